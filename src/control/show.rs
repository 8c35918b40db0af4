//! `show`: one task, its events, and each event's deliveries with their attempts.

use super::{Control, bad_record, check_id, not_found, store_error};
use crate::protocol::{
    DeliveryView, ErrorBody, EventView, ShowRequest, ShowResponse, ShownEvent, TaskView,
};

pub(super) async fn run(req: ShowRequest, ctx: &Control) -> Result<ShowResponse, ErrorBody> {
    check_id(&req.task_id)?;
    let Some((task, events)) = ctx
        .store
        .show(req.task_id.clone())
        .await
        .map_err(|e| store_error(&e))?
    else {
        return Err(not_found(&req.task_id));
    };
    let events = events
        .into_iter()
        .map(|e| EventView::from_record(e).map_err(bad_record))
        .collect::<Result<Vec<_>, _>>()?;
    let mut deliveries = ctx
        .store
        .deliveries_of(req.task_id.clone())
        .await
        .map_err(|e| store_error(&e))?;
    let events = events
        .into_iter()
        .map(|ev| {
            let mine = deliveries
                .extract_if(.., |(seq, _)| *seq == ev.seq)
                .map(|(_, d)| DeliveryView::from_record(d))
                .collect();
            ShownEvent::new(ev, mine)
        })
        .collect();
    let files = super::archive::files(ctx, &req.task_id).await?;
    Ok(ShowResponse {
        task: TaskView::from_record(task),
        events,
        files,
    })
}
