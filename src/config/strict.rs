//! Strict reading of a TOML tree into `#[derive(Deserialize)]` types, with every problem at once.
//!
//! serde stops at the first error. To name them all, the tree is deserialized again after each
//! error with the offending value taken out (`serde_path_to_error` says where it is; the key then
//! takes its default), until a pass goes through. Unknown keys are collected on that last pass by
//! `serde_ignored`, each with its full path, a "did you mean" and the keys its table knows. Array
//! elements taken out are remembered, so later problems in the same array keep the index as
//! written.

use serde::de::{self, DeserializeOwned, Deserializer, Visitor};
use toml::Value;

use super::de::show;

/// One problem: the key path it is about, and what is wrong.
pub(super) type Problem = (String, String);

/// The keys of the table at a path (given by its keys, array indices left out).
pub(super) type KnownKeys = fn(&[&str]) -> &'static [&'static str];

/// One step of a key path.
#[derive(Debug, Clone, PartialEq)]
enum Step {
    Key(String),
    Index(usize),
}

/// Deserializes `root` as `T`, returning every unknown key and every bad value. `T` is `None`
/// only if a problem could not be taken out of the tree (the problems then say what it was).
pub(super) fn deserialize<T: DeserializeOwned>(
    mut root: Value,
    known: KnownKeys,
) -> (Option<T>, Vec<Problem>) {
    let mut problems = sections_are_tables(&mut root, known);
    // Array elements taken out so far: (the array's path as written, the element's index).
    let mut taken: Vec<(Vec<Step>, usize)> = Vec::new();
    loop {
        let mut unknown = Vec::new();
        let mut note = |path: serde_ignored::Path| unknown.push(steps(&path));
        let ignoring = serde_ignored::Deserializer::new(root.clone(), &mut note);
        let error = match serde_path_to_error::deserialize::<_, T>(ignoring) {
            Ok(t) => {
                let unknown = unknown
                    .iter()
                    .map(|p| unknown_key(&as_written(p, &taken), known));
                problems.splice(0..0, unknown);
                return (Some(t), problems);
            }
            Err(e) => e,
        };
        let path: Option<Vec<Step>> = error
            .path()
            .iter()
            .map(|seg| match seg {
                serde_path_to_error::Segment::Map { key } => Some(Step::Key(key.clone())),
                serde_path_to_error::Segment::Seq { index } => Some(Step::Index(*index)),
                _ => None,
            })
            .collect();
        // `message`, not `to_string`: toml appends its own key path, without array indices.
        let what = error.inner().message().trim().to_owned();
        let Some((path, found)) = path.and_then(|p| take(&mut root, &p).map(|v| (p, v))) else {
            problems.push((error.path().to_string(), what));
            return (None, problems);
        };
        let written = as_written(&path, &taken);
        problems.push((display(&written), reword(&what, &found)));
        if let Some((Step::Index(i), array)) = written.split_last() {
            taken.push((array.to_vec(), *i));
        }
    }
}

/// Takes out top-level keys that should be tables but are not: serde would read a struct from an
/// array too, so `[[api]]` would otherwise pass for `[api]`.
fn sections_are_tables(root: &mut Value, known: KnownKeys) -> Vec<Problem> {
    let Value::Table(root) = root else {
        return Vec::new();
    };
    let mut problems = Vec::new();
    for name in known(&[]) {
        if let Some(v) = root.get(*name).filter(|v| !v.is_table()) {
            problems.push((
                name.to_string(),
                format!("expected a [{name}] table, got {}", show(v)),
            ));
            root.remove(*name);
        }
    }
    problems
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

fn steps(path: &serde_ignored::Path) -> Vec<Step> {
    use serde_ignored::Path;
    match path {
        Path::Root => Vec::new(),
        Path::Seq { parent, index } => [steps(parent), vec![Step::Index(*index)]].concat(),
        Path::Map { parent, key } => [steps(parent), vec![Step::Key(key.clone())]].concat(),
        Path::Some { parent }
        | Path::NewtypeStruct { parent }
        | Path::NewtypeVariant { parent } => steps(parent),
    }
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

fn unknown_key(path: &[Step], known: KnownKeys) -> Problem {
    let Some((Step::Key(key), parent)) = path.split_last() else {
        return (display(path), "unknown key".to_owned());
    };
    let tables: Vec<&str> = parent
        .iter()
        .filter_map(|s| match s {
            Step::Key(k) => Some(k.as_str()),
            Step::Index(_) => None,
        })
        .collect();
    let known = known(&tables);
    let hint = closest(key, known)
        .map(|k| format!(" (did you mean `{k}`?)"))
        .unwrap_or_default();
    if parent.is_empty() {
        let what = format!(
            "unknown section{hint}; known sections: {}",
            known.join(", ")
        );
        (format!("[{key}]"), what)
    } else {
        let what = format!("unknown key{hint}; known keys: {}", known.join(", "));
        (display(path), what)
    }
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

/// The keys a derived struct knows, as its `Deserialize` impl announces them to a deserializer
/// (so the list is never written twice).
pub(super) fn fields<T: DeserializeOwned>() -> &'static [&'static str] {
    struct Probe<'a>(&'a mut &'static [&'static str]);

    impl<'de> Deserializer<'de> for Probe<'_> {
        type Error = de::value::Error;

        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
            Err(de::Error::custom("not a struct"))
        }

        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Self::Error> {
            *self.0 = fields;
            Err(de::Error::custom("probed"))
        }

        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
            option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
            ignored_any
        }
    }

    let mut fields: &'static [&'static str] = &[];
    // The probe always fails: it only wants the field list the struct hands it.
    let _ = T::deserialize(Probe(&mut fields));
    fields
}
