//! The cache on the request path: answering whole requests from cached replies,
//! and capturing server replies to fill the cache.
//!
//! A request is answered by pgtier only when no transaction is open, nothing
//! still in flight can change that (only Parse/Bind/Describe/Close/Sync are
//! pending), and every part of it can be answered: the reply is then a handful
//! of shared `Bytes` (cached rows plus static ParseComplete / BindComplete /
//! ReadyForQuery), sent at once or queued behind the replies still due from
//! the server. Otherwise the request goes to Postgres unchanged (preceded by
//! any Parse the server has not seen), and results of cacheable statements are
//! captured as they stream back to the client, then stored once the request
//! has committed.
//!
//! The layer decides and the session acts: [`SessionCache::decide`] takes a
//! decoded request ([`crate::protocol::batch::Batch`]) and the tracker, and
//! returns an [`Outcome`]; `proxy::apply` carries it out on the reply queue and
//! the output queues.
//!
//! - `dispatch`: the entry point, and whether the cache may be used at all;
//! - `simple`: the simple protocol (L1, L2, coalescing, stale-while-revalidate);
//! - `plan`: extended-protocol requests answered by pgtier;
//! - `forward`: extended-protocol requests sent to Postgres (Parse replay, fills);
//! - `fill`: whether and where a result may be stored;
//! - `captures`: server replies captured and stored when their request commits;
//! - `settings`: the session settings the key follows;
//! - `state`: the session's cache state, taints, fences, end of requests;
//! - `warm`: hits that make entries hot, and warm refreshes run on this session;
//! - `latency`: latency figures; `action`: the decision types.

mod action;
mod captures;
mod dispatch;
mod fill;
mod forward;
mod latency;
mod plan;
mod settings;
mod simple;
mod state;
mod warm;

pub use action::{Forward, Outcome, Reply};
pub use state::SessionCache;

#[cfg(test)]
mod dispatch_tests;
#[cfg(test)]
mod skipped_tests;
#[cfg(test)]
mod unnamed_tests;
#[cfg(test)]
mod warm_tests;
