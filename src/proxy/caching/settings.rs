//! The session's settings as far as they shape query output, so the cache key
//! can follow them: the startup packet, the server's defaults for the role and
//! database, and the SET/RESET/DISCARD changes of forwarded requests (applied
//! only once the request that made them has succeeded outside a transaction).

use std::collections::{BTreeMap, VecDeque};

use crate::bypass::BypassReason;
use crate::cache::key::session_seed;
use crate::cache::Seed;
use crate::proxy::statements::Statements;
use crate::sql::SessionEffect;

/// Client encodings in which a multi-byte character may contain the bytes of a
/// quote or a backslash, so the server splits a statement where pgtier's
/// (UTF-8) parser does not.
const SPLITTING_ENCODINGS: [&str; 6] = ["SJIS", "SHIFT_JIS_2004", "BIG5", "GBK", "UHC", "GB18030"];

/// Why pgtier's parser may read this session's statements differently from the
/// server (it parses as with `standard_conforming_strings = on` in UTF-8).
pub fn parser_mismatch(server_params: &[(String, String)]) -> Option<BypassReason> {
    for (k, v) in server_params {
        if k.eq_ignore_ascii_case("standard_conforming_strings") && !v.eq_ignore_ascii_case("on") {
            return Some(BypassReason::StandardConformingStrings);
        }
        if k.eq_ignore_ascii_case("client_encoding")
            && SPLITTING_ENCODINGS
                .iter()
                .any(|e| e.eq_ignore_ascii_case(v))
        {
            return Some(BypassReason::ClientEncoding);
        }
    }
    None
}

pub struct Settings {
    database: String,
    user: String,
    startup: Vec<(String, String)>,
    /// Digest of the settings the session started with beyond its startup
    /// packet (role and database defaults, server configuration).
    defaults: Option<String>,
    /// Settings changed with SET during the session (those the server does not
    /// report back in ParameterStatus).
    set: BTreeMap<String, String>,
    /// Changes of forwarded requests, one list per request, applied when each
    /// one succeeds.
    pending: VecDeque<Vec<SessionEffect>>,
    /// Changes gathered while forwarding the current request.
    next: Vec<SessionEffect>,
    /// Changed since the seed was last computed.
    changed: bool,
}

impl Settings {
    pub fn new(database: &str, user: &str, startup: &[(String, String)]) -> Settings {
        Settings {
            database: database.to_string(),
            user: user.to_string(),
            startup: startup.to_vec(),
            defaults: None,
            set: BTreeMap::new(),
            pending: VecDeque::new(),
            next: Vec::new(),
            changed: false,
        }
    }

    /// The key seed from everything that shapes output, oldest source first
    /// (defaults, startup, the server's reports, then SET): the newest value of
    /// each setting is the one in force.
    pub fn seed(&self, server_params: &[(String, String)]) -> Seed {
        let defaults = self.defaults.as_deref().map(|d| ("pgtier.defaults", d));
        let params = defaults
            .into_iter()
            .chain(
                self.startup
                    .iter()
                    .chain(server_params.iter())
                    .map(|(k, v)| (k.as_str(), v.as_str())),
            )
            .chain(self.set.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        session_seed(&self.database, &self.user, params)
    }

    pub fn set_defaults(&mut self, defaults: Option<String>) {
        self.defaults = defaults;
    }

    /// Whether the session's search_path may name `pg_temp` (so an
    /// unqualified CREATE may make a temporary object): as it started, or as
    /// set since (in this request or an earlier one).
    pub fn path_may_name_pg_temp(&self) -> bool {
        let names = |v: &str| v.to_ascii_lowercase().contains("pg_temp");
        let set_here = self.next.iter().any(|e| {
            matches!(e, SessionEffect::Set { name, value } if name == "search_path" && names(value))
        });
        set_here
            || self.set.get("search_path").is_some_and(|v| names(v))
            || self
                .startup
                .iter()
                .any(|(k, v)| (k == "search_path" || k == "options") && names(v))
            || self
                .defaults
                .as_deref()
                .is_some_and(crate::proxy::defaults::path_names_pg_temp)
    }

    /// Whether settings changed since the last call (the seed must follow).
    pub fn take_changed(&mut self) -> bool {
        std::mem::take(&mut self.changed)
    }

    /// A change made by the request being forwarded.
    pub fn note(&mut self, effect: SessionEffect) {
        self.next.push(effect);
    }

    /// The request being forwarded is complete: whether it carries changes
    /// (applied by [`Settings::request_ended`] when its reply ends).
    pub fn close_request(&mut self) -> bool {
        if self.next.is_empty() {
            return false;
        }
        self.pending.push_back(std::mem::take(&mut self.next));
        true
    }

    /// The oldest request carrying changes ended; `clean`: it succeeded outside
    /// a transaction. Otherwise part may have applied, or may yet roll back:
    /// the session's settings are no longer known.
    pub fn request_ended(
        &mut self,
        clean: bool,
        statements: &mut Statements,
    ) -> Result<(), BypassReason> {
        let Some(effects) = self.pending.pop_front() else {
            return Ok(());
        };
        if !clean {
            return Err(BypassReason::SettingChangedInTransaction);
        }
        let mut taint = Ok(());
        for e in effects {
            match e {
                SessionEffect::Set { name, value } => {
                    self.set.insert(name, value);
                }
                SessionEffect::Reset { name } => {
                    self.set.remove(&name);
                }
                SessionEffect::ResetAll => self.set.clear(),
                SessionEffect::DiscardAll => {
                    self.set.clear();
                    statements.clear();
                }
                SessionEffect::Deallocate(Some(name)) => statements.remove(name.as_bytes()),
                SessionEffect::Deallocate(None) => statements.clear(),
                SessionEffect::Taint(why) => taint = Err(why),
                SessionEffect::CreatesUnqualified => {}
            }
        }
        self.changed = true;
        taint
    }
}
