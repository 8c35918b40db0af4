//! The rooms of `src/` and their arrows (ARCHITECTURE.md, "Arrows point down"): every
//! `crate::ROOM` path in a room's code names a room strictly below it, so no import runs back
//! up and no two rooms form a circle. A new room fails here until it is given its place.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// The rooms from the top down; a room may name only rooms on a later line.
const ORDER: &[&[&str]] = &[
    &["cli"],
    &["client", "daemon"],
    &["proxy", "web"],
    &["control", "housekeeping"],
    &["protocol"],
    &["jobs"],
    &["forward", "archive", "metrics", "systemd"],
    &["config"],
    &["api"],
    &["store"],
    &["events", "json", "logging", "http", "tls", "testing"],
    &["clock"],
];

fn rank(room: &str) -> Option<usize> {
    ORDER.iter().position(|line| line.contains(&room))
}

/// Every `.rs` file of a room: `src/ROOM.rs` or everything under `src/ROOM/`.
fn files(path: &Path, out: &mut Vec<PathBuf>) {
    if path.is_dir() {
        for entry in std::fs::read_dir(path).expect("read a room's directory") {
            files(&entry.expect("a directory entry").path(), out);
        }
    } else if path.extension().is_some_and(|e| e == "rs") {
        out.push(path.to_owned());
    }
}

/// The line without its comment: whole comment lines (`//`, `///`, `//!`) and a trailing
/// ` // …` say what code means, and may name any room.
fn code_of(line: &str) -> &str {
    if line.trim_start().starts_with("//") {
        return "";
    }
    line.find(" // ").map_or(line, |i| &line[..i])
}

/// The rooms `code` names, each with the byte offset of its `crate::`: `crate::ROOM…`, and each
/// top-level name of a group `crate::{ROOM…, ROOM::{…}, …}` (over several lines too).
fn named(code: &str) -> Vec<(usize, String)> {
    let ident = |s: &str| -> String {
        s.trim_start()
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    let mut rooms = Vec::new();
    for (at, _) in code.match_indices("crate::") {
        // `other_crate::…` is another crate's path; `$crate::` (in a macro) is ours.
        let before = code[..at].chars().next_back();
        if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            continue;
        }
        let rest = &code[at + "crate::".len()..];
        let Some(group) = rest.strip_prefix('{') else {
            rooms.push((at, ident(rest)));
            continue;
        };
        // The group's top-level items: split at commas outside nested braces.
        let (mut depth, mut item_start) = (0usize, 0);
        for (i, c) in group.char_indices() {
            match c {
                '{' => depth += 1,
                '}' if depth == 0 => {
                    rooms.push((at, ident(&group[item_start..i])));
                    break;
                }
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    rooms.push((at, ident(&group[item_start..i])));
                    item_start = i + 1;
                }
                _ => {}
            }
        }
    }
    rooms.retain(|(_, r)| !r.is_empty());
    rooms
}

/// The rooms one line of code names.
fn rooms_in(code: &str) -> BTreeSet<String> {
    named(code).into_iter().map(|(_, r)| r).collect()
}

#[test]
fn every_import_points_down() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut rooms = Vec::new();
    for entry in std::fs::read_dir(&src).expect("read src/") {
        let path = entry.expect("a directory entry").path();
        let name = path.file_stem().and_then(|s| s.to_str()).unwrap_or("");
        let source = path.is_dir() || path.extension().is_some_and(|e| e == "rs");
        if source && name != "lib" && name != "main" {
            rooms.push((name.to_owned(), path.clone()));
        }
    }
    assert!(rooms.len() > 10, "src/ holds the rooms: {rooms:?}");
    let unplaced: Vec<&str> = rooms
        .iter()
        .map(|(r, _)| r.as_str())
        .filter(|r| rank(r).is_none())
        .collect();
    assert!(
        unplaced.is_empty(),
        "rooms without a place in ORDER here and in ARCHITECTURE.md's arrows: {unplaced:?}"
    );

    let mut upward = Vec::new();
    for (room, path) in &rooms {
        let own = rank(room).expect("placed");
        let mut sources = Vec::new();
        files(path, &mut sources);
        for file in sources {
            let text = std::fs::read_to_string(&file).expect("read a source file");
            let code: Vec<&str> = text.lines().map(code_of).collect();
            let code = code.join("\n");
            for (at, other) in named(&code) {
                // A name that is no room (`crate::VERSION`) is the crate root's, above none.
                if other != *room && rank(&other).is_some_and(|r| r <= own) {
                    let line = code[..at].matches('\n').count() + 1;
                    let shown = file.strip_prefix(&src).unwrap_or(&file).display();
                    upward.push(format!("{room} -> {other}: src/{shown}:{line}"));
                }
            }
        }
    }
    assert!(
        upward.is_empty(),
        "imports that run up or sideways (move the name to the lower room):\n{}",
        upward.join("\n")
    );
}

#[test]
fn the_reader_finds_paths_and_groups_and_skips_comments() {
    let set = |names: &[&str]| names.iter().map(|n| n.to_string()).collect::<BTreeSet<_>>();
    assert_eq!(
        rooms_in("use crate::store::{Kind, Store};"),
        set(&["store"])
    );
    assert_eq!(
        rooms_in("use crate::{\n    config::{Config, Env},\n    events::Stage,\n};"),
        set(&["config", "events"])
    );
    assert_eq!(
        rooms_in("let k = crate::api::families::Kind::Music; crate::tls::install();"),
        set(&["api", "tls"])
    );
    assert!(rooms_in("use tokio_crate::store::X;").is_empty());
    assert!(rooms_in(code_of("    /// see [`crate::daemon::Daemon`]")).is_empty());
    assert!(rooms_in(code_of("let x = 1; // crate::daemon holds it")).is_empty());
    assert_eq!(
        code_of(r#"let u = "http://h/x";"#),
        r#"let u = "http://h/x";"#
    );
}
