//! The extended protocol, answered by pgtier: a request is answered only when
//! every part of it can be (each Execute's result cached, each Parse and Bind
//! proven by a cached result or description), with ParseComplete/BindComplete/
//! ReadyForQuery composed around the cached rows. Results missing from L1 are
//! looked up in L2 together before giving up.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use smallvec::SmallVec;

use super::action::Reply;
use super::fill::{self, BindParams};
use super::simple::{entry, fresh};
use super::state::SessionCache;
use crate::cache::key::{describe_key, extended_key, statement_hash};
use crate::cache::l2::Lookup;
use crate::cache::{text_hash, Cache, Entry, Key};
use crate::invalidation::DbState;
use crate::metrics;
use crate::protocol::backend::{
    BIND_COMPLETE_BYTES, CLOSE_COMPLETE_BYTES, PARSE_COMPLETE_BYTES, READY_IDLE_BYTES,
};
use crate::protocol::batch::Batch;
use crate::protocol::frontend::{Bind, Frontend, Target};

/// A portal bound in the request being planned.
struct Portal<'a> {
    name: &'a [u8],
    statement: &'a [u8],
    /// Text of a statement defined by a Parse in this same request, and its
    /// declared parameter types.
    sql: Option<&'a [u8]>,
    types: Option<&'a [u8]>,
    key: Key,
    bind: Bind<'a>,
    entry: Option<Arc<Entry>>,
    /// A cached result for it is served in this request: the same Bind
    /// succeeded on the server before (the key covers its arguments).
    proven: bool,
    /// The Parse earlier in this request that defined its statement.
    parse: Option<usize>,
}

/// A statement (re)defined by a Parse in the request being planned.
struct Defined<'a> {
    name: &'a [u8],
    hash: u128,
    sql: &'a [u8],
    /// Its parameter types, as declared.
    types: &'a [u8],
    /// The cache proves Postgres accepts it (a result or description for it).
    proven: bool,
}

/// What planning found an extended-protocol request to be.
// Returned once per request, never stored: the hit's reply stays inline (no
// allocation on a hit), the miss path's portals are boxed.
#[allow(clippy::large_enum_variant)]
enum Plan<'a> {
    /// Every part answered from L1: the reply.
    Hit(Reply),
    /// Answerable except for results missing from L1 (L2 may have them).
    /// (Boxed: the miss path may allocate, the hit path does not.)
    Missing(Box<SmallVec<[Portal<'a>; 4]>>),
    /// Must go to the server.
    No,
}

/// The portal of that name bound last in the request being planned.
fn find_portal<'p, 'a>(portals: &'p mut [Portal<'a>], name: &[u8]) -> Option<&'p mut Portal<'a>> {
    portals.iter_mut().rev().find(|p| p.name == name)
}

/// A servable entry: from L1, or fetched from L2 for this request.
fn usable(
    cache: &Cache,
    db: &DbState,
    prefetched: &[(Key, Arc<Entry>)],
    key: &Key,
    now: Instant,
) -> Option<Arc<Entry>> {
    fresh(cache, db, key, now).or_else(|| {
        prefetched
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, e)| e.clone())
    })
}

impl SessionCache {
    /// Answer the request from the cache if every part of it can be.
    pub(super) async fn extended_hit(
        &mut self,
        cache: &Cache,
        db: &DbState,
        batch: &Batch<'_>,
    ) -> Option<Reply> {
        let mut plan = self.plan_hit(cache, db, batch);
        let found = match &plan {
            Plan::Missing(portals) => self.l2_lookup(cache, db, portals).await,
            _ => false,
        };
        if found {
            plan = self.plan_hit(cache, db, batch);
        }
        self.prefetched.clear();
        let fallbacks = std::mem::take(&mut self.prefetched_fallbacks);
        match plan {
            Plan::Hit(reply) => {
                fallbacks.into_iter().for_each(fill::count_key_fallback);
                self.commit_hit(batch);
                self.timing.answered();
                Some(reply)
            }
            Plan::Missing(_) | Plan::No => {
                self.timing.forget_hits();
                None
            }
        }
    }

    /// Resolve a statement name as it stands during planning: redefined earlier
    /// in this request, or known from before.
    fn statement_hash(&self, defined: &[Defined<'_>], name: &[u8]) -> Option<u128> {
        defined
            .iter()
            .rev()
            .find(|d| d.name == name)
            .map(|d| d.hash)
            .or_else(|| self.statements.get(name).map(|s| s.hash))
    }

    /// Compose the reply to an extended-protocol request from the cache alone.
    /// Touches no session state but the shapes it would report.
    fn plan_hit<'a>(&mut self, cache: &Cache, db: &DbState, batch: &Batch<'a>) -> Plan<'a> {
        self.timing.forget_hits();
        let mut reply = Reply::new();
        let mut portals: SmallVec<[Portal<'a>; 4]> = SmallVec::new();
        let mut defined: SmallVec<[Defined<'a>; 4]> = SmallVec::new();
        let now = Instant::now();
        let public_rules = cache.has_public_rules();
        let mut executes = 0;
        let mut missing = false;
        for m in batch.messages() {
            let Some(msg) = m.view else {
                return Plan::No;
            };
            match msg {
                Frontend::Parse(p) => {
                    // A named statement goes to the server when the client
                    // defines it: parsed later (replayed before its first use
                    // there), it would be analysed against a catalog that may
                    // have changed since, where Postgres keeps what it parsed
                    // (its result type, the relations its names meant). Only
                    // the first execution of each per connection pays this.
                    if !p.name.is_empty() {
                        return Plan::No;
                    }
                    defined.push(Defined {
                        name: p.name,
                        hash: statement_hash(p.query, p.param_types),
                        sql: p.query,
                        types: p.param_types,
                        proven: false,
                    });
                    reply.push(Bytes::from_static(PARSE_COMPLETE_BYTES));
                }
                Frontend::Bind(b) => {
                    let Some(hash) = self.statement_hash(&defined, b.statement) else {
                        return Plan::No;
                    };
                    let parse = defined.iter().rposition(|d| d.name == b.statement);
                    let public = public_rules
                        && self
                            .statements
                            .get(b.statement)
                            .filter(|s| s.hash == hash)
                            .and_then(|s| s.decision.as_ref())
                            .and_then(|d| d.cacheable())
                            .is_some_and(|p| p.public);
                    portals.push(Portal {
                        name: b.portal,
                        statement: b.statement,
                        sql: parse.map(|i| defined[i].sql),
                        types: parse.map(|i| defined[i].types),
                        key: extended_key(self.seed.pick(public), hash, b.args),
                        bind: b,
                        entry: None,
                        proven: false,
                        parse,
                    });
                    reply.push(Bytes::from_static(BIND_COMPLETE_BYTES));
                }
                Frontend::Describe(d) if d.target == Target::Statement => {
                    let Some(hash) = self.statement_hash(&defined, d.name) else {
                        return Plan::No;
                    };
                    let Some(desc) = cache.describe(&describe_key(self.seed.user, hash)) else {
                        return Plan::No;
                    };
                    // Described for this user and these settings: Postgres parsed it.
                    if let Some(def) = defined.iter_mut().rev().find(|x| x.name == d.name) {
                        def.proven = true;
                    }
                    reply.push(desc);
                }
                Frontend::Describe(d) => {
                    let Some(p) = find_portal(&mut portals, d.name) else {
                        return Plan::No;
                    };
                    match usable(cache, db, &self.prefetched, &p.key, now) {
                        Some(e) => {
                            let Some(rd) = e.row_desc.clone() else {
                                return Plan::No;
                            };
                            p.entry = Some(e);
                            p.proven = true;
                            if let Some(i) = p.parse {
                                defined[i].proven = true;
                            }
                            reply.push(rd);
                        }
                        None => missing = true,
                    }
                }
                Frontend::Execute(x) => {
                    if x.max_rows != 0 {
                        return Plan::No;
                    }
                    let Some(p) = find_portal(&mut portals, x.portal) else {
                        return Plan::No;
                    };
                    let entry = match p.entry.take() {
                        Some(e) => Some(e),
                        None => usable(cache, db, &self.prefetched, &p.key, now),
                    };
                    match entry {
                        Some(e) => {
                            p.proven = true;
                            if let Some(i) = p.parse {
                                defined[i].proven = true;
                            }
                            reply.push(e.rows.clone());
                            db.hits.count(&e.tables);
                            self.timing.hit(e.shape);
                            if e.hit(cache.warm_after()) {
                                let defined = p.sql.zip(p.types);
                                self.remember_extended(
                                    db,
                                    &e,
                                    p.key,
                                    p.statement,
                                    defined,
                                    p.bind.args,
                                );
                            }
                            executes += 1;
                        }
                        None => missing = true,
                    }
                }
                Frontend::Close(c) if c.target == Target::Statement => {
                    // The server must close what it knows; only ours can be closed here.
                    if self.statements.get(c.name).is_some_and(|s| s.on_server) {
                        return Plan::No;
                    }
                    reply.push(Bytes::from_static(CLOSE_COMPLETE_BYTES));
                }
                Frontend::Close(_) => reply.push(Bytes::from_static(CLOSE_COMPLETE_BYTES)),
                Frontend::Sync => reply.push(Bytes::from_static(READY_IDLE_BYTES)),
                _ => return Plan::No,
            }
        }
        if !batch.ends_with_sync() {
            return Plan::No;
        }
        if missing {
            self.timing.forget_hits();
            return Plan::Missing(Box::new(portals));
        }
        // A Parse or Bind whose success nothing cached proves (a prepare with
        // no execution, a Bind without Execute) may fail on the server: only
        // Postgres may answer it.
        if defined.iter().any(|d| !d.proven) || portals.iter().any(|p| !p.proven) {
            self.timing.forget_hits();
            return Plan::No;
        }
        metrics::hot().l1_hit.increment(executes);
        Plan::Hit(reply)
    }

    /// Look the results missing from L1 up in L2 (concurrently); those found go
    /// into L1. True if all were found.
    async fn l2_lookup(&mut self, cache: &Cache, db: &DbState, portals: &[Portal<'_>]) -> bool {
        let Some(l2) = cache.l2() else { return false };
        let mut wanted = Vec::new();
        for p in portals.iter().filter(|p| p.entry.is_none()) {
            let (decision, sql_hash, types) = match (p.sql, p.types) {
                (Some(sql), Some(types)) => (cache.decide(sql), text_hash(sql), types),
                _ => {
                    let Some((_, d)) = self.statement_decision(cache, p.statement) else {
                        return false;
                    };
                    let Some(s) = self.statements.get(p.statement) else {
                        return false;
                    };
                    (d, text_hash(s.sql()), s.param_types())
                }
            };
            let params = BindParams {
                bind: &p.bind,
                types,
            };
            let Ok(plan) = fill::plan(cache, db, decision, sql_hash, p.key, &params, self.utf8)
            else {
                return false;
            };
            let Some(k2) = plan.l2key else {
                return false;
            };
            wanted.push((p.key, k2, plan));
        }
        if wanted.is_empty() {
            return false;
        }
        let lookups = futures_util::future::join_all(wanted.iter().map(|w| l2.get(w.1))).await;
        let mut all = true;
        for ((key, _, plan), found) in wanted.into_iter().zip(lookups) {
            match found {
                Lookup::Hit(rd, rows) => {
                    metrics::hot().l2_hit.increment(1);
                    // Counted if the request is answered; forwarded, its fill
                    // counts it.
                    self.prefetched_fallbacks
                        .extend(plan.key_fallback.map(|r| r.label()));
                    self.timing.served_from_l2();
                    let e = Arc::new(entry(rd, rows, plan));
                    cache.l1.insert(key, e.clone());
                    self.prefetched.push((key, e));
                }
                Lookup::Miss => {
                    metrics::hot().l2_miss.increment(1);
                    all = false;
                }
                Lookup::Unavailable => {
                    metrics::hot().l2_unavailable.increment(1);
                    all = false;
                }
            }
        }
        all
    }

    /// Apply the statement bookkeeping of a request answered from the cache.
    fn commit_hit(&mut self, batch: &Batch<'_>) {
        for m in batch.messages() {
            match m.view {
                Some(Frontend::Parse(p)) => {
                    self.statements.define(&p, m.raw, false);
                }
                Some(Frontend::Close(c)) if c.target == Target::Statement => {
                    // Answered only for statements the server never saw, but
                    // an older unnamed one may still be there.
                    self.stray_unnamed |= c.name.is_empty();
                    self.statements.remove(c.name)
                }
                _ => {}
            }
        }
    }
}
