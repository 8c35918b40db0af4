//! `list`: tasks, newest first, optionally of one state. The answer is streamed: read from the
//! store a page at a time and written as it is read, so `list` over a million tasks costs the
//! daemon one page, not the whole answer (issue 16).

use std::io;

use tokio::net::unix::OwnedWriteHalf;
use tracing::warn;

use super::socket::write_line;
use super::{Control, store_error};
use crate::protocol::{ErrorBody, ListRequest, RowStream, TaskView};
use crate::store::TaskState;

/// Tasks read from the store per page. A task row is a few hundred bytes, so a page is on the
/// order of 100 KiB however long the listing.
pub const TASKS_PAGE: u32 = 256;

fn state_of(req: &ListRequest) -> Result<Option<TaskState>, ErrorBody> {
    match req.state.as_deref() {
        None | Some("all") => Ok(None),
        Some(s) => TaskState::parse(s).map(Some).ok_or_else(|| {
            ErrorBody::new(
                "bad_request",
                format!("unknown state {s:?}; use active, done, failed, removed or all"),
            )
        }),
    }
}

/// Writes the answer to `req` to `write`, page by page. A bad request or a store that fails
/// before anything was sent gets an error line; a store failure mid-answer can only end the
/// connection (the line is half-written), and is logged.
pub(super) async fn stream(
    req: ListRequest,
    ctx: &Control,
    write: &mut OwnedWriteHalf,
) -> io::Result<()> {
    let state = match state_of(&req) {
        Ok(s) => s,
        Err(e) => return write_line(write, &e.to_line()).await,
    };
    let mut left = req.limit;
    let mut before = None;
    let mut answer = RowStream::open("tasks");
    let mut sent_any = false;
    loop {
        let want = left.map_or(TASKS_PAGE, |l| l.min(TASKS_PAGE));
        if want == 0 {
            break;
        }
        let (page, next) = match ctx.store.list_page(state, before, want).await {
            Ok(p) => p,
            Err(e) if !sent_any => return write_line(write, &store_error(&e).to_line()).await,
            Err(e) => {
                warn!(error = %e, "the store failed in the middle of a `list` answer; closing that connection");
                return Err(io::Error::other(e.to_string()));
            }
        };
        left = left.map(|l| l.saturating_sub(u32::try_from(page.len()).unwrap_or(u32::MAX)));
        for task in page {
            answer
                .push(&TaskView::from_record(task))
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        }
        write_line(write, &answer.take()).await?;
        sent_any = true;
        match next {
            Some(n) => before = Some(n),
            None => break,
        }
    }
    write_line(write, &answer.close(&[])).await
}
