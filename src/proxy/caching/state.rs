//! A session's cache state and what happens to it outside a request: the key
//! seed and taints, the write fence, and the end of each forwarded request
//! (storing captures, applying setting changes).

use std::sync::Arc;

use bytes::BytesMut;
use smallvec::SmallVec;

use super::captures::Captures;
use super::latency::Timing;
use super::settings::{parser_mismatch, Settings};
use crate::bypass::BypassReason;
use crate::cache::{Cache, Decision, Entry, Key, Seed};
use crate::invalidation::DbState;
use crate::protocol::{backend, TxStatus};
use crate::proxy::replies::Expect;
use crate::proxy::statements::Statements;
use crate::proxy::tracker::{ReplyTag, Tracker};
use crate::sql::SessionEffect;

/// Per-session cache state.
pub struct SessionCache {
    pub seed: Seed,
    /// The invalidation state of this session's database; none means the
    /// database has no listener and is never cached.
    pub(super) db: Option<Arc<DbState>>,
    /// The same database state, kept for catalog questions asked while `db`
    /// is lent out for a request.
    pub(super) catalog_db: Option<Arc<DbState>>,
    /// Whether the session's database has a listener at all. Fixed for the
    /// session: without one nothing is ever served from cache, so statements
    /// need no analysis.
    pub(super) has_listener: bool,
    /// The request of the latest statement that may have written: a fence
    /// follows the end of its transaction.
    pub(super) wrote_in: Option<u64>,
    /// A fence is outstanding: nothing may be answered from the cache.
    pub fencing: bool,
    /// The session changed roles: the fence that follows also invalidates the
    /// whole database (the listener's poll of roles would come later).
    pub announce_all: bool,
    /// Set once the session did something pgtier cannot model; no caching after.
    pub tainted: Option<BypassReason>,
    /// The client and server encodings are both UTF-8: text keys are the
    /// bytes the request carries (`invalidation::key_deps::key_slots`).
    pub(super) utf8: bool,
    pub(super) settings: Settings,
    pub statements: Statements,
    /// The server may hold an unnamed statement the client no longer has:
    /// pgtier answered what destroyed it for the client (a Query, a Close)
    /// or a warm refresh parsed its own. Closed on the server before the
    /// client's next use of the unnamed statement that does not define it.
    pub(super) stray_unnamed: bool,
    /// A forwarded statement called a function a role defined (see
    /// `note_effects`): `public` rules no longer share this session's reads.
    pub(super) ran_user_code: bool,
    pub(super) captures: Captures,
    pub(super) timing: Timing,
    /// The request number captures opened now belong to.
    pub(super) current_request: u64,
    /// Results just fetched from L2 for the request being planned (L1 may be
    /// too small to hold them even for a moment).
    pub(super) prefetched: Vec<(Key, Arc<Entry>)>,
    /// Why those results' reads are left table-level (see
    /// `FillPlan::count_fallback`), counted if the request is answered.
    pub(super) prefetched_fallbacks: Vec<&'static str>,
    /// Scratch for the Parse messages replayed ahead of a request.
    pub(super) inject: BytesMut,
}

impl SessionCache {
    pub fn new(
        database: &str,
        user: &str,
        startup_params: &[(String, String)],
        db: Option<Arc<DbState>>,
    ) -> SessionCache {
        SessionCache {
            seed: Seed::default(),
            has_listener: db.is_some(),
            catalog_db: db.clone(),
            db,
            wrote_in: None,
            fencing: false,
            announce_all: false,
            tainted: None,
            utf8: false,
            settings: Settings::new(database, user, startup_params),
            statements: Statements::default(),
            stray_unnamed: false,
            ran_user_code: false,
            captures: Captures::default(),
            timing: Timing::default(),
            current_request: 0,
            prefetched: Vec::new(),
            prefetched_fallbacks: Vec::new(),
            inject: BytesMut::new(),
        }
    }

    /// Recompute the key seed (the server reported new values, or a SET took
    /// effect).
    pub fn reseed(&mut self, server_params: &[(String, String)]) {
        self.seed = self.settings.seed(server_params);
        if self.ran_user_code {
            self.seed.public = self.seed.user;
        }
        let is_utf8 = |name: &str| {
            server_params
                .iter()
                .any(|(k, v)| k == name && v.eq_ignore_ascii_case("UTF8"))
        };
        self.utf8 = is_utf8("client_encoding") && is_utf8("server_encoding");
        if let Some(why) = parser_mismatch(server_params) {
            // Statements may already have been read differently by the server
            // than by pgtier (a hidden SET, a hidden table): never trust the
            // session's state again, even once the setting is back.
            self.taint(why);
        }
    }

    /// Whether a SET took effect since the last call: the session reseeds.
    pub fn take_settings_changed(&mut self) -> bool {
        self.settings.take_changed()
    }

    /// What the server said of the session's starting settings; a cached
    /// database's session that could not learn them never uses the cache.
    pub fn set_defaults(&mut self, defaults: Option<String>) {
        if self.has_listener && defaults.is_none() {
            self.taint(BypassReason::SettingsUnknown);
        }
        self.settings.set_defaults(defaults);
    }

    pub fn taint(&mut self, why: BypassReason) {
        if self.tainted.is_none() {
            tracing::debug!(why = why.label(), "session no longer uses the cache");
            self.tainted = Some(why);
        }
    }

    pub fn db(&self) -> Option<&Arc<DbState>> {
        self.db.as_ref()
    }

    /// Why this session cannot use the cache right now, if it cannot.
    pub(super) fn bypass_reason(
        &self,
        db: Option<&DbState>,
        track: &Tracker,
    ) -> Option<BypassReason> {
        if let Some(t) = self.tainted {
            return Some(t);
        }
        match db {
            None => return Some(BypassReason::NoListener),
            Some(db) if !db.live() => return Some(BypassReason::ListenerDown),
            _ => {}
        }
        if self.fencing {
            return Some(BypassReason::FencePending);
        }
        if track.answerable() {
            return None;
        }
        Some(if track.blind {
            BypassReason::Untracked
        } else if track.tx != TxStatus::Idle {
            BypassReason::InTransaction
        } else if track.copy_in {
            BypassReason::Copy
        } else {
            BypassReason::Pipelined
        })
    }

    /// The decision for a known statement, kept on the statement.
    pub(super) fn statement_decision(
        &mut self,
        cache: &Cache,
        name: &[u8],
    ) -> Option<(u128, Arc<Decision>)> {
        let s = self.statements.get_mut(name)?;
        if s.decision.is_none() {
            s.decision = Some(cache.decide(s.sql()));
        }
        s.decision.clone().map(|d| (s.hash, d))
    }

    /// Record the session effects of a forwarded statement: taints at once, the
    /// rest once the request succeeds.
    pub(super) fn note_effects(&mut self, decision: &Decision, db: Option<&DbState>) {
        // Rows written only to tables this instance does not cache (and that
        // write nowhere else) need no fence: no entry here can hold them. A
        // watch that starts after the write cannot let a fill in before the
        // write's commit (it waits for the table's writers), so the next read
        // is current.
        let uncached = || db.is_some_and(|d| d.caches_none_of(&decision.analysis.writes));
        if decision.analysis.may_write && !(decision.analysis.plain_dml && uncached()) {
            self.wrote_in = Some(self.current_request);
        }
        if decision.analysis.roles_changed {
            self.announce_all = true;
        }
        let calls = &decision.analysis.calls;
        if !calls.is_empty()
            && !self
                .catalog_db
                .as_ref()
                .is_some_and(|d| d.all_immutable(calls))
        {
            // A function that is not IMMUTABLE (or one that shadows a built-in)
            // may write, SET, set_config(), or create temporary objects, none of
            // which pgtier would see.
            self.wrote_in = Some(self.current_request);
            self.taint(BypassReason::FunctionCall);
        } else if self
            .catalog_db
            .as_ref()
            .is_some_and(|d| d.any_user_defined(calls))
        {
            // A role's own IMMUTABLE function may still call set_config():
            // what this session reads is no longer shared with other roles.
            self.ran_user_code = true;
            self.seed.public = self.seed.user;
        }
        for e in &decision.analysis.effects {
            match e {
                SessionEffect::Taint(why) => self.taint(*why),
                // Possibly a temporary object, which only this session's names
                // resolve to, while its key is that of sessions without it.
                SessionEffect::CreatesUnqualified => {
                    if self.settings.path_may_name_pg_temp() {
                        self.taint(BypassReason::TemporaryObjects);
                    }
                }
                other => self.settings.note(other.clone()),
            }
        }
    }

    /// Tag for the message that ends a forwarded request: whether its end
    /// applies setting changes.
    pub(super) fn close_request(&mut self) -> ReplyTag {
        if self.settings.close_request() {
            ReplyTag::Effects
        } else {
            ReplyTag::None
        }
    }

    /// Capture a relayed server message for the capture its request opened.
    pub fn on_reply(&mut self, expect: Expect, tag: ReplyTag, msg_tag: u8, msg: &[u8], max: usize) {
        if let ReplyTag::Statement(id) = tag {
            if matches!(msg_tag, backend::PARSE_COMPLETE | backend::CLOSE_COMPLETE) {
                self.statements.confirmed(id);
            }
            return;
        }
        self.captures.on_reply(expect, tag, msg_tag, msg, max);
    }

    /// An error ended these requests (the failed one first): the statement
    /// changes of the Parse and Close messages among them never happened.
    pub fn refused(&mut self, tags: &[ReplyTag]) {
        let id = |t: &ReplyTag| match t {
            ReplyTag::Statement(id) => Some(*id),
            _ => None,
        };
        // A Close of the server's stray unnamed statement that the server
        // skipped closed nothing: it must go ahead of a later use again.
        if tags.contains(&ReplyTag::StrayClose) {
            self.stray_unnamed = true;
        }
        let failed = tags.first().and_then(id);
        let skipped: SmallVec<[u64; 4]> = tags.iter().skip(1).filter_map(id).collect();
        if failed.is_some() || !skipped.is_empty() {
            self.statements.refused(failed, &skipped);
        }
    }

    /// A message streamed through without buffering cannot be captured.
    pub fn abort(&mut self, tag: ReplyTag) {
        self.captures.abort(tag);
    }

    /// An error in request `request`: nothing it produced is stored.
    pub fn on_error(&mut self, request: u64) {
        self.captures.on_error(request);
    }

    /// A notice while request `request` ran: nothing it produced is stored
    /// either, since a hit replays no notice.
    pub fn on_notice(&mut self, request: u64) {
        self.captures.on_error(request);
    }

    /// Request `request` ended (ReadyForQuery): store what it captured if it
    /// committed, apply its setting changes if it succeeded. True if a write
    /// fence must follow before the client hears of the end.
    pub fn on_ready(
        &mut self,
        cache: &Cache,
        tag: ReplyTag,
        status: TxStatus,
        error: bool,
        request: u64,
    ) -> bool {
        let clean = status == TxStatus::Idle && !error;
        self.timing.ended(request);
        self.captures.finish(cache, request, clean);
        if tag == ReplyTag::Effects {
            if let Err(why) = self.settings.request_ended(clean, &mut self.statements) {
                self.taint(why);
            }
        }
        // A transaction that wrote has ended: before the client hears so, make
        // sure its invalidations have been processed (read-your-writes).
        // Only once the request that wrote (the latest that may have) has
        // ended: a later pipelined write's flag must not fence an earlier
        // request, whose fence would queue behind that later one.
        let fence = status == TxStatus::Idle && self.wrote_in.is_some_and(|r| r <= request);
        if fence {
            self.wrote_in = None;
        }
        fence && self.db.as_ref().is_some_and(|d| d.live())
    }
}
