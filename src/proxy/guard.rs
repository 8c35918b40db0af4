//! Who may use the stand-in: the loopback checks every HTTP face shares ([`crate::http::guard`]:
//! `Host` against DNS rebinding, cross-site browser requests), and the key check of its own:
//! the application's `Authorization` must be a configured account's key or a local token.
//! Pure.

use hyper::Request;
use hyper::header::{AUTHORIZATION, HeaderMap};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::http::Refusal;

/// The shared loopback checks: a foreign `Host` (DNS rebinding) or a cross-site browser
/// request is refused before anything else is looked at.
pub fn check_request<B>(req: &Request<B>) -> Result<(), Refusal> {
    crate::http::guard::check_host(req)?;
    crate::http::guard::check_cross_site(req)
}

/// The credential in an `Authorization: Bearer …` header (the scheme in any case), if there
/// is exactly one such header.
pub fn bearer(headers: &HeaderMap) -> Option<&[u8]> {
    let mut all = headers.get_all(AUTHORIZATION).iter();
    let value = all.next()?;
    if all.next().is_some() {
        return None;
    }
    let v = value.as_bytes();
    let (scheme, rest) = v.split_at(v.iter().position(|b| *b == b' ')?);
    if !scheme.eq_ignore_ascii_case(b"bearer") {
        return None;
    }
    let token = rest.trim_ascii();
    (!token.is_empty()).then_some(token)
}

/// Which account `presented` stands for: the account of the first local token it equals,
/// else the first account whose key it equals (`keys[i]` is account `i`'s key, `None` when it
/// cannot be read). Every candidate is compared, in constant time over digests of equal
/// length, so neither the answer's timing nor its length says how close a guess was.
pub fn account_for<'a>(
    presented: &[u8],
    tokens: impl IntoIterator<Item = (&'a str, usize)>,
    keys: impl IntoIterator<Item = Option<&'a str>>,
) -> Option<usize> {
    let wanted = Sha256::digest(presented);
    let mut found: Option<usize> = None;
    let candidates = tokens
        .into_iter()
        .map(|(t, i)| (Some(t), i))
        .chain(keys.into_iter().enumerate().map(|(i, k)| (k, i)));
    for (secret, account) in candidates {
        let Some(secret) = secret else { continue };
        let digest = Sha256::digest(secret.as_bytes());
        let same: bool = digest.as_slice().ct_eq(wanted.as_slice()).into();
        if same && found.is_none() {
            found = Some(account);
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::HeaderValue;

    fn headers(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(AUTHORIZATION, HeaderValue::from_str(v).expect("value"));
        }
        h
    }

    #[test]
    fn the_bearer_credential_is_read_from_one_header_only() {
        assert_eq!(bearer(&headers(&["Bearer sk-1"])), Some(&b"sk-1"[..]));
        assert_eq!(bearer(&headers(&["bearer  sk-1 "])), Some(&b"sk-1"[..]));
        assert_eq!(bearer(&headers(&["Basic sk-1"])), None);
        assert_eq!(bearer(&headers(&["Bearer"])), None);
        assert_eq!(bearer(&headers(&["Bearer "])), None);
        assert_eq!(bearer(&headers(&["Bearer a", "Bearer b"])), None);
        assert_eq!(bearer(&headers(&[])), None);
    }

    #[test]
    fn a_token_or_an_account_key_names_its_account_and_nothing_else_does() {
        let tokens = [("local-token-aaaaaaaa", 1), ("local-token-bbbbbbbb", 0)];
        let keys = [Some("sk-first"), None, Some("sk-third")];
        let who = |p: &str| account_for(p.as_bytes(), tokens, keys);
        assert_eq!(who("local-token-aaaaaaaa"), Some(1));
        assert_eq!(who("local-token-bbbbbbbb"), Some(0));
        assert_eq!(who("sk-first"), Some(0));
        assert_eq!(who("sk-third"), Some(2));
        assert_eq!(who("sk-thir"), None);
        assert_eq!(who("sk-third "), None);
        assert_eq!(who(""), None);
        // A token that happens to equal a key: the token's account wins.
        assert_eq!(account_for(b"sk-third", [("sk-third", 0)], keys), Some(0));
    }
}
