//! `[proxy]`: the loopback stand-in for the API (off until `listen` is set), its checks, and
//! its local tokens, whose files are read after parsing like every other secret.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::de;
use super::strict::Problem;
use crate::clock::format_duration;

/// The header an application may send a task's label in, unless configured otherwise.
pub const DEFAULT_LABEL_HEADER: &str = "X-Sunopoll-Label";
/// The largest submission body accepted: a request is a prompt and a few settings; lyrics
/// fit in a few KiB.
pub const DEFAULT_PROXY_MAX_BODY: u64 = 1 << 20;
/// Connections served at once.
pub const DEFAULT_PROXY_CONNECTIONS: usize = 64;
/// How long a client has for its request head (and a kept-alive connection may idle).
pub const DEFAULT_PROXY_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a client has for its whole body once the head is in.
pub const DEFAULT_PROXY_BODY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the API has to answer one forwarded request, connect to last byte: the same as a
/// poll's, so a shutdown's drain covers a submission in flight.
pub const DEFAULT_UPSTREAM_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a submission may wait for its turn in the account's request budget before it is
/// answered with the provider's throttle signal instead.
pub const DEFAULT_MAX_WAIT: Duration = Duration::from_secs(10);
/// Shortest local token accepted: anything shorter can be guessed by whoever can connect.
pub const MIN_TOKEN_LEN: usize = 16;

/// `[proxy]`: where the stand-in listens and how it treats clients.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", default, deny_unknown_fields)]
pub struct ProxyConfig {
    /// `listen`: e.g. `127.0.0.1:8787`; `None` is off.
    #[serde(deserialize_with = "de::some_socket_addr")]
    pub listen: Option<SocketAddr>,
    /// `allow-remote`: let `listen` be an address other machines reach.
    #[serde(deserialize_with = "de::flag")]
    pub allow_remote: bool,
    /// `label-header`: the request header whose value becomes the task's label; `None`
    /// (written `""`) takes no label from requests.
    #[serde(deserialize_with = "label_header")]
    pub label_header: Option<String>,
    /// `max-body-size`: a larger request body is answered 413.
    #[serde(deserialize_with = "de::bytes")]
    pub max_body_size: u64,
    /// `max-connections`: connections served at once.
    #[serde(deserialize_with = "de::count")]
    pub max_connections: usize,
    /// `header-timeout`: for a request head, and a kept-alive connection's idle time.
    #[serde(deserialize_with = "de::duration")]
    pub header_timeout: Duration,
    /// `body-timeout`: for a whole request body.
    #[serde(deserialize_with = "de::duration")]
    pub body_timeout: Duration,
    /// `upstream-timeout`: for the API's whole answer to one forwarded request.
    #[serde(deserialize_with = "de::duration")]
    pub upstream_timeout: Duration,
    /// `max-wait`: how long a submission may wait for the account's request budget.
    #[serde(deserialize_with = "de::any_duration")]
    pub max_wait: Duration,
    /// `[[proxy.token]]` as written.
    pub token: Vec<TokenEntry>,
    /// The tokens, once their files are read.
    #[serde(skip)]
    pub tokens: Vec<ProxyToken>,
}

impl Default for ProxyConfig {
    fn default() -> ProxyConfig {
        ProxyConfig {
            listen: None,
            allow_remote: false,
            label_header: Some(DEFAULT_LABEL_HEADER.to_owned()),
            max_body_size: DEFAULT_PROXY_MAX_BODY,
            max_connections: DEFAULT_PROXY_CONNECTIONS,
            header_timeout: DEFAULT_PROXY_HEADER_TIMEOUT,
            body_timeout: DEFAULT_PROXY_BODY_TIMEOUT,
            upstream_timeout: DEFAULT_UPSTREAM_TIMEOUT,
            max_wait: DEFAULT_MAX_WAIT,
            token: Vec::new(),
            tokens: Vec::new(),
        }
    }
}

/// One `[[proxy.token]]` as written: a local token an application may send instead of an
/// account's key, and the account it stands for.
#[derive(Clone, Default, Deserialize)]
#[serde(
    rename_all = "kebab-case",
    default,
    deny_unknown_fields,
    expecting = "a [[proxy.token]] table"
)]
pub struct TokenEntry {
    /// `token`, inline.
    pub token: Option<String>,
    /// `token-file`: a file whose first line is the token.
    #[serde(deserialize_with = "de::some_path")]
    pub token_file: Option<PathBuf>,
    /// `account` (default: the first configured).
    pub account: Option<String>,
}

impl std::fmt::Debug for TokenEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenEntry")
            .field("token", &self.token.as_ref().map(|_| "***"))
            .field("token_file", &self.token_file)
            .field("account", &self.account)
            .finish()
    }
}

/// A local token and its account. Its `Debug` never shows the token.
#[derive(Clone)]
pub struct ProxyToken {
    /// The account it stands for.
    pub account: String,
    token: String,
}

impl ProxyToken {
    /// The token itself, for comparing with what a client sent.
    pub fn expose(&self) -> &str {
        &self.token
    }
}

impl std::fmt::Debug for ProxyToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ProxyToken({:?}, ***)", self.account)
    }
}

/// `label-header`: a header name, or `""` for none.
fn label_header<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    use serde::de::Error as _;
    let s = String::deserialize(d)?;
    let s = s.trim();
    if s.is_empty() {
        return Ok(None);
    }
    if reqwest::header::HeaderName::from_bytes(s.as_bytes()).is_err() {
        return Err(D::Error::custom(format!(
            "`{s}` is not an HTTP header name (like \"X-Sunopoll-Label\")"
        )));
    }
    Ok(Some(s.to_owned()))
}

/// A token's text is refused when it could not be sent in a header or is short enough to
/// guess. Pure.
fn check_token(token: &str) -> Result<(), String> {
    if token.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("contains spaces or control characters".to_owned());
    }
    if token.len() < MIN_TOKEN_LEN {
        return Err(format!(
            "is shorter than {MIN_TOKEN_LEN} characters; anyone who can connect could guess it"
        ));
    }
    Ok(())
}

/// Headers a label may not be read from: they mean something to HTTP or carry the key.
fn reserved_label_header(name: &str) -> bool {
    matches!(
        name.to_ascii_lowercase().as_str(),
        "authorization"
            | "host"
            | "content-length"
            | "content-type"
            | "transfer-encoding"
            | "connection"
            | "cookie"
    )
}

impl ProxyConfig {
    /// What spans keys: the listen address against `allow-remote`, each token's source and
    /// account (`accounts`: the configured names, the first the default).
    pub(super) fn validate(&self, accounts: &[String], bad: &mut impl FnMut(&str, String)) {
        if let Some(addr) = self.listen
            && let Err(refused) = crate::http::guard::check_listen(addr, self.allow_remote, "proxy")
        {
            bad(&refused.key, refused.what);
        }
        if let Some(h) = &self.label_header
            && reserved_label_header(h)
        {
            bad(
                "proxy.label-header",
                format!(
                    "{h:?} means something else to HTTP; use a header of its own like \"X-Sunopoll-Label\""
                ),
            );
        }
        for (i, t) in self.token.iter().enumerate() {
            let key = |k: &str| format!("proxy.token[{i}].{k}");
            match (&t.token, &t.token_file) {
                (Some(_), Some(_)) => bad(
                    &key("token"),
                    "set either `token` or `token-file`, not both".to_owned(),
                ),
                (None, None) => bad(&key("token"), "is required (or `token-file`)".to_owned()),
                (Some(token), None) => {
                    if let Err(why) = check_token(token) {
                        bad(&key("token"), why);
                    }
                }
                (None, Some(_)) => {}
            }
            if let Some(a) = &t.account
                && !accounts.contains(a)
            {
                bad(
                    &key("account"),
                    format!(
                        "no account is named {a:?}; the configured accounts are {}",
                        accounts.join(", ")
                    ),
                );
            }
        }
    }

    /// Reads token files (relative to `base`) into `tokens`; problems are added to
    /// `problems`, naming the key and the file, never the content.
    pub(super) fn resolve(
        &mut self,
        base: &Path,
        default_account: &str,
        problems: &mut Vec<Problem>,
    ) {
        let mut tokens = Vec::new();
        for (i, t) in self.token.iter_mut().enumerate() {
            t.token_file = t
                .token_file
                .take()
                .map(|p| if p.is_absolute() { p } else { base.join(p) });
            let token = match (&t.token, &t.token_file) {
                (Some(token), _) => token.clone(),
                (None, Some(file)) => {
                    let key = format!("proxy.token[{i}].token-file");
                    let read = std::fs::read_to_string(file)
                        .map_err(|e| format!("cannot read {}: {e}", file.display()))
                        .and_then(|text| {
                            let first = text.lines().next().unwrap_or("").trim().to_owned();
                            check_token(&first)
                                .map(|()| first)
                                .map_err(|why| format!("the token in {} {why}", file.display()))
                        });
                    match read {
                        Ok(token) => token,
                        Err(what) => {
                            problems.push((key, what));
                            continue;
                        }
                    }
                }
                (None, None) => continue,
            };
            if tokens.iter().any(|k: &ProxyToken| k.token == token) {
                problems.push((
                    format!("proxy.token[{i}]"),
                    "the same token is given twice; each token stands for one account".to_owned(),
                ));
                continue;
            }
            tokens.push(ProxyToken {
                account: t
                    .account
                    .clone()
                    .unwrap_or_else(|| default_account.to_owned()),
                token,
            });
        }
        self.tokens = tokens;
    }

    /// One line for `check-config` and the start-up summary.
    pub fn summary(&self) -> String {
        let Some(addr) = self.listen else {
            return "proxy: off".to_owned();
        };
        format!(
            "proxy: http://{addr} ({} token{}, label header {}, bodies up to {} bytes, {} connections, header/body timeouts {}/{}, upstream timeout {}, waits up to {} for the request budget)",
            self.tokens.len(),
            if self.tokens.len() == 1 { "" } else { "s" },
            self.label_header.as_deref().unwrap_or("none"),
            self.max_body_size,
            self.max_connections,
            format_duration(self.header_timeout),
            format_duration(self.body_timeout),
            format_duration(self.upstream_timeout),
            format_duration(self.max_wait),
        )
    }
}
