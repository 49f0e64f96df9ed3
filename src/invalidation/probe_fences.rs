//! Read-your-writes fences of the NOTIFY source that cost no commit: a round
//! trip on the listening connection instead of a NOTIFY of their own.
//!
//! Why that is enough: a writing transaction queues its notifications before
//! it commits, and Postgres (15 and later) signals the listening backends
//! inside the commit itself (`AtCommit_Notify`), before the writer's client
//! hears of it. A listening backend that was signalled sends what it was
//! signalled for before the ReadyForQuery of its next query. So a query on
//! the listening connection that starts after a write's ReadyForQuery
//! completes after every notification of that write has been received.
//!
//! Why it matters: a notifying commit holds Postgres's notification lock
//! through its WAL flush, so notifying commits run one at a time, the
//! writers' and the fences' alike. A fence NOTIFY doubled that serial work
//! for every write through pgtier to a cached table.
//!
//! Fences wait here until the probe task takes them all, runs one query on
//! the listening connection, and hands them to the applier in the same
//! channel as the notifications: the applier releases them only after
//! applying everything received before the probe's reply.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, oneshot, Notify};
use tokio_postgres::Client;

use super::control::Incoming;

/// Oldest server whose commit signals listeners before it is acknowledged.
pub const MIN_SERVER_VERSION: i32 = 150_000;

#[derive(Debug, Default)]
pub struct ProbeFences {
    /// Whether the listening server is new enough (else fences NOTIFY).
    usable: AtomicBool,
    waiting: Mutex<Vec<oneshot::Sender<()>>>,
    pub(super) wanted: Notify,
}

impl ProbeFences {
    pub fn usable(&self) -> bool {
        self.usable.load(Ordering::Acquire)
    }

    /// Set by the listener once it knows the server's version.
    pub fn set_usable(&self, usable: bool) {
        self.usable.store(usable, Ordering::Release);
    }

    /// Release `tx` after the next probe (dropped at once when `live` says
    /// the listener is gone: its session then bypasses the cache).
    pub fn wait(&self, tx: oneshot::Sender<()>, live: impl Fn() -> bool) {
        let Ok(mut w) = self.waiting.lock() else {
            return;
        };
        // Under the lock: `clear` runs after the database is marked down, so
        // a fence added here is either cleared there or sees it down.
        if !live() {
            return;
        }
        w.push(tx);
        drop(w);
        self.wanted.notify_one();
    }

    pub(super) fn take(&self) -> Vec<oneshot::Sender<()>> {
        self.waiting
            .lock()
            .map(|mut w| std::mem::take(&mut *w))
            .unwrap_or_default()
    }

    /// The listener is gone: release every waiter (its session sees the
    /// database down and bypasses the cache).
    pub fn clear(&self) {
        drop(self.take());
    }
}

/// Probe for waiting fences until the connection fails (the error ends the
/// listener's session) or the applier's channel closes. Holds the channel
/// weakly: its closing is how the listener learns the connection is gone.
pub(super) async fn run(
    client: Arc<Client>,
    fences: Arc<ProbeFences>,
    go_down: impl Fn(),
    applier: mpsc::WeakUnboundedSender<Incoming>,
) -> anyhow::Result<()> {
    loop {
        fences.wanted.notified().await;
        // Every fence taken here was registered after its write's
        // ReadyForQuery, so before the probe is sent.
        let batch = fences.take();
        if batch.is_empty() {
            continue;
        }
        let probed = client.simple_query("").await;
        let sent = match (&probed, applier.upgrade()) {
            (Ok(_), Some(tx)) => tx.send(Incoming::Probed(batch)).map_err(|e| e.0),
            (_, _) => Err(Incoming::Probed(batch)),
        };
        if let Err(batch) = sent {
            // Down before the waiters go: released sessions must not read
            // entries whose invalidation was lost.
            go_down();
            drop(batch);
            probed?;
            anyhow::bail!("notification applier gone");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn waiters_are_released_when_cleared_and_refused_while_down() {
        let f = ProbeFences::default();
        let (tx, rx) = oneshot::channel::<()>();
        f.wait(tx, || false);
        assert!(rx.await.is_err(), "down: released at once");

        let (tx, mut rx) = oneshot::channel::<()>();
        f.wait(tx, || true);
        assert!(rx.try_recv().is_err(), "waits for a probe");
        assert_eq!(f.take().len(), 1);
        assert!(f.take().is_empty(), "a probe takes each waiter once");

        let (tx, rx) = oneshot::channel::<()>();
        f.wait(tx, || true);
        f.clear();
        assert!(rx.await.is_err(), "cleared: released");
    }
}
