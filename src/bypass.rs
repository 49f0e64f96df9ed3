//! Why a request was not looked up in the cache: one enum for every layer that
//! can refuse (the statement, the rules, the catalog, the session), whose label
//! is the `reason` of `pgtier_cache_lookups_total{outcome="bypass"}`.
//!
//! A leaf module: the SQL analysis, the catalog and the session all name their
//! reasons here, and the metrics count them by index without a lookup.

macro_rules! reasons {
    ($($(#[$doc:meta])* $name:ident => $label:literal,)*) => {
        /// A reason not to use the cache for a request (or ever again, for a
        /// session taint).
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum BypassReason {
            $($(#[$doc])* $name,)*
        }

        impl BypassReason {
            /// Every reason, in declaration order (`as usize` indexes it).
            pub const ALL: &'static [BypassReason] = &[$(BypassReason::$name,)*];

            /// The metric label.
            pub fn label(self) -> &'static str {
                match self {
                    $(BypassReason::$name => $label,)*
                }
            }
        }
    };
}

reasons! {
    // The statement itself (SQL analysis).
    ParseError => "parse_error",
    NotSelect => "not_select",
    MultiStatement => "multi_statement",
    /// Calls something whose result can change between identical calls.
    Volatile => "volatile",
    /// Calls a function pgtier cannot vouch for.
    UnknownFunction => "unknown_function",
    Locking => "locking",
    SelectInto => "select_into",
    DataModifying => "data_modifying",
    TableSample => "tablesample",
    SystemCatalog => "system_catalog",
    TempTable => "temp_table",
    /// 'now', 'today', ... evaluated when the query runs (in the text, or as a
    /// Bind parameter).
    TimeLiteral => "time_literal",
    TimeCast => "time_cast",
    CatalogLookup => "catalog_lookup",

    // The operator's rules.
    /// A `cache = false` rule matched.
    Rule => "rule",
    /// Allowlist mode and no rule lists the statement.
    NotListed => "not_listed",
    /// TTL zero.
    Disabled => "disabled",

    // The catalog of the session's database.
    /// A `public` rule over a statement whose names depend on the search_path.
    PublicUnqualified => "public_unqualified",
    VolatileFunction => "volatile_function",
    VolatileOperator => "volatile_operator",
    VolatileCast => "volatile_cast",
    UnknownTable => "unknown_table",
    NotATable => "not_a_table",
    ForeignTable => "foreign_table",
    MaterializedView => "materialized_view",
    UnsafeView => "unsafe_view",
    ViewTooDeep => "view_too_deep",
    RowSecurity => "row_security",
    /// A `public` rule while some role has settings of its own.
    PublicRoleSettings => "public_role_settings",
    /// A table has no notify trigger (and cannot get one).
    NoTrigger => "no_trigger",
    /// A table is not watched yet (the watch is being set up).
    NotWatched => "not_watched",
    /// The key column sets a read by key was planned with changed before its
    /// generations were taken (rare: a registration or an epoch in between).
    KeysChanged => "keys_changed",
    /// A table it reads has a commit the logical stream delivered that the
    /// server may not show other sessions yet (see `invalidation::settle`).
    CommitNotVisible => "commit_not_visible",

    // The session's state for this request.
    NoListener => "no_listener",
    ListenerDown => "listener_down",
    FencePending => "fence_pending",
    Untracked => "untracked",
    InTransaction => "in_transaction",
    Copy => "copy",
    Pipelined => "pipelined",
    /// Cacheable executions mixed with others in one request.
    MixedRequest => "mixed_request",
    /// The result outgrew `max_entry_bytes` while it was captured.
    TooLarge => "too_large",

    // Session taints: nothing is served from cache for the rest of the session.
    /// A call of a function that is not known IMMUTABLE, or a FunctionCall message.
    FunctionCall => "function_call",
    /// The session's starting settings could not be learnt.
    SettingsUnknown => "settings_unknown",
    SettingChangedInTransaction => "setting_changed_in_transaction",
    FenceTimeout => "fence_timeout",
    /// The query that asks for the WAL position of a fence (logical source)
    /// did not answer with one.
    FenceFailed => "fence_failed",
    StandardConformingStrings => "standard_conforming_strings",
    ClientEncoding => "client_encoding",
    TemporaryObjects => "temporary_objects",
    RoleChange => "role_change",
    SetConfig => "set_config",
    ProcedureCall => "procedure_call",
    DoBlock => "do_block",
    SetFromCurrent => "set_from_current",
}

impl std::fmt::Display for BypassReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.label())
    }
}

#[cfg(test)]
mod tests {
    use super::BypassReason;

    #[test]
    fn labels_are_distinct_and_indexes_follow_declaration() {
        let mut labels: Vec<_> = BypassReason::ALL.iter().map(|r| r.label()).collect();
        for (i, r) in BypassReason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i);
        }
        labels.sort_unstable();
        let n = labels.len();
        labels.dedup();
        assert_eq!(labels.len(), n, "duplicate label");
    }
}
