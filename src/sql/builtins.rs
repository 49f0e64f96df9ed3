//! Which built-in functions a cached statement may call by name: the allow-list
//! (pg_catalog functions whose result depends only on their arguments and the
//! session settings that are part of the cache key) and the names that are
//! refused outright.

use std::collections::HashSet;
use std::sync::OnceLock;

use super::clock::TIME_INPUTS;

pub(crate) fn builtins() -> &'static HashSet<&'static str> {
    static SET: OnceLock<HashSet<&'static str>> = OnceLock::new();
    SET.get_or_init(|| {
        include_str!("builtin_functions.txt")
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .collect()
    })
}

/// Whether a (possibly pg_catalog-qualified) function is a known safe built-in.
pub fn is_safe_builtin(name: &str) -> bool {
    let bare = name.strip_prefix("pg_catalog.").unwrap_or(name);
    !bare.contains('.') && builtins().contains(bare) && !TIME_INPUTS.contains(&bare)
}

/// Built-in names that exist in pg_catalog but are deliberately not allowed.
pub(crate) fn builtin_volatile(name: &str) -> bool {
    static SET: OnceLock<HashSet<&'static str>> = OnceLock::new();
    SET.get_or_init(|| {
        [
            "now",
            "random",
            "random_normal",
            "nextval",
            "currval",
            "lastval",
            "setval",
            "clock_timestamp",
            "statement_timestamp",
            "transaction_timestamp",
            "timeofday",
            "age",
            "current_setting",
            "set_config",
            "current_schema",
            "current_schemas",
            "current_database",
            "current_user",
            "session_user",
            "current_query",
            "gen_random_uuid",
            "uuid_generate_v4",
            "pg_sleep",
            "txid_current",
            "version",
            "getpgusername",
            "mxid_age",
            "enum_range",
            "enum_first",
            "enum_last",
            "format_type",
            "oidvectortypes",
            "obj_description",
            "col_description",
            "shobj_description",
        ]
        .into_iter()
        .collect()
    })
    .contains(name)
        || TIME_INPUTS.contains(&name)
        || name.starts_with("pg_")
        || name.starts_with("has_")
        || name.starts_with("to_reg")
        || name.starts_with("txid_")
        || name.starts_with("inet_")
}

/// Types whose input function finds a catalog object by name (and whose output
/// prints one by oid): a cast to them reads the catalog.
pub(crate) fn catalog_lookup_type(name: &str) -> bool {
    matches!(
        name,
        "regclass"
            | "regcollation"
            | "regconfig"
            | "regdictionary"
            | "regnamespace"
            | "regoper"
            | "regoperator"
            | "regproc"
            | "regprocedure"
            | "regrole"
            | "regtype"
    )
}
