//! Latency figures of a session's requests: answered by pgtier (per tier and
//! per statement shape) or by Postgres (timed until their ReadyForQuery).

use std::collections::VecDeque;
use std::time::Instant;

use crate::metrics::{self, Outcome};

pub struct Timing {
    /// When the request being handled was complete.
    started: Instant,
    /// Shapes of the cached results in the reply being composed.
    hit_shapes: Vec<u64>,
    /// Whether any of them came from L2.
    from_l2: bool,
    /// Requests sent to Postgres: (request number, start, shape, outcome).
    upstream: VecDeque<(u64, Instant, u64, Outcome)>,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            started: Instant::now(),
            hit_shapes: Vec::with_capacity(4),
            from_l2: false,
            upstream: VecDeque::new(),
        }
    }
}

impl Timing {
    /// A request is complete and about to be handled.
    pub fn begin(&mut self) {
        self.started = Instant::now();
        self.hit_shapes.clear();
        self.from_l2 = false;
    }

    /// A cached result of this shape is part of the reply being composed.
    pub fn hit(&mut self, shape: u64) {
        self.hit_shapes.push(shape);
    }

    /// The reply being composed will not be sent after all.
    pub fn forget_hits(&mut self) {
        self.hit_shapes.clear();
    }

    pub fn served_from_l2(&mut self) {
        self.from_l2 = true;
    }

    /// pgtier answered the request.
    pub fn answered(&mut self) {
        let took = self.started.elapsed();
        let hot = metrics::hot();
        if self.from_l2 {
            hot.latency_l2.record(took);
        } else {
            hot.latency_l1.record(took);
        }
        for s in self.hit_shapes.drain(..) {
            metrics::shape(s, Outcome::Hit, took);
        }
    }

    /// Request `request` (of this shape) went to Postgres.
    pub fn sent(&mut self, request: u64, shape: u64, outcome: Outcome) {
        self.upstream
            .push_back((request, self.started, shape, outcome));
    }

    /// Requests up to `request` have ended.
    pub fn ended(&mut self, request: u64) {
        while let Some(&(req, started, shape, outcome)) = self.upstream.front() {
            if req > request {
                break;
            }
            self.upstream.pop_front();
            let took = started.elapsed();
            metrics::hot().latency_upstream.record(took);
            metrics::shape(shape, outcome, took);
        }
    }
}
