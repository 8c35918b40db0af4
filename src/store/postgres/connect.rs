//! How the daemon reaches its database: the connection settings (`[store] url`, the password
//! from a systemd credential or a file, TLS), the pool, and connection errors explained without
//! ever showing the password.

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, PoolError, RecyclingMethod, Runtime};
use tokio_postgres::config::{Host, SslMode};

/// Connections per daemon: its poll loops, deliveries, archive and the operators' reads.
pub const POOL_SIZE: usize = 8;

/// How long to wait for a connection (from the pool, or a new one) before the operation fails
/// as a store fault: a database that does not answer must not hang the daemon's loops.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a session may sit idle inside a transaction before the server ends it: half the
/// lease, and at least a second (see [`PgOptions::new`]).
pub fn idle_in_transaction_timeout(lease: Duration) -> Duration {
    (lease / 2).max(Duration::from_secs(1))
}

/// Everything needed to reach one database.
#[derive(Clone)]
pub struct PgOptions {
    /// Parsed from `[store] url`, with the password (if any) set from its source.
    config: tokio_postgres::Config,
    /// How long a claim keeps other daemons off a row (`[store] lease`).
    pub lease: Duration,
    /// Extra CA certificates (PEM) to trust for TLS (`[store] ca-file`).
    ca_file: Option<PathBuf>,
    /// Who this daemon is among the queue's members, the same across its restarts (the daemon
    /// sets its control socket's path; the host name is added). Targets are registered under
    /// it. `None` (a one-off such as `store copy`): a name of this process only.
    pub member: Option<String>,
}

impl std::fmt::Debug for PgOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgOptions")
            .field("database", &self.shown())
            .field("lease", &self.lease)
            .finish_non_exhaustive()
    }
}

impl PgOptions {
    /// Reads `url` (a `postgres://` or `postgresql://` URL, or `key=value` pairs, as libpq
    /// takes them). `password`, when given, replaces any password in the URL. The error names
    /// what is wrong and never repeats the URL (it may hold a password).
    pub fn new(
        url: &str,
        password: Option<String>,
        lease: Duration,
        ca_file: Option<PathBuf>,
    ) -> Result<PgOptions, String> {
        let mut config = tokio_postgres::Config::from_str(url)
            .map_err(|e| format!("store.url is not a PostgreSQL connection URL: {e}"))?;
        if config.get_hosts().is_empty() {
            return Err(
                "store.url names no host (add one, or `?host=/run/postgresql` for the local socket)"
                    .to_owned(),
            );
        }
        if config.get_dbname().is_none() {
            return Err("store.url names no database (…/DBNAME)".to_owned());
        }
        if let Some(p) = password {
            config.password(p);
        }
        if config.get_application_name().is_none() {
            config.application_name("sunopoll");
        }
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        // A connection the server (or a firewall) dropped silently is noticed, not waited on.
        config.keepalives(true);
        config.keepalives_idle(Duration::from_secs(30));
        // A daemon stopped in the middle of a transaction (SIGSTOP, a frozen VM) holds its row
        // locks — a task's row, the event sequence — and every other daemon's writes would wait
        // behind them for as long as it stays stopped: the whole queue would stall, not just its
        // work. The server ends such a session once it has sat idle inside a transaction for
        // half a lease (the transaction is rolled back; that daemon finds its connection gone
        // and retries), so the others are free again before its leases even run out. Our
        // transactions never wait on anything but the database between statements.
        let idle = idle_in_transaction_timeout(lease);
        let setting = format!(
            "-c idle_in_transaction_session_timeout={}",
            idle.as_millis()
        );
        let options = match config.get_options() {
            Some(given) if !given.trim().is_empty() => format!("{given} {setting}"),
            _ => setting,
        };
        config.options(&options);
        Ok(PgOptions {
            config,
            lease,
            ca_file,
            member: None,
        })
    }

    /// The database as people may see it: `user@host:port/db`, never a password.
    pub fn shown(&self) -> String {
        let c = &self.config;
        let hosts: Vec<String> = c
            .get_hosts()
            .iter()
            .enumerate()
            .map(|(i, h)| {
                let host = match h {
                    Host::Tcp(name) => name.clone(),
                    Host::Unix(path) => path.display().to_string(),
                };
                match c.get_ports().get(i).or(c.get_ports().first()) {
                    Some(port) => format!("{host}:{port}"),
                    None => host,
                }
            })
            .collect();
        let user = c.get_user().map(|u| format!("{u}@")).unwrap_or_default();
        let db = c.get_dbname().unwrap_or_default();
        // A socket directory is shown as libpq's `host=` parameter: a path in the authority
        // would read as part of the database name.
        match c.get_hosts().first() {
            Some(Host::Unix(_)) => format!("postgres://{user}/{db}?host={}", hosts.join(",")),
            _ => format!("postgres://{user}{}/{db}", hosts.join(",")),
        }
    }

    /// Whether TLS is asked for (`sslmode=prefer`, the default, or `require`).
    fn wants_tls(&self) -> bool {
        self.config.get_ssl_mode() != SslMode::Disable
    }

    /// The pool. Connections are made when first needed; one is reused unless it is known to
    /// be closed (`RecyclingMethod::Fast`). Checking each with a query before every use
    /// (`Verified`) cost a round trip per operation, a sixth of an `add`'s; a connection the
    /// server ended (a restart) is closed by the time it is taken again, and one that breaks in
    /// use fails that operation as a store fault, which every caller already retries.
    pub(super) fn pool(&self) -> Result<Pool, String> {
        let manager_config = ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        };
        let manager = if self.wants_tls() {
            let tls = tokio_postgres_rustls::MakeRustlsConnect::new(self.tls_config()?);
            Manager::from_config(self.config.clone(), tls, manager_config)
        } else {
            Manager::from_config(self.config.clone(), tokio_postgres::NoTls, manager_config)
        };
        Pool::builder(manager)
            .max_size(POOL_SIZE)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(CONNECT_TIMEOUT))
            .create_timeout(Some(CONNECT_TIMEOUT))
            .recycle_timeout(Some(CONNECT_TIMEOUT))
            .build()
            .map_err(|e| format!("cannot set up the connection pool: {e}"))
    }

    /// TLS that verifies the server's certificate and name (what libpq calls
    /// `sslmode=verify-full`) against the system's CAs, or the bundled Mozilla set when the
    /// system has none, plus `ca-file`.
    fn tls_config(&self) -> Result<rustls::ClientConfig, String> {
        crate::tls::install_crypto_provider();
        let mut roots = rustls::RootCertStore::empty();
        let loaded = rustls_native_certs::load_native_certs();
        let (added, _) = roots.add_parsable_certificates(loaded.certs);
        if added == 0 {
            roots.add_parsable_certificates(
                webpki_root_certs::TLS_SERVER_ROOT_CERTS.iter().cloned(),
            );
        }
        if let Some(path) = &self.ca_file {
            let pem = std::fs::read(path)
                .map_err(|e| format!("store.ca-file {}: cannot read it: {e}", path.display()))?;
            use rustls::pki_types::pem::PemObject;
            let certs: Vec<_> = rustls::pki_types::CertificateDer::pem_slice_iter(&pem)
                .collect::<Result<_, _>>()
                .map_err(|e| {
                    format!(
                        "store.ca-file {}: not PEM certificates: {e}",
                        path.display()
                    )
                })?;
            if certs.is_empty() {
                return Err(format!(
                    "store.ca-file {}: holds no certificate",
                    path.display()
                ));
            }
            roots.add_parsable_certificates(certs);
        }
        Ok(rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth())
    }
}

impl PgOptions {
    /// A connection of its own (not pooled), for `LISTEN`: its messages come as a stream.
    pub(super) async fn connect_listener(
        &self,
    ) -> Result<(tokio_postgres::Client, super::notify::Messages), String> {
        let explain = |e: tokio_postgres::Error| format!("cannot connect: {}", super::describe(&e));
        if self.wants_tls() {
            let tls = tokio_postgres_rustls::MakeRustlsConnect::new(self.tls_config()?);
            let (client, conn) = self.config.connect(tls).await.map_err(explain)?;
            Ok((client, messages(conn)))
        } else {
            let (client, conn) = self
                .config
                .connect(tokio_postgres::NoTls)
                .await
                .map_err(explain)?;
            Ok((client, messages(conn)))
        }
    }
}

/// Drives `conn`, yielding what the server sends unasked (notifications, notices).
fn messages<S, T>(mut conn: tokio_postgres::Connection<S, T>) -> super::notify::Messages
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    Box::pin(futures_util::stream::poll_fn(move |cx| {
        conn.poll_message(cx)
    }))
}

/// Why no connection could be had, in one line, without the password.
pub(super) fn describe_pool(e: &PoolError) -> String {
    match e {
        // The server was reached and it (or its certificate) said no: asking whether it runs
        // would send the reader the wrong way.
        PoolError::Backend(e) if refusal_hint(e).is_some() => {
            format!("cannot connect to PostgreSQL: {}", super::describe(e))
        }
        PoolError::Backend(e) => format!(
            "cannot connect to PostgreSQL (is it running and reachable?): {}",
            super::describe(e)
        ),
        PoolError::Timeout(_) => format!(
            "cannot connect: no connection within {}s (is PostgreSQL up and reachable?)",
            CONNECT_TIMEOUT.as_secs()
        ),
        PoolError::Closed => "the store has shut down".to_owned(),
        other => format!("cannot connect: {other}"),
    }
}

/// What to do when the server's certificate or its pg_hba refused the connection, for the
/// refusals whose fix is in the daemon's own settings; `None` for any other error.
pub(super) fn refusal_hint(e: &tokio_postgres::Error) -> Option<&'static str> {
    use rustls::CertificateError;
    if let Some(db) = e.as_db_error() {
        // No pg_hba line lets this client in without TLS (`hostssl` lines only, or a
        // `hostnossl … reject`): the server's message ends in "no encryption".
        let plain_refused = db.code().code() == "28000" && db.message().ends_with("no encryption");
        return plain_refused.then_some(
            "the server's pg_hba.conf does not let this connection in without TLS: set \
             sslmode=require in store.url (if it takes it over TLS)",
        );
    }
    match tls_error(e)? {
        rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer) => Some(
            "the server's certificate is not signed by a CA this host trusts: set store.ca-file \
             to the PEM file of the CA that signed it",
        ),
        rustls::Error::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
        ) => Some(
            "the server's certificate is not made for the host store.url names: connect by a \
             name the certificate holds, or give the server a certificate for this one",
        ),
        _ => None,
    }
}

/// The rustls error under `e`, if its cause is a failed TLS handshake. tokio-rustls reports it
/// as an `io::Error` wrapping the `rustls::Error`, and `io::Error::source` skips what it wraps,
/// so each cause is looked into as well as at.
fn tls_error(e: &tokio_postgres::Error) -> Option<&rustls::Error> {
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        if let Some(tls) = c.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        let wrapped = c
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<rustls::Error>());
        if wrapped.is_some() {
            return wrapped;
        }
        cause = c.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_urls_own_options_are_kept_beside_the_idle_transaction_timeout() {
        let o = PgOptions::new(
            "postgres://u@h/db?options=-csearch_path%3Dsunopoll",
            None,
            Duration::from_secs(30),
            None,
        )
        .expect("options");
        assert_eq!(
            o.config.get_options(),
            Some("-csearch_path=sunopoll -c idle_in_transaction_session_timeout=15000")
        );
        let plain = PgOptions::new("postgres://u@h/db", None, Duration::from_secs(30), None)
            .expect("options");
        assert_eq!(
            plain.config.get_options(),
            Some("-c idle_in_transaction_session_timeout=15000")
        );
    }
}
