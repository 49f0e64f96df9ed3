//! Warm refreshes on an idle session (`invalidation::warm`): the session says
//! when it is idle, takes a job left for it, and sends the refresh as it would
//! a stale-while-revalidate refresh: its replies fill the cache and are
//! swallowed, and a client request arriving meanwhile queues behind it.

use std::task::Context;

use super::Session;
use crate::invalidation::warm::Job;
use crate::protocol::batch::Batch;
use crate::protocol::TxStatus;
use crate::proxy::apply;
use crate::proxy::caching::Outcome;

impl Session {
    /// Nothing in flight or half-read on either side, no transaction open, no
    /// fence pending, the client's request (if any) not begun.
    fn warm_idle(&self) -> bool {
        let t = &self.track;
        t.replies.is_empty()
            && t.tx == TxStatus::Idle
            && !t.open_batch
            && !t.copy_in
            && !t.blind
            && !t.terminating
            && self.fence.is_none()
            && self.cin.is_empty()
            && self.scanned == 0
            && self.client_stream == 0
            && self.server_stream == 0
            && self.sin.is_empty()
            && self.sout.is_empty()
            && !self.backlog
            && self.violation.is_none()
    }

    /// Offer this session for warm refreshes while it is idle; a job left for
    /// it, if any.
    pub(super) fn poll_warm(&mut self, cx: &mut Context<'_>) -> Option<Job> {
        self.warm.as_ref()?;
        let idle = self.warm_idle();
        if idle {
            // Offered under the seed its next request would use.
            self.reseed_if_changed();
        }
        let seat = self.warm.as_ref()?;
        if !idle || !self.caching.warmable() {
            seat.mailbox.busy();
            return None;
        }
        seat.mailbox.poll_idle(cx, self.caching.seed.user)
    }

    /// Send the refresh `job` asks for, if this session still may.
    pub(super) fn run_warm(&mut self, job: Job) {
        if !self.warm_idle() {
            return;
        }
        let cache = &self.proxy.cache;
        let Some((bytes, forward)) = self.caching.warm_request(cache, job, &self.track) else {
            return;
        };
        let batch = Batch::new(&bytes);
        apply::apply(
            Outcome::forward(forward),
            &batch,
            &mut self.track,
            &mut self.cout,
            &mut self.sout,
        );
    }
}
