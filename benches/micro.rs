//! Micro-benchmarks of the hot pure functions: classifying an answer, mapping it to events,
//! and serialising a callback body. `cargo bench --bench micro`.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use sunopoll::api::classify;
use sunopoll::api::families::music::{Music, Outcome, callback_body, map_record};
use sunopoll::events::Stage;

fn fixture(name: &str) -> Vec<u8> {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn benches(c: &mut Criterion) {
    let success = fixture("record-info.SUCCESS.json");
    let pending = fixture("record-info.PENDING.json");
    let throttled = fixture("error.430.call-frequency-too-high.json");
    c.bench_function("classify SUCCESS (2 tracks)", |b| {
        b.iter(|| classify(&Music, black_box(200), None, black_box(&success)))
    });
    c.bench_function("classify PENDING", |b| {
        b.iter(|| classify(&Music, black_box(200), None, black_box(&pending)))
    });
    c.bench_function("classify 430 envelope", |b| {
        b.iter(|| classify(&Music, black_box(200), None, black_box(&throttled)))
    });
    let Outcome::Progress(record) = classify(&Music, 200, None, &success) else {
        panic!("fixture")
    };
    c.bench_function("map_record PENDING→SUCCESS (3 events)", |b| {
        b.iter(|| {
            map_record(
                black_box("a3f9c2e17b4d4e8f9c0b5d6e7f8a9b10"),
                None,
                black_box(&record),
                true,
            )
        })
    });
    c.bench_function("map_record FIRST→SUCCESS (1 event)", |b| {
        b.iter(|| {
            map_record(
                black_box("a3f9c2e17b4d4e8f9c0b5d6e7f8a9b10"),
                Some(Stage::First),
                black_box(&record),
                true,
            )
        })
    });
    let tracks: Vec<_> = record.tracks.iter().collect();
    c.bench_function("callback_body complete (2 tracks)", |b| {
        b.iter(|| {
            callback_body(
                black_box("a3f9c2e17b4d4e8f9c0b5d6e7f8a9b10"),
                Stage::Complete,
                200,
                "All generated successfully.",
                black_box(&tracks),
            )
        })
    });
}

criterion_group!(micro, benches);
criterion_main!(micro);
