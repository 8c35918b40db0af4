//! A server that misbehaves at the TCP level, for faults wiremock cannot produce: a body cut
//! short, a connection reset in the middle of a body, a connection closed or reset without an
//! answer (a server that never answers is wiremock with a long delay). In `Pass` mode it relays
//! connections to an upstream (the fake API or a fake handler), so a fault can start and end in
//! the middle of a test.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// What the server does with each new connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Relay to the upstream.
    Pass,
    /// Read the request, send headers promising 4096 bytes and a few of them, then close
    /// cleanly (FIN): a truncated body.
    Truncate,
    /// The same, then reset the connection (RST): a reset in the middle of the body.
    ResetMidBody,
    /// Read the request, then close without answering.
    Close,
    /// Read the request, then reset without answering.
    Reset,
    /// Relay, holding each piece of a request for a varying 0–`ms` milliseconds before passing
    /// it on: a network whose latency jitters, so requests sent evenly arrive bunched.
    Jitter(u64),
}

/// The misbehaving server.
pub struct Chaos {
    addr: SocketAddr,
    mode: watch::Sender<Mode>,
    faults: Arc<Mutex<Vec<(Instant, String)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Chaos {
    /// Listens on 127.0.0.1 and relays to `upstream` until told otherwise.
    pub async fn start(upstream: SocketAddr) -> Chaos {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (mode, mode_rx) = watch::channel(Mode::Pass);
        let faults = Arc::new(Mutex::new(Vec::new()));
        let seen = faults.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let mode_rx = mode_rx.clone();
                let seen = seen.clone();
                tokio::spawn(async move {
                    let mode = *mode_rx.borrow();
                    if mode == Mode::Pass {
                        relay(stream, upstream, mode_rx).await;
                    } else if let Mode::Jitter(ms) = mode {
                        relay_jittered(stream, upstream, ms).await;
                    } else {
                        misbehave(stream, mode, &seen).await;
                    }
                });
            }
        });
        Chaos {
            addr,
            mode,
            faults,
            task,
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn uri(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Switches the behaviour for new connections; relayed connections are cut when it changes
    /// (a pooled keep-alive connection must not carry requests past the start of a fault).
    pub fn set(&self, mode: Mode) {
        self.mode.send_replace(mode);
    }

    /// When each misbehaving answer began (one per connection, i.e. per request).
    pub fn faults(&self) -> Vec<Instant> {
        self.fault_ids().into_iter().map(|f| f.0).collect()
    }

    /// The same, with each request's `webhook-id` header (empty if it had none).
    pub fn fault_ids(&self) -> Vec<(Instant, String)> {
        self.faults.lock().expect("faults").clone()
    }
}

impl Drop for Chaos {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn relay(mut client: TcpStream, upstream: SocketAddr, mut mode: watch::Receiver<Mode>) {
    let Ok(mut server) = TcpStream::connect(upstream).await else {
        return;
    };
    mode.mark_unchanged();
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
        _ = mode.changed() => {}
    }
}

async fn relay_jittered(client: TcpStream, upstream: SocketAddr, max_ms: u64) {
    let Ok(server) = TcpStream::connect(upstream).await else {
        return;
    };
    let (mut client_r, mut client_w) = client.into_split();
    let (mut server_r, mut server_w) = server.into_split();
    let up = async move {
        let mut buf = [0u8; 16384];
        loop {
            let n = match client_r.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let hold = fastrand::u64(0..=max_ms);
            tokio::time::sleep(Duration::from_millis(hold)).await;
            if server_w.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    let down = async move {
        let _ = tokio::io::copy(&mut server_r, &mut client_w).await;
    };
    tokio::join!(up, down);
}

/// Reads one HTTP/1.1 request (head, then a `Content-Length` body), at most 1 MiB; returns
/// its head, lower-cased.
async fn read_request(stream: &mut TcpStream) -> Option<String> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 || buf.len() > 1 << 20 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    while buf.len() < head_end + length.min(1 << 20) {
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Some(head)
}

async fn misbehave(mut stream: TcpStream, mode: Mode, seen: &Mutex<Vec<(Instant, String)>>) {
    let arrived = Instant::now();
    let Some(head) = read_request(&mut stream).await else {
        return;
    };
    let id = head
        .lines()
        .find_map(|l| l.strip_prefix("webhook-id:"))
        .map(|v| v.trim().to_owned())
        .unwrap_or_default();
    seen.lock().expect("faults").push((arrived, id));
    let partial = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 4096\r\n\r\n{\"code\":200,\"msg\":\"success\",\"data\":{\"taskId\":\"";
    match mode {
        Mode::Pass | Mode::Jitter(_) => {}
        Mode::Truncate => {
            let _ = stream.write_all(partial).await;
            let _ = stream.flush().await;
            let _ = stream.shutdown().await;
        }
        Mode::ResetMidBody => {
            let _ = stream.write_all(partial).await;
            let _ = stream.flush().await;
            // Let the client read the head and the first bytes before the reset arrives.
            tokio::time::sleep(Duration::from_millis(20)).await;
            let _ = stream.set_zero_linger();
        }
        Mode::Close => {
            let _ = stream.shutdown().await;
        }
        Mode::Reset => {
            let _ = stream.set_zero_linger();
        }
    }
    drop(stream);
}
