//! The one response body type every face answers with (a whole body or a stream), the
//! Server-Sent Events framing, and reading a request body within a cap and a time.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use hyper::body::{Frame, SizeHint};
use hyper::header::{self, HeaderValue};
use hyper::{Response, StatusCode};
use tokio::sync::mpsc;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use super::Refusal;
use crate::clock::format_duration;

/// A response body: either whole (its length known, sent with `Content-Length`) or a stream of
/// chunks sent as they come (chunked), which ends when its sender is dropped, when the client
/// goes away (the body is dropped then, so the sender's `send` fails), or when the server
/// stops ([`super::serve`] ends every streaming body on its cancellation token).
pub struct Body(Kind);

enum Kind {
    Full(Option<Bytes>),
    Stream {
        chunks: mpsc::Receiver<Bytes>,
        stop: Option<Pin<Box<WaitForCancellationFutureOwned>>>,
    },
}

impl std::fmt::Debug for Body {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Kind::Full(b) => f
                .debug_tuple("Body::Full")
                .field(&b.as_ref().map_or(0, Bytes::len))
                .finish(),
            Kind::Stream { .. } => f.write_str("Body::Stream"),
        }
    }
}

impl Body {
    /// A whole body.
    pub fn full(bytes: impl Into<Bytes>) -> Body {
        let bytes = bytes.into();
        Body(Kind::Full((!bytes.is_empty()).then_some(bytes)))
    }

    /// No body at all (`Content-Length: 0`).
    pub fn empty() -> Body {
        Body(Kind::Full(None))
    }

    /// A body streamed from `chunks`: each one is sent as it arrives. The channel is bounded,
    /// so a client that reads slowly slows its producer down instead of growing a buffer.
    pub fn stream(chunks: mpsc::Receiver<Bytes>) -> Body {
        Body(Kind::Stream { chunks, stop: None })
    }

    /// Whether this is a streaming body.
    pub fn is_stream(&self) -> bool {
        matches!(self.0, Kind::Stream { .. })
    }

    /// Ends a streaming body (cleanly: the chunked terminator is sent) once `cancel` fires,
    /// even while its producer still holds the sender. A whole body is left alone.
    pub(super) fn stop_on(&mut self, cancel: &CancellationToken) {
        if let Kind::Stream { stop, .. } = &mut self.0 {
            *stop = Some(Box::pin(cancel.clone().cancelled_owned()));
        }
    }
}

impl hyper::body::Body for Body {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        match &mut this.0 {
            Kind::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Kind::Stream { chunks, stop } => {
                // The stop is looked at first, so a producer that never pauses cannot keep
                // the stream open past shutdown.
                if let Some(stop) = stop
                    && stop.as_mut().poll(cx).is_ready()
                {
                    this.0 = Kind::Full(None);
                    return Poll::Ready(None);
                }
                loop {
                    return match chunks.poll_recv(cx) {
                        // An empty chunk would read as the end of a chunked body.
                        Poll::Ready(Some(b)) if b.is_empty() => continue,
                        Poll::Ready(Some(b)) => Poll::Ready(Some(Ok(Frame::data(b)))),
                        Poll::Ready(None) => Poll::Ready(None),
                        Poll::Pending => Poll::Pending,
                    };
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.0, Kind::Full(None))
    }

    fn size_hint(&self) -> SizeHint {
        match &self.0 {
            Kind::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Kind::Stream { .. } => SizeHint::default(),
        }
    }
}

/// A `text/event-stream` answer (Server-Sent Events) whose events are the chunks sent on
/// `events`, each made with [`event`]. Not cached, not sniffed.
pub fn event_stream(events: mpsc::Receiver<Bytes>) -> Response<Body> {
    let mut r = Response::new(Body::stream(events));
    *r.status_mut() = StatusCode::OK;
    let headers = r.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream; charset=utf-8"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    r
}

/// One Server-Sent Event: an optional `id` (what the browser sends back as `Last-Event-ID`
/// when it reconnects), an optional event `name`, and `data`, split into one `data:` line per
/// line so that a line break in the data cannot end the event or start a forged one.
pub fn event(id: Option<u64>, name: Option<&str>, data: &str) -> Bytes {
    let mut out = String::with_capacity(data.len() + 32);
    if let Some(id) = id {
        out.push_str(&format!("id: {id}\n"));
    }
    if let Some(name) = name {
        out.push_str("event: ");
        out.push_str(&name.replace(['\r', '\n'], " "));
        out.push('\n');
    }
    // The stream's own line ends: CRLF, CR and LF alike.
    for line in data.split("\r\n").flat_map(|l| l.split(['\r', '\n'])) {
        out.push_str("data: ");
        out.push_str(line);
        out.push('\n');
    }
    out.push('\n');
    Bytes::from(out)
}

/// Reads a request body whole: at most `cap` bytes (a declared `Content-Length` over it is
/// refused before anything is read), within `timeout` for the whole of it. Refusals: 413 over
/// the cap, 408 too slow, 400 when the client broke off or sent a malformed body.
pub async fn read_body<B>(body: B, cap: usize, timeout: Duration) -> Result<Bytes, Refusal>
where
    B: hyper::body::Body<Data = Bytes>,
    B::Error: std::fmt::Display,
{
    let too_large = || {
        Refusal::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the request body is larger than {}", size(cap)),
        )
    };
    if body.size_hint().lower() > cap as u64 {
        return Err(too_large());
    }
    let read = async {
        let mut body = std::pin::pin!(body);
        let mut buf = BytesMut::with_capacity((body.size_hint().lower() as usize).min(cap));
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| {
                Refusal::new(
                    StatusCode::BAD_REQUEST,
                    format!("the request body could not be read: {e}"),
                )
            })?;
            if let Ok(data) = frame.into_data() {
                if buf.len() + data.len() > cap {
                    return Err(too_large());
                }
                buf.extend_from_slice(&data);
            }
        }
        Ok(buf.freeze())
    };
    tokio::time::timeout(timeout, read)
        .await
        .unwrap_or_else(|_| {
            Err(Refusal::new(
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "the request body did not arrive within {}",
                    format_duration(timeout)
                ),
            ))
        })
}

/// A cap as people write it: `1 MiB (1048576 bytes)`, `64 KiB (65536 bytes)`, `1000 bytes`.
fn size(bytes: usize) -> String {
    const KIB: usize = 1024;
    const MIB: usize = 1024 * KIB;
    match bytes {
        b if b >= MIB && b.is_multiple_of(MIB) => format!("{} MiB ({b} bytes)", b / MIB),
        b if b >= KIB && b.is_multiple_of(KIB) => format!("{} KiB ({b} bytes)", b / KIB),
        b => format!("{b} bytes"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{Full, StreamBody};

    fn run<F: Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .expect("runtime")
            .block_on(f)
    }

    #[test]
    fn a_body_within_the_cap_is_read_whole() {
        let got = run(read_body(
            Full::new(Bytes::from_static(b"0123456789")),
            10,
            Duration::from_secs(1),
        ));
        assert_eq!(got, Ok(Bytes::from_static(b"0123456789")));
    }

    #[test]
    fn a_declared_length_over_the_cap_is_refused_with_the_cap_in_the_reason() {
        let got = run(read_body(
            Full::new(Bytes::from(vec![b'x'; 2 * 1024 * 1024])),
            1024 * 1024,
            Duration::from_secs(1),
        ));
        assert_eq!(
            got,
            Err(Refusal::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "the request body is larger than 1 MiB (1048576 bytes)"
            ))
        );
    }

    fn chunks(parts: &[&'static [u8]]) -> impl hyper::body::Body<Data = Bytes, Error = Infallible> {
        let frames: Vec<Result<Frame<Bytes>, Infallible>> = parts
            .iter()
            .map(|p| Ok(Frame::data(Bytes::from_static(p))))
            .collect();
        StreamBody::new(futures_util::stream::iter(frames))
    }

    #[test]
    fn an_undeclared_length_is_counted_as_it_arrives() {
        let got = run(read_body(
            chunks(&[b"12345", b"67890", b"x"]),
            10,
            Duration::from_secs(1),
        ));
        assert_eq!(
            got.map_err(|r| r.status),
            Err(StatusCode::PAYLOAD_TOO_LARGE)
        );
        let got = run(read_body(
            chunks(&[b"12345", b"67890"]),
            10,
            Duration::from_secs(1),
        ));
        assert_eq!(got, Ok(Bytes::from_static(b"1234567890")));
    }

    #[test]
    fn a_body_that_never_ends_is_cut_off_at_the_timeout() {
        let never = StreamBody::new(futures_util::stream::pending::<
            Result<Frame<Bytes>, Infallible>,
        >());
        let got = run(read_body(never, 10, Duration::from_secs(5)));
        assert_eq!(
            got,
            Err(Refusal::new(
                StatusCode::REQUEST_TIMEOUT,
                "the request body did not arrive within 5s"
            ))
        );
    }

    #[test]
    fn a_broken_body_is_a_bad_request() {
        let frames: Vec<Result<Frame<Bytes>, &str>> =
            vec![Ok(Frame::data(Bytes::from_static(b"ab"))), Err("reset")];
        let got = run(read_body(
            StreamBody::new(futures_util::stream::iter(frames)),
            10,
            Duration::from_secs(1),
        ));
        assert_eq!(
            got,
            Err(Refusal::new(
                StatusCode::BAD_REQUEST,
                "the request body could not be read: reset"
            ))
        );
    }

    #[test]
    fn sizes_read_as_people_write_them() {
        assert_eq!(size(1000), "1000 bytes");
        assert_eq!(size(1024), "1 KiB (1024 bytes)");
        assert_eq!(size(1536), "1536 bytes");
        assert_eq!(size(3 * 1024 * 1024), "3 MiB (3145728 bytes)");
    }

    #[test]
    fn an_event_keeps_its_lines_inside_it() {
        assert_eq!(event(None, None, "hello"), "data: hello\n\n");
        assert_eq!(
            event(Some(7), Some("stage"), "a\nb"),
            "id: 7\nevent: stage\ndata: a\ndata: b\n\n"
        );
        // CR, LF and CRLF all end a line of the stream; none may end the event.
        assert_eq!(
            event(None, Some("x\n\ndata: forged"), "1\r\n\r\n2\r3"),
            "event: x  data: forged\ndata: 1\ndata: \ndata: 2\ndata: 3\n\n"
        );
        assert_eq!(event(None, None, ""), "data: \n\n");
    }

    #[test]
    fn a_whole_body_says_its_length_and_a_stream_does_not() {
        use hyper::body::Body as _;
        assert_eq!(Body::full("abc").size_hint().exact(), Some(3));
        assert_eq!(Body::empty().size_hint().exact(), Some(0));
        assert!(Body::empty().is_end_stream());
        let (_tx, rx) = mpsc::channel(1);
        let s = Body::stream(rx);
        assert!(s.is_stream() && !s.is_end_stream());
        assert_eq!(s.size_hint().exact(), None);
    }

    #[test]
    fn a_stream_skips_empty_chunks_and_stops_on_the_token_with_its_sender_alive() {
        run(async {
            let (tx, rx) = mpsc::channel(4);
            let cancel = CancellationToken::new();
            let mut body = Body::stream(rx);
            body.stop_on(&cancel);
            tx.send(Bytes::new()).await.expect("send");
            tx.send(Bytes::from_static(b"one")).await.expect("send");
            let frame = body.frame().await.expect("a frame").expect("no error");
            assert_eq!(frame.into_data().ok(), Some(Bytes::from_static(b"one")));
            tx.send(Bytes::from_static(b"two")).await.expect("send");
            cancel.cancel();
            assert!(body.frame().await.is_none(), "ended on the token");
            drop(tx);
        });
    }
}
