//! Whether a result may be stored, and where: the one chain every fill and L2
//! lookup goes through (the statement's verdict, the catalog's resolution of
//! its tables, a snapshot of their generations, the L2 key).
//!
//! It lives beside the session's cache code rather than in `cache`, because it
//! asks the database's invalidation state (`invalidation` depends on `cache`).

use std::sync::Arc;

use crate::bypass::BypassReason;
use crate::cache::rules::Policy;
use crate::cache::{Cache, Decision, Key};
use crate::invalidation::DbState;

/// Everything needed to store (or look up in L2) one result.
#[derive(Debug)]
pub struct FillPlan {
    pub policy: Policy,
    pub decision: Arc<Decision>,
    /// The database epoch and the generations of what the result read, taken
    /// before the statement runs: a write in between makes the entry invalid.
    pub epoch: u64,
    pub deps: Box<[(u32, u64)]>,
    /// The L2 key, when L2 is in use.
    pub l2key: Option<u128>,
}

/// Plan storing the result of a statement (`sql_hash`: hash of its text) under
/// `key`, or say why it cannot be stored.
pub fn plan(
    cache: &Cache,
    db: &DbState,
    decision: Arc<Decision>,
    sql_hash: u128,
    key: Key,
) -> Result<FillPlan, BypassReason> {
    let policy = decision.verdict.as_ref().map_err(|b| b.reason())?.clone();
    let resolved = db.resolve(sql_hash, &decision);
    let resolved = resolved.as_ref().as_ref().map_err(|why| *why)?;
    let (epoch, deps) = db.snapshot(resolved).ok_or(BypassReason::NotWatched)?;
    let l2key = cache.l2().and(db.l2_key(key, &resolved.slots));
    Ok(FillPlan {
        policy,
        decision,
        epoch,
        deps,
        l2key,
    })
}
