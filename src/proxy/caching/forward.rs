//! The extended protocol, forwarded: the Parse messages the request depends on
//! that the server never saw go first, statements are tracked as the server
//! will know them, and every cacheable execution of a request that can commit
//! on its own gets a capture (a fill) for its result.

use bytes::Bytes;
use smallvec::SmallVec;

use super::action::Forward;
use super::fill::{self, BindParams};
use super::state::SessionCache;
use crate::bypass::BypassReason;
use crate::cache::key::{describe_key, extended_key, statement_hash};
use crate::cache::{text_hash, Cache, Claim};
use crate::invalidation::DbState;
use crate::metrics;
use crate::protocol::batch::Batch;
use crate::protocol::frontend::{Bind, Close, Frontend, Target};
use crate::proxy::tracker::{CaptureId, ReplyTag, Tracker};
use crate::sql::is_time_literal;

/// A portal bound in the request being forwarded, and its fill if any.
struct Bound<'a> {
    name: &'a [u8],
    statement: &'a [u8],
    fill: Option<CaptureId>,
}

impl SessionCache {
    /// Plan sending an extended-protocol request (or anything but a lone Query)
    /// to the server.
    pub(super) fn forward_extended(
        &mut self,
        cache: &Cache,
        db: Option<&DbState>,
        batch: &Batch<'_>,
        state_bypass: Option<BypassReason>,
        track: &Tracker,
    ) -> Forward {
        let mut preview = track.preview();
        let mut open_batch = track.open_batch;
        let first_request = self.current_request;
        let cacheable_state = db.is_some() && self.tainted.is_none();
        let fills_ok = cacheable_state && self.fillable(cache, batch);
        let (inject, replayed, close_unnamed) = self.replay_parses(batch, track.replies.skipping());
        let mut portals: SmallVec<[Bound<'_>; 4]> = SmallVec::new();
        let mut tags = SmallVec::new();
        for m in batch.messages() {
            let Some(msg) = m.view else {
                tags.push(ReplyTag::None);
                continue;
            };
            let (expect, ends) = preview.step(&msg);
            let mut tag = ReplyTag::None;
            match msg {
                Frontend::Parse(p) => {
                    let hash = statement_hash(p.query, p.param_types);
                    // Postgres rejects redefining a named statement it has; the
                    // old definition stays in force.
                    let rejected = !p.name.is_empty()
                        && self
                            .statements
                            .get(p.name)
                            .is_some_and(|s| s.on_server && s.hash != hash);
                    // One the server skips (after an error) defines nothing.
                    if !rejected && preview.queued {
                        tag = ReplyTag::Statement(self.statements.pending(p.name, true));
                        self.statements.define(&p, m.raw, true);
                    }
                }
                Frontend::Bind(b) => {
                    let fill = match (fills_ok, db) {
                        (true, Some(db)) => self.start_fill(cache, db, &b),
                        _ => None,
                    };
                    portals.push(Bound {
                        name: b.portal,
                        statement: b.statement,
                        fill,
                    });
                }
                Frontend::Describe(d) if d.target == Target::Statement && cacheable_state => {
                    if let Some(s) = self.statements.get(d.name) {
                        let key = describe_key(self.seed.user, s.hash);
                        tag = self.captures.open_describe(self.current_request, key);
                    }
                }
                Frontend::Describe(d) => {
                    let bound = portals.iter().rev().find(|p| p.name == d.name);
                    if let Some(id) = bound.and_then(|p| p.fill) {
                        tag = ReplyTag::Fill(id);
                    }
                }
                Frontend::Execute(x) => {
                    let bound = portals.iter().rev().find(|p| p.name == x.portal);
                    if !self.has_listener {
                        metrics::bypass(BypassReason::NoListener);
                    } else if let Some(p) = bound {
                        let fill = p.fill;
                        if let Some((_, d)) = self.statement_decision(cache, p.statement) {
                            self.note_effects(&d, db);
                            if fill.is_none() {
                                let reason = match (&d.verdict, state_bypass.or(self.tainted)) {
                                    (Err(b), _) => Some(b.reason()),
                                    (Ok(_), Some(why)) => Some(why),
                                    (Ok(_), None) => {
                                        (!fills_ok).then_some(BypassReason::MixedRequest)
                                    }
                                };
                                if let Some(r) = reason {
                                    metrics::bypass(r);
                                }
                            }
                        }
                        if let Some(id) = fill {
                            tag = ReplyTag::Fill(id);
                        }
                    }
                }
                Frontend::Close(c) if c.target == Target::Statement && preview.queued => {
                    // Closing an unknown statement is not an error: nothing to replay.
                    tag = ReplyTag::Statement(self.statements.pending(c.name, false));
                    self.statements.remove(c.name);
                }
                Frontend::Query(q) => {
                    // It destroys the unnamed statement on the server.
                    self.statements.remove(b"");
                    if self.has_listener {
                        let d = cache.decide(q.sql);
                        self.note_effects(&d, db);
                    }
                }
                Frontend::FunctionCall(_) if self.has_listener => {
                    // Calls a function by OID, unseen: as for any unvetted call.
                    self.taint(BypassReason::FunctionCall);
                }
                _ => {}
            }
            if expect.is_some() {
                if ends && tag == ReplyTag::None {
                    tag = self.close_request();
                }
                if ends {
                    // What follows in this batch belongs to the next request.
                    self.current_request = preview.next_request;
                }
                // Only what the server answers moves the batch on: a Flush or a
                // stray CopyData leaves its implicit transaction open.
                open_batch = !ends;
            }
            tags.push(tag);
        }
        if !open_batch {
            let outcome = if portals.iter().any(|p| p.fill.is_some()) {
                metrics::Outcome::Miss
            } else {
                metrics::Outcome::Other
            };
            let shape = portals
                .first()
                .filter(|_| self.has_listener)
                .and_then(|p| self.statements.get(p.statement))
                .and_then(|s| s.decision.as_ref())
                .map_or(0, |d| d.analysis.fingerprint);
            self.timing.sent(first_request, shape, outcome);
        }
        Forward {
            inject,
            replayed,
            close_unnamed,
            tags,
            swallow: false,
        }
    }

    /// Whether every execution in the request may be stored: all cacheable reads
    /// run to completion, and the request ends with Sync (commits on its own).
    fn fillable(&mut self, cache: &Cache, batch: &Batch<'_>) -> bool {
        let mut parsed: SmallVec<[(&[u8], &[u8]); 4]> = SmallVec::new();
        let mut bound: SmallVec<[(&[u8], bool); 4]> = SmallVec::new();
        let mut any = false;
        for msg in batch.messages().iter().map(|m| m.view) {
            match msg {
                Some(Frontend::Parse(p)) => parsed.push((p.name, p.query)),
                Some(Frontend::Bind(b)) => {
                    let ok = match parsed.iter().rev().find(|(n, _)| *n == b.statement) {
                        Some((_, q)) => cache.decide(q).cacheable().is_some(),
                        None => self
                            .statement_decision(cache, b.statement)
                            .is_some_and(|(_, d)| d.cacheable().is_some()),
                    };
                    bound.push((b.portal, ok));
                }
                Some(Frontend::Execute(x)) => {
                    let ok = bound
                        .iter()
                        .rev()
                        .find(|(n, _)| *n == x.portal)
                        .is_some_and(|(_, ok)| *ok);
                    if !ok || x.max_rows != 0 {
                        return false;
                    }
                    any = true;
                }
                Some(Frontend::Describe(_) | Frontend::Close(_) | Frontend::Sync) => {}
                _ => return false,
            }
        }
        any && batch.ends_with_sync()
    }

    /// Claim and open a fill for a bound cacheable statement, if it may be stored.
    fn start_fill(&mut self, cache: &Cache, db: &DbState, b: &Bind<'_>) -> Option<CaptureId> {
        let (hash, decision) = self.statement_decision(cache, b.statement)?;
        let public = decision.cacheable()?.public;
        let statement = self.statements.get(b.statement)?;
        let sql_hash = text_hash(statement.sql());
        let key = extended_key(self.seed.pick(public), hash, b.args);
        let params = BindParams {
            bind: b,
            types: statement.param_types(),
        };
        let plan = match fill::plan(cache, db, decision, sql_hash, key, &params, self.utf8) {
            Ok(plan) => plan,
            Err(why) => {
                metrics::bypass(why);
                return None;
            }
        };
        if b.param_values().iter().any(|v| is_time_literal(v)) {
            metrics::bypass(BypassReason::TimeLiteral);
            return None;
        }
        // Counted here, not when L2 was asked for it before it came here.
        plan.count_fallback();
        let lease = match cache.claim(key) {
            Claim::Leader(l) => Some(l),
            Claim::Follower(_) => {
                metrics::hot().coalesced.increment(1);
                None
            }
        };
        metrics::hot().l1_miss.increment(1);
        let request = self.current_request;
        match self.captures.open_fill(request, key, plan, false, lease) {
            ReplyTag::Fill(id) => Some(id),
            _ => None,
        }
    }

    /// Statements the request uses that the server never saw (pgtier answered
    /// their Parse): their Parse messages, to go ahead of the request, and how
    /// many there are; and whether a Close of the unnamed statement goes first
    /// (the request uses an unnamed statement the client does not have, and
    /// the server may have one the client never saw: Postgres must say it
    /// does not exist).
    fn replay_parses(
        &mut self,
        batch: &Batch<'_>,
        skipping: bool,
    ) -> (Option<Bytes>, SmallVec<[ReplyTag; 2]>, bool) {
        self.inject.clear();
        let mut n = SmallVec::new();
        if skipping {
            // The server skips the whole request up to its Sync: nothing to
            // prepare it for.
            return (None, n, false);
        }
        let mut close_unnamed = false;
        // Names (re)defined earlier in this request: not the old definitions.
        let mut defined: SmallVec<[&[u8]; 4]> = SmallVec::new();
        for msg in batch.messages().iter().filter_map(|m| m.view) {
            let name = match msg {
                Frontend::Parse(p) if p.name.is_empty() => {
                    defined.push(p.name);
                    continue;
                }
                // A named re-Parse must meet the old definition, as Postgres would.
                Frontend::Parse(p) => p.name,
                Frontend::Bind(b) => b.statement,
                Frontend::Describe(d) if d.target == Target::Statement => d.name,
                _ => continue,
            };
            if defined.contains(&name) {
                continue;
            }
            if name.is_empty() && self.stray_unnamed && self.statements.get(b"").is_none() {
                self.stray_unnamed = false;
                close_unnamed = true;
            }
            if self.statements.get(name).is_some_and(|s| !s.on_server) {
                // Undone if the server refuses or skips the replay.
                let id = self.statements.pending(name, true);
                if let Some(s) = self.statements.get_mut(name) {
                    self.inject.extend_from_slice(&s.parse);
                    s.on_server = true;
                    n.push(ReplyTag::Statement(id));
                }
            }
            if let Frontend::Parse(p) = msg {
                defined.push(p.name);
            }
        }
        if close_unnamed {
            // First, as `proxy::apply` expects its reply.
            let parses = self.inject.split();
            Close {
                target: Target::Statement,
                name: b"",
            }
            .encode(&mut self.inject);
            self.inject.extend_from_slice(&parses);
        }
        let inject = (!self.inject.is_empty()).then(|| self.inject.split().freeze());
        (inject, n, close_unnamed)
    }
}
