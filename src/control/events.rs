//! `events`: a one-off page of the event log, or (`follow`) a stream of one line per event for
//! as long as the client stays connected.

use std::io;

use tokio::io::{AsyncReadExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio_util::sync::CancellationToken;

use super::socket::write_line;
use super::{Control, EVENTS_PAGE, EVENTS_PAGE_MAX, bad_record, check_id, store_error};
use crate::protocol::{
    ErrorBody, EventLine, EventView, EventsRequest, EventsResponse, answer_line,
};

pub(super) async fn list(req: EventsRequest, ctx: &Control) -> Result<EventsResponse, ErrorBody> {
    if let Some(t) = &req.task_id {
        check_id(t)?;
    }
    let limit = req.limit.unwrap_or(EVENTS_PAGE).clamp(1, EVENTS_PAGE_MAX);
    let events = ctx
        .store
        .events(req.since.unwrap_or(0), req.task_id, Some(limit + 1))
        .await
        .map_err(|e| store_error(&e))?;
    let more = events.len() > limit as usize;
    let events = events
        .into_iter()
        .take(limit as usize)
        .map(|e| EventView::from_record(e).map_err(bad_record))
        .collect::<Result<_, _>>()?;
    Ok(EventsResponse { events, more })
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
        let batch = match ctx
            .store
            .events(since, req.task_id.clone(), Some(EVENTS_PAGE))
            .await
        {
            Ok(b) => b,
            Err(e) => return write_line(write, &store_error(&e).to_line()).await,
        };
        let full = batch.len() == EVENTS_PAGE as usize;
        for record in batch {
            since = record.seq;
            let event = match EventView::from_record(record) {
                Ok(ev) => ev,
                Err(m) => return write_line(write, &bad_record(m).to_line()).await,
            };
            let line = answer_line(&EventLine { event })
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            write_line(write, &line).await?;
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
