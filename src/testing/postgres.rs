//! A throwaway PostgreSQL for the tests: a real server (the binaries [`real_tool`] finds, Debian's
//! on CI) in a fresh temporary directory, listening only on a Unix socket there, and gone within
//! seconds of the test process ending, however it ends (normal exit, panic, SIGKILL). A cluster
//! from [`PgCluster::spawn_tls`] also listens on TCP 127.0.0.1, for TLS clients only, with a
//! certificate from a throwaway CA made with the `openssl` command in its directory.
//!
//! Rust tests exit without running the destructors of statics, so the shared cluster cannot stop
//! itself. Each cluster instead gets a supervisor: a small `sh` whose stdin is a pipe that only the
//! test process holds (close-on-exec, so no other child inherits it). When the test process is
//! gone the kernel closes the pipe, the supervisor's `cat` sees end of file, and it shuts the
//! postmaster down the way `pg_ctl stop -m immediate` does (SIGQUIT) and removes the directory.

use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use super::real_tool;

/// The port number in the socket's name (`.s.PGSQL.5432`) where no TCP port is opened. A TLS
/// cluster takes a free TCP port instead, and its socket is named after that.
const PORT: u16 = 5432;
/// How long the throwaway certificates are valid (days): longer than any test process runs.
const CERT_DAYS: &str = "2";
/// The database superuser initdb creates (trust authentication on the socket).
const SUPERUSER: &str = "postgres";
/// How long to wait for the server to accept connections: this many tries…
const READY_TRIES: u32 = 300;
/// …this far apart (30 s in all).
const READY_PAUSE: Duration = Duration::from_millis(100);
/// Unix socket paths are limited to 108 bytes (`sun_path`), the terminating NUL included.
const MAX_SOCKET_PATH: usize = 100;

/// What the supervisor runs (`$1` is the cluster's directory): wait for end of file on stdin (the
/// test process is gone), stop the postmaster as `pg_ctl stop -m immediate` does (SIGQUIT; SIGKILL
/// if it is still there after 10 s), remove the directory. The pid is only signalled if it is a
/// process named `postgres`, so a stale `postmaster.pid` never hits an unrelated process. A zombie
/// (a parent that does not reap) counts as gone.
const SUPERVISOR: &str = r#"
cat >/dev/null
alive() { [ -e "/proc/$1" ] && ! grep -qs '^[0-9]* (.*) Z' "/proc/$1/stat"; }
pid=$(head -n 1 "$1/data/postmaster.pid" 2>/dev/null)
case "$pid" in ''|*[!0-9]*) pid= ;; esac
if [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = postgres ]; then
    kill -QUIT "$pid" 2>/dev/null
    i=0
    while [ "$i" -lt 100 ] && alive "$pid"; do sleep 0.1; i=$((i + 1)); done
    if alive "$pid"; then kill -KILL "$pid" 2>/dev/null; fi
fi
rm -rf "$1"
"#;

/// The cluster shared by every test in this test process, started on first use. `None` (after a
/// NOT RUN line) where PostgreSQL is not installed; in CI that case fails instead (see
/// [`real_tool`]). Panics with the server's log when it cannot start.
///
/// Tests get their own database from [`PgCluster::database`]. A test that stops or restarts the
/// server would disturb every other test using this one: such a test takes its own cluster from
/// [`PgCluster::spawn`].
pub fn postgres() -> Option<&'static PgCluster> {
    static CLUSTER: OnceLock<PgCluster> = OnceLock::new();
    if let Some(cluster) = CLUSTER.get() {
        return Some(cluster);
    }
    // Looked up before the OnceLock so that every test that skips says so.
    let tools = Tools::find()?;
    Some(CLUSTER.get_or_init(|| PgCluster::start_with(tools, Durability::Off)))
}

/// Whether a cluster's commits wait for the disk.
#[derive(Debug, Clone, Copy)]
enum Durability {
    /// `fsync`, `synchronous_commit` and `full_page_writes` off: for tests.
    Off,
    /// PostgreSQL's defaults (all on): for benchmarks.
    Default,
}

/// The PostgreSQL programs, all from one installation (the directory initdb is in).
#[derive(Debug)]
struct Tools {
    initdb: PathBuf,
    pg_ctl: PathBuf,
    pg_isready: PathBuf,
    psql: PathBuf,
}

impl Tools {
    fn find() -> Option<Tools> {
        let found = real_tool("initdb")?;
        // Through any symlink (a /usr/local/bin/initdb → /usr/lib/postgresql/15/bin/initdb) to
        // the installation's own directory, where its other programs are.
        let initdb = std::fs::canonicalize(&found)
            .unwrap_or_else(|e| panic!("resolving {}: {e}", found.display()));
        let bin = initdb.parent().unwrap_or(Path::new("/")).to_path_buf();
        let sibling = |name: &str| {
            let path = bin.join(name);
            assert!(
                path.is_file(),
                "{} has initdb but no {name}: an incomplete PostgreSQL installation",
                bin.display()
            );
            path
        };
        sibling("postgres");
        Some(Tools {
            pg_ctl: sibling("pg_ctl"),
            pg_isready: sibling("pg_isready"),
            psql: sibling("psql"),
            initdb,
        })
    }
}

/// A running throwaway PostgreSQL cluster: data, Unix socket and log in one temporary directory.
/// Dropping it (only a cluster from [`PgCluster::spawn`] is ever dropped) stops the server and
/// removes the directory; so does the end of the test process, however it ends.
#[derive(Debug)]
pub struct PgCluster {
    tools: Tools,
    /// The temporary directory: the socket is here, the data in `data/`, the log in `server.log`.
    dir: PathBuf,
    /// The server's port: [`PORT`], or for a TLS cluster the TCP port on 127.0.0.1.
    port: u16,
    /// The certificates of a cluster from [`PgCluster::spawn_tls`].
    tls: Option<TlsFiles>,
    /// Who the server programs run as: `None` runs them as this process's user; `Some` when this
    /// process is root, which initdb and postgres refuse to be.
    run_as: Option<(u32, u32)>,
    /// Numbers the databases [`PgCluster::database`] creates.
    next_db: AtomicU64,
    /// Serializes stop/start/restart.
    lifecycle: Mutex<()>,
    /// The supervisor; its stdin is the pipe whose closing tells it to clean up.
    supervisor: Mutex<Child>,
}

impl PgCluster {
    /// Starts a cluster of the caller's own, for a test that stops or restarts the server (the
    /// shared one from [`postgres`] serves everything else). `None` (after a NOT RUN line) where
    /// PostgreSQL is not installed, a failure in CI. Panics with the server's log when it cannot
    /// start.
    pub fn spawn() -> Option<PgCluster> {
        Some(PgCluster::start_with(Tools::find()?, Durability::Off))
    }

    /// Starts a cluster of the caller's own that also listens on TCP 127.0.0.1 (a free port) with
    /// `ssl = on`. Its certificate is signed by a throwaway CA ([`PgCluster::ca_file`]) and names
    /// `localhost` and `127.0.0.1`; pg_hba takes TCP clients only over TLS (`hostssl`, and
    /// `hostnossl … reject`). The Unix socket stays as in [`PgCluster::spawn`], for
    /// [`PgCluster::psql`] and [`PgCluster::database`]. `None` (after a NOT RUN line) where
    /// PostgreSQL or `openssl` is not installed, a failure in CI.
    pub fn spawn_tls() -> Option<PgCluster> {
        PgCluster::spawn_tls_for("DNS:localhost,IP:127.0.0.1")
    }

    /// As [`PgCluster::spawn_tls`], with a server certificate whose subjectAltName is `names`
    /// (openssl's syntax: `DNS:db.invalid`, `DNS:a,IP:127.0.0.1`), e.g. for a certificate made
    /// for another host than the one the client connects to.
    pub fn spawn_tls_for(names: &str) -> Option<PgCluster> {
        let tools = Tools::find()?;
        let openssl = real_tool("openssl")?;
        let port = free_port();
        let mut cluster = PgCluster::create(tools, port);
        cluster.init(Durability::Off);
        cluster.tls = Some(cluster.make_certificates(&openssl, names));
        cluster.init_tls();
        cluster.start();
        Some(cluster)
    }

    /// Like [`PgCluster::spawn`], but with PostgreSQL's default durability (`fsync`,
    /// `synchronous_commit` and `full_page_writes` on): every commit waits for its WAL to reach
    /// the disk, as on the servers users run. For benchmarks, whose figures must include that
    /// wait; tests take the faster [`PgCluster::spawn`].
    pub fn spawn_durable() -> Option<PgCluster> {
        Some(PgCluster::start_with(Tools::find()?, Durability::Default))
    }

    fn start_with(tools: Tools, durability: Durability) -> PgCluster {
        let cluster = PgCluster::create(tools, PORT);
        cluster.init(durability);
        cluster.start();
        cluster
    }

    /// The directory and its supervisor; no cluster in it yet.
    fn create(tools: Tools, port: u16) -> PgCluster {
        let dir = make_dir();
        let me = std::fs::metadata(&dir)
            .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
            .uid();
        let run_as = (me == 0).then(server_user);
        if let Some((uid, gid)) = run_as {
            std::os::unix::fs::chown(&dir, Some(uid), Some(gid))
                .unwrap_or_else(|e| panic!("chown {} to {uid}:{gid}: {e}", dir.display()));
        }
        // The supervisor comes first, so that a cluster that fails half-way is cleaned up too (its
        // pipe closes as this function unwinds).
        let supervisor = Command::new("sh")
            .arg("-c")
            .arg(SUPERVISOR)
            .arg("sunopoll-pg-supervisor")
            .arg(&dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Its own process group: a Ctrl-C at the terminal stops the tests, and the supervisor
            // outlives them to clean up.
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("starting sh (the cluster's supervisor): {e}"));
        PgCluster {
            tools,
            dir,
            port,
            tls: None,
            run_as,
            next_db: AtomicU64::new(1),
            lifecycle: Mutex::new(()),
            supervisor: Mutex::new(supervisor),
        }
    }

    /// initdb, then the settings: only the Unix socket in our directory, and with
    /// [`Durability::Off`] no durability (a test's data is thrown away anyway).
    fn init(&self, durability: Durability) {
        let data = self.data_dir();
        let mut initdb = self.server_command(&self.tools.initdb);
        initdb
            .arg("-D")
            .arg(&data)
            .args(["--auth=trust", "-U", SUPERUSER, "--no-sync"])
            .args(["--encoding=UTF8", "--locale=C", "--no-instructions"]);
        self.run(initdb, "initdb");
        let durability = match durability {
            Durability::Off => "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n",
            Durability::Default => "",
        };
        let settings = format!(
            "\n# sunopoll tests\nlisten_addresses = ''\nunix_socket_directories = '{}'\nport = {}\n\
             {durability}max_connections = 200\n",
            self.dir.display(),
            self.port
        );
        append(&data.join("postgresql.conf"), &settings);
    }

    /// Makes a throwaway CA (`tls/ca.crt`) and a server certificate it signs for `names`
    /// (`tls/server.crt`, its key `tls/server.key` mode 0600 and the server user's, as the
    /// server insists), all with the `openssl` command.
    fn make_certificates(&self, openssl: &Path, names: &str) -> TlsFiles {
        let tls = self.dir.join("tls");
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&tls)
            .unwrap_or_else(|e| panic!("creating {}: {e}", tls.display()));
        // Our own configuration, so the system's openssl.cnf (its defaults and extensions)
        // plays no part. A CA that webpki accepts needs basicConstraints CA:TRUE and keyCertSign.
        let config = format!(
            "[req]\ndistinguished_name = dn\nprompt = no\n[dn]\nCN = placeholder\n\
             [ca]\nbasicConstraints = critical,CA:TRUE\nkeyUsage = critical,keyCertSign,cRLSign\n\
             subjectKeyIdentifier = hash\n\
             [server]\nbasicConstraints = critical,CA:FALSE\n\
             keyUsage = critical,digitalSignature,keyEncipherment\nextendedKeyUsage = serverAuth\n\
             subjectAltName = {names}\nsubjectKeyIdentifier = hash\nauthorityKeyIdentifier = keyid\n"
        );
        let cnf = tls.join("openssl.cnf");
        std::fs::write(&cnf, config).unwrap_or_else(|e| panic!("writing {}: {e}", cnf.display()));
        let files = TlsFiles {
            ca: tls.join("ca.crt"),
            cert: tls.join("server.crt"),
            key: tls.join("server.key"),
        };
        let (ca_key, csr) = (tls.join("ca.key"), tls.join("server.csr"));
        let openssl_cmd = |args: &[&str]| {
            let mut cmd = Command::new(openssl);
            cmd.args(args)
                .env("OPENSSL_CONF", &cnf)
                .current_dir(&tls)
                .stdin(Stdio::null());
            cmd
        };
        // P-256 keys: quick to make, and what rustls verifies.
        let new_key = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
        ];
        let mut ca = openssl_cmd(&["req", "-x509", "-config"]);
        ca.arg(&cnf)
            .args([
                "-extensions",
                "ca",
                "-subj",
                "/CN=sunopoll test CA",
                "-days",
                CERT_DAYS,
            ])
            .args(new_key)
            .arg("-keyout")
            .arg(&ca_key)
            .arg("-out")
            .arg(&files.ca);
        self.run(ca, "openssl req (the test CA)");
        let mut request = openssl_cmd(&["req", "-new", "-config"]);
        request
            .arg(&cnf)
            .args(["-subj", "/CN=sunopoll test server"])
            .args(new_key)
            .arg("-keyout")
            .arg(&files.key)
            .arg("-out")
            .arg(&csr);
        self.run(request, "openssl req (the server's key)");
        let mut sign = openssl_cmd(&["x509", "-req", "-in"]);
        sign.arg(&csr)
            .arg("-CA")
            .arg(&files.ca)
            .arg("-CAkey")
            .arg(&ca_key)
            .args(["-set_serial", "2", "-days", CERT_DAYS, "-extfile"])
            .arg(&cnf)
            .args(["-extensions", "server", "-out"])
            .arg(&files.cert);
        self.run(sign, "openssl x509 (signing the server's certificate)");
        // The server refuses a key file that others may read, or that is neither its own nor
        // root's.
        std::fs::set_permissions(&files.key, std::fs::Permissions::from_mode(0o600))
            .unwrap_or_else(|e| panic!("chmod 600 {}: {e}", files.key.display()));
        if let Some((uid, gid)) = self.run_as {
            for path in [&tls, &files.cert, &files.key] {
                std::os::unix::fs::chown(path, Some(uid), Some(gid))
                    .unwrap_or_else(|e| panic!("chown {} to {uid}:{gid}: {e}", path.display()));
            }
        }
        files
    }

    /// The TLS settings: TCP on 127.0.0.1 with `ssl = on`, and a pg_hba that lets TCP clients in
    /// only over TLS (the Unix socket as before).
    fn init_tls(&self) {
        let tls = self.tls.as_ref().expect("certificates are made first");
        let data = self.data_dir();
        append(
            &data.join("postgresql.conf"),
            &format!(
                "\n# sunopoll TLS tests\nlisten_addresses = '127.0.0.1'\nssl = on\n\
                 ssl_cert_file = '{}'\nssl_key_file = '{}'\n",
                tls.cert.display(),
                tls.key.display()
            ),
        );
        let hba = data.join("pg_hba.conf");
        std::fs::write(
            &hba,
            "# sunopoll TLS tests: TCP clients only over TLS\n\
             local all all trust\n\
             hostssl all all 127.0.0.1/32 trust\n\
             hostnossl all all all reject\n",
        )
        .unwrap_or_else(|e| panic!("writing {}: {e}", hba.display()));
    }

    /// The throwaway CA's certificate (PEM) that signed the server's: what `[store] ca-file`
    /// names to trust it. Panics on a cluster that is not from [`PgCluster::spawn_tls`].
    pub fn ca_file(&self) -> &Path {
        &self.tls_files().ca
    }

    /// A connection URL for database `db` over TCP to 127.0.0.1 with `sslmode` (`disable`,
    /// `prefer`, `require`), as the superuser (pg_hba trusts it over TLS). Panics on a cluster
    /// that is not from [`PgCluster::spawn_tls`].
    pub fn tls_url(&self, db: &str, sslmode: &str) -> String {
        self.tls_files();
        format!(
            "postgresql://{SUPERUSER}@127.0.0.1:{}/{}?sslmode={sslmode}",
            self.port,
            percent_encode(db)
        )
    }

    fn tls_files(&self) -> &TlsFiles {
        self.tls
            .as_ref()
            .expect("a cluster from PgCluster::spawn_tls (this one has no TLS)")
    }

    /// The directory the server's Unix socket is in (the `host` of a connection to it).
    pub fn socket_dir(&self) -> &Path {
        &self.dir
    }

    /// The cluster's data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// The postmaster's process id while the server runs (from `postmaster.pid`), for tests that
    /// watch or kill it.
    pub fn postmaster_pid(&self) -> Option<u32> {
        let text = std::fs::read_to_string(self.data_dir().join("postmaster.pid")).ok()?;
        text.lines().next()?.trim().parse().ok()
    }

    /// A connection URL for database `db` that tokio-postgres accepts: the superuser over the Unix
    /// socket, e.g. `postgresql://postgres@/test_1?host=%2Ftmp%2Fsunopoll-pg-…`.
    pub fn url(&self, db: &str) -> String {
        format!(
            "postgresql://{SUPERUSER}@/{}?host={}&port={}",
            percent_encode(db),
            percent_encode(&self.dir.to_string_lossy()),
            self.port
        )
    }

    /// Creates a fresh, empty database with a name no other call on this cluster gets, and
    /// returns its connection URL (see [`PgCluster::url`]).
    pub fn database(&self) -> String {
        let name = format!("test_{}", self.next_db.fetch_add(1, Ordering::Relaxed));
        self.psql("postgres", &format!("CREATE DATABASE {name}"));
        self.url(&name)
    }

    /// Runs `sql` (one or more statements, each on its own as in a psql script, stopping at the
    /// first error) in database `db` with `psql -At`, and returns what it prints: one line per
    /// row, columns separated by `|`. Panics with psql's stderr when it fails.
    pub fn psql(&self, db: &str, sql: &str) -> String {
        let mut psql = Command::new(&self.tools.psql);
        clear_pg_env(&mut psql);
        psql.args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h"])
            .arg(&self.dir)
            .args([
                "-p",
                &self.port.to_string(),
                "-U",
                SUPERUSER,
                "-d",
                db,
                "-f",
                "-",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = psql
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", self.tools.psql.display()));
        let mut stdin = child.stdin.take().expect("stdin was piped");
        // Written from another thread: psql may fill its stdout before it has read all of stdin.
        // A write error (psql gone early) shows up as psql's own failure below.
        let output = std::thread::scope(|s| {
            s.spawn(move || {
                let _ = stdin.write_all(sql.as_bytes());
            });
            child.wait_with_output()
        })
        .unwrap_or_else(|e| panic!("waiting for psql: {e}"));
        if !output.status.success() {
            panic!(
                "psql -d {db} failed ({}) on:\n{sql}\n{}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            );
        }
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Starts the server (after [`PgCluster::stop`]) and waits until it accepts connections.
    pub fn start(&self) {
        let _lifecycle = self.lifecycle.lock().unwrap_or_else(|e| e.into_inner());
        self.pg_ctl("start");
        self.wait_ready();
    }

    /// Stops the server (fast mode: sessions are ended, nothing written is lost).
    pub fn stop(&self) {
        let _lifecycle = self.lifecycle.lock().unwrap_or_else(|e| e.into_inner());
        self.pg_ctl("stop");
    }

    /// Restarts the server (`pg_ctl restart -m fast`: every session is ended, the data stays) and
    /// waits until it accepts connections again.
    pub fn restart(&self) {
        let _lifecycle = self.lifecycle.lock().unwrap_or_else(|e| e.into_inner());
        self.pg_ctl("restart");
        self.wait_ready();
    }

    fn pg_ctl(&self, action: &str) {
        let mut pg_ctl = self.server_command(&self.tools.pg_ctl);
        pg_ctl
            .arg("-D")
            .arg(self.data_dir())
            // The log is where the server's output goes; without it the server would hold
            // pg_ctl's stdout, and reading that would wait for the server to end.
            .arg("-l")
            .arg(self.log_path())
            .args(["-w", "-t", "30", "-m", "fast", action]);
        self.run(pg_ctl, &format!("pg_ctl {action}"));
    }

    /// Waits (at most 30 s) until the server accepts connections; panics with its log otherwise.
    fn wait_ready(&self) {
        for _ in 0..READY_TRIES {
            let mut ready = Command::new(&self.tools.pg_isready);
            clear_pg_env(&mut ready);
            let status = ready
                .arg("-q")
                .arg("-h")
                .arg(&self.dir)
                .args([
                    "-p",
                    &self.port.to_string(),
                    "-U",
                    SUPERUSER,
                    "-d",
                    "postgres",
                ])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .unwrap_or_else(|e| panic!("starting pg_isready: {e}"));
            if status.success() {
                return;
            }
            std::thread::sleep(READY_PAUSE);
        }
        panic!(
            "PostgreSQL in {} did not accept connections within 30 s; its log ends:\n{}",
            self.dir.display(),
            self.log_tail()
        );
    }

    /// A command for a server program (initdb, pg_ctl): as the server user when we are root, in
    /// the cluster's directory, with no `PG*` variable of ours steering it elsewhere.
    fn server_command(&self, program: &Path) -> Command {
        let mut cmd = Command::new(program);
        clear_pg_env(&mut cmd);
        if let Some((uid, gid)) = self.run_as {
            // std drops root's supplementary groups when it switches uid.
            cmd.uid(uid).gid(gid);
        }
        cmd.current_dir(&self.dir).stdin(Stdio::null());
        cmd
    }

    /// Runs `cmd` to the end; panics with its output and the server log's tail when it fails.
    fn run(&self, mut cmd: Command, what: &str) -> Output {
        let output = cmd
            .output()
            .unwrap_or_else(|e| panic!("starting {what}: {e}"));
        if !output.status.success() {
            panic!(
                "{what} failed ({}) for the cluster in {}:\n{}{}\nthe server log ends:\n{}",
                output.status,
                self.dir.display(),
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr),
                self.log_tail()
            );
        }
        output
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("server.log")
    }

    /// The last 40 lines of the server's log.
    fn log_tail(&self) -> String {
        match std::fs::read_to_string(self.log_path()) {
            Ok(log) => {
                let lines: Vec<&str> = log.lines().collect();
                lines[lines.len().saturating_sub(40)..].join("\n")
            }
            Err(e) => format!("(no log: {e})"),
        }
    }
}

impl Drop for PgCluster {
    /// Closes the supervisor's pipe and waits for it: the server is stopped and the directory
    /// removed when this returns (the supervisor's own waits are bounded).
    fn drop(&mut self) {
        let supervisor = self.supervisor.get_mut().unwrap_or_else(|e| e.into_inner());
        drop(supervisor.stdin.take());
        let _ = supervisor.wait();
    }
}

/// The certificate files of a TLS cluster, in its directory's `tls/`.
#[derive(Debug)]
struct TlsFiles {
    /// The throwaway CA's certificate.
    ca: PathBuf,
    /// The server's certificate and its key.
    cert: PathBuf,
    key: PathBuf,
}

/// Appends `text` to the file at `path`.
fn append(path: &Path, text: &str) {
    std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .unwrap_or_else(|e| panic!("appending to {}: {e}", path.display()));
}

/// A TCP port on 127.0.0.1 that nothing listens on now (the kernel's pick for port 0). Another
/// process could take it before the server binds it; the server's start then fails loudly.
fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap_or_else(|e| panic!("binding 127.0.0.1:0 to find a free port: {e}"));
    listener
        .local_addr()
        .unwrap_or_else(|e| panic!("the address of 127.0.0.1:0: {e}"))
        .port()
}

/// A new private directory (mode 0700) for a cluster. Under the temporary directory unless the
/// socket's path would be too long there, then under /tmp.
fn make_dir() -> PathBuf {
    let mut base = std::env::temp_dir();
    // "/sunopoll-pg-<pid>-<8 hex>/.s.PGSQL.5432"
    if base.as_os_str().len() + 50 > MAX_SOCKET_PATH {
        base = PathBuf::from("/tmp");
    }
    let mut last_error = None;
    for _ in 0..16 {
        let dir = base.join(format!(
            "sunopoll-pg-{}-{:08x}",
            std::process::id(),
            fastrand::u32(..)
        ));
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => return dir,
            Err(e) => last_error = Some(e),
        }
    }
    panic!(
        "could not create a directory for PostgreSQL under {}: {}",
        base.display(),
        last_error.map_or_else(String::new, |e| e.to_string())
    );
}

/// The uid and gid to run the server as when we are root: the `postgres` user (Debian's package
/// makes it), else `nobody`.
fn server_user() -> (u32, u32) {
    let passwd = std::fs::read_to_string("/etc/passwd")
        .unwrap_or_else(|e| panic!("reading /etc/passwd (for the postgres user): {e}"));
    for name in ["postgres", "nobody"] {
        let found = passwd.lines().find_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            if fields.len() < 4 || fields[0] != name {
                return None;
            }
            Some((fields[2].parse().ok()?, fields[3].parse().ok()?))
        });
        if let Some(ids) = found {
            return ids;
        }
    }
    panic!(
        "running as root and /etc/passwd has neither a postgres nor a nobody user to run \
         PostgreSQL as (initdb and postgres refuse to run as root)"
    );
}

/// Removes every `PG*` variable (PGHOST, PGDATA, PGPASSWORD, …) from `cmd`'s environment, so
/// that only the arguments say where the cluster is.
fn clear_pg_env(cmd: &mut Command) {
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("PG") {
            cmd.env_remove(key);
        }
    }
}

/// Percent-encodes everything but unreserved characters and `/` (for a URL's path or query).
fn percent_encode(s: &str) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr as _;

    /// Set in the child process of [`cluster_goes_away_with_its_process`]: where it writes its
    /// cluster's directory and postmaster pid.
    const HANDOFF: &str = "SUNOPOLL_TEST_PG_HANDOFF";
    /// Set too when the child is to wait to be SIGKILLed rather than to exit (normally, once the
    /// handoff file is gone).
    const HOLD: &str = "SUNOPOLL_TEST_PG_HOLD";

    async fn connect(url: &str) -> tokio_postgres::Client {
        let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|e| panic!("connecting to {url}: {e}"));
        tokio::spawn(async move {
            let _ = connection.await;
        });
        client
    }

    async fn public_tables(client: &tokio_postgres::Client) -> i64 {
        client
            .query_one(
                "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'",
                &[],
            )
            .await
            .expect("counting tables")
            .get(0)
    }

    #[test]
    fn the_url_names_the_socket_and_the_database() {
        let Some(cluster) = postgres() else { return };
        let url = cluster.url("some_db");
        let config = tokio_postgres::Config::from_str(&url).expect("tokio-postgres parses it");
        assert_eq!(
            config.get_hosts(),
            &[tokio_postgres::config::Host::Unix(
                cluster.socket_dir().to_path_buf()
            )]
        );
        assert_eq!(config.get_ports(), &[PORT]);
        assert_eq!(config.get_dbname(), Some("some_db"));
        assert_eq!(config.get_user(), Some(SUPERUSER));
    }

    #[test]
    fn percent_encoding_keeps_paths_readable_and_escapes_the_rest() {
        assert_eq!(percent_encode("/tmp/a-b_c.d~e"), "/tmp/a-b_c.d~e");
        assert_eq!(
            percent_encode("/tmp/a b&c=d?é"),
            "/tmp/a%20b%26c%3Dd%3F%C3%A9"
        );
    }

    #[tokio::test]
    async fn each_database_is_fresh_empty_and_separate() {
        let Some(cluster) = postgres() else { return };
        let (a, b) = (cluster.database(), cluster.database());
        assert_ne!(a, b);
        let (a, b) = (connect(&a).await, connect(&b).await);
        for client in [&a, &b] {
            let one: i32 = client.query_one("SELECT 1", &[]).await.unwrap().get(0);
            assert_eq!(one, 1);
            assert_eq!(public_tables(client).await, 0, "a new database is empty");
        }
        a.batch_execute("CREATE TABLE marker (x int); INSERT INTO marker VALUES (42)")
            .await
            .unwrap();
        assert_eq!(public_tables(&a).await, 1);
        assert_eq!(
            public_tables(&b).await,
            0,
            "a table in one is not in the other"
        );
        let a_name: String = a
            .query_one("SELECT current_database()", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(cluster.psql(&a_name, "SELECT x FROM marker"), "42\n");
    }

    #[test]
    fn psql_prints_rows_and_fails_loudly() {
        let Some(cluster) = postgres() else { return };
        assert_eq!(
            cluster.psql("postgres", "SELECT 1, 'a'; SELECT 2, 'b'"),
            "1|a\n2|b\n"
        );
        let failed = std::panic::catch_unwind(|| cluster.psql("postgres", "SELEC 1"))
            .expect_err("bad SQL fails");
        let message = failed
            .downcast_ref::<String>()
            .expect("the panic carries a message");
        assert!(message.contains("syntax error"), "{message}");
    }

    #[tokio::test]
    async fn restart_ends_sessions_and_keeps_data() {
        // Its own cluster: a restart would cut the other tests' sessions on the shared one.
        let Some(cluster) = PgCluster::spawn() else {
            return;
        };
        let url = cluster.database();
        let before = connect(&url).await;
        before
            .batch_execute("CREATE TABLE kept (x int); INSERT INTO kept VALUES (7)")
            .await
            .unwrap();
        let pid = cluster.postmaster_pid().expect("the server runs");
        cluster.restart();
        assert_ne!(cluster.postmaster_pid(), Some(pid), "a new postmaster");
        assert!(
            before.simple_query("SELECT 1").await.is_err(),
            "a session from before the restart was ended"
        );
        let after = connect(&url).await;
        let x: i32 = after
            .query_one("SELECT x FROM kept", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(x, 7);
        cluster.stop();
        assert_eq!(cluster.postmaster_pid(), None, "stopped");
        cluster.start();
        let again = connect(&url).await;
        let x: i32 = again
            .query_one("SELECT x FROM kept", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(x, 7);
        let dir = cluster.socket_dir().to_path_buf();
        drop(cluster);
        assert!(!dir.exists(), "dropping a cluster removes its directory");
    }

    /// True while `pid` is a running (not zombie) process named postgres.
    fn postmaster_alive(pid: u32) -> bool {
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let state = stat.rsplit_once(')').map(|(_, rest)| rest.trim_start());
        comm.trim() == "postgres" && state.is_some_and(|s| !s.starts_with('Z'))
    }

    /// The other half of [`cluster_goes_away_with_its_process`], run by it in a child process:
    /// starts the shared cluster, checks it answers, hands over where it is, and then returns when
    /// the parent removes the handoff file or (with [`HOLD`]) waits to be killed.
    #[test]
    #[ignore = "run in a child process by cluster_goes_away_with_its_process"]
    fn cluster_in_a_child_process() {
        let Some(cluster) = postgres() else { return };
        assert_eq!(cluster.psql("postgres", "SELECT 1"), "1\n");
        let Some(handoff) = std::env::var_os(HANDOFF) else {
            return;
        };
        let pid = cluster.postmaster_pid().expect("the server runs");
        let text = format!("{}\n{pid}\n", cluster.socket_dir().display());
        let partial = PathBuf::from(&handoff).with_extension("partial");
        std::fs::write(&partial, text).unwrap();
        std::fs::rename(&partial, &handoff).unwrap();
        // Held until killed, or until the parent has seen the cluster run and removes the file.
        let hold = std::env::var_os(HOLD).is_some();
        for _ in 0..600 {
            if !hold && !Path::new(&handoff).exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("was not killed or released within 60 s");
    }

    #[test]
    fn cluster_goes_away_with_its_process() {
        if Tools::find().is_none() {
            return;
        }
        let scratch = tempfile::tempdir().unwrap();
        for killed in [true, false] {
            let handoff = scratch.path().join(format!("handoff-{killed}"));
            let stderr = std::fs::File::create(scratch.path().join("stderr")).unwrap();
            let mut child = Command::new(std::env::current_exe().unwrap());
            child
                .args([
                    "--exact",
                    "testing::postgres::tests::cluster_in_a_child_process",
                ])
                .args(["--ignored", "--test-threads=1", "--nocapture"])
                .env(HANDOFF, &handoff)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(stderr);
            if killed {
                child.env(HOLD, "1");
            }
            let mut child = child.spawn().unwrap();
            let child_stderr =
                || std::fs::read_to_string(scratch.path().join("stderr")).unwrap_or_default();
            let mut handed = None;
            for _ in 0..600 {
                if let Ok(text) = std::fs::read_to_string(&handoff) {
                    handed = Some(text);
                    break;
                }
                if let Some(status) = child.try_wait().unwrap() {
                    panic!(
                        "the child ended ({status}) before its cluster ran:\n{}",
                        child_stderr()
                    );
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let handed = handed.unwrap_or_else(|| {
                let _ = child.kill();
                panic!(
                    "the child's cluster did not start within 60 s:\n{}",
                    child_stderr()
                )
            });
            let (dir, pid) = handed.trim().split_once('\n').expect("dir and pid");
            let (dir, pid) = (PathBuf::from(dir), pid.parse::<u32>().unwrap());
            assert!(dir.is_dir(), "the child's cluster is in {}", dir.display());
            assert!(
                postmaster_alive(pid),
                "the child's postmaster {pid} runs; its log:\n{}",
                std::fs::read_to_string(dir.join("server.log")).unwrap_or_default()
            );
            if killed {
                child.kill().unwrap(); // SIGKILL: no destructor, no exit handler
                child.wait().unwrap();
            } else {
                std::fs::remove_file(&handoff).unwrap(); // lets the child's test end
                let status = child.wait().unwrap();
                assert!(status.success(), "{status}:\n{}", child_stderr());
            }
            let mut gone = false;
            for _ in 0..300 {
                if !postmaster_alive(pid) && !dir.exists() {
                    gone = true;
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            assert!(
                gone,
                "30 s after the child {}, its postmaster {pid} runs: {}, {} exists: {}",
                if killed { "was killed" } else { "exited" },
                postmaster_alive(pid),
                dir.display(),
                dir.exists()
            );
        }
    }
}
