//! `events`: a one-off page of the event log, or (`follow`) a stream of one line per event for
//! as long as the client stays connected. Both read the store a bounded page at a time
//! ([`EVENTS_PAGE_ROWS`], [`EVENTS_PAGE_BYTES`]) and write as they read, so neither a large
//! `limit` over large bodies nor a stalled follower makes the daemon hold more than a page.

use std::io;

use tokio::io::{AsyncReadExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio_util::sync::CancellationToken;

use serde_json::Value;
use tracing::warn;

use super::socket::write_line;
use super::{Control, EVENTS_PAGE, EVENTS_PAGE_MAX, bad_record, check_id, store_error};
use crate::protocol::{EventLine, EventView, EventsRequest, RowStream, answer_line};

/// Events read from the store per page, and the bodies' bytes that end a page early: a page
/// costs at most about this much (plus one body) however large the bodies or the `limit`.
pub const EVENTS_PAGE_ROWS: u32 = 64;
/// See [`EVENTS_PAGE_ROWS`]. 256 KiB is a hundred ordinary bodies; with every control slot
/// taken by a follower, the pages together stay in the hundreds of MiB at the very worst.
pub const EVENTS_PAGE_BYTES: usize = 256 * 1024;

/// Writes a one-off page of the event log (at most `limit`, with `more` when more follow) to
/// `write`, read from the store and written a page at a time, so `limit 10000` over large
/// bodies costs the daemon one page, not the whole answer.
pub(super) async fn stream(
    req: EventsRequest,
    ctx: &Control,
    write: &mut OwnedWriteHalf,
) -> io::Result<()> {
    if let Some(t) = &req.task_id
        && let Err(e) = check_id(t)
    {
        return write_line(write, &e.to_line()).await;
    }
    let limit = req.limit.unwrap_or(EVENTS_PAGE).clamp(1, EVENTS_PAGE_MAX);
    let mut since = req.since.unwrap_or(0);
    let (mut sent, mut more, mut sent_any) = (0u32, false, false);
    let mut answer = RowStream::open("events");
    'pages: loop {
        // One more than is left, to learn whether more follow.
        let want = (limit - sent).saturating_add(1).min(EVENTS_PAGE_ROWS);
        let page = match ctx
            .store
            .events_page(since, req.task_id.clone(), want, EVENTS_PAGE_BYTES)
            .await
        {
            Ok(p) => p,
            Err(e) if !sent_any => return write_line(write, &store_error(&e).to_line()).await,
            Err(e) => {
                warn!(error = %e, "the store failed in the middle of an `events` answer; closing that connection");
                return Err(io::Error::other(e.to_string()));
            }
        };
        if page.is_empty() {
            break;
        }
        for record in page {
            if sent == limit {
                more = true;
                break 'pages;
            }
            since = record.seq;
            let view = match EventView::from_record(record) {
                Ok(v) => v,
                Err(m) if !sent_any => return write_line(write, &bad_record(m).to_line()).await,
                Err(m) => {
                    warn!(error = %m, "a stored event cannot be shown; closing that `events` connection");
                    return Err(io::Error::new(io::ErrorKind::InvalidData, m));
                }
            };
            answer
                .push(&view)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            sent += 1;
        }
        write_line(write, &answer.take()).await?;
        sent_any = true;
    }
    write_line(write, &answer.close(&[("more", &Value::Bool(more))])).await
}

/// Streams events to a `--follow` client until it disconnects or the daemon stops.
pub(super) async fn follow(
    req: &EventsRequest,
    ctx: &Control,
    reader: &mut BufReader<OwnedReadHalf>,
    write: &mut OwnedWriteHalf,
    cancel: &CancellationToken,
) -> io::Result<()> {
    if let Some(t) = &req.task_id
        && let Err(e) = check_id(t)
    {
        return write_line(write, &e.to_line()).await;
    }
    let mut latest = ctx.events.clone();
    let mut since = match req.since {
        Some(s) => s,
        None => match ctx.store.last_seq().await {
            Ok(s) => s,
            Err(e) => return write_line(write, &store_error(&e).to_line()).await,
        },
    };
    let mut scratch = [0u8; 256];
    loop {
        latest.mark_unchanged();
        // A follower holds one page at a time, bounded in rows and bytes: nothing queues for
        // it, so a follower that stops reading costs one page until its write times out and
        // it is dropped, however far behind it is.
        let batch = match ctx
            .store
            .events_page(
                since,
                req.task_id.clone(),
                EVENTS_PAGE_ROWS,
                EVENTS_PAGE_BYTES,
            )
            .await
        {
            Ok(b) => b,
            Err(e) => return write_line(write, &store_error(&e).to_line()).await,
        };
        // A page may end early at its byte budget, so only an empty one means "caught up".
        let full = !batch.is_empty();
        for record in batch {
            since = record.seq;
            let event = match EventView::from_record(record) {
                Ok(ev) => ev,
                Err(m) => return write_line(write, &bad_record(m).to_line()).await,
            };
            let line = answer_line(&EventLine { event })
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            if let Err(e) = write_line(write, &line).await {
                if e.kind() == io::ErrorKind::TimedOut {
                    warn!(
                        since,
                        "an `events --follow` client stopped reading; disconnecting it (it resumes from its last event when it reconnects)"
                    );
                }
                return Err(e);
            }
        }
        if full {
            continue;
        }
        tokio::select! {
            () = cancel.cancelled() => return Ok(()),
            changed = latest.changed() => if changed.is_err() { return Ok(()) },
            // Anything the client sends, or its hanging up, ends the stream.
            n = reader.read(&mut scratch) => { let _ = n?; return Ok(()) }
        }
    }
}
