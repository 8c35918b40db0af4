//! A server that misbehaves at the TCP level in front of a fake handler, for faults wiremock
//! cannot produce: a connection closed or reset without an answer (a server that never answers
//! is wiremock with a long delay). In `Pass` mode it relays connections to the upstream, so a
//! fault can start and end in the middle of a test. (The API's cut bodies and jittered
//! latency are the timed fake's own: `timed_api.rs`.)

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// What the server does with each new connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Relay to the upstream.
    Pass,
    /// Read the request, answer with a head and the first bytes of a body, then reset the
    /// connection (RST): an answer cut by a reset mid-body (the stand-in's ambiguous
    /// submission; the API's cut record-info answers are the timed fake's own).
    ResetMidBody,
    /// Read the request, then close without answering.
    Close,
    /// Read the request, then reset without answering.
    Reset,
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

    /// How many misbehaving answers were given (one per connection, i.e. per request).
    pub fn fault_count(&self) -> usize {
        self.faults.lock().expect("faults").len()
    }

    /// When each misbehaving answer began (one per connection, i.e. per request), with the
    /// request's `webhook-id` header (empty if it had none).
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
    match mode {
        Mode::Pass => {}
        Mode::ResetMidBody => {
            let partial = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 4096\r\n\r\n{\"code\":200,\"msg\":\"success\",\"data\":{\"taskId\":\"";
            let _ = stream.write_all(partial).await;
            let _ = stream.flush().await;
            // Let the client read the head and the first bytes before the reset arrives.
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
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
