//! `archive-redo`, and the archive's parts of `show` and `status`: each file with its state and
//! local path, the counts, and why downloads are paused.

use super::{Control, check_id, not_found, store_error};
use crate::protocol::{
    ArchiveRedoRequest, ArchiveRedoResponse, ArchiveStatusView, ErrorBody, FileView,
};
use crate::store::FileState;

/// `show`'s list of files (empty with the archive off).
pub(super) async fn files(ctx: &Control, task: &str) -> Result<Vec<FileView>, ErrorBody> {
    let Some(archive) = &ctx.archive else {
        return Ok(Vec::new());
    };
    let files = ctx
        .store
        .files_of(task.to_owned())
        .await
        .map_err(|e| store_error(&e))?;
    Ok(files
        .into_iter()
        .map(|f| {
            let location = archive.sink.location(task, &f.name);
            FileView::from_record(f, location)
        })
        .collect())
}

/// `status`'s archive part, and the problem to report if downloads are paused.
pub(super) async fn status(ctx: &Control) -> (Option<ArchiveStatusView>, Option<String>) {
    let Some(archive) = &ctx.archive else {
        return (None, None);
    };
    let s = archive.status.lock().map(|s| s.clone()).unwrap_or_default();
    let counts = ctx.store.archive_counts().await.ok();
    let problem = s
        .paused_cause
        .as_ref()
        .map(|c| format!("archive downloads are paused: {c}; free some space (or lower [archive] min-free) and they resume by themselves"));
    let view = ArchiveStatusView {
        state: if s.state.is_empty() {
            "starting".to_owned()
        } else {
            s.state
        },
        paused_cause: s.paused_cause,
        in_flight: s.in_flight,
        dir: s.dir,
        files: counts,
    };
    (Some(view), problem)
}

pub(super) async fn redo(
    req: ArchiveRedoRequest,
    ctx: &Control,
) -> Result<ArchiveRedoResponse, ErrorBody> {
    check_id(&req.task_id)?;
    let Some(archive) = &ctx.archive else {
        return Err(ErrorBody::new(
            "archive_off",
            "the archive is off: set [archive] dir in the config to keep files",
        ));
    };
    let files = ctx
        .store
        .files_of(req.task_id.clone())
        .await
        .map_err(|e| store_error(&e))?;
    if files.is_empty() {
        let known = ctx
            .store
            .show(req.task_id.clone())
            .await
            .map_err(|e| store_error(&e))?;
        if known.is_none() {
            return Err(not_found(&req.task_id));
        }
    }
    let mut verified = 0;
    let mut again = Vec::new();
    for f in &files {
        match f.state {
            FileState::Pending => {}
            FileState::Failed | FileState::Expired => again.push(f.name.clone()),
            FileState::Done => match archive.sink.verify(&req.task_id, &f.name).await {
                Ok(Some((size, sha)))
                    if Some(size) == f.size && Some(&sha) == f.sha256.as_ref() =>
                {
                    verified += 1;
                }
                Ok(Some(_)) => {
                    // Damaged: out of the way, or the archive job would take it as kept.
                    if let Err(e) = archive.sink.set_aside(&req.task_id, &f.name).await {
                        return Err(ErrorBody::new(
                            "io_error",
                            format!("cannot move the damaged {} aside: {e}", f.name),
                        ));
                    }
                    tracing::warn!(task_id = %req.task_id, file = %f.name, "archived file does not match its SHA-256; fetched again");
                    again.push(f.name.clone());
                }
                Ok(None) => again.push(f.name.clone()),
                Err(e) => {
                    return Err(ErrorBody::new(
                        "io_error",
                        format!("cannot read the kept {}: {e}", f.name),
                    ));
                }
            },
        }
    }
    if !again.is_empty() {
        ctx.store
            .redo_files(req.task_id.clone(), again.clone(), crate::clock::now_ms())
            .await
            .map_err(|e| store_error(&e))?;
        archive.wake.notify_one();
    }
    Ok(ArchiveRedoResponse {
        verified,
        refetching: again,
    })
}
