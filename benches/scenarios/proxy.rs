//! The API stand-in (`[proxy]`): what it adds to one submission's round trip against the fake
//! API called directly, in the same run, with the durable commit of the tracked task included
//! (and a passed-through call, which commits nothing, beside it); and its memory under 100
//! concurrent submissions.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use crate::fake::{Fake, Mode};
use crate::proc::{Daemon, Setup};
use crate::{Results, mib, percentile};

/// Round trips per series.
const ROUNDS: usize = 2000;
/// Round trips per series before measuring (connections, caches, the store's pages).
const WARMUP: usize = 100;
/// Clients submitting at once for the memory figure, and submissions each.
const CONCURRENT: usize = 100;
const EACH: usize = 10;

/// One keep-alive HTTP/1.1 connection, as an application's HTTP client keeps it.
struct Client {
    host: String,
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Client {
    fn open(base: &str) -> Client {
        let host = base.trim_start_matches("http://").to_owned();
        let stream = TcpStream::connect(&host).expect("connect");
        stream.set_nodelay(true).expect("nodelay");
        Client {
            host,
            reader: BufReader::new(stream.try_clone().expect("clone")),
            writer: stream,
        }
    }

    /// One POST; returns the status and the body.
    fn post(&mut self, path: &str, body: &str) -> (u16, Vec<u8>) {
        let request = format!(
            "POST {path} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer bench-key\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            self.host,
            body.len()
        );
        self.writer.write_all(request.as_bytes()).expect("send");
        let mut status = 0;
        let mut length = 0;
        let mut line = String::new();
        loop {
            line.clear();
            self.reader.read_line(&mut line).expect("read the head");
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some(rest) = l.strip_prefix("HTTP/1.1 ") {
                status = rest[..3].parse().expect("status");
            } else if let Some((k, v)) = l.split_once(':')
                && k.eq_ignore_ascii_case("content-length")
            {
                length = v.trim().parse().expect("length");
            }
        }
        let mut out = vec![0; length];
        self.reader.read_exact(&mut out).expect("read the body");
        (status, out)
    }
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

/// `sunopoll_store_commit_duration_seconds` (sum, count) from the daemon's own metrics.
fn commits(metrics_port: u16) -> (f64, f64) {
    let mut s = TcpStream::connect(("127.0.0.1", metrics_port)).expect("metrics");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .expect("send");
    let mut text = String::new();
    s.read_to_string(&mut text).expect("read");
    let value = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (
        value("sunopoll_store_commit_duration_seconds_sum"),
        value("sunopoll_store_commit_duration_seconds_count"),
    )
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The `proxy` scenario.
pub fn proxy(rt: &tokio::runtime::Runtime, dir: &Path, results: &mut Results) {
    let api = rt.block_on(Fake::start(Mode::Pending));
    let (port, metrics_port) = (free_port(), free_port());
    // Polls far apart (each tracked task is polled once, soon after its add), no rate limit
    // (the account's budget would otherwise hold submissions to 2/s), room for 100 clients.
    let d = Daemon::start(&Setup {
        api: &api.url,
        dir,
        poll: "interval = \"10m\"\nmax-in-flight = 8\nmax-requests-per-second = \"unlimited\"",
        extra: &format!(
            "[proxy]\nlisten = \"127.0.0.1:{port}\"\nmax-connections = 128\n[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n"
        ),
    });
    let base = format!("http://127.0.0.1:{port}");
    let body = r#"{"prompt":"a calm piano","customMode":false,"model":"V4_5ALL","callBackUrl":"https://example.com/suno-callback"}"#;
    let mut direct = Client::open(&api.url);
    let mut through = Client::open(&base);
    let (mut t_direct, mut t_tracked, mut t_passed) = (Vec::new(), Vec::new(), Vec::new());
    let timed = |c: &mut Client, path: &str, into: &mut Vec<f64>, keep: bool| {
        let t = Instant::now();
        let (status, _) = c.post(path, body);
        let took = ms(t.elapsed());
        assert_eq!(status, 200, "{path}");
        if keep {
            into.push(took);
        }
    };
    let mut before = (0.0, 0.0);
    for i in 0..WARMUP + ROUNDS {
        let keep = i >= WARMUP;
        if i == WARMUP {
            before = commits(metrics_port);
        }
        // Interleaved, so the three series share the machine's ups and downs.
        timed(&mut direct, "/api/v1/generate", &mut t_direct, keep);
        timed(&mut through, "/api/v1/generate", &mut t_tracked, keep);
        timed(
            &mut through,
            "/api/v1/generate/generate-persona",
            &mut t_passed,
            keep,
        );
    }
    let after = commits(metrics_port);
    let tracked = d.request(r#"{"cmd":"status"}"#);
    assert!(
        tracked["proxy"]["tracked"].as_u64().unwrap_or(0) >= (WARMUP + ROUNDS) as u64,
        "{tracked}"
    );
    for v in [&mut t_direct, &mut t_tracked, &mut t_passed] {
        v.sort_by(f64::total_cmp);
    }
    let (d50, d99) = (percentile(&t_direct, 0.5), percentile(&t_direct, 0.99));
    let (s50, s99) = (percentile(&t_tracked, 0.5), percentile(&t_tracked, 0.99));
    let (p50, p99) = (percentile(&t_passed, 0.5), percentile(&t_passed, 0.99));
    let commit_ms = (after.0 - before.0) / (after.1 - before.1).max(1.0) * 1000.0;
    results.add(
        "proxy",
        &format!("added per tracked submission, p50 (ms; {ROUNDS} each, commit included)"),
        "≤ 2",
        format!("{:.2}", s50 - d50),
        Some(s50 - d50 <= 2.0),
    );
    results.add(
        "proxy",
        "added per tracked submission, p99 (ms)",
        "(info)",
        format!("{:.2}", s99 - d99),
        None,
    );
    results.add(
        "proxy",
        "round trip: direct / tracked / passed through, p50 (ms)",
        "(info)",
        format!("{d50:.2} / {s50:.2} / {p50:.2}"),
        None,
    );
    results.add(
        "proxy",
        "round trip: direct / tracked / passed through, p99 (ms)",
        "(info)",
        format!("{d99:.2} / {s99:.2} / {p99:.2}"),
        None,
    );
    results.add(
        "proxy",
        "the durable commit: mean store commit during the run (ms)",
        "(info)",
        format!("{commit_ms:.2} ({:.0} commits)", after.1 - before.1),
        None,
    );

    // Memory with 100 applications submitting at once.
    let (rss_before, _) = d.rss_kib();
    let start = Arc::new(Barrier::new(CONCURRENT));
    let began = Instant::now();
    let clients: Vec<_> = (0..CONCURRENT)
        .map(|_| {
            let (start, base) = (Arc::clone(&start), base.clone());
            std::thread::spawn(move || {
                let mut c = Client::open(&base);
                start.wait();
                (0..EACH)
                    .filter(|_| c.post("/api/v1/generate", body).0 == 200)
                    .count()
            })
        })
        .collect();
    let ok: usize = clients.into_iter().map(|c| c.join().expect("client")).sum();
    let took = began.elapsed();
    let (rss_after, peak) = d.rss_kib();
    d.stop();
    assert_eq!(
        ok,
        CONCURRENT * EACH,
        "every concurrent submission answered 200"
    );
    results.add(
        "proxy",
        &format!(
            "peak RSS, {CONCURRENT} clients submitting at once ({} submissions)",
            CONCURRENT * EACH
        ),
        "(info)",
        format!(
            "{} (before {}, after {})",
            mib(peak),
            mib(rss_before),
            mib(rss_after)
        ),
        None,
    );
    results.add(
        "proxy",
        &format!("tracked submissions/s with {CONCURRENT} clients"),
        "(info)",
        format!("{:.0}", (CONCURRENT * EACH) as f64 / took.as_secs_f64()),
        None,
    );
}
