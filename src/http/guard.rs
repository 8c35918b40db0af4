//! The loopback checks every HTTP face shares, as pure functions of an address or a request.
//!
//! A TCP port on loopback is not private the way the control socket is: every local user can
//! connect to it, and every web page the operator visits can make the browser send requests to
//! `127.0.0.1`. So:
//!
//! - [`check_listen`]: a face listens on loopback unless the operator wrote `allow-remote`.
//! - [`check_host`]: the `Host` must be a loopback name or address. A page on `evil.example`
//!   whose name the attacker re-points at 127.0.0.1 (DNS rebinding) is same-origin with itself
//!   and can read the answers, but its requests still say `Host: evil.example`.
//! - [`check_cross_site`]: what a browser marks as cross-site (`Sec-Fetch-Site`), or sends with
//!   an `Origin` that is not loopback, is refused. Clients that are not browsers send neither.
//! - [`check_same_origin`]: a request that changes something (the web page's POSTs) must come
//!   from the page itself; another page on another loopback port is "same-site", not
//!   same-origin, so it does not pass.
//!
//! Loopback names are `localhost` and names ending in `.localhost` (RFC 6761; browsers resolve
//! them to loopback themselves, never through DNS); loopback addresses are 127.0.0.0/8, `::1` and
//! `::ffff:127.0.0.0/104`. Anything else is refused, spelling tricks included: `127.1`,
//! `0x7f.0.0.1`, `2130706433` and `localhost.` are names here, and not loopback ones.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use hyper::header::{self, HeaderMap, HeaderName};
use hyper::{Request, StatusCode, Version};

use super::Refusal;

/// The header browsers set to say where a request comes from relative to its target.
const SEC_FETCH_SITE: HeaderName = HeaderName::from_static("sec-fetch-site");

/// Whether `addr` keeps a listener on this machine.
pub fn is_loopback(addr: &SocketAddr) -> bool {
    is_loopback_ip(addr.ip())
}

fn is_loopback_ip(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

/// A `listen` address refused: the config key and what is wrong with it (the shape of a config
/// problem, so `config` can report it with the file's other problems).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {what}")]
pub struct ListenRefused {
    /// `SECTION.listen`.
    pub key: String,
    /// Why, and what to do about it.
    pub what: String,
}

/// Refuses a `[section] listen` that is not a loopback address unless `[section] allow-remote`
/// is true; `section` (`"proxy"`, `"web"`) names both keys in the message.
pub fn check_listen(
    addr: SocketAddr,
    allow_remote: bool,
    section: &str,
) -> Result<(), ListenRefused> {
    if allow_remote || is_loopback(&addr) {
        return Ok(());
    }
    Err(ListenRefused {
        key: format!("{section}.listen"),
        what: format!(
            "{addr} is not a loopback address, so other machines could reach it; listen on \
             127.0.0.1 or [::1], or set {section}.allow-remote = true to serve it on purpose"
        ),
    })
}

/// Refuses a request whose `Host` (and absolute-form target, if any) is not a loopback name or
/// address: 403 for a foreign one, 400 for an HTTP/1.1 request without one, with two, or with
/// one that is not text. HTTP/1.0 may leave `Host` out.
pub fn check_host<B>(req: &Request<B>) -> Result<(), Refusal> {
    let bad = |reason: &str| Err(Refusal::new(StatusCode::BAD_REQUEST, reason));
    let mut hosts = req.headers().get_all(header::HOST).iter();
    match (hosts.next(), hosts.next()) {
        (Some(_), Some(_)) => return bad("more than one Host header"),
        (None, _) if req.version() >= Version::HTTP_11 => {
            return bad("no Host header (HTTP/1.1 requires one)");
        }
        (None, _) => {}
        (Some(value), None) => {
            let Ok(host) = value.to_str() else {
                return bad("the Host header is not text");
            };
            foreign("Host", host)?;
        }
    }
    // An absolute-form target (`GET http://evil.example/ HTTP/1.1`) names the host the
    // request is for, whatever `Host` says.
    if let Some(authority) = req.uri().authority() {
        foreign("the request target's host", authority.as_str())?;
    }
    Ok(())
}

fn foreign(what: &str, host: &str) -> Result<(), Refusal> {
    if is_loopback_host(host) {
        return Ok(());
    }
    Err(Refusal::new(
        StatusCode::FORBIDDEN,
        format!(
            "{what} {host:?} is not a loopback name or address (127.0.0.1, [::1], localhost, \
             *.localhost)"
        ),
    ))
}

/// Whether `authority` (`host` or `host:port`, as in `Host`) names this machine: 127.0.0.0/8,
/// `[::1]` (and IPv4-mapped loopback), `localhost` or a name ending in `.localhost`, any case.
pub fn is_loopback_host(authority: &str) -> bool {
    let (host, port) = match authority.strip_prefix('[') {
        Some(rest) => {
            let Some((inside, after)) = rest.split_once(']') else {
                return false;
            };
            let Ok(v6) = inside.parse::<Ipv6Addr>() else {
                return false;
            };
            if !is_loopback_ip(IpAddr::V6(v6)) {
                return false;
            }
            (None, after)
        }
        None => {
            let host = authority.split(':').next().unwrap_or_default();
            (Some(host), &authority[host.len()..])
        }
    };
    // `u16::from_str` alone would take a `+`.
    let port_ok = port.is_empty()
        || port.strip_prefix(':').is_some_and(|p| {
            !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) && p.parse::<u16>().is_ok()
        });
    port_ok && host.is_none_or(is_loopback_name_or_v4)
}

fn is_loopback_name_or_v4(host: &str) -> bool {
    if let Ok(v4) = host.parse::<Ipv4Addr>() {
        return v4.is_loopback();
    }
    let host = host.to_ascii_lowercase();
    let Some(sub) = host.strip_suffix("localhost") else {
        return false;
    };
    if sub.is_empty() {
        return true;
    }
    let Some(labels) = sub.strip_suffix('.') else {
        return false;
    };
    labels.split('.').all(|label| {
        !label.is_empty()
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    })
}

/// Whether `origin` (an `Origin` header's value) is an `http`/`https` origin on a loopback
/// name or address. `null` (sandboxed frames, `file:` pages) is not.
pub fn is_loopback_origin(origin: &str) -> bool {
    let authority = origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"));
    authority.is_some_and(|a| !a.contains('/') && is_loopback_host(a))
}

/// The one value of a header that must appear at most once: `Ok(None)` when absent, a 403 when
/// repeated or not text (browsers send these once; anything else is not a browser's request).
fn single<'a>(headers: &'a HeaderMap, name: &HeaderName) -> Result<Option<&'a str>, Refusal> {
    let mut values = headers.get_all(name).iter();
    match (values.next(), values.next()) {
        (None, _) => Ok(None),
        (Some(v), None) => v.to_str().map(Some).map_err(|_| {
            Refusal::new(
                StatusCode::FORBIDDEN,
                format!("the {name} header is not text"),
            )
        }),
        (Some(_), Some(_)) => Err(Refusal::new(
            StatusCode::FORBIDDEN,
            format!("more than one {name} header"),
        )),
    }
}

/// Refuses what a browser sends on behalf of another site: `Sec-Fetch-Site: cross-site`, or
/// an `Origin` that is not a loopback origin (403). A request with neither header (curl, an
/// SDK) passes; so does one from another loopback page ("same-site"), which
/// [`check_same_origin`] refuses where it matters.
pub fn check_cross_site<B>(req: &Request<B>) -> Result<(), Refusal> {
    let headers = req.headers();
    if let Some(site) = single(headers, &SEC_FETCH_SITE)?
        && site.eq_ignore_ascii_case("cross-site")
    {
        return Err(Refusal::new(
            StatusCode::FORBIDDEN,
            "a cross-site request (Sec-Fetch-Site: cross-site)",
        ));
    }
    if let Some(origin) = single(headers, &header::ORIGIN)?
        && !is_loopback_origin(origin)
    {
        return Err(Refusal::new(
            StatusCode::FORBIDDEN,
            format!("Origin {origin:?} is not a loopback origin"),
        ));
    }
    Ok(())
}

/// For a request that changes something: refuses it (403) unless it comes from the page itself,
/// `Sec-Fetch-Site: same-origin` or an `Origin` equal to `http://` + its `Host`, and neither
/// header says otherwise. A request with neither is refused too: every browser sends at least
/// one on a POST, so it is not from the page. Call [`check_host`] first: the page's origin is
/// read from the `Host` it checked.
pub fn check_same_origin<B>(req: &Request<B>) -> Result<(), Refusal> {
    let forbidden = |reason: String| Err(Refusal::new(StatusCode::FORBIDDEN, reason));
    let headers = req.headers();
    let site = single(headers, &SEC_FETCH_SITE)?;
    let origin = single(headers, &header::ORIGIN)?;
    if let Some(site) = site
        && !site.eq_ignore_ascii_case("same-origin")
    {
        return forbidden(format!(
            "a request that changes something from another page (Sec-Fetch-Site: {site})"
        ));
    }
    if let Some(origin) = origin {
        let Some(host) = single(headers, &header::HOST)? else {
            return forbidden("no Host to compare the Origin with".to_owned());
        };
        let own = format!("http://{host}");
        if !origin.eq_ignore_ascii_case(&own) {
            return forbidden(format!(
                "a request that changes something from Origin {origin:?}, not this page's \
                 ({own})"
            ));
        }
    }
    if site.is_none() && origin.is_none() {
        return forbidden(
            "a request that changes something without Sec-Fetch-Site or Origin (a browser sends \
             them, so it is not from this page)"
                .to_owned(),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("a socket address")
    }

    #[test]
    fn loopback_listen_addresses_pass_and_others_need_allow_remote() {
        for ok in [
            "127.0.0.1:8787",
            "127.0.0.1:0",
            "127.1.2.3:80",
            "127.255.255.254:1",
            "[::1]:8787",
            "[::ffff:127.0.0.1]:8787",
        ] {
            assert!(is_loopback(&addr(ok)), "{ok}");
            assert_eq!(check_listen(addr(ok), false, "proxy"), Ok(()), "{ok}");
        }
        for remote in [
            "0.0.0.0:8787",
            "[::]:8787",
            "192.168.1.10:8787",
            "10.0.0.1:8787",
            "128.0.0.1:8787",
            "126.255.255.255:8787",
            "[::2]:8787",
            "[fe80::1]:8787",
            "[::ffff:10.0.0.1]:8787",
            "[::ffff:0.0.0.0]:8787",
        ] {
            assert!(!is_loopback(&addr(remote)), "{remote}");
            assert_eq!(check_listen(addr(remote), true, "web"), Ok(()), "{remote}");
            let refused = check_listen(addr(remote), false, "web").expect_err(remote);
            assert_eq!(refused.key, "web.listen");
            assert!(
                refused.what.contains("web.allow-remote = true"),
                "{refused}"
            );
            assert!(
                refused.what.starts_with(&format!("{} ", addr(remote))),
                "{refused}"
            );
        }
        assert_eq!(
            check_listen(addr("0.0.0.0:8787"), false, "proxy")
                .expect_err("refused")
                .to_string(),
            "proxy.listen: 0.0.0.0:8787 is not a loopback address, so other machines could \
             reach it; listen on 127.0.0.1 or [::1], or set proxy.allow-remote = true to serve \
             it on purpose"
        );
    }

    const LOOPBACK_HOSTS: &[&str] = &[
        "127.0.0.1",
        "127.0.0.1:8787",
        "127.0.0.1:1",
        "127.0.0.1:65535",
        "127.1.2.3",
        "127.255.255.255:80",
        "[::1]",
        "[::1]:8788",
        "[0:0:0:0:0:0:0:1]:8788",
        "[::ffff:127.0.0.1]",
        "[::ffff:127.0.0.1]:9",
        "localhost",
        "localhost:8787",
        "LocalHost",
        "LOCALHOST:80",
        "app.localhost",
        "app.localhost:8788",
        "a.b-c.d_e.localhost",
        "X.LOCALHOST:1",
    ];

    const FOREIGN_HOSTS: &[&str] = &[
        "",
        "evil.example",
        "evil.example:8787",
        "localhost.evil.example",
        "localhost.evil.example:8787",
        "evil-localhost",
        "evillocalhost",
        "evil.localhost.example",
        "127.0.0.1.evil.example",
        "localhost.",
        "app.localhost.",
        ".localhost",
        "a..localhost",
        "a b.localhost",
        "user@localhost",
        "localhost@evil.example",
        "127.1",
        "127.0.1",
        "0x7f.0.0.1",
        "0177.0.0.1",
        "2130706433",
        "127.0.0.1 ",
        " 127.0.0.1",
        "128.0.0.1",
        "0.0.0.0",
        "0.0.0.0:8787",
        "10.0.0.1",
        "192.168.0.1:8787",
        "::1",
        "::1:8787",
        "[::1",
        "[::1]x",
        "[::1]:",
        "[::1]:8787:1",
        "[::2]",
        "[::]:8787",
        "[fe80::1%25lo]",
        "[::ffff:10.0.0.1]",
        "localhost:",
        "localhost:0x50",
        "localhost:65536",
        "localhost:123456",
        "localhost:-1",
        "localhost:80:80",
        "localhost:+80",
        "127.0.0.1:",
        "127.0.0.1:80/",
        "localhost/",
        "localhost\\evil.example",
    ];

    #[test]
    fn loopback_names_and_addresses_are_hosts_of_this_machine_and_nothing_else_is() {
        for ok in LOOPBACK_HOSTS {
            assert!(is_loopback_host(ok), "{ok:?} is loopback");
        }
        for no in FOREIGN_HOSTS {
            assert!(!is_loopback_host(no), "{no:?} is not loopback");
        }
    }

    fn request(version: Version, headers: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::builder().uri("/").version(version);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).expect("a request")
    }

    /// Request headers, and the status they are refused with (`None`: they pass).
    type Case = (&'static [(&'static str, &'static str)], Option<u16>);

    fn run_table(check: fn(&Request<()>) -> Result<(), Refusal>, cases: &[Case]) {
        for (headers, want) in cases {
            let got = check(&request(Version::HTTP_11, headers));
            assert_eq!(status(got), *want, "{headers:?}");
        }
    }

    fn status(r: Result<(), Refusal>) -> Option<u16> {
        r.err().map(|r| r.status.as_u16())
    }

    #[test]
    fn the_host_check_passes_loopback_refuses_foreign_and_wants_one_host_on_http_1_1() {
        for ok in LOOPBACK_HOSTS {
            for v in [Version::HTTP_10, Version::HTTP_11] {
                assert_eq!(
                    status(check_host(&request(v, &[("host", ok)]))),
                    None,
                    "{ok}"
                );
            }
        }
        for no in FOREIGN_HOSTS {
            // Not every entry is a valid header value (a leading space is trimmed by the
            // header parser); those that are must be refused.
            let Ok(req) = Request::builder().uri("/").header("host", *no).body(()) else {
                continue;
            };
            assert_eq!(status(check_host(&req)), Some(403), "{no:?}");
        }
        let refused = check_host(&request(Version::HTTP_11, &[("host", "evil.example:8787")]))
            .expect_err("foreign");
        assert_eq!(
            refused.reason,
            "Host \"evil.example:8787\" is not a loopback name or address (127.0.0.1, [::1], \
             localhost, *.localhost)"
        );
        assert_eq!(
            status(check_host(&request(Version::HTTP_11, &[]))),
            Some(400)
        );
        assert_eq!(status(check_host(&request(Version::HTTP_10, &[]))), None);
        let two = request(
            Version::HTTP_11,
            &[("host", "127.0.0.1"), ("host", "127.0.0.1")],
        );
        assert_eq!(status(check_host(&two)), Some(400));
        let mut binary = request(Version::HTTP_11, &[]);
        binary.headers_mut().insert(
            header::HOST,
            header::HeaderValue::from_bytes(b"l\xffcalhost").expect("opaque bytes"),
        );
        assert_eq!(status(check_host(&binary)), Some(400));
    }

    #[test]
    fn an_absolute_form_target_must_name_loopback_too() {
        let req = |uri: &str, host: &str| {
            Request::builder()
                .uri(uri)
                .header("host", host)
                .body(())
                .expect("a request")
        };
        assert_eq!(
            status(check_host(&req(
                "http://127.0.0.1:8787/api",
                "127.0.0.1:8787"
            ))),
            None
        );
        assert_eq!(
            status(check_host(&req("http://evil.example/api", "127.0.0.1"))),
            Some(403)
        );
        assert_eq!(
            status(check_host(&req("http://localhost/api", "evil.example"))),
            Some(403)
        );
    }

    #[test]
    fn loopback_origins_are_http_or_https_on_a_loopback_host() {
        for ok in [
            "http://127.0.0.1:8788",
            "http://127.0.0.1",
            "https://localhost:8788",
            "http://app.localhost",
            "http://[::1]:8788",
        ] {
            assert!(is_loopback_origin(ok), "{ok}");
        }
        for no in [
            "null",
            "",
            "127.0.0.1:8788",
            "http://evil.example",
            "https://evil.example:443",
            "http://localhost.evil.example",
            "http://127.0.0.1:8788/",
            "http://127.0.0.1:8788/path",
            "ftp://127.0.0.1",
            "file://",
            "chrome-extension://abcdef",
            "http://user@127.0.0.1",
            "http://",
        ] {
            assert!(!is_loopback_origin(no), "{no}");
        }
    }

    #[test]
    fn the_cross_site_check_refuses_cross_site_and_foreign_origins_and_passes_the_rest() {
        let cases: &[Case] = &[
            // Not a browser: nothing to go on, and nothing to refuse.
            (&[], None),
            (&[("sec-fetch-site", "none")], None),
            (&[("sec-fetch-site", "same-origin")], None),
            (&[("sec-fetch-site", "same-site")], None),
            (&[("sec-fetch-site", "cross-site")], Some(403)),
            (&[("sec-fetch-site", "Cross-Site")], Some(403)),
            (&[("origin", "http://127.0.0.1:8788")], None),
            (&[("origin", "http://localhost:9999")], None),
            (&[("origin", "http://evil.example")], Some(403)),
            (&[("origin", "null")], Some(403)),
            (
                &[
                    ("sec-fetch-site", "same-site"),
                    ("origin", "http://127.0.0.1:1"),
                ],
                None,
            ),
            (
                &[
                    ("sec-fetch-site", "same-origin"),
                    ("origin", "http://evil.example"),
                ],
                Some(403),
            ),
            (
                &[
                    ("sec-fetch-site", "cross-site"),
                    ("origin", "http://127.0.0.1:8788"),
                ],
                Some(403),
            ),
            (
                &[("sec-fetch-site", "none"), ("sec-fetch-site", "cross-site")],
                Some(403),
            ),
            (
                &[
                    ("origin", "http://127.0.0.1"),
                    ("origin", "http://evil.example"),
                ],
                Some(403),
            ),
        ];
        run_table(check_cross_site, cases);
        let refused = check_cross_site(&request(
            Version::HTTP_11,
            &[("origin", "https://evil.example")],
        ))
        .expect_err("foreign origin");
        assert_eq!(
            refused.reason,
            "Origin \"https://evil.example\" is not a loopback origin"
        );
    }

    #[test]
    fn a_state_changing_request_must_come_from_the_page_itself() {
        const HOST: (&str, &str) = ("host", "127.0.0.1:8788");
        let cases: &[Case] = &[
            (&[HOST, ("sec-fetch-site", "same-origin")], None),
            (&[HOST, ("origin", "http://127.0.0.1:8788")], None),
            (&[HOST, ("origin", "HTTP://127.0.0.1:8788")], None),
            (
                &[
                    HOST,
                    ("sec-fetch-site", "same-origin"),
                    ("origin", "http://127.0.0.1:8788"),
                ],
                None,
            ),
            (
                &[
                    ("host", "localhost:9000"),
                    ("origin", "http://localhost:9000"),
                ],
                None,
            ),
            // A page on another loopback port is same-site, not same-origin.
            (&[HOST, ("sec-fetch-site", "same-site")], Some(403)),
            (&[HOST, ("origin", "http://127.0.0.1:9999")], Some(403)),
            (&[HOST, ("origin", "http://localhost:8788")], Some(403)),
            (&[HOST, ("origin", "https://127.0.0.1:8788")], Some(403)),
            (&[HOST, ("origin", "null")], Some(403)),
            (&[HOST, ("sec-fetch-site", "cross-site")], Some(403)),
            (&[HOST, ("sec-fetch-site", "none")], Some(403)),
            (
                &[
                    HOST,
                    ("sec-fetch-site", "same-site"),
                    ("origin", "http://127.0.0.1:8788"),
                ],
                Some(403),
            ),
            (
                &[
                    HOST,
                    ("sec-fetch-site", "same-origin"),
                    ("origin", "http://127.0.0.1:9999"),
                ],
                Some(403),
            ),
            // Neither header: not a browser's POST, so not the page's.
            (&[HOST], Some(403)),
            (&[("origin", "http://127.0.0.1:8788")], Some(403)),
            (
                &[
                    HOST,
                    ("sec-fetch-site", "same-origin"),
                    ("sec-fetch-site", "same-origin"),
                ],
                Some(403),
            ),
        ];
        run_table(check_same_origin, cases);
        let refused = check_same_origin(&request(
            Version::HTTP_11,
            &[HOST, ("origin", "http://127.0.0.1:9999")],
        ))
        .expect_err("another page");
        assert_eq!(
            refused.reason,
            "a request that changes something from Origin \"http://127.0.0.1:9999\", not this \
             page's (http://127.0.0.1:8788)"
        );
    }
}
