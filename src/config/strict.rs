//! Strict reading of the config file's TOML tree into `#[derive(Deserialize)]` types with
//! `deny_unknown_fields`, every problem reported at once.
//!
//! serde stops at the first error. To name them all, the tree is deserialized again after each
//! error with the offending value taken out (`serde_path_to_error` says where it is; the key then
//! takes its default), until a pass goes through. An unknown key is such an error too, named
//! with its full path, a "did you mean" and the keys its table knows (serde's message lists
//! them). Array elements taken out are remembered, so later problems in the same array keep the
//! index as written.

use serde::de::DeserializeOwned;
use toml::Value;

use super::de::show;

/// One problem: the key path it is about, and what is wrong.
pub(super) type Problem = (String, String);

/// One step of a key path.
#[derive(Debug, Clone, PartialEq)]
enum Step {
    Key(String),
    Index(usize),
}

/// Deserializes `root` as `T`, returning every unknown key and every bad value. `T` is `None`
/// only if a problem could not be taken out of the tree (the problems then say what it was).
pub(super) fn deserialize<T: DeserializeOwned>(mut root: Value) -> (Option<T>, Vec<Problem>) {
    let mut problems = Vec::new();
    // Array elements taken out so far: (the array's path as written, the element's index).
    let mut taken: Vec<(Vec<Step>, usize)> = Vec::new();
    loop {
        let error = match serde_path_to_error::deserialize::<_, T>(root.clone()) {
            Ok(t) => return (Some(t), problems),
            Err(e) => e,
        };
        // `message`, not `to_string`: toml appends its own key path, without array indices.
        let what = error.inner().message().trim().to_owned();
        let path: Option<Vec<Step>> = error
            .path()
            .iter()
            .map(|seg| match seg {
                serde_path_to_error::Segment::Map { key } => Some(Step::Key(key.clone())),
                serde_path_to_error::Segment::Seq { index } => Some(Step::Index(*index)),
                _ => None,
            })
            .collect();
        let Some(mut path) = path.filter(|p| !p.is_empty()) else {
            problems.push((error.path().to_string(), what));
            return (None, problems);
        };
        // Every top-level key is a section. When one is not a table (`api = 5`, or `[[api]]`,
        // which serde would read as a struct too), the section itself is the problem.
        let unknown = what.strip_prefix("unknown field `");
        if unknown.is_none() && (path.len() == 1 || matches!(path[1], Step::Index(_))) {
            path.truncate(1);
        }
        let Some(found) = take(&mut root, &path) else {
            problems.push((error.path().to_string(), what));
            return (None, problems);
        };
        let written = as_written(&path, &taken);
        problems.push(match (unknown, written.as_slice()) {
            (Some(rest), _) => unknown_key(&written, rest),
            (None, [Step::Key(section)]) => {
                let what = format!("expected a [{section}] table, got {}", show(&found));
                (section.clone(), what)
            }
            (None, _) => (display(&written), reword(&what, &found)),
        });
        if let Some((Step::Index(i), array)) = written.split_last() {
            taken.push((array.to_vec(), *i));
        }
    }
}

/// `rest` is serde's message after "unknown field `": the key, then the keys its table knows
/// ("`, expected `a`", "… `a` or `b`", "… one of `a`, `b`, `c`").
fn unknown_key(path: &[Step], rest: &str) -> Problem {
    let key = match path.last() {
        Some(Step::Key(k)) => k.as_str(),
        _ => "",
    };
    let expected = rest.strip_prefix(key).unwrap_or(rest);
    let known: Vec<&str> = expected.split('`').skip(2).step_by(2).collect();
    let hint = closest(key, &known)
        .map(|k| format!(" (did you mean `{k}`?)"))
        .unwrap_or_default();
    let known = known.join(", ");
    match path {
        [_] => (
            format!("[{key}]"),
            format!("unknown section{hint}; known sections: {known}"),
        ),
        _ => (
            display(path),
            format!("unknown key{hint}; known keys: {known}"),
        ),
    }
}

/// serde's "invalid type: integer `5`, expected a string" as "expected a string, got the
/// integer 5", the way the value formats in [`super::de`] say it.
fn reword(what: &str, found: &Value) -> String {
    ["invalid type: ", "invalid value: "]
        .iter()
        .find_map(|prefix| what.strip_prefix(prefix)?.split_once(", expected "))
        .map_or_else(
            || what.to_owned(),
            |(_, expected)| {
                let expected = expected.replace("a sequence", "a list");
                format!("expected {expected}, got {}", show(found))
            },
        )
}

/// Takes the value at `path` out of the tree.
fn take(root: &mut Value, path: &[Step]) -> Option<Value> {
    let (last, parents) = path.split_last()?;
    let mut node = root;
    for step in parents {
        node = match (step, node) {
            (Step::Key(k), Value::Table(t)) => t.get_mut(k)?,
            (Step::Index(i), Value::Array(a)) => a.get_mut(*i)?,
            _ => return None,
        };
    }
    match (last, node) {
        (Step::Key(k), Value::Table(t)) => t.remove(k),
        (Step::Index(i), Value::Array(a)) if *i < a.len() => Some(a.remove(*i)),
        _ => None,
    }
}

/// A path in the tree as it is now, with indices as they were in the file.
fn as_written(path: &[Step], taken: &[(Vec<Step>, usize)]) -> Vec<Step> {
    let mut out = Vec::with_capacity(path.len());
    for step in path {
        let step = match step {
            Step::Index(now) => {
                let mut gone: Vec<usize> = taken
                    .iter()
                    .filter(|(array, _)| *array == out)
                    .map(|(_, i)| *i)
                    .collect();
                gone.sort_unstable();
                Step::Index(
                    gone.into_iter()
                        .fold(*now, |i, g| if g <= i { i + 1 } else { i }),
                )
            }
            key => key.clone(),
        };
        out.push(step);
    }
    out
}

/// `forward.target[0].url`.
fn display(path: &[Step]) -> String {
    let mut s = String::new();
    for step in path {
        match step {
            Step::Key(k) if s.is_empty() => s.push_str(k),
            Step::Key(k) => s.push_str(&format!(".{k}")),
            Step::Index(i) => s.push_str(&format!("[{i}]")),
        }
    }
    s
}

/// The known key closest to a misspelt one, if any is close.
fn closest<'a>(key: &str, known: &[&'a str]) -> Option<&'a str> {
    known
        .iter()
        .map(|k| (edit_distance(key, k), *k))
        .filter(|(d, k)| *d <= 2.max(k.len() / 4))
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur.push((prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}
