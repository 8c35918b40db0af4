//! The accept loop every HTTP face runs: hyper's HTTP/1.1 on each connection, a cap on
//! connections, a header timeout, keep-alive on or off, and a designed stop.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{Body, text};

/// How long the loop pauses after a failed `accept` (out of file descriptors, mostly), so that
/// it neither spins nor stops serving for good.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);

/// How a face's server treats connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections served at once. Past it, a connection is answered `503` with `Retry-After:
    /// 1` and closed (up to as many again, each within `header_timeout`); past those, it is
    /// closed unanswered.
    pub max_connections: usize,
    /// How long a client has to send a whole request head: from connecting, and on a
    /// kept-alive connection from the end of the previous answer, so it is also how long a
    /// connection may sit idle. A client too slow is disconnected unanswered.
    pub header_timeout: Duration,
    /// Whether a connection may carry more than one request.
    pub keep_alive: bool,
}

/// Serves HTTP/1.1 on `listener` with `handler` until `cancel` fires; `face` names the server
/// in logs. Every connection is a task on `tracker`.
///
/// The handler gets the request and the peer's address and returns the whole answer; its
/// future is dropped when the client goes away, so work that must outlive the client belongs
/// in a task of its own. When `cancel` fires the loop stops accepting, idle connections
/// close, answers in progress finish, and streaming bodies ([`Body::stream`]) end.
pub async fn serve<H, F>(
    face: &'static str,
    listener: TcpListener,
    limits: Limits,
    handler: H,
    cancel: CancellationToken,
    tracker: TaskTracker,
) where
    H: Fn(Request<Incoming>, SocketAddr) -> F + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    let handler = Arc::new(handler);
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    // Saying "busy" takes a task too; those are capped as well, or a flood of connections
    // would make as many tasks.
    let busy_slots = Arc::new(Semaphore::new(limits.max_connections));
    loop {
        let accepted = tokio::select! {
            () = cancel.cancelled() => return,
            a = listener.accept() => a,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(face, error = %e, "{face}: accept failed");
                tokio::time::sleep(ACCEPT_PAUSE).await;
                continue;
            }
        };
        // Answers are small and streamed events smaller: send each at once.
        let _ = stream.set_nodelay(true);
        if let Ok(permit) = Arc::clone(&slots).try_acquire_owned() {
            let handler = Arc::clone(&handler);
            let cancel = cancel.clone();
            tracker.spawn(async move {
                let _permit = permit;
                let stop = cancel.clone();
                let service = move |req| {
                    let answer = handler(req, peer);
                    let cancel = cancel.clone();
                    async move {
                        let mut answer = answer.await;
                        answer.body_mut().stop_on(&cancel);
                        Ok::<_, Infallible>(answer)
                    }
                };
                connection(face, stream, peer, limits, limits.keep_alive, service, stop).await;
            });
        } else if let Ok(permit) = Arc::clone(&busy_slots).try_acquire_owned() {
            tracing::debug!(face, %peer, max = limits.max_connections, "{face}: every connection slot is taken; answering 503");
            let limit = limits.max_connections;
            let stop = cancel.clone();
            tracker.spawn(async move {
                let _permit = permit;
                let service = move |_req| async move { Ok::<_, Infallible>(busy(face, limit)) };
                connection(face, stream, peer, limits, false, service, stop).await;
            });
        } else {
            tracing::debug!(face, %peer, "{face}: every connection slot is taken; connection closed");
        }
    }
}

/// One connection served by hyper until it ends, or until `cancel` (then gracefully: the
/// answer in progress, if any, is finished).
async fn connection<S, Fut>(
    face: &'static str,
    stream: TcpStream,
    peer: SocketAddr,
    limits: Limits,
    keep_alive: bool,
    service: S,
    cancel: CancellationToken,
) where
    S: Fn(Request<Incoming>) -> Fut,
    Fut: Future<Output = Result<Response<Body>, Infallible>>,
{
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .keep_alive(keep_alive)
        .serve_connection(TokioIo::new(stream), hyper::service::service_fn(service));
    let mut conn = std::pin::pin!(conn);
    let ended = tokio::select! {
        () = cancel.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
        r = conn.as_mut() => r,
    };
    if let Err(e) = ended {
        // A client that hangs up, or is too slow with its request head, ends here.
        tracing::debug!(face, %peer, error = %e, "{face}: connection ended with an error");
    }
}

/// The answer to a connection past the cap.
fn busy(face: &'static str, limit: usize) -> Response<Body> {
    let mut r = text(
        StatusCode::SERVICE_UNAVAILABLE,
        format!("busy: the {face} server serves at most {limit} connections at once; try again\n"),
    );
    let headers = r.headers_mut();
    headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    r
}
