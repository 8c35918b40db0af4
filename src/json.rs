//! JSON numbers as they were written (`design.md` invariant 11: a number the API sent reaches
//! the handler with its spelling). serde_json is built with `arbitrary_precision`, so a number
//! in a parsed [`Value`] is the token it was read from — `0.18229166666666666` (not the
//! `0.18229166666666663` its default float parser makes of it), `1.50`, `0.0`, `-0`, integers
//! past 2^53 and past 2^64 — and it is written back as that token. Where a number must become
//! an `f64` it is rounded correctly (`float_roundtrip`), and sunopoll's own numbers are written
//! shortest-round-trip, as before.
//!
//! One spelling is serde_json's, not the sender's: an exponent is written `e` with its sign
//! (`1E5` and `1e5` both become `1e+5`, `2.5E-3` becomes `2.5e-3`); the digits, and so the
//! value in every reader, are kept. serde_json's reader normalises the exponent before any
//! caller sees the token, and it offers no public way to build a number from a token as given.
//!
//! What `arbitrary_precision` changes for readers is handled here once: a number no `f64`
//! holds (`1e400`) now parses instead of failing, and a [`Value`] read into a typed struct
//! reports a bad number only as "invalid number".

use serde::de::DeserializeOwned;
use serde_json::{Number, Value};

/// True when `n` is a number every JSON reader can take: within `f64`'s range. `1e400` and a
/// 400-digit integer are not (serde_json's default reader refuses the whole document, so a
/// handler would lose the callback); an integer past 2^64 is (it reads as a float).
pub fn fits_f64(n: &Number) -> bool {
    let token = n.as_str();
    // Only an exponent or more than 308 digits can overflow; the rest need no parse.
    let may_overflow = token.len() > 308 || token.bytes().any(|b| b == b'e' || b == b'E');
    !may_overflow || n.as_f64().is_some()
}

/// Replaces every number in `v` that no `f64` holds ([`fits_f64`]) by `null`, so one such value
/// reads as absent instead of costing the whole answer. Returns how many were replaced.
pub fn null_unrepresentable(v: &mut Value) -> usize {
    match v {
        Value::Number(n) if !fits_f64(n) => {
            *v = Value::Null;
            1
        }
        Value::Array(items) => items.iter_mut().map(null_unrepresentable).sum(),
        Value::Object(map) => map.values_mut().map(null_unrepresentable).sum(),
        _ => 0,
    }
}

/// The first number in `v` that no `f64` holds, if any (for refusing a request that has one).
pub fn first_unrepresentable(v: &Value) -> Option<&Number> {
    match v {
        Value::Number(n) if !fits_f64(n) => Some(n),
        Value::Array(items) => items.iter().find_map(first_unrepresentable),
        Value::Object(map) => map.values().find_map(first_unrepresentable),
        _ => None,
    }
}

/// Reads a `T` from `v` with serde_json's full message on a bad value ("invalid value: integer
/// `-1`, expected u32"). `serde_json::from_value` says only "invalid number" for any number
/// that does not fit under `arbitrary_precision`, so `v` is written out (its tokens unchanged)
/// and read as text; the position in that text, which the sender never wrote, is left out.
pub fn typed<T: DeserializeOwned>(v: &Value) -> Result<T, String> {
    let text = v.to_string();
    serde_json::from_str(&text).map_err(|e| {
        let message = e.to_string();
        let position = format!(" at line {} column {}", e.line(), e.column());
        match message.strip_suffix(&position) {
            Some(bare) => bare.to_owned(),
            None => message,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Value {
        serde_json::from_str(text).expect("json")
    }

    #[test]
    fn a_parsed_number_is_written_back_as_its_token() {
        for token in [
            "0.18229166666666666",
            "0.19270833333333334",
            "0.10000000000000001",
            "2.2250738585072011e-308",
            "5e-324",
            "4.9406564584124654e-324",
            "1e-400",
            "1.50",
            "0.0",
            "-0",
            "-0.0",
            "9007199254740993",
            "18446744073709551616",
            "-9223372036854775809",
            "123456789012345678901234567890",
            "1e+21",
            "1.5e-7",
        ] {
            let text = format!(r#"{{"n":{token},"a":[{token}]}}"#);
            assert_eq!(parse(&text).to_string(), text, "{token}");
        }
        // The one change: the exponent's letter and sign, never its digits.
        assert_eq!(
            parse("[1E5,1e5,2.5E-3,1E+05]").to_string(),
            "[1e+5,1e+5,2.5e-3,1e+05]"
        );
    }

    #[test]
    fn a_number_becomes_the_nearest_f64() {
        assert_eq!(
            parse("0.18229166666666666").as_f64(),
            Some(0.182_291_666_666_666_66)
        );
        let typed: f64 = serde_json::from_str("0.18229166666666666").expect("f64");
        assert_eq!(typed.to_string(), "0.18229166666666666");
        let typed: f64 = serde_json::from_str("2.2250738585072011e-308").expect("f64");
        // The largest subnormal; serde_json's default reader says `f64::MIN_POSITIVE`.
        assert_eq!(typed, f64::from_bits(0x000f_ffff_ffff_ffff));
    }

    #[test]
    fn only_numbers_past_f64_are_unrepresentable() {
        let mut v = parse(
            r#"{"a":1e400,"b":"1e400","c":[-2E+999,3,1e308],"d":123456789012345678901234567890}"#,
        );
        assert_eq!(
            first_unrepresentable(&v).map(Number::to_string).as_deref(),
            Some("1e+400")
        );
        assert_eq!(null_unrepresentable(&mut v), 2);
        assert_eq!(
            v.to_string(),
            r#"{"a":null,"b":"1e400","c":[null,3,1e+308],"d":123456789012345678901234567890}"#
        );
        assert_eq!(first_unrepresentable(&v), None);
        let digits = format!("[{}]", "9".repeat(400));
        assert!(first_unrepresentable(&parse(&digits)).is_some());
        assert!(first_unrepresentable(&parse(&format!("[{}]", "9".repeat(308)))).is_none());
    }

    #[test]
    fn a_typed_read_says_what_was_wrong_with_a_number() {
        #[derive(Debug, serde::Deserialize)]
        #[allow(dead_code)]
        struct Req {
            limit: Option<u32>,
            since: Option<i64>,
        }
        for (text, want) in [
            (
                r#"{"limit":-1}"#,
                "invalid value: integer `-1`, expected u32",
            ),
            (
                r#"{"limit":5.0}"#,
                "invalid type: floating point `5.0`, expected u32",
            ),
            (
                r#"{"since":99999999999999999999}"#,
                "invalid type: floating point `1e+20`, expected i64",
            ),
            (
                r#"{"limit":"x"}"#,
                "invalid type: string \"x\", expected u32",
            ),
        ] {
            let err = typed::<Req>(&parse(text)).expect_err(text);
            assert_eq!(err, want, "{text}");
        }
        let ok: Req = typed(&parse(r#"{"limit":7,"since":-3}"#)).expect("fits");
        assert_eq!((ok.limit, ok.since), (Some(7), Some(-3)));
    }
}
