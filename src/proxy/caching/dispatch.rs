//! The cache layer's entry point: one request in, one [`Outcome`] out.
//!
//! It decides whether the session may use the cache at all right now, then
//! hands the request to the simple or extended protocol's planner. It reads
//! the tracker but changes nothing outside the session's cache state: the
//! session carries the outcome out (`proxy::apply`).

use super::action::{Forward, Outcome};
use super::state::SessionCache;
use crate::bypass::BypassReason;
use crate::cache::Cache;
use crate::invalidation::DbState;
use crate::metrics;
use crate::protocol::batch::Batch;
use crate::proxy::tracker::{ReplyTag, Tracker};

impl SessionCache {
    /// Decide what to do with one complete client request.
    pub async fn decide(&mut self, cache: &Cache, batch: &Batch<'_>, track: &Tracker) -> Outcome {
        // Borrow the database state for the request without touching its
        // reference count (shared by every session: a hot cache line).
        let db = self.db.take();
        let outcome = self.decide_with(cache, db.as_deref(), batch, track).await;
        self.db = db;
        outcome
    }

    async fn decide_with(
        &mut self,
        cache: &Cache,
        db: Option<&DbState>,
        batch: &Batch<'_>,
        track: &Tracker,
    ) -> Outcome {
        if batch.is_empty() {
            return Outcome::default();
        }
        let state_bypass = self.bypass_reason(db, track);
        self.current_request = track.requests_sent + 1;
        self.timing.begin();
        let db = db.filter(|_| state_bypass.is_none());
        if let Some(sql) = batch.single_query() {
            // A Query destroys the unnamed statement, on the server or, when
            // pgtier answers it, for the client alone.
            self.statements.remove(b"");
            let outcome = if !self.has_listener {
                self.forward_unwatched()
            } else {
                self.simple(cache, db, sql, state_bypass, track).await
            };
            // A stale answer's refresh is the same Query: the server sees it.
            if outcome.forward.is_none() {
                self.stray_unnamed = true;
            }
            return outcome;
        }
        if let Some(db) = db {
            if let Some(reply) = self.extended_hit(cache, db, batch).await {
                return Outcome::answer(reply);
            }
        }
        Outcome::forward(self.forward_extended(cache, db, batch, state_bypass, track))
    }

    /// Forward a simple query on a session whose database pgtier does not
    /// cache: no parse (each distinct text would cost one), no shape of its own.
    fn forward_unwatched(&mut self) -> Outcome {
        metrics::bypass(BypassReason::NoListener);
        self.timing
            .sent(self.current_request, 0, metrics::Outcome::Other);
        Outcome::forward(Forward {
            tags: smallvec::smallvec![ReplyTag::None],
            ..Forward::default()
        })
    }
}
