//! The simple protocol (one Query message): a lookup by text in L1, then L2,
//! then one session per key goes to Postgres while the others wait for its
//! fill (coalescing); a stale entry is answered at once and refreshed behind
//! the answer (stale-while-revalidate).

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;

use super::action::{Forward, Outcome, Reply};
use super::fill::{self, FillPlan};
use super::state::SessionCache;
use crate::bypass::BypassReason;
use crate::cache::key::simple_key;
use crate::cache::l2::Lookup;
use crate::cache::{text_hash, Cache, Claim, Decision, Entry, Key};
use crate::invalidation::key_deps::NoParams;
use crate::invalidation::DbState;
use crate::metrics;
use crate::protocol::backend::READY_IDLE_BYTES;
use crate::proxy::tracker::{ReplyTag, Tracker};

/// A miss, once L2 and the other sessions have been asked.
// Returned once per miss, never stored: boxing the reply would cost an
// allocation where moving 264 bytes costs nothing measurable.
#[allow(clippy::large_enum_variant)]
enum Miss {
    /// L2, or the session that was filling the key, had it.
    Answered(Reply),
    /// Go to Postgres and capture the result under this tag.
    Fill(ReplyTag),
    /// Go to Postgres; nothing will be stored.
    Bypass,
}

/// A cached entry that may be served now: fresh, and nothing it read has changed.
#[inline]
pub(super) fn fresh(cache: &Cache, db: &DbState, key: &Key, now: Instant) -> Option<Arc<Entry>> {
    cache
        .l1
        .get(key)
        .filter(|e| now < e.fresh_until && db.valid(e.epoch, &e.deps))
}

impl SessionCache {
    pub(super) async fn simple(
        &mut self,
        cache: &Cache,
        db: Option<&DbState>,
        sql: &[u8],
        state_bypass: Option<BypassReason>,
        track: &Tracker,
    ) -> Outcome {
        let hot = metrics::hot();
        let mut tag = ReplyTag::None;
        let decision = match db {
            Some(db) => {
                // Deciding costs a lookup: only needed up front when a rule may
                // make the entry shared between users.
                let early = cache.has_public_rules().then(|| cache.decide(sql));
                let public = early
                    .as_ref()
                    .and_then(|d| d.cacheable())
                    .is_some_and(|p| p.public);
                let key = simple_key(self.seed.pick(public), sql);
                if let Some(e) = cache.l1.get(&key).filter(|e| db.valid(e.epoch, &e.deps)) {
                    let now = Instant::now();
                    if now < e.fresh_until {
                        hot.l1_hit.increment(1);
                        db.hits.count(&e.tables);
                        self.count_simple_hit(cache, db, &e, key, sql);
                        return Outcome::answer(self.reply_simple(&e));
                    }
                    if now < e.stale_until {
                        hot.l1_stale.increment(1);
                        db.hits.count(&e.tables);
                        let answer = Some(self.reply_simple(&e));
                        let forward = self.refresh_simple(cache, db, sql, key, track);
                        return Outcome { answer, forward };
                    }
                }
                let hash = text_hash(sql);
                let decision = early.unwrap_or_else(|| cache.decide_hashed(hash, sql));
                self.note_effects(&decision, Some(db));
                match self.simple_miss(cache, db, &decision, hash, key).await {
                    Miss::Answered(reply) => return Outcome::answer(reply),
                    Miss::Fill(t) => tag = t,
                    Miss::Bypass => {}
                }
                decision
            }
            None => {
                let decision = cache.decide(sql);
                self.note_effects(&decision, None);
                metrics::bypass(match &decision.verdict {
                    Err(b) => b.reason(),
                    // No database state means the session cannot use the cache.
                    Ok(_) => state_bypass.unwrap_or(BypassReason::NoListener),
                });
                decision
            }
        };
        let outcome = if matches!(tag, ReplyTag::Fill(_)) {
            metrics::Outcome::Miss
        } else {
            tag = self.close_request();
            metrics::Outcome::Other
        };
        self.timing
            .sent(self.current_request, decision.analysis.fingerprint, outcome);
        Outcome::forward(Forward {
            tags: smallvec::smallvec![tag],
            ..Forward::default()
        })
    }

    /// Not in L1: try L2, then become the filler or wait for the one filling.
    async fn simple_miss(
        &mut self,
        cache: &Cache,
        db: &DbState,
        decision: &Arc<Decision>,
        hash: u128,
        key: Key,
    ) -> Miss {
        let hot = metrics::hot();
        if let (Some(why), Some(_)) = (self.tainted, decision.cacheable()) {
            // The statement itself tainted the session (note_effects).
            metrics::bypass(why);
            return Miss::Bypass;
        }
        let plan = match fill::plan(cache, db, decision.clone(), hash, key, &NoParams, self.utf8) {
            Ok(plan) => plan,
            Err(why) => {
                metrics::bypass(why);
                return Miss::Bypass;
            }
        };
        // This read is answered from L2, another session's fill, or its own.
        plan.count_fallback();
        if let (Some(l2), Some(k2)) = (cache.l2(), plan.l2key) {
            match l2.get(k2).await {
                Lookup::Hit(Some(rd), rows) => {
                    hot.l2_hit.increment(1);
                    self.timing.served_from_l2();
                    let e = entry(Some(rd), rows, plan);
                    db.hits.count(&e.tables);
                    let reply = self.reply_simple(&e);
                    cache.insert(key, e);
                    return Miss::Answered(reply);
                }
                Lookup::Hit(None, _) | Lookup::Miss => hot.l2_miss.increment(1),
                Lookup::Unavailable => hot.l2_unavailable.increment(1),
            }
        }
        let lease = match cache.claim(key) {
            Claim::Leader(l) => Some(l),
            Claim::Follower(n) => {
                hot.coalesced.increment(1);
                cache.wait_for(n, key).await;
                if let Some(e) = fresh(cache, db, &key, Instant::now()) {
                    hot.l1_hit.increment(1);
                    db.hits.count(&e.tables);
                    return Miss::Answered(self.reply_simple(&e));
                }
                None
            }
        };
        hot.l1_miss.increment(1);
        let request = self.current_request;
        Miss::Fill(self.captures.open_fill(request, key, plan, true, lease))
    }

    /// Re-run a stale entry's query on this session's connection, its replies
    /// captured for the cache and not relayed (one refresh per key at a time).
    fn refresh_simple(
        &mut self,
        cache: &Cache,
        db: &DbState,
        sql: &[u8],
        key: Key,
        track: &Tracker,
    ) -> Option<Forward> {
        if !track.replies.is_empty() {
            return None;
        }
        let Claim::Leader(lease) = cache.claim(key) else {
            return None;
        };
        let hash = text_hash(sql);
        let decision = cache.decide_hashed(hash, sql);
        let plan = fill::plan(cache, db, decision, hash, key, &NoParams, self.utf8).ok()?;
        let request = self.current_request;
        let tag = self
            .captures
            .open_fill(request, key, plan, true, Some(lease));
        Some(Forward {
            tags: smallvec::smallvec![tag],
            swallow: true,
            ..Forward::default()
        })
    }

    /// A simple-protocol hit: RowDescription, rows, ReadyForQuery.
    fn reply_simple(&mut self, e: &Entry) -> Reply {
        let mut reply = Reply::new();
        if let Some(rd) = &e.row_desc {
            reply.push(rd.clone());
        }
        reply.push(e.rows.clone());
        reply.push(Bytes::from_static(READY_IDLE_BYTES));
        self.timing.hit(e.shape);
        self.timing.answered();
        reply
    }
}

/// An entry for a result fetched from L2.
pub(super) fn entry(row_desc: Option<Bytes>, rows: Bytes, plan: FillPlan) -> Entry {
    Entry::new(
        row_desc,
        rows,
        plan.policy.ttl,
        plan.policy.swr,
        plan.decision.analysis.fingerprint,
        plan.epoch,
        plan.deps,
    )
    .reading(plan.tables)
}
