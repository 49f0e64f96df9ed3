//! The session's part in warming hot keys (`invalidation::warm`): the hit that
//! makes an entry hot leaves its recipe, and an idle session turns a warm job
//! into a request whose replies fill the cache and are swallowed.
//!
//! A warm request is built from the recipe alone: the statement text as the
//! readers sent it (a Query, or an unnamed Parse/Bind/Describe/Execute/Sync
//! with the readers' parameter types, values and formats, never a client's
//! statement name). Before it goes, the session checks that it is the job's
//! context (its whole key seed, and the key the request hashes to) and that the
//! statement is still one pgtier caches; the fill's generations are read here,
//! after the invalidation that started the job.

use bytes::{Bytes, BytesMut};

use super::action::Forward;
use super::fill::{self, BindParams};
use super::state::SessionCache;
use crate::cache::key::{extended_key, simple_key, statement_hash};
use crate::cache::{text_hash, Cache, Decision, Entry, Key};
use crate::invalidation::key_deps::NoParams;
use crate::invalidation::warm::{Job, Recipe};
use crate::invalidation::DbState;
use crate::protocol::batch::Batch;
use crate::protocol::frontend::{self, Bind, Describe, Execute, Frontend, Parse, Query, Target};
use crate::proxy::tracker::{ReplyTag, Tracker};
use crate::sql::is_time_literal;

impl SessionCache {
    /// Count a simple-protocol hit on `e` (under `key`, for `sql`).
    #[inline]
    pub(super) fn count_simple_hit(
        &self,
        cache: &Cache,
        db: &DbState,
        e: &Entry,
        key: Key,
        sql: &[u8],
    ) {
        if e.hit(cache.warm_after()) {
            self.remember(db, key, e, || Recipe::Simple {
                sql: Bytes::copy_from_slice(sql),
            });
        }
    }

    /// An extended-protocol hit made `e` (under `key`) hot: remember its
    /// statement, named `statement` or defined in the request (`defined`: text
    /// and types), bound with `args`.
    #[cold]
    pub(super) fn remember_extended(
        &self,
        db: &DbState,
        e: &Entry,
        key: Key,
        statement: &[u8],
        defined: Option<(&[u8], &[u8])>,
        args: &[u8],
    ) {
        let stored = self
            .statements
            .get(statement)
            .map(|s| (s.sql(), s.param_types()));
        let Some((sql, types)) = defined.or(stored) else {
            return;
        };
        self.remember(db, key, e, || Recipe::Extended {
            sql: Bytes::copy_from_slice(sql),
            types: Bytes::copy_from_slice(types),
            args: Bytes::copy_from_slice(args),
        });
    }

    #[cold]
    fn remember(&self, db: &DbState, key: Key, e: &Entry, recipe: impl FnOnce() -> Recipe) {
        db.warm.register(key, self.seed.user, &e.deps, recipe);
    }

    /// Whether this session may carry warm refreshes at all now.
    pub fn warmable(&self) -> bool {
        self.tainted.is_none() && !self.fencing && self.db.as_ref().is_some_and(|d| d.live())
    }

    /// The request that refreshes `job`'s entry on this (idle) session, and how
    /// to forward it; `None` (the job dropped) if this session is not the
    /// job's context or the statement is no longer cached.
    pub fn warm_request(
        &mut self,
        cache: &Cache,
        job: Job,
        track: &Tracker,
    ) -> Option<(Bytes, Forward)> {
        let db = self.db.clone()?;
        if !self.warmable() || job.seed != self.seed.user || !track.replies.is_empty() {
            return None;
        }
        if !track.answerable() {
            return None;
        }
        let request = track.requests_sent + 1;
        let Job {
            key,
            recipe,
            lease,
            ticket,
            ..
        } = job;
        let mut buf = BytesMut::new();
        let (bytes, tags) = match &recipe {
            Recipe::Simple { sql } => {
                let hash = text_hash(sql);
                let decision = cache.decide_hashed(hash, sql);
                let public = self.refreshable(&db, &decision)?;
                if simple_key(self.seed.pick(public), sql) != key {
                    return None;
                }
                let plan =
                    fill::plan(cache, &db, decision, hash, key, &NoParams, self.utf8).ok()?;
                Query { sql }.encode(&mut buf);
                let tag = self
                    .captures
                    .open_warm(request, key, plan, true, lease, ticket);
                (buf.freeze(), smallvec::smallvec![tag])
            }
            Recipe::Extended { sql, types, args } => {
                encode_extended(&mut buf, sql, types, args);
                let bytes = buf.freeze();
                let batch = Batch::new(&bytes);
                let bind = batch.views().find_map(|m| match m {
                    Frontend::Bind(b) => Some(b),
                    _ => None,
                })?;
                if bind.param_values().iter().any(|v| is_time_literal(v)) {
                    return None;
                }
                let decision = cache.decide(sql);
                let public = self.refreshable(&db, &decision)?;
                let statement = statement_hash(sql, types);
                if extended_key(self.seed.pick(public), statement, bind.args) != key {
                    return None;
                }
                let params = BindParams { bind: &bind, types };
                let plan = fill::plan(
                    cache,
                    &db,
                    decision,
                    text_hash(sql),
                    key,
                    &params,
                    self.utf8,
                )
                .ok()?;
                let tag = self
                    .captures
                    .open_warm(request, key, plan, false, lease, ticket);
                // Parse, Bind, Describe (its RowDescription is kept), Execute, Sync.
                let none = ReplyTag::None;
                (
                    bytes.clone(),
                    smallvec::smallvec![none, none, tag, tag, none],
                )
            }
        };
        // A Query, like a Parse of the unnamed statement, replaces the
        // client's unnamed statement on the server: replay it before its next
        // use there.
        if let Some(s) = self.statements.get_mut(b"") {
            s.on_server = false;
        }
        // And the refresh's own unnamed statement stays there.
        self.stray_unnamed = true;
        let forward = Forward {
            tags,
            swallow: true,
            ..Forward::default()
        };
        Some((bytes, forward))
    }

    /// Whether a statement may still be refreshed here (a cacheable read that
    /// calls nothing that is not IMMUTABLE now): whether its entries are shared.
    fn refreshable(&self, db: &DbState, d: &Decision) -> Option<bool> {
        let policy = d.cacheable()?;
        let a = &d.analysis;
        let quiet = !a.may_write && !a.roles_changed && a.effects.is_empty();
        (quiet && db.all_immutable(&a.calls)).then_some(policy.public)
    }
}

/// An unnamed Parse/Bind/Describe/Execute/Sync of `sql` with these parameter
/// types and Bind arguments.
fn encode_extended(buf: &mut BytesMut, sql: &[u8], types: &[u8], args: &[u8]) {
    Parse {
        name: b"",
        query: sql,
        param_types: types,
    }
    .encode(buf);
    Bind {
        portal: b"",
        statement: b"",
        args,
        result_formats: &[],
        param_count: 0,
    }
    .encode(buf);
    Describe {
        target: Target::Portal,
        name: b"",
    }
    .encode(buf);
    Execute {
        portal: b"",
        max_rows: 0,
    }
    .encode(buf);
    buf.extend_from_slice(frontend::SYNC_BYTES);
}
