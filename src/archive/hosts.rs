//! Which asset URLs the archive may fetch. A callback body is data from the network: a URL in
//! it that points at this host or its private network would turn the archive into a way to
//! read internal services, so such hosts are refused unless `[archive] allow-hosts` names them.
//! Pure; only literal addresses and `localhost` are judged (a name is not resolved here).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Why a URL is not fetched.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// Not an http(s) URL with a host.
    #[error("not an http(s) URL with a host: {0}")]
    NotHttp(String),
    /// A loopback, private, link-local or unspecified address not in `allow-hosts`.
    #[error(
        "{0} is a loopback, private or link-local address; add it to [archive] allow-hosts to fetch from it"
    )]
    Internal(String),
}

/// Checks `url` against `allow`: `Ok` with the parsed URL when it may be fetched.
pub fn check(url: &str, allow: &[String]) -> Result<url::Url, Refused> {
    let parsed = url::Url::parse(url).map_err(|_| Refused::NotHttp(url.to_owned()))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(Refused::NotHttp(url.to_owned()));
    }
    let internal = match parsed.host() {
        None => return Err(Refused::NotHttp(url.to_owned())),
        Some(url::Host::Domain(d)) => {
            let d = d.trim_end_matches('.').to_ascii_lowercase();
            d == "localhost" || d.ends_with(".localhost")
        }
        Some(url::Host::Ipv4(ip)) => internal_v4(ip),
        Some(url::Host::Ipv6(ip)) => internal_v6(ip),
    };
    let host = parsed.host_str().unwrap_or("");
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if internal && !allow.iter().any(|h| h.eq_ignore_ascii_case(host)) {
        return Err(Refused::Internal(host.to_owned()));
    }
    Ok(parsed)
}

fn internal_v4(ip: Ipv4Addr) -> bool {
    ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_unspecified()
        || ip.is_broadcast()
        // 100.64.0.0/10, carrier-grade NAT: private in practice.
        || (ip.octets()[0] == 100 && (ip.octets()[1] & 0xc0) == 64)
}

fn internal_v6(ip: Ipv6Addr) -> bool {
    if let Some(v4) = ip.to_ipv4_mapped() {
        return internal_v4(v4);
    }
    let first = ip.segments()[0];
    ip.is_loopback()
        || ip.is_unspecified()
        || (first & 0xfe00) == 0xfc00 // unique local fc00::/7
        || (first & 0xffc0) == 0xfe80 // link-local fe80::/10
}

/// True when `ip` is an address the archive never fetches from unless allowed.
pub fn is_internal(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => internal_v4(v4),
        IpAddr::V6(v6) => internal_v6(v6),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_hosts_are_refused_unless_allowed() {
        let none: Vec<String> = Vec::new();
        for url in [
            "http://127.0.0.1:8080/a.mp3",
            "http://localhost/a.mp3",
            "http://10.1.2.3/a",
            "http://192.168.0.1/a",
            "http://172.16.0.1/a",
            "http://169.254.169.254/latest/meta-data",
            "http://[::1]/a",
            "http://[fe80::1]/a",
            "http://[fd00::1]/a",
            "http://[::ffff:127.0.0.1]/a",
            "http://0.0.0.0/a",
            "http://100.64.0.1/a",
        ] {
            assert!(
                matches!(check(url, &none), Err(Refused::Internal(_))),
                "{url}"
            );
        }
        assert!(check("https://cdn1.example.com/a.mp3", &none).is_ok());
        assert!(check("https://8.8.8.8/a.mp3", &none).is_ok());
        assert!(matches!(
            check("file:///etc/passwd", &none),
            Err(Refused::NotHttp(_))
        ));
        assert!(matches!(check("nonsense", &none), Err(Refused::NotHttp(_))));
        let allow = vec!["127.0.0.1".to_owned(), "::1".to_owned()];
        assert!(check("http://127.0.0.1:9/a", &allow).is_ok());
        assert!(check("http://[::1]:9/a", &allow).is_ok());
        assert!(check("http://10.0.0.1/a", &allow).is_err());
        assert!(is_internal("127.0.0.2".parse().expect("ip")));
    }
}
