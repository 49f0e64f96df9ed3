//! The cache on the request path: answering whole requests from cached replies,
//! and capturing server replies to fill the cache.
//!
//! A request is answered by pgtier only when no transaction is open, nothing
//! still in flight can change that (only Parse/Bind/Describe/Close/Sync are
//! pending), and every part of it can be answered: the reply is then a handful of
//! shared `Bytes` (cached rows plus static ParseComplete / BindComplete /
//! ReadyForQuery) written in one vectored write, or queued behind the replies
//! still due from the server.
//! Otherwise the request goes to Postgres unchanged (preceded by any Parse the
//! server has not seen), and results of cacheable statements are captured as
//! they stream back to the client, then stored once the request has committed.

use std::collections::{BTreeMap, VecDeque};
use std::ops::Range;
use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};

use super::conn::OutQueue;
use super::replies::Expect;
use super::statements::Statements;
use super::tracker::{ReplyTag, Tracker};
use crate::cache::key::{describe_key, extended_key, session_seed, simple_key, statement_hash};
use crate::cache::l2::Lookup;
use crate::cache::rules::Policy;
use crate::cache::{text_hash, Cache, Claim, Decision, Entry, FillLease, Key, Seed};
use crate::invalidation::DbState;
use crate::metrics;
use crate::protocol::backend::{
    self, BIND_COMPLETE_BYTES, CLOSE_COMPLETE_BYTES, PARSE_COMPLETE_BYTES, READY_IDLE_BYTES,
};
use crate::protocol::frontend::{Frontend, Target};
use crate::protocol::TxStatus;
use crate::sql::{is_time_literal, SessionEffect};

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

/// The portal of that name bound last in the request being planned.
fn find_portal<'p>(portals: &'p mut [Portal], batch: &[u8], name: &[u8]) -> Option<&'p mut Portal> {
    portals
        .iter_mut()
        .rev()
        .find(|p| batch[p.name.clone()] == *name)
}

/// (start, end, tag) of each whole message in an already framed buffer.
fn messages(buf: &[u8]) -> impl Iterator<Item = (usize, usize, u8)> + '_ {
    let mut at = 0;
    std::iter::from_fn(move || {
        if at + 5 > buf.len() {
            return None;
        }
        let len = i32::from_be_bytes([buf[at + 1], buf[at + 2], buf[at + 3], buf[at + 4]]);
        let start = at;
        at += len.max(4) as usize + 1;
        (at <= buf.len()).then_some((start, at, buf[start]))
    })
}

fn decode(buf: &[u8], (s, e, tag): (usize, usize, u8)) -> Option<Frontend<'_>> {
    Frontend::decode(tag, &buf[s + 5..e]).ok()
}

/// A cached entry that may be served now: fresh, and nothing it read has changed.
#[inline]
fn fresh(cache: &Cache, db: &DbState, key: &Key, now: Instant) -> Option<Arc<Entry>> {
    cache
        .l1
        .get(key)
        .filter(|e| now < e.fresh_until && db.valid(e.epoch, &e.deps))
}

fn range_of(outer: &[u8], inner: &[u8]) -> Range<usize> {
    let start = inner.as_ptr() as usize - outer.as_ptr() as usize;
    start..start + inner.len()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CaptureState {
    Open,
    Complete,
    Aborted,
}

enum CaptureKind {
    Fill {
        key: Key,
        /// Where to store it in L2 too, if L2 is in use.
        l2: Option<u128>,
        policy: Policy,
        decision: Arc<Decision>,
        epoch: u64,
        deps: Box<[(u32, u64)]>,
        /// Simple-protocol results must carry their RowDescription.
        simple: bool,
        /// Held until the fill ends; dropping it wakes coalesced waiters.
        _lease: Option<FillLease>,
    },
    Describe {
        key: Key,
    },
}

struct Capture {
    /// The request (by count of requests sent) whose ReadyForQuery ends it.
    request: u64,
    kind: CaptureKind,
    row_desc: Option<Bytes>,
    buf: BytesMut,
    state: CaptureState,
}

/// A portal bound in the request being handled.
struct Portal {
    name: Range<usize>,
    statement: Range<usize>,
    /// Text of a statement defined by a Parse in this same request.
    sql: Option<Range<usize>>,
    key: Option<Key>,
    entry: Option<Arc<Entry>>,
    fill: Option<u16>,
    /// A cached result for it is served in this request: the same Bind
    /// succeeded on the server before (the key covers its arguments).
    proven: bool,
    /// The Parse earlier in this request that defined its statement.
    parse: Option<usize>,
}

/// Client encodings in which a multi-byte character may contain the bytes of a
/// quote or a backslash, so the server splits a statement where pgtier's
/// (UTF-8) parser does not.
const SPLITTING_ENCODINGS: [&str; 6] = ["SJIS", "SHIFT_JIS_2004", "BIG5", "GBK", "UHC", "GB18030"];

/// Why pgtier's parser may read this session's statements differently from the
/// server (it parses as with `standard_conforming_strings = on` in UTF-8).
fn parser_mismatch(server_params: &[(String, String)]) -> Option<&'static str> {
    for (k, v) in server_params {
        if k.eq_ignore_ascii_case("standard_conforming_strings") && !v.eq_ignore_ascii_case("on") {
            return Some("standard_conforming_strings");
        }
        if k.eq_ignore_ascii_case("client_encoding")
            && SPLITTING_ENCODINGS
                .iter()
                .any(|e| e.eq_ignore_ascii_case(v))
        {
            return Some("client_encoding");
        }
    }
    None
}

/// What planning found an extended-protocol request to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Plan {
    /// Every part can be answered from L1.
    Hit,
    /// Answerable except for results missing from L1 (L2 may have them).
    Missing,
    /// Must go to the server.
    No,
}

/// Per-session cache state.
pub struct SessionCache {
    pub seed: Seed,
    /// The invalidation state of this session's database; none means the
    /// database has no listener and is never cached.
    db: Option<Arc<DbState>>,
    /// The same database state, kept for catalog questions asked while `db`
    /// is lent out for a request.
    catalog_db: Option<Arc<DbState>>,
    /// Whether the session's database has a listener at all. Fixed for the
    /// session: without one nothing is ever served from cache, so statements
    /// need no analysis.
    watched: bool,
    /// The request of the latest statement that may have written: a fence
    /// follows the end of its transaction.
    wrote_in: Option<u64>,
    /// A fence is outstanding: nothing may be answered from the cache.
    pub fencing: bool,
    /// The session changed roles: the fence that follows also invalidates the
    /// whole database (the listener's poll of roles would come later).
    pub announce_all: bool,
    database: String,
    user: String,
    startup_params: Vec<(String, String)>,
    /// Digest of the settings the session started with beyond its startup
    /// packet (role and database defaults, server configuration).
    defaults: Option<String>,
    /// Settings changed with SET during the session (those the server does not
    /// report back in ParameterStatus).
    settings: BTreeMap<String, String>,
    /// Set once the session did something pgtier cannot model; no caching after.
    pub tainted: Option<&'static str>,
    /// Setting changes of forwarded requests, applied when each one succeeds.
    pending_effects: VecDeque<Vec<SessionEffect>>,
    /// Changes gathered while forwarding the current request.
    pending_next: Vec<SessionEffect>,
    pub statements: Statements,
    /// Set when settings changed: the session must reseed.
    pub settings_changed: bool,
    captures: Vec<Capture>,
    // Scratch space reused across requests, so a hit allocates nothing.
    chunks: Vec<Bytes>,
    portals: Vec<Portal>,
    /// Statements (name, hash, text) (re)defined by the request being planned.
    defined: Vec<(Range<usize>, u128, Range<usize>)>,
    /// Per entry of `defined`: whether the cache proves Postgres accepts it.
    parse_proven: Vec<bool>,
    inject: BytesMut,
    /// Replies composed by pgtier waiting for their turn behind server replies.
    synthetic: VecDeque<Vec<Bytes>>,
    /// Bytes held in `synthetic`: they count towards the client's queue.
    synthetic_bytes: usize,
    /// Results just fetched from L2 for the request being planned (L1 may be
    /// too small to hold them even for a moment).
    prefetched: Vec<(Key, Arc<Entry>)>,
    /// The request number captures opened now belong to.
    current_request: u64,
    /// When the request being handled was complete, for latency figures.
    started: Instant,
    /// Shapes of the cached results in the reply being composed, and whether
    /// any came from L2.
    hit_shapes: Vec<u64>,
    from_l2: bool,
    /// Requests sent to Postgres: (request number, start, shape, outcome).
    upstream: VecDeque<(u64, Instant, u64, metrics::Outcome)>,
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
            watched: db.is_some(),
            catalog_db: db.clone(),
            db,
            wrote_in: None,
            fencing: false,
            announce_all: false,
            database: database.to_string(),
            user: user.to_string(),
            startup_params: startup_params.to_vec(),
            defaults: None,
            settings: BTreeMap::new(),
            tainted: None,
            pending_effects: VecDeque::new(),
            pending_next: Vec::new(),
            statements: Statements::default(),
            settings_changed: false,
            captures: Vec::new(),
            chunks: Vec::with_capacity(8),
            portals: Vec::with_capacity(4),
            defined: Vec::with_capacity(4),
            parse_proven: Vec::with_capacity(4),
            inject: BytesMut::new(),
            synthetic: VecDeque::new(),
            synthetic_bytes: 0,
            prefetched: Vec::new(),
            current_request: 0,
            started: Instant::now(),
            hit_shapes: Vec::with_capacity(4),
            from_l2: false,
            upstream: VecDeque::new(),
        }
    }

    /// Recompute the key seed from everything that shapes output, oldest
    /// source first (startup, then the server's reports, then SET): the newest
    /// value of each setting is the one in force.
    pub fn reseed(&mut self, server_params: &[(String, String)]) {
        let defaults = self.defaults.as_deref().map(|d| ("pgtier.defaults", d));
        let params = defaults
            .into_iter()
            .chain(
                self.startup_params
                    .iter()
                    .chain(server_params.iter())
                    .map(|(k, v)| (k.as_str(), v.as_str())),
            )
            .chain(self.settings.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        self.seed = session_seed(&self.database, &self.user, params);
        if let Some(why) = parser_mismatch(server_params) {
            // Statements may already have been read differently by the server
            // than by pgtier (a hidden SET, a hidden table): never trust the
            // session's state again, even once the setting is back.
            self.taint(why);
        }
    }

    /// What the server said of the session's starting settings; a cached
    /// database's session that could not learn them never uses the cache.
    pub fn set_defaults(&mut self, defaults: Option<String>) {
        if self.watched && defaults.is_none() {
            self.taint("settings_unknown");
        }
        self.defaults = defaults;
    }

    pub fn taint(&mut self, why: &'static str) {
        if self.tainted.is_none() {
            tracing::debug!(why, "session no longer uses the cache");
            self.tainted = Some(why);
        }
    }

    /// Why this session cannot use the cache right now, if it cannot.
    fn bypass_reason(&self, db: Option<&DbState>, track: &Tracker) -> Option<&'static str> {
        if let Some(t) = self.tainted {
            return Some(t);
        }
        match db {
            None => return Some("no_listener"),
            Some(db) if !db.live() => return Some("listener_down"),
            _ => {}
        }
        if self.fencing {
            return Some("fence_pending");
        }
        if track.answerable() {
            return None;
        }
        Some(if track.blind {
            "untracked"
        } else if track.tx != TxStatus::Idle {
            "in_transaction"
        } else if track.copy_in {
            "copy"
        } else {
            "pipelined"
        })
    }

    /// Send a reply composed by pgtier: now, or after the replies still due.
    fn emit(&mut self, track: &mut Tracker, cout: &mut OutQueue) {
        let took = self.started.elapsed();
        let hot = metrics::hot();
        if self.from_l2 {
            hot.latency_l2.record(took);
        } else {
            hot.latency_l1.record(took);
        }
        for s in self.hit_shapes.drain(..) {
            metrics::shape(s, metrics::Outcome::Hit, took);
        }
        if track.replies.is_empty() {
            for c in self.chunks.drain(..) {
                cout.push(c);
            }
        } else {
            self.synthetic_bytes += self.chunks.iter().map(Bytes::len).sum::<usize>();
            self.synthetic.push_back(self.chunks.drain(..).collect());
            track.expect(Expect::Synthetic, false, ReplyTag::Synthetic);
        }
    }

    /// The next composed reply that has become due (its turn in the reply queue).
    pub fn take_synthetic(&mut self) -> Vec<Bytes> {
        let reply = self.synthetic.pop_front().unwrap_or_default();
        self.synthetic_bytes -= reply.iter().map(Bytes::len).sum::<usize>();
        reply
    }

    /// Size of the composed replies waiting behind server replies.
    pub fn synthetic_bytes(&self) -> usize {
        self.synthetic_bytes
    }

    /// Handle one complete client request (`batch` holds whole messages).
    pub async fn dispatch(
        &mut self,
        cache: &Cache,
        batch: Bytes,
        track: &mut Tracker,
        cout: &mut OutQueue,
        sout: &mut OutQueue,
    ) {
        // Borrow the database state for the request without touching its
        // reference count (shared by every session: a hot cache line).
        let db = self.db.take();
        self.dispatch_with(cache, db.as_deref(), batch, track, cout, sout)
            .await;
        self.db = db;
    }

    async fn dispatch_with(
        &mut self,
        cache: &Cache,
        db: Option<&DbState>,
        batch: Bytes,
        track: &mut Tracker,
        cout: &mut OutQueue,
        sout: &mut OutQueue,
    ) {
        let Some(first) = messages(&batch).next() else {
            return;
        };
        let state_bypass = self.bypass_reason(db, track);
        self.current_request = track.requests_sent + 1;
        self.started = Instant::now();
        self.hit_shapes.clear();
        self.from_l2 = false;
        let db = db.filter(|_| state_bypass.is_none());
        if first.1 == batch.len() {
            if let Some(Frontend::Query(q)) = decode(&batch, first) {
                let sql = range_of(&batch, q.sql);
                if !self.watched {
                    self.forward_unwatched(batch, track, sout);
                    return;
                }
                self.simple(cache, db, &batch, sql, state_bypass, track, cout, sout)
                    .await;
                return;
            }
        }
        if let Some(db) = db {
            let mut plan = self.plan_hit(cache, db, &batch);
            if plan == Plan::Missing && self.l2_lookup(cache, db, &batch).await {
                plan = self.plan_hit(cache, db, &batch);
            }
            self.prefetched.clear();
            if plan == Plan::Hit {
                self.commit_hit(&batch);
                self.emit(track, cout);
                return;
            }
        }
        self.forward_extended(cache, db, batch, state_bypass, track, sout);
    }

    /// Forward a simple query on a session whose database pgtier does not
    /// cache: no parse (each distinct text would cost one), no shape of its own.
    fn forward_unwatched(&mut self, batch: Bytes, track: &mut Tracker, sout: &mut OutQueue) {
        metrics::bypass("no_listener");
        self.upstream.push_back((
            self.current_request,
            self.started,
            0,
            metrics::Outcome::Other,
        ));
        track.expect(Expect::Query, false, ReplyTag::None);
        track.open_batch = false;
        sout.push(batch);
    }

    #[allow(clippy::too_many_arguments)]
    async fn simple(
        &mut self,
        cache: &Cache,
        db: Option<&DbState>,
        batch: &Bytes,
        sql: Range<usize>,
        state_bypass: Option<&'static str>,
        track: &mut Tracker,
        cout: &mut OutQueue,
        sout: &mut OutQueue,
    ) {
        let hot = metrics::hot();
        let sql = &batch[sql];
        let mut tag = ReplyTag::None;
        if let Some(db) = db {
            let decision = cache.has_public_rules().then(|| cache.decide(sql));
            let public = decision
                .as_ref()
                .and_then(|d| d.cacheable())
                .is_some_and(|p| p.public);
            let key = simple_key(self.seed.pick(public), sql);
            if let Some(e) = cache.l1.get(&key).filter(|e| db.valid(e.epoch, &e.deps)) {
                let now = Instant::now();
                if now < e.fresh_until {
                    hot.l1_hit.increment(1);
                    self.reply_simple(&e, track, cout);
                    return;
                }
                if now < e.stale_until {
                    // Stale-while-revalidate: answer now, refresh behind it.
                    hot.l1_stale.increment(1);
                    self.reply_simple(&e, track, cout);
                    self.refresh_simple(cache, db, batch, sql, key, track, sout);
                    return;
                }
            }
            let hash = text_hash(sql);
            let decision = decision.unwrap_or_else(|| cache.decide_hashed(hash, sql));
            self.note_effects(&decision);
            let resolved = decision.cacheable().map(|_| db.resolve(hash, &decision));
            match (&decision.verdict, self.tainted, resolved.as_deref()) {
                (Ok(_), None, Some(Err(why))) => metrics::bypass(why),
                (Ok(policy), None, Some(Ok(resolved))) => 'fill: {
                    let Some(snapshot) = db.snapshot(resolved) else {
                        metrics::bypass("not_watched");
                        break 'fill;
                    };
                    let policy = policy.clone();
                    let l2tier = cache.l2();
                    let l2key = l2tier.as_ref().and(db.l2_key(key, &resolved.slots));
                    if let (Some(l2), Some(k2)) = (&l2tier, l2key) {
                        match l2.get(k2).await {
                            Lookup::Hit(Some(rd), rows) => {
                                hot.l2_hit.increment(1);
                                self.from_l2 = true;
                                let e = Entry::new(
                                    Some(rd),
                                    rows,
                                    policy.ttl,
                                    policy.swr,
                                    decision.analysis.fingerprint,
                                    snapshot.0,
                                    snapshot.1,
                                );
                                self.reply_simple(&e, track, cout);
                                cache.insert(key, e);
                                return;
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
                                self.reply_simple(&e, track, cout);
                                return;
                            }
                            None
                        }
                    };
                    hot.l1_miss.increment(1);
                    tag = self.open_fill(key, l2key, policy, decision, snapshot, true, lease);
                }
                (Ok(_), Some(why), _) => metrics::bypass(why),
                (Ok(_), None, None) => {}
                (Err(b), _, _) => metrics::bypass(b.label()),
            }
        } else {
            let decision = cache.decide(sql);
            self.note_effects(&decision);
            match &decision.verdict {
                Err(b) => metrics::bypass(b.label()),
                Ok(_) => metrics::bypass(state_bypass.unwrap_or("unknown")),
            }
        }
        if tag == ReplyTag::None {
            tag = self.effects_tag();
        }
        let outcome = if matches!(tag, ReplyTag::Fill(_)) {
            metrics::Outcome::Miss
        } else {
            metrics::Outcome::Other
        };
        let shape = cache.decide(sql).analysis.fingerprint;
        self.upstream
            .push_back((self.current_request, self.started, shape, outcome));
        track.expect(Expect::Query, false, tag);
        track.open_batch = false;
        sout.push(batch.clone());
    }

    /// Re-run a stale entry's query on this session's connection, its replies
    /// captured for the cache and not relayed (one refresh per key at a time).
    #[allow(clippy::too_many_arguments)]
    fn refresh_simple(
        &mut self,
        cache: &Cache,
        db: &DbState,
        batch: &Bytes,
        sql: &[u8],
        key: Key,
        track: &mut Tracker,
        sout: &mut OutQueue,
    ) {
        if !track.replies.is_empty() {
            return;
        }
        let Claim::Leader(lease) = cache.claim(key) else {
            return;
        };
        let hash = text_hash(sql);
        let decision = cache.decide_hashed(hash, sql);
        let Ok(policy) = decision.verdict.clone() else {
            return;
        };
        let resolved = db.resolve(hash, &decision);
        let Ok(resolved) = resolved.as_ref() else {
            return;
        };
        let Some(snapshot) = db.snapshot(resolved) else {
            return;
        };
        let l2key = cache.l2().and(db.l2_key(key, &resolved.slots));
        let tag = self.open_fill(key, l2key, policy, decision, snapshot, true, Some(lease));
        track.expect(Expect::Query, true, tag);
        sout.push(batch.clone());
    }

    /// A simple-protocol hit: RowDescription, rows, ReadyForQuery.
    fn reply_simple(&mut self, e: &Entry, track: &mut Tracker, cout: &mut OutQueue) {
        self.chunks.clear();
        self.hit_shapes.push(e.shape);
        if let Some(rd) = &e.row_desc {
            self.chunks.push(rd.clone());
        }
        self.chunks.push(e.rows.clone());
        self.chunks.push(Bytes::from_static(READY_IDLE_BYTES));
        self.emit(track, cout);
    }

    /// Resolve a statement name as it stands during planning: redefined earlier
    /// in this request, or known from before.
    fn statement_hash(&self, batch: &[u8], name: &[u8]) -> Option<u128> {
        self.defined
            .iter()
            .rev()
            .find(|(n, _, _)| &batch[n.clone()] == name)
            .map(|(_, h, _)| *h)
            .or_else(|| self.statements.get(name).map(|s| s.hash))
    }

    /// Try to answer an extended-protocol request entirely from the cache,
    /// filling `self.chunks` with the reply. Touches no session state.
    fn plan_hit(&mut self, cache: &Cache, db: &DbState, batch: &Bytes) -> Plan {
        self.chunks.clear();
        self.hit_shapes.clear();
        self.portals.clear();
        self.defined.clear();
        self.parse_proven.clear();
        let now = Instant::now();
        let public_rules = cache.has_public_rules();
        let mut last = 0u8;
        let mut executes = 0;
        let mut missing = false;
        for m in messages(batch) {
            last = m.2;
            let Some(msg) = decode(batch, m) else {
                return Plan::No;
            };
            match msg {
                Frontend::Parse(p) => {
                    let hash = statement_hash(p.query, p.param_types);
                    // Parsing a name that exists is an error Postgres must report.
                    if !p.name.is_empty() && self.statement_hash(batch, p.name).is_some() {
                        return Plan::No;
                    }
                    self.defined
                        .push((range_of(batch, p.name), hash, range_of(batch, p.query)));
                    self.parse_proven.push(false);
                    self.chunks.push(Bytes::from_static(PARSE_COMPLETE_BYTES));
                }
                Frontend::Bind(b) => {
                    let Some(hash) = self.statement_hash(batch, b.statement) else {
                        return Plan::No;
                    };
                    let parse = self
                        .defined
                        .iter()
                        .rposition(|(n, _, _)| batch[n.clone()] == *b.statement);
                    let sql = parse.map(|i| self.defined[i].2.clone());
                    let public = public_rules
                        && self
                            .statements
                            .get(b.statement)
                            .filter(|s| s.hash == hash)
                            .and_then(|s| s.decision.as_ref())
                            .and_then(|d| d.cacheable())
                            .is_some_and(|p| p.public);
                    let key = extended_key(self.seed.pick(public), hash, b.args);
                    self.portals.push(Portal {
                        name: range_of(batch, b.portal),
                        statement: range_of(batch, b.statement),
                        sql,
                        key: Some(key),
                        entry: None,
                        fill: None,
                        proven: false,
                        parse,
                    });
                    self.chunks.push(Bytes::from_static(BIND_COMPLETE_BYTES));
                }
                Frontend::Describe(d) if d.target == Target::Statement => {
                    let Some(hash) = self.statement_hash(batch, d.name) else {
                        return Plan::No;
                    };
                    let Some(desc) = cache.describe(&describe_key(self.seed.user, hash)) else {
                        return Plan::No;
                    };
                    // Described for this user and these settings: Postgres parsed it.
                    if let Some(i) = self
                        .defined
                        .iter()
                        .rposition(|(n, _, _)| batch[n.clone()] == *d.name)
                    {
                        self.parse_proven[i] = true;
                    }
                    self.chunks.push(desc);
                }
                Frontend::Describe(d) => {
                    let Some(p) = find_portal(&mut self.portals, batch, d.name) else {
                        return Plan::No;
                    };
                    match p
                        .key
                        .and_then(|k| usable(cache, db, &self.prefetched, &k, now))
                    {
                        Some(e) => {
                            let Some(rd) = e.row_desc.clone() else {
                                return Plan::No;
                            };
                            p.entry = Some(e);
                            p.proven = true;
                            if let Some(i) = p.parse {
                                self.parse_proven[i] = true;
                            }
                            self.chunks.push(rd);
                        }
                        None => missing = true,
                    }
                }
                Frontend::Execute(x) => {
                    if x.max_rows != 0 {
                        return Plan::No;
                    }
                    let Some(p) = find_portal(&mut self.portals, batch, x.portal) else {
                        return Plan::No;
                    };
                    let entry = match p.entry.take() {
                        Some(e) => Some(e),
                        None => p
                            .key
                            .and_then(|k| usable(cache, db, &self.prefetched, &k, now)),
                    };
                    match entry {
                        Some(e) => {
                            p.proven = true;
                            if let Some(i) = p.parse {
                                self.parse_proven[i] = true;
                            }
                            self.chunks.push(e.rows.clone());
                            self.hit_shapes.push(e.shape);
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
                    self.chunks.push(Bytes::from_static(CLOSE_COMPLETE_BYTES));
                }
                Frontend::Close(_) => self.chunks.push(Bytes::from_static(CLOSE_COMPLETE_BYTES)),
                Frontend::Sync => self.chunks.push(Bytes::from_static(READY_IDLE_BYTES)),
                _ => return Plan::No,
            }
        }
        if last != b'S' {
            return Plan::No;
        }
        if missing {
            self.hit_shapes.clear();
            return Plan::Missing;
        }
        // A Parse or Bind whose success nothing cached proves (a prepare with
        // no execution, a Bind without Execute) may fail on the server: only
        // Postgres may answer it.
        if self.parse_proven.contains(&false) || self.portals.iter().any(|p| !p.proven) {
            self.hit_shapes.clear();
            return Plan::No;
        }
        metrics::hot().l1_hit.increment(executes);
        Plan::Hit
    }

    /// Look the results missing from L1 up in L2 (concurrently); those found go
    /// into L1. True if all were found.
    async fn l2_lookup(&mut self, cache: &Cache, db: &DbState, batch: &Bytes) -> bool {
        let Some(l2) = cache.l2() else { return false };
        let mut wanted = Vec::new();
        for i in 0..self.portals.len() {
            let p = &self.portals[i];
            let (Some(key), None) = (p.key, &p.entry) else {
                continue;
            };
            let (decision, sql_hash) = match &p.sql {
                Some(q) => {
                    let sql = &batch[q.clone()];
                    (cache.decide(sql), text_hash(sql))
                }
                None => {
                    let name = batch[p.statement.clone()].to_vec();
                    let Some((_, d)) = self.statement_decision(cache, &name) else {
                        return false;
                    };
                    let Some(s) = self.statements.get(&name) else {
                        return false;
                    };
                    (d, text_hash(s.sql()))
                }
            };
            let Some(policy) = decision.cacheable().cloned() else {
                return false;
            };
            let resolved = db.resolve(sql_hash, &decision);
            let Ok(resolved) = resolved.as_ref() else {
                return false;
            };
            let Some(snapshot) = db.snapshot(resolved) else {
                return false;
            };
            let Some(k2) = db.l2_key(key, &resolved.slots) else {
                return false;
            };
            wanted.push((key, k2, policy, decision.analysis.fingerprint, snapshot));
        }
        if wanted.is_empty() {
            return false;
        }
        let lookups = futures_util::future::join_all(wanted.iter().map(|w| l2.get(w.1))).await;
        let mut all = true;
        for ((key, _, policy, shape, (epoch, deps)), found) in wanted.into_iter().zip(lookups) {
            match found {
                Lookup::Hit(rd, rows) => {
                    metrics::hot().l2_hit.increment(1);
                    self.from_l2 = true;
                    let e = Arc::new(Entry::new(
                        rd, rows, policy.ttl, policy.swr, shape, epoch, deps,
                    ));
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
    fn commit_hit(&mut self, batch: &Bytes) {
        for m in messages(batch) {
            match decode(batch, m) {
                Some(Frontend::Parse(p)) => {
                    self.statements.define(&p, &batch[m.0..m.1], false);
                }
                Some(Frontend::Close(c)) if c.target == Target::Statement => {
                    self.statements.remove(c.name)
                }
                _ => {}
            }
        }
    }

    /// The decision for a known statement, cached on the statement.
    fn statement_decision(&mut self, cache: &Cache, name: &[u8]) -> Option<(u128, Arc<Decision>)> {
        let s = self.statements.get_mut(name)?;
        if s.decision.is_none() {
            s.decision = Some(cache.decide(s.sql()));
        }
        s.decision.clone().map(|d| (s.hash, d))
    }

    /// Whether every execution in the request may be stored: all cacheable reads
    /// run to completion, and the request ends with Sync (commits on its own).
    fn fillable(&mut self, cache: &Cache, batch: &Bytes) -> bool {
        let mut local: Vec<(Range<usize>, Range<usize>)> = Vec::new();
        let mut portals: Vec<(Range<usize>, bool)> = Vec::new();
        let mut last = 0;
        let mut any = false;
        for m in messages(batch) {
            last = m.2;
            match decode(batch, m) {
                Some(Frontend::Parse(p)) => {
                    local.push((range_of(batch, p.name), range_of(batch, p.query)))
                }
                Some(Frontend::Bind(b)) => {
                    let ok = match local
                        .iter()
                        .rev()
                        .find(|(n, _)| &batch[n.clone()] == b.statement)
                    {
                        Some((_, q)) => cache.decide(&batch[q.clone()]).cacheable().is_some(),
                        None => self
                            .statement_decision(cache, b.statement)
                            .is_some_and(|(_, d)| d.cacheable().is_some()),
                    };
                    portals.push((range_of(batch, b.portal), ok));
                }
                Some(Frontend::Execute(x)) => {
                    let ok = portals
                        .iter()
                        .rev()
                        .find(|(n, _)| &batch[n.clone()] == x.portal)
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
        any && last == b'S'
    }

    /// Queue an extended-protocol request for the server, with the Parse messages
    /// it depends on that the server has not seen, and set up captures.
    fn forward_extended(
        &mut self,
        cache: &Cache,
        db: Option<&DbState>,
        batch: Bytes,
        state_bypass: Option<&'static str>,
        track: &mut Tracker,
        sout: &mut OutQueue,
    ) {
        let first_request = self.current_request;
        let cacheable_state = db.is_some() && self.tainted.is_none();
        let fills_ok = cacheable_state && self.fillable(cache, &batch);
        let replayed = self.replay_parses(&batch);
        for _ in 0..replayed {
            // Their ParseComplete replies come first and are not the client's.
            track.expect(Expect::Parse, true, ReplyTag::None);
        }
        self.portals.clear();
        self.defined.clear();
        for m in messages(&batch) {
            let Some(msg) = decode(&batch, m) else {
                continue;
            };
            track.on_client(&msg);
            let (expect, ends) = track.expectation(&msg);
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
                    if !rejected {
                        self.statements.define(&p, &batch[m.0..m.1], true);
                    }
                }
                Frontend::Bind(b) => {
                    let mut portal = Portal {
                        name: range_of(&batch, b.portal),
                        statement: range_of(&batch, b.statement),
                        sql: None,
                        key: None,
                        entry: None,
                        fill: None,
                        proven: false,
                        parse: None,
                    };
                    if let (true, Some(db)) = (fills_ok, db) {
                        portal.fill = self.start_fill(cache, db, &b);
                    }
                    self.portals.push(portal);
                }
                Frontend::Describe(d) if d.target == Target::Statement && cacheable_state => {
                    if let Some(s) = self.statements.get(d.name) {
                        tag = self.open_describe(describe_key(self.seed.user, s.hash));
                    }
                }
                Frontend::Describe(d) => {
                    if let Some(slot) = self.portal_fill(&batch, d.name) {
                        tag = ReplyTag::Fill(slot);
                    }
                }
                Frontend::Execute(x) => {
                    let portal = self
                        .portals
                        .iter()
                        .rev()
                        .find(|p| batch[p.name.clone()] == *x.portal)
                        .map(|p| (p.statement.clone(), p.fill));
                    if !self.watched {
                        metrics::bypass("no_listener");
                    } else if let Some((stmt, fill)) = portal {
                        if let Some((_, d)) = self.statement_decision(cache, &batch[stmt]) {
                            self.note_effects(&d);
                            if fill.is_none() {
                                let reason = match (&d.verdict, state_bypass.or(self.tainted)) {
                                    (Err(b), _) => Some(b.label()),
                                    (Ok(_), Some(why)) => Some(why),
                                    (Ok(_), None) => (!fills_ok).then_some("mixed_request"),
                                };
                                if let Some(r) = reason {
                                    metrics::bypass(r);
                                }
                            }
                        }
                        if let Some(slot) = fill {
                            tag = ReplyTag::Fill(slot);
                        }
                    }
                }
                Frontend::Close(c) if c.target == Target::Statement => {
                    // Closing an unknown statement is not an error: nothing to replay.
                    self.statements.remove(c.name);
                }
                Frontend::Query(q) if self.watched => {
                    let d = cache.decide(q.sql);
                    self.note_effects(&d);
                }
                Frontend::FunctionCall(_) if self.watched => {
                    // Calls a function by OID, unseen: as for any unvetted call.
                    self.taint("function_call");
                }
                _ => {}
            }
            if let Some(e) = expect {
                if ends && tag == ReplyTag::None {
                    tag = self.effects_tag();
                }
                track.expect(e, false, tag);
                if ends {
                    // What follows in this batch belongs to the next request.
                    self.current_request = track.requests_sent + 1;
                }
                // Only what the server answers moves the batch on: a Flush or a
                // stray CopyData leaves its implicit transaction open.
                track.open_batch = !ends;
            }
        }
        if !self.inject.is_empty() {
            sout.push(self.inject.split().freeze());
        }
        if !track.open_batch {
            let outcome = if self.portals.iter().any(|p| p.fill.is_some()) {
                metrics::Outcome::Miss
            } else {
                metrics::Outcome::Other
            };
            let shape = self
                .portals
                .first()
                .filter(|_| self.watched)
                .map(|p| batch[p.statement.clone()].to_vec())
                .and_then(|name| self.statements.get(&name).and_then(|s| s.decision.clone()))
                .map_or(0, |d| d.analysis.fingerprint);
            self.upstream
                .push_back((first_request, self.started, shape, outcome));
        }
        sout.push(batch);
    }

    /// Claim and open a fill for a bound cacheable statement, if it may be stored.
    fn start_fill(
        &mut self,
        cache: &Cache,
        db: &DbState,
        b: &crate::protocol::frontend::Bind<'_>,
    ) -> Option<u16> {
        let (hash, decision) = self.statement_decision(cache, b.statement)?;
        let policy = decision.verdict.clone().ok()?;
        let sql_hash = text_hash(self.statements.get(b.statement)?.sql());
        let resolved = db.resolve(sql_hash, &decision);
        let resolved = match resolved.as_ref() {
            Ok(r) => r,
            Err(why) => {
                metrics::bypass(why);
                return None;
            }
        };
        let Some(snapshot) = db.snapshot(resolved) else {
            metrics::bypass("not_watched");
            return None;
        };
        if b.param_values().iter().any(|v| is_time_literal(v)) {
            metrics::bypass("time_literal");
            return None;
        }
        let key = extended_key(self.seed.pick(policy.public), hash, b.args);
        let l2key = cache.l2().and(db.l2_key(key, &resolved.slots));
        let lease = match cache.claim(key) {
            Claim::Leader(l) => Some(l),
            Claim::Follower(_) => {
                metrics::hot().coalesced.increment(1);
                None
            }
        };
        metrics::hot().l1_miss.increment(1);
        match self.open_fill(key, l2key, policy, decision, snapshot, false, lease) {
            ReplyTag::Fill(slot) => Some(slot),
            _ => None,
        }
    }

    /// Statements the request uses that the server never saw (pgtier answered
    /// their Parse): their Parse messages go ahead of the request. Returns how
    /// many were queued in `self.inject`.
    fn replay_parses(&mut self, batch: &Bytes) -> usize {
        self.inject.clear();
        self.defined.clear();
        let mut n = 0;
        for m in messages(batch) {
            let name = match decode(batch, m) {
                Some(Frontend::Parse(p)) => {
                    // A named re-Parse must meet the old definition, as Postgres would.
                    let name = p.name;
                    if name.is_empty() {
                        self.defined.push((range_of(batch, name), 0, 0..0));
                        continue;
                    }
                    name
                }
                Some(Frontend::Bind(b)) => b.statement,
                Some(Frontend::Describe(d)) if d.target == Target::Statement => d.name,
                _ => continue,
            };
            if self
                .defined
                .iter()
                .any(|(n, _, _)| batch[n.clone()] == *name)
            {
                continue;
            }
            if let Some(s) = self.statements.get_mut(name) {
                if !s.on_server {
                    self.inject.extend_from_slice(&s.parse);
                    s.on_server = true;
                    n += 1;
                }
            }
            if let Some(Frontend::Parse(p)) = decode(batch, m) {
                self.defined.push((range_of(batch, p.name), 0, 0..0));
            }
        }
        n
    }

    fn portal_fill(&self, batch: &[u8], name: &[u8]) -> Option<u16> {
        self.portals
            .iter()
            .rev()
            .find(|p| &batch[p.name.clone()] == name)
            .and_then(|p| p.fill)
    }

    /// Record the session effects of a forwarded statement: taints at once, the
    /// rest once the request succeeds.
    fn note_effects(&mut self, decision: &Decision) {
        if decision.analysis.may_write {
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
            self.taint("function_call");
        }
        for e in &decision.analysis.effects {
            match e {
                SessionEffect::Taint(why) => self.taint(why),
                other => self.pending_next.push(other.clone()),
            }
        }
    }

    /// Tag for the message that ends a request carrying setting changes.
    fn effects_tag(&mut self) -> ReplyTag {
        if self.pending_next.is_empty() {
            return ReplyTag::None;
        }
        self.pending_effects
            .push_back(std::mem::take(&mut self.pending_next));
        ReplyTag::Effects
    }

    #[allow(clippy::too_many_arguments)]
    fn open_fill(
        &mut self,
        key: Key,
        l2: Option<u128>,
        policy: Policy,
        decision: Arc<Decision>,
        (epoch, deps): (u64, Box<[(u32, u64)]>),
        simple: bool,
        lease: Option<FillLease>,
    ) -> ReplyTag {
        let slot = self.captures.len();
        if slot >= u16::MAX as usize {
            return ReplyTag::None;
        }
        self.captures.push(Capture {
            request: self.current_request,
            kind: CaptureKind::Fill {
                key,
                l2,
                policy,
                decision,
                epoch,
                deps,
                simple,
                _lease: lease,
            },
            row_desc: None,
            buf: BytesMut::new(),
            state: CaptureState::Open,
        });
        ReplyTag::Fill(slot as u16)
    }

    fn open_describe(&mut self, key: Key) -> ReplyTag {
        let slot = self.captures.len();
        if slot >= u16::MAX as usize {
            return ReplyTag::None;
        }
        self.captures.push(Capture {
            request: self.current_request,
            kind: CaptureKind::Describe { key },
            row_desc: None,
            buf: BytesMut::new(),
            state: CaptureState::Open,
        });
        ReplyTag::Describe(slot as u16)
    }

    /// Capture a relayed server message for the capture its request opened.
    pub fn on_reply(&mut self, expect: Expect, tag: ReplyTag, msg_tag: u8, msg: &[u8], max: usize) {
        let slot = match tag {
            ReplyTag::Fill(s) | ReplyTag::Describe(s) => s as usize,
            _ => return,
        };
        let Some(c) = self.captures.get_mut(slot) else {
            return;
        };
        if c.state != CaptureState::Open {
            return;
        }
        match (&c.kind, expect, msg_tag) {
            (CaptureKind::Describe { .. }, _, backend::PARAMETER_DESCRIPTION) => {
                c.buf.extend_from_slice(msg)
            }
            (CaptureKind::Describe { .. }, _, backend::ROW_DESCRIPTION | backend::NO_DATA) => {
                c.buf.extend_from_slice(msg);
                c.state = CaptureState::Complete;
            }
            (
                CaptureKind::Fill { .. },
                Expect::Describe | Expect::Query,
                backend::ROW_DESCRIPTION,
            ) => {
                c.row_desc = Some(Bytes::copy_from_slice(msg));
            }
            (CaptureKind::Fill { .. }, _, backend::DATA_ROW) => {
                if c.buf.len() + msg.len() > max {
                    c.state = CaptureState::Aborted;
                    c.buf = BytesMut::new();
                    metrics::bypass("too_large");
                } else {
                    c.buf.extend_from_slice(msg);
                }
            }
            (
                CaptureKind::Fill { .. },
                Expect::Execute | Expect::Query,
                backend::COMMAND_COMPLETE,
            ) => {
                c.buf.extend_from_slice(msg);
                c.state = CaptureState::Complete;
            }
            // NoData, EmptyQuery, PortalSuspended, COPY: nothing cacheable.
            (CaptureKind::Fill { .. }, _, _) => c.state = CaptureState::Aborted,
            _ => {}
        }
    }

    /// A message streamed through without buffering cannot be captured.
    pub fn abort(&mut self, tag: ReplyTag) {
        if let ReplyTag::Fill(s) | ReplyTag::Describe(s) = tag {
            if let Some(c) = self.captures.get_mut(s as usize) {
                c.state = CaptureState::Aborted;
                c.buf = BytesMut::new();
            }
        }
    }

    /// An error in request `request`: nothing it produced is stored.
    pub fn on_error(&mut self, request: u64) {
        for c in &mut self.captures {
            if c.request == request {
                c.state = CaptureState::Aborted;
            }
        }
    }

    /// A request ended (ReadyForQuery): store what it captured if it committed,
    /// and apply its setting changes if it succeeded.
    pub fn on_ready(
        &mut self,
        cache: &Cache,
        tag: ReplyTag,
        status: TxStatus,
        error: bool,
        request: u64,
    ) -> bool {
        let committed = status == TxStatus::Idle && !error;
        while let Some(&(req, started, shape, outcome)) = self.upstream.front() {
            if req > request {
                break;
            }
            self.upstream.pop_front();
            let took = started.elapsed();
            metrics::hot().latency_upstream.record(took);
            metrics::shape(shape, outcome, took);
        }
        let mut i = 0;
        while i < self.captures.len() {
            if self.captures[i].request > request {
                i += 1;
                continue;
            }
            let c = self.captures.swap_remove(i);
            let stored = committed && c.request == request && c.state == CaptureState::Complete;
            match c.kind {
                CaptureKind::Fill {
                    key,
                    l2,
                    policy,
                    decision,
                    epoch,
                    deps,
                    simple,
                    ..
                } => {
                    if stored && (!simple || c.row_desc.is_some()) {
                        if let (Some(tier), Some(k2)) = (cache.l2(), l2) {
                            tier.put(k2, c.row_desc.as_deref(), &c.buf, policy.ttl + policy.swr);
                        }
                        cache.insert(
                            key,
                            Entry::new(
                                c.row_desc,
                                Bytes::copy_from_slice(&c.buf),
                                policy.ttl,
                                policy.swr,
                                decision.analysis.fingerprint,
                                epoch,
                                deps,
                            ),
                        );
                        metrics::hot().fills.increment(1);
                    } else {
                        metrics::hot().fills_aborted.increment(1);
                    }
                }
                CaptureKind::Describe { key } => {
                    if stored {
                        cache.store_describe(key, Bytes::copy_from_slice(&c.buf));
                    }
                }
            }
        }
        if tag == ReplyTag::Effects {
            if let Some(effects) = self.pending_effects.pop_front() {
                if error || status != TxStatus::Idle {
                    // Part may have applied, or may yet roll back: pgtier can no
                    // longer be sure of the session's settings.
                    self.taint("setting_changed_in_transaction");
                } else {
                    self.apply(effects);
                }
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

    pub fn db(&self) -> Option<&Arc<DbState>> {
        self.db.as_ref()
    }

    fn apply(&mut self, effects: Vec<SessionEffect>) {
        for e in effects {
            match e {
                SessionEffect::Set { name, value } => {
                    self.settings.insert(name, value);
                }
                SessionEffect::Reset { name } => {
                    self.settings.remove(&name);
                }
                SessionEffect::ResetAll => self.settings.clear(),
                SessionEffect::DiscardAll => {
                    self.settings.clear();
                    self.statements.clear();
                }
                SessionEffect::Deallocate(Some(name)) => self.statements.remove(name.as_bytes()),
                SessionEffect::Deallocate(None) => self.statements.clear(),
                SessionEffect::Taint(why) => self.taint(why),
            }
        }
        self.settings_changed = true;
    }
}

#[cfg(test)]
mod dispatch_tests;
