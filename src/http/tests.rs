//! The server loop on 127.0.0.1 port 0 with real sockets: the connection cap, the header
//! timeout, keep-alive, the body cap and timeout, and streams that end when the client goes
//! away or the server stops. Timeouts are short configured ones; every wait has a bound.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{Body, Limits, event, event_stream, read_body, serve, text};

/// The bound on every wait in these tests: far longer than anything should take.
const BOUND: Duration = Duration::from_secs(10);

const LIMITS: Limits = Limits {
    max_connections: 4,
    header_timeout: Duration::from_secs(60),
    keep_alive: true,
};

fn with_header_timeout(ms: u64) -> Limits {
    Limits {
        header_timeout: Duration::from_millis(ms),
        ..LIMITS
    }
}

struct Running {
    addr: SocketAddr,
    cancel: CancellationToken,
    tracker: TaskTracker,
}

async fn start<H, F>(limits: Limits, handler: H) -> Running
where
    H: Fn(Request<Incoming>, SocketAddr) -> F + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let cancel = CancellationToken::new();
    let tracker = TaskTracker::new();
    tracker.spawn(serve(
        "test",
        listener,
        limits,
        handler,
        cancel.clone(),
        tracker.clone(),
    ));
    Running {
        addr,
        cancel,
        tracker,
    }
}

impl Running {
    /// Cancels and waits for every task the server started, the loop included.
    async fn stop(self) {
        self.cancel.cancel();
        self.tracker.close();
        tokio::time::timeout(BOUND, self.tracker.wait())
            .await
            .expect("every connection task ends once the server is cancelled");
    }

    async fn connect(&self) -> TcpStream {
        TcpStream::connect(self.addr).await.expect("connect")
    }
}

/// Reads until `needle` has arrived (or the connection ends); what came so far.
async fn read_until(s: &mut TcpStream, needle: &str) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains(needle) {
        match tokio::time::timeout(BOUND, s.read(&mut buf))
            .await
            .expect("the server answers within the bound")
        {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&got).into_owned()
}

/// Reads until the server closes the connection (a reset counts as closing); what came.
async fn read_to_end(s: &mut TcpStream) -> String {
    read_until(s, "\u{0}never sent\u{0}").await
}

async fn ok(_req: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
    text(StatusCode::OK, format!("hello {}", peer.ip()))
}

const GET: &[u8] = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n";

#[tokio::test]
async fn past_the_cap_a_connection_is_answered_busy_and_a_freed_slot_serves_again() {
    let server = start(
        Limits {
            max_connections: 2,
            ..LIMITS
        },
        ok,
    )
    .await;
    // Two kept-alive connections, each answered once, hold both slots.
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = server.connect().await;
        s.write_all(GET).await.expect("write");
        let answer = read_until(&mut s, "hello 127.0.0.1").await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        held.push(s);
    }
    let mut third = server.connect().await;
    third.write_all(GET).await.expect("write");
    let busy = read_to_end(&mut third).await;
    assert!(busy.starts_with("HTTP/1.1 503"), "{busy}");
    assert!(busy.contains("retry-after: 1\r\n"), "{busy}");
    assert!(
        busy.contains("busy: the test server serves at most 2 connections at once"),
        "{busy}"
    );
    // A slot is free once the server has seen the first client leave; until then a new
    // client may still hear "busy".
    drop(held.remove(0));
    let mut served = String::new();
    for _ in 0..200 {
        let mut s = server.connect().await;
        s.write_all(GET).await.expect("write");
        served = read_until(&mut s, "hello").await;
        if served.starts_with("HTTP/1.1 200") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(served.starts_with("HTTP/1.1 200"), "{served}");
    server.stop().await;
}

#[tokio::test]
async fn a_client_that_sends_half_a_head_is_cut_off_unanswered() {
    let server = start(with_header_timeout(200), ok).await;
    let mut s = server.connect().await;
    s.write_all(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        .await
        .expect("write");
    let got = read_to_end(&mut s).await;
    assert!(!got.contains("200"), "{got}");
    server.stop().await;
}

#[tokio::test]
async fn keep_alive_carries_a_second_request_and_the_header_timeout_bounds_the_idle_time() {
    let server = start(with_header_timeout(300), ok).await;
    let mut s = server.connect().await;
    for _ in 0..2 {
        s.write_all(GET).await.expect("write");
        let answer = read_until(&mut s, "hello 127.0.0.1").await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(!answer.contains("connection: close"), "{answer}");
    }
    // Now idle: closed once the header timeout passes, with nothing more said.
    assert_eq!(read_to_end(&mut s).await, "");
    server.stop().await;
}

#[tokio::test]
async fn without_keep_alive_the_connection_closes_after_one_answer() {
    let server = start(
        Limits {
            keep_alive: false,
            ..LIMITS
        },
        ok,
    )
    .await;
    let mut s = server.connect().await;
    s.write_all(GET).await.expect("write");
    let answer = read_to_end(&mut s).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("connection: close\r\n"), "{answer}");
    assert!(answer.ends_with("hello 127.0.0.1"), "{answer}");
    server.stop().await;
}

/// Answers with the length of the body it read, or the refusal.
async fn echo_length(req: Request<Incoming>, _peer: SocketAddr) -> Response<Body> {
    match read_body(req.into_body(), 16, Duration::from_millis(300)).await {
        Ok(body) => text(StatusCode::OK, format!("read {} bytes", body.len())),
        Err(refusal) => refusal.response(),
    }
}

async fn post(server: &Running, head: &str, body: &[u8]) -> String {
    let mut s = server.connect().await;
    s.write_all(format!("POST / HTTP/1.1\r\nHost: 127.0.0.1\r\n{head}\r\n").as_bytes())
        .await
        .expect("write head");
    s.write_all(body).await.expect("write body");
    // Enough for the answer to these small bodies; the refusals close the connection.
    read_until(&mut s, "bytes").await
}

#[tokio::test]
async fn a_body_over_the_cap_is_413_and_a_slow_one_408() {
    let server = start(LIMITS, echo_length).await;
    let fits = post(&server, "Content-Length: 5\r\n", b"hello").await;
    assert!(fits.starts_with("HTTP/1.1 200"), "{fits}");
    assert!(fits.ends_with("read 5 bytes"), "{fits}");

    let declared = post(&server, "Content-Length: 100\r\n", &[b'x'; 100]).await;
    assert!(declared.starts_with("HTTP/1.1 413"), "{declared}");
    assert!(declared.contains("connection: close\r\n"), "{declared}");
    assert!(
        declared.contains("the request body is larger than 16 bytes"),
        "{declared}"
    );

    let chunked = post(
        &server,
        "Transfer-Encoding: chunked\r\n",
        b"a\r\n0123456789\r\na\r\n0123456789\r\n0\r\n\r\n",
    )
    .await;
    assert!(chunked.starts_with("HTTP/1.1 413"), "{chunked}");

    let mut slow = server.connect().await;
    slow.write_all(b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 10\r\n\r\nabc")
        .await
        .expect("write");
    let cut = read_to_end(&mut slow).await;
    assert!(cut.starts_with("HTTP/1.1 408"), "{cut}");
    assert!(
        cut.contains("the request body did not arrive within 300ms"),
        "{cut}"
    );
    server.stop().await;
}

/// A server whose every answer is an event stream; the test gets each stream's sender.
async fn streaming() -> (Running, mpsc::Receiver<mpsc::Sender<Bytes>>) {
    let (senders, streams) = mpsc::channel(4);
    let server = start(LIMITS, move |_req, _peer| {
        let senders = senders.clone();
        async move {
            let (tx, rx) = mpsc::channel(8);
            senders.send(tx).await.expect("the test takes the sender");
            event_stream(rx)
        }
    })
    .await;
    (server, streams)
}

async fn open_stream(
    server: &Running,
    streams: &mut mpsc::Receiver<mpsc::Sender<Bytes>>,
) -> (TcpStream, mpsc::Sender<Bytes>) {
    let mut s = server.connect().await;
    s.write_all(b"GET /live HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .await
        .expect("write");
    let tx = tokio::time::timeout(BOUND, streams.recv())
        .await
        .expect("the handler ran")
        .expect("a sender");
    tx.send(event(Some(1), Some("stage"), "one"))
        .await
        .expect("the stream is open");
    let first = read_until(&mut s, "data: one\n\n").await;
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    assert!(first.contains("content-type: text/event-stream"), "{first}");
    assert!(first.contains("transfer-encoding: chunked"), "{first}");
    assert!(
        first.contains("id: 1\nevent: stage\ndata: one\n\n"),
        "{first}"
    );
    (s, tx)
}

#[tokio::test]
async fn a_stream_ends_when_its_client_goes_away() {
    let (server, mut streams) = streaming().await;
    let (s, tx) = open_stream(&server, &mut streams).await;
    drop(s);
    // Nothing is being sent: the server notices the hang-up by itself and drops the body.
    tokio::time::timeout(BOUND, tx.closed())
        .await
        .expect("the body is dropped once the client has gone");
    assert!(tx.send(event(None, None, "late")).await.is_err());
    server.stop().await;
}

#[tokio::test]
async fn a_stream_ends_cleanly_when_the_server_stops_though_its_producer_lives_on() {
    let (server, mut streams) = streaming().await;
    let (mut s, tx) = open_stream(&server, &mut streams).await;
    server.cancel.cancel();
    let rest = read_to_end(&mut s).await;
    assert!(
        rest.ends_with("0\r\n\r\n"),
        "the chunked end, then close: {rest:?}"
    );
    server.stop().await;
    assert!(tx.is_closed(), "the body was dropped");
}
