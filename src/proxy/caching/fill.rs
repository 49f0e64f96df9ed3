//! Whether a result may be stored, and where: the one chain every fill and L2
//! lookup goes through (the statement's verdict, the catalog's resolution of
//! its tables, a snapshot of their generations, the L2 key).
//!
//! It lives beside the session's cache code rather than in `cache`, because it
//! asks the database's invalidation state (`invalidation` depends on `cache`).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::bypass::BypassReason;
use crate::cache::rules::Policy;
use crate::cache::{Cache, Decision, Key};
use crate::invalidation::key_deps::{self, Params};
use crate::invalidation::DbState;
use crate::protocol::frontend::Bind;
use crate::sql::keyvalue::Refusal;

/// Everything needed to store (or look up in L2) one result.
#[derive(Debug)]
pub struct FillPlan {
    pub policy: Policy,
    pub decision: Arc<Decision>,
    /// The database epoch and the generations of what the result read, taken
    /// before the statement runs: a write in between makes the entry invalid.
    pub epoch: u64,
    pub deps: Box<[(u32, u64)]>,
    /// Oids of the tables it reads (its hits are counted on them).
    pub tables: Arc<[u32]>,
    /// The L2 key, when L2 is in use.
    pub l2key: Option<u128>,
    /// Why a read by key is left table-level by its values, if it is.
    pub key_fallback: Option<Refusal>,
}

impl FillPlan {
    /// Count the read this plan is for as left table-level, if it is. Once per
    /// read: by the caller that serves or fills it, not by every plan made for
    /// it (an extended read may be planned for L2 and again for its fill).
    pub fn count_fallback(&self) {
        if let Some(reason) = self.key_fallback {
            count_key_fallback(reason.label());
        }
    }
}

/// Count one read of a key-level shape left table-level by its values.
pub fn count_key_fallback(reason: &'static str) {
    metrics::counter!("pgtier_key_fallbacks_total", "reason" => reason).increment(1);
}

/// A Bind's parameters, with the types its statement declared.
pub struct BindParams<'a> {
    pub bind: &'a Bind<'a>,
    /// Raw big-endian type OIDs from the Parse.
    pub types: &'a [u8],
}

impl Params for BindParams<'_> {
    fn param(&self, number: u32) -> Option<(bool, Option<&[u8]>, u32)> {
        let i = usize::try_from(number.checked_sub(1)?).ok()?;
        let (binary, value) = self.bind.param(i)?;
        let declared = self
            .types
            .get(4 * i..4 * i + 4)
            .map_or(0, |t| u32::from_be_bytes([t[0], t[1], t[2], t[3]]));
        Some((binary, value, declared))
    }
}

/// Plan storing the result of a statement (`sql_hash`: hash of its text) under
/// `key`, or say why it cannot be stored. A read by key depends on the keys
/// `params` give it, not on its whole table (see `invalidation::key_deps`;
/// `utf8`: the session may use text keys).
pub fn plan(
    cache: &Cache,
    db: &DbState,
    decision: Arc<Decision>,
    sql_hash: u128,
    key: Key,
    params: &dyn Params,
    utf8: bool,
) -> Result<FillPlan, BypassReason> {
    let policy = decision.verdict.as_ref().map_err(|b| b.reason())?.clone();
    let resolved = db.resolve(sql_hash, &decision);
    let resolved = resolved.as_ref().as_ref().map_err(|why| *why)?;
    let mut key_fallback = None;
    let keyed = resolved.key.as_ref().and_then(|k| {
        let keys = key_deps::key_slots(&db.name, k, params, utf8)
            .inspect_err(|why| key_fallback = Some(*why))
            .ok()?;
        let mut slots: Vec<u32> = resolved
            .slots
            .iter()
            .copied()
            .filter(|s| *s != k.table_slot)
            .chain(std::iter::once(k.whole_slot))
            .chain(keys)
            .collect();
        slots.sort_unstable();
        slots.dedup();
        Some(slots)
    });
    let slots: &[u32] = keyed.as_deref().unwrap_or(&resolved.slots);
    let (epoch, deps) = db
        .snapshot_slots(resolved, slots)
        .ok_or(BypassReason::NotWatched)?;
    let l2key = cache.l2().and(db.l2_key(key, slots));
    // Checked after the snapshot and the L2 key: the column sets that made
    // this read keyed were still live when they were taken, so a write since
    // reports its keys (or kills the table). Sets forgotten in between (an
    // epoch on the logical stream) would leave a keyed result that a write
    // reporting another set of the table does not reach.
    if keyed.is_some() && db.keys.version.load(Ordering::Acquire) != resolved.keys_version {
        return Err(BypassReason::KeysChanged);
    }
    // After the snapshot: a commit bumped into these slots that is not yet
    // visible is seen held here, and this read may not see it.
    if db.gens.any_held(slots.iter().copied()) {
        return Err(BypassReason::CommitNotVisible);
    }
    Ok(FillPlan {
        policy,
        decision,
        epoch,
        deps,
        tables: resolved.tables.clone(),
        l2key,
        key_fallback,
    })
}
