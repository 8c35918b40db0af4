//! Word between the daemons sharing a queue: `LISTEN`/`NOTIFY` on one channel. A transaction
//! that stores events, adds tasks, replays deliveries or redoes archive files says so with
//! `pg_notify`, which PostgreSQL delivers only once (and if) it commits; every daemon listens on
//! a connection of its own and passes what it hears on as a [`Note`], so an `add` on one host
//! wakes the poll loops on all, and a follower on any daemon streams events stored by all.
//!
//! Notifications are a nudge, never the record: the store is. A daemon that missed some (its
//! listening connection dropped) hears [`Note::Resync`] once it listens again and looks at the
//! store afresh; and every loop still wakes on its own schedule.

use std::time::Duration;

use deadpool_postgres::GenericClient;
use futures_util::StreamExt;
use tokio::sync::broadcast;
use tokio_postgres::AsyncMessage;
use tokio_util::sync::CancellationToken;

use super::Sql;
use super::connect::PgOptions;

/// The one channel sunopoll notifies on.
pub(super) const CHANNEL: &str = "sunopoll";

/// How a note of stored events begins; the sequence number follows. Spelt out in SQL too, where
/// storing an event says so in the same statement (`events::insert`).
pub(super) const EVENTS: &str = "events:";

/// What another daemon (or this one) just committed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Note {
    /// Events up to this sequence number are stored.
    Events(i64),
    /// Tasks of this account were added (or are to be polled again).
    Tasks(String),
    /// Deliveries were replayed.
    Deliveries,
    /// Archive files are due again.
    Files,
    /// Notifications may have been missed: look at everything afresh.
    Resync,
}

impl Note {
    fn encode(&self) -> String {
        match self {
            Note::Events(seq) => format!("{EVENTS}{seq}"),
            Note::Tasks(account) => format!("tasks:{account}"),
            Note::Deliveries => "deliveries".to_owned(),
            Note::Files => "files".to_owned(),
            Note::Resync => "resync".to_owned(),
        }
    }

    fn decode(payload: &str) -> Option<Note> {
        match payload.split_once(':') {
            Some((kind, seq)) if EVENTS.strip_suffix(':') == Some(kind) => {
                seq.parse().ok().map(Note::Events)
            }
            Some(("tasks", account)) => Some(Note::Tasks(account.to_owned())),
            None if payload == "deliveries" => Some(Note::Deliveries),
            None if payload == "files" => Some(Note::Files),
            _ => None,
        }
    }
}

/// Says `note` to every daemon once this transaction commits.
pub(super) async fn say(c: &impl GenericClient, note: &Note) -> Sql<()> {
    super::query(c, "SELECT pg_notify($1, $2)", &[&CHANNEL, &note.encode()]).await?;
    Ok(())
}

/// Listens until `stop`, passing every note on to `out`, reconnecting (1 s, doubling to 30 s)
/// whenever the connection drops. Logs a lost connection once, and its return.
pub(super) async fn listen(
    options: PgOptions,
    out: broadcast::Sender<Note>,
    stop: CancellationToken,
) {
    let mut delay = Duration::from_secs(1);
    let mut lost = false;
    loop {
        let outcome = tokio::select! {
            () = stop.cancelled() => return,
            r = listen_once(&options, &out, lost, &stop) => r,
        };
        match outcome {
            Ok(()) => return,
            Err(e) => {
                if !lost {
                    tracing::warn!(problem = %e, "lost the connection that hears other daemons' news; reconnecting (loops still look at the queue on their own schedule)");
                }
                lost = true;
            }
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(30));
    }
}

/// One listening connection, until it fails (`Err`) or `stop` fires (`Ok`).
async fn listen_once(
    options: &PgOptions,
    out: &broadcast::Sender<Note>,
    after_loss: bool,
    stop: &CancellationToken,
) -> Result<(), String> {
    let (client, mut messages) = options.connect_listener().await?;
    // The connection must be driven for `LISTEN` to be answered at all: a task of its own
    // reads it and hands on what the server sends unasked; it ends with the connection.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let reader = tokio::spawn(async move {
        while let Some(m) = messages.next().await {
            let failed = m.is_err();
            if tx.send(m).is_err() || failed {
                return;
            }
        }
    });
    let _stop_reader = AbortOnDrop(reader);
    client
        .batch_execute(&format!("LISTEN {CHANNEL}"))
        .await
        .map_err(|e| super::describe(&e))?;
    if after_loss {
        tracing::info!("hearing other daemons' news again");
        let _ = out.send(Note::Resync);
    }
    loop {
        let message = tokio::select! {
            () = stop.cancelled() => return Ok(()),
            m = rx.recv() => m,
        };
        match message {
            Some(Ok(AsyncMessage::Notification(n))) if n.channel() == CHANNEL => {
                if let Some(note) = Note::decode(n.payload()) {
                    // No receiver yet (the daemon is starting) is not an error.
                    let _ = out.send(note);
                }
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(super::describe(&e)),
            None => return Err("the server closed the connection".to_owned()),
        }
    }
}

/// Stops the connection's reader when the listener lets go of it.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A connection's messages, as a stream the listener reads.
pub(super) type Messages = std::pin::Pin<
    Box<dyn futures_util::Stream<Item = Result<AsyncMessage, tokio_postgres::Error>> + Send>,
>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notes_survive_their_spelling() {
        for note in [
            Note::Events(42),
            Note::Tasks("default".into()),
            Note::Tasks("a:b".into()),
            Note::Deliveries,
            Note::Files,
        ] {
            assert_eq!(Note::decode(&note.encode()), Some(note));
        }
        assert_eq!(Note::decode("events:x"), None);
        assert_eq!(Note::decode("something else"), None);
    }
}
