//! What a statement does, decided once per statement text with the real Postgres
//! grammar (libpg_query): whether it is a read pgtier may cache, which tables it
//! reads or writes, and how it changes session state that the cache key covers.
//!
//! The parse tree is walked in full (through its serde form) rather than with a
//! hand-picked traversal, so a volatile call hidden in LIMIT, VALUES or a
//! sub-select cannot slip past.

use std::collections::HashSet;
use std::sync::OnceLock;

use serde_json::Value;

/// A table named in a statement, as written (schema optional).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TableRef {
    pub schema: Option<String>,
    pub name: String,
}

impl std::fmt::Display for TableRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.schema {
            Some(s) => write!(f, "{s}.{}", self.name),
            None => f.write_str(&self.name),
        }
    }
}

/// Why a statement is not cached. Also the `reason` label of bypass metrics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NotCacheable {
    ParseError,
    NotASelect,
    MultiStatement,
    /// Calls something whose result can change between identical calls.
    Volatile(String),
    /// A function pgtier cannot vouch for (not a known built-in).
    UnknownFunction(String),
    Locking,
    SelectInto,
    DataModifying,
    TableSample,
    SystemCatalog,
    TempTable,
    /// 'now', 'today', ... literals are evaluated when the query runs.
    TimeLiteral,
    /// A value cast to a date/time type at run time (`('to'||'day')::date`, a
    /// column holding 'now'): the cast reads the clock when it meets such a word.
    TimeCast,
    /// A cast to a reg* type looks names up in the catalog, which pgtier does
    /// not version.
    CatalogLookup,
}

impl NotCacheable {
    pub fn label(&self) -> &'static str {
        match self {
            NotCacheable::ParseError => "parse_error",
            NotCacheable::NotASelect => "not_select",
            NotCacheable::MultiStatement => "multi_statement",
            NotCacheable::Volatile(_) => "volatile",
            NotCacheable::UnknownFunction(_) => "unknown_function",
            NotCacheable::Locking => "locking",
            NotCacheable::SelectInto => "select_into",
            NotCacheable::DataModifying => "data_modifying",
            NotCacheable::TableSample => "tablesample",
            NotCacheable::SystemCatalog => "system_catalog",
            NotCacheable::TempTable => "temp_table",
            NotCacheable::TimeLiteral => "time_literal",
            NotCacheable::TimeCast => "time_cast",
            NotCacheable::CatalogLookup => "catalog_lookup",
        }
    }
}

/// A cacheable read: what invalidation and the rules need to know.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Read {
    /// Every relation named, CTE references included: a CTE may share its name
    /// with a table that its own body (or another scope) reads, so which one a
    /// reference means is left to the catalog (`ctes` says which names may be
    /// CTEs).
    pub tables: Vec<TableRef>,
    pub ctes: Vec<String>,
    /// Functions that are not built-ins; the catalog must show them immutable.
    pub user_functions: Vec<String>,
}

/// A change to session state that the cache key must follow.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SessionEffect {
    /// `SET name = value` (session level); value is a canonical rendering.
    Set {
        name: String,
        value: String,
    },
    /// `RESET name` / `SET name TO DEFAULT`.
    Reset {
        name: String,
    },
    ResetAll,
    /// DISCARD ALL: settings reset and every prepared statement dropped.
    DiscardAll,
    /// DEALLOCATE name, or DEALLOCATE ALL (None).
    Deallocate(Option<String>),
    /// Something pgtier cannot model (SET ROLE, set_config(), temp tables): the
    /// session is never served from cache again.
    Taint(&'static str),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Analysis {
    /// The cacheability verdict from the statement alone (catalog checks come later).
    pub read: Result<Read, NotCacheable>,
    pub effects: Vec<SessionEffect>,
    /// Tables the statement writes or alters (DML targets, TRUNCATE, DDL).
    pub writes: Vec<TableRef>,
    /// Whether it may write at all (anything but plain reads and session commands).
    pub may_write: bool,
    /// Functions it calls that are neither known-safe built-ins nor built-ins
    /// known to be volatile: user functions, which may write, change settings
    /// or create temporary objects unless the catalog says they are IMMUTABLE.
    pub user_calls: Vec<String>,
    /// pg_query fingerprint: the statement's shape with constants removed.
    pub fingerprint: u64,
}

fn builtins() -> &'static HashSet<&'static str> {
    static SET: OnceLock<HashSet<&'static str>> = OnceLock::new();
    SET.get_or_init(|| {
        include_str!("builtin_functions.txt")
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .collect()
    })
}

/// Input functions of the date/time types: called on a run-time text they read
/// the clock for 'now', 'today', ... so they are never safe.
const TIME_INPUTS: [&str; 5] = [
    "date_in",
    "timestamp_in",
    "timestamptz_in",
    "time_in",
    "timetz_in",
];

/// Date/time types whose input accepts the special words; a cast of a run-time
/// value to one of them (or the function-style `date(x)`) may read the clock.
const TIME_TYPES: [&str; 5] = ["date", "timestamp", "timestamptz", "time", "timetz"];

/// Object identifier types: their input looks a name up in the catalog.
const REG_TYPES: [&str; 11] = [
    "regclass",
    "regcollation",
    "regconfig",
    "regdictionary",
    "regnamespace",
    "regoper",
    "regoperator",
    "regproc",
    "regprocedure",
    "regrole",
    "regtype",
];

/// Whether a (possibly pg_catalog-qualified) function is a known safe built-in.
pub fn is_safe_builtin(name: &str) -> bool {
    let bare = name.strip_prefix("pg_catalog.").unwrap_or(name);
    !bare.contains('.') && builtins().contains(bare) && !TIME_INPUTS.contains(&bare)
}

const TIME_WORDS: [&str; 4] = ["now", "today", "tomorrow", "yesterday"];

/// Whether a value contains one of the special date/time inputs that are
/// evaluated when the query runs ('now', 'today 10:00', 'tomorrow', ...), as a
/// word of its own. Errs on the side of "yes": a text that merely mentions
/// "today" is not cached either.
pub fn is_time_literal(v: &[u8]) -> bool {
    v.split(|b| !b.is_ascii_alphabetic()).any(|word| {
        TIME_WORDS
            .iter()
            .any(|w| word.eq_ignore_ascii_case(w.as_bytes()))
    })
}

fn is_system_schema(s: &str) -> bool {
    s == "pg_catalog" || s == "information_schema" || s.starts_with("pg_toast")
}

/// Analyse one statement string (possibly several statements).
pub fn analyze(sql: &str) -> Analysis {
    let fingerprint = pg_query::fingerprint(sql, 0, 0)
        .map(|f| f.value)
        .unwrap_or(0);
    let parsed = match pg_query::parse(sql, 0) {
        Ok(p) => p,
        Err(_) => {
            return Analysis {
                read: Err(NotCacheable::ParseError),
                effects: Vec::new(),
                writes: Vec::new(),
                may_write: true,
                user_calls: Vec::new(),
                fingerprint,
            }
        }
    };
    let mut out = Analysis {
        read: Err(NotCacheable::NotASelect),
        effects: Vec::new(),
        writes: Vec::new(),
        may_write: false,
        user_calls: Vec::new(),
        fingerprint,
    };
    let stmts = &parsed.protobuf.stmts;
    for raw in stmts {
        let Some(stmt) = raw.stmt.as_ref() else {
            continue;
        };
        let tree = serde_json::to_value(stmt).unwrap_or(Value::Null);
        let top = tree
            .get("node")
            .and_then(|n| n.as_object())
            .and_then(|o| o.keys().next().cloned())
            .unwrap_or_default();
        let facts = Facts::collect(&tree);
        out.effects.extend(session_effects(&top, &tree, &facts));
        out.writes.extend(facts.written.iter().cloned());
        out.user_calls.extend(facts.user_calls());
        if !matches!(
            top.as_str(),
            "SelectStmt" | "VariableSetStmt" | "VariableShowStmt"
        ) || facts.modifying
            || facts.into
        {
            out.may_write = true;
        }
        if stmts.len() == 1 {
            out.read = if top == "SelectStmt" {
                facts.verdict()
            } else {
                Err(NotCacheable::NotASelect)
            };
        }
    }
    if stmts.len() > 1 {
        out.read = Err(NotCacheable::MultiStatement);
    }
    // A user function may write, whatever else makes the statement
    // uncacheable (`SELECT now(), write_fn()`): the write must be fenced.
    if !out.user_calls.is_empty() {
        out.may_write = true;
    }
    out.user_calls.sort();
    out.user_calls.dedup();
    out.writes.sort();
    out.writes.dedup();
    out
}

/// Everything the walk finds in one statement's tree.
#[derive(Default, Debug)]
struct Facts {
    tables: Vec<TableRef>,
    ctes: HashSet<String>,
    functions: Vec<String>,
    sql_value_functions: bool,
    locking: bool,
    into: bool,
    temp_into: bool,
    modifying: bool,
    tablesample: bool,
    time_literal: bool,
    set_config: bool,
    written: Vec<TableRef>,
    /// A cast or function-style cast of a run-time value to a date/time type.
    time_cast: bool,
    /// A cast to a reg* type (catalog lookup by name).
    reg_cast: bool,
    /// A name in `pg_temp` (a session-private object, with or without TEMP).
    pg_temp_name: bool,
}

fn str_of(v: &Value, key: &str) -> String {
    v.get(key)
        .and_then(|s| s.as_str())
        .unwrap_or("")
        .to_string()
}

fn range_var(v: &Value) -> TableRef {
    let schema = str_of(v, "schemaname");
    TableRef {
        schema: (!schema.is_empty()).then_some(schema),
        name: str_of(v, "relname"),
    }
}

/// Names in a `[{ "node": { "String": { "sval": .. } } }, ..]` list, dot-joined.
fn qualified_name(list: Option<&Value>) -> String {
    let mut parts = Vec::new();
    for item in list.and_then(|l| l.as_array()).into_iter().flatten() {
        if let Some(s) = item.pointer("/node/String/sval").and_then(|s| s.as_str()) {
            parts.push(s.to_string());
        }
    }
    parts.join(".")
}

impl Facts {
    fn collect(tree: &Value) -> Facts {
        let mut f = Facts::default();
        let mut stack = vec![tree];
        while let Some(v) = stack.pop() {
            match v {
                Value::Object(map) => {
                    // A RangeVar appears wrapped as a node ("RangeVar": {..}) in
                    // lists, but bare in typed fields (e.g. CreateStmt.relation).
                    if map.contains_key("relname") && map.contains_key("relpersistence") {
                        f.range_var(v);
                    }
                    for (k, child) in map {
                        f.visit(k, child);
                        stack.push(child);
                    }
                }
                Value::Array(items) => stack.extend(items.iter()),
                _ => {}
            }
        }
        f
    }

    fn range_var(&mut self, v: &Value) {
        if str_of(v, "relpersistence") == "t" {
            self.temp_into = true;
        }
        if str_of(v, "schemaname").starts_with("pg_temp") {
            self.pg_temp_name = true;
        }
        self.tables.push(range_var(v));
    }

    fn visit(&mut self, key: &str, v: &Value) {
        match key {
            "CommonTableExpr" => {
                self.ctes.insert(str_of(v, "ctename"));
            }
            "FuncCall" => {
                let name = qualified_name(v.get("funcname"));
                if name == "set_config" || name == "pg_catalog.set_config" {
                    self.set_config = true;
                }
                if name.starts_with("pg_temp") {
                    self.pg_temp_name = true;
                }
                let bare = name.strip_prefix("pg_catalog.").unwrap_or(&name);
                if TIME_TYPES.contains(&bare)
                    && v.get("args")
                        .and_then(|a| a.as_array())
                        .is_some_and(|args| args.iter().any(|a| !fixed_value(a)))
                {
                    self.time_cast = true;
                }
                self.functions.push(name);
            }
            "TypeCast" => {
                let ty = qualified_name(v.pointer("/type_name/names"));
                let bare = ty.strip_prefix("pg_catalog.").unwrap_or(&ty);
                if REG_TYPES.contains(&bare) {
                    self.reg_cast = true;
                }
                if TIME_TYPES.contains(&bare) && !v.get("arg").is_some_and(fixed_value) {
                    self.time_cast = true;
                }
            }
            // CREATE FUNCTION/TYPE/... pg_temp.x: a session-private object.
            "funcname" | "defnames" | "domainname" | "type_name"
                if qualified_name(Some(v)).starts_with("pg_temp") =>
            {
                self.pg_temp_name = true;
            }
            "SQLValueFunction" | "SqlvalueFunction" => self.sql_value_functions = true,
            "locking_clause" if v.as_array().is_some_and(|a| !a.is_empty()) => self.locking = true,
            "into_clause" if !v.is_null() => self.into = true,
            "RangeTableSample" => self.tablesample = true,
            "A_Const" | "AConst" => {
                if let Some(s) = v.pointer("/val/Sval/sval").and_then(|s| s.as_str()) {
                    if is_time_literal(s.as_bytes()) {
                        self.time_literal = true;
                    }
                }
            }
            "InsertStmt" | "UpdateStmt" | "DeleteStmt" | "MergeStmt" => {
                self.modifying = true;
                if let Some(rel) = v.get("relation") {
                    self.written.push(range_var(rel));
                }
            }
            "TruncateStmt" => {
                self.modifying = true;
                for r in v
                    .get("relations")
                    .and_then(|r| r.as_array())
                    .into_iter()
                    .flatten()
                {
                    if let Some(rv) = r.pointer("/node/RangeVar") {
                        self.written.push(range_var(rv));
                    }
                }
            }
            "AlterTableStmt" | "RenameStmt" | "RuleStmt" | "CreateTrigStmt" | "IndexStmt"
            | "CreatePolicyStmt" | "AlterPolicyStmt" => {
                for k in ["relation", "table"] {
                    if let Some(rel) = v.get(k).filter(|r| !r.is_null()) {
                        self.written.push(range_var(rel));
                    }
                }
            }
            "DropStmt" => {
                for o in v
                    .get("objects")
                    .and_then(|o| o.as_array())
                    .into_iter()
                    .flatten()
                {
                    let name = qualified_name(o.pointer("/node/List/items"));
                    if !name.is_empty() {
                        let (schema, name) = match name.rsplit_once('.') {
                            Some((s, n)) => (Some(s.to_string()), n.to_string()),
                            None => (None, name),
                        };
                        self.written.push(TableRef { schema, name });
                    }
                }
            }
            _ => {}
        }
    }

    fn verdict(&self) -> Result<Read, NotCacheable> {
        if self.modifying {
            return Err(NotCacheable::DataModifying);
        }
        if self.into {
            return Err(NotCacheable::SelectInto);
        }
        if self.locking {
            return Err(NotCacheable::Locking);
        }
        if self.tablesample {
            return Err(NotCacheable::TableSample);
        }
        if self.time_literal {
            return Err(NotCacheable::TimeLiteral);
        }
        if self.time_cast {
            return Err(NotCacheable::TimeCast);
        }
        if self.reg_cast {
            return Err(NotCacheable::CatalogLookup);
        }
        if self.sql_value_functions {
            return Err(NotCacheable::Volatile("CURRENT_* / USER".into()));
        }
        let mut user_functions = Vec::new();
        for f in &self.functions {
            if is_safe_builtin(f) {
                continue;
            }
            let bare = f.strip_prefix("pg_catalog.").unwrap_or(f);
            if f.starts_with("pg_catalog.") || builtin_volatile(bare) {
                return Err(NotCacheable::Volatile(bare.to_string()));
            }
            user_functions.push(f.clone());
        }
        for t in &self.tables {
            let system = match &t.schema {
                Some(s) => is_system_schema(s),
                None => t.name.starts_with("pg_"),
            };
            if system {
                return Err(NotCacheable::SystemCatalog);
            }
            if t.schema
                .as_deref()
                .is_some_and(|s| s.starts_with("pg_temp"))
            {
                return Err(NotCacheable::TempTable);
            }
        }
        let mut tables = self.tables.clone();
        tables.sort();
        tables.dedup();
        let mut ctes: Vec<String> = self.ctes.iter().cloned().collect();
        ctes.sort();
        Ok(Read {
            tables,
            ctes,
            user_functions,
        })
    }
}

impl Facts {
    /// Called functions that are neither safe built-ins nor known volatile
    /// built-ins (those change no session state, set_config aside, which is
    /// found on its own).
    fn user_calls(&self) -> impl Iterator<Item = String> + '_ {
        self.functions.iter().filter_map(|f| {
            if is_safe_builtin(f) {
                return None;
            }
            let bare = f.strip_prefix("pg_catalog.").unwrap_or(f);
            (!f.starts_with("pg_catalog.") && !builtin_volatile(bare)).then(|| f.clone())
        })
    }
}

/// Whether an expression is a literal or a Bind parameter, possibly cast: its
/// value is fixed by the request text, where time words are looked for.
fn fixed_value(v: &Value) -> bool {
    let node = v.get("node").unwrap_or(v);
    if node.get("AConst").is_some() || node.get("A_Const").is_some() {
        return true;
    }
    if node.get("ParamRef").is_some() {
        return true;
    }
    node.get("TypeCast")
        .and_then(|c| c.get("arg"))
        .is_some_and(fixed_value)
}

/// Built-in names that exist in pg_catalog but are deliberately not allowed.
fn builtin_volatile(name: &str) -> bool {
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

/// A value's rendering without source positions, so equal settings compare equal.
fn canonical(v: &Value) -> String {
    fn strip(v: &mut Value) {
        match v {
            Value::Object(m) => {
                m.remove("location");
                m.values_mut().for_each(strip);
            }
            Value::Array(a) => a.iter_mut().for_each(strip),
            _ => {}
        }
    }
    let mut v = v.clone();
    strip(&mut v);
    v.to_string()
}

fn session_effects(top: &str, tree: &Value, facts: &Facts) -> Vec<SessionEffect> {
    let mut out = Vec::new();
    if facts.set_config {
        out.push(SessionEffect::Taint("set_config"));
    }
    if facts.temp_into || (facts.pg_temp_name && top != "SelectStmt") {
        out.push(SessionEffect::Taint("temporary_objects"));
    }
    match top {
        // Arbitrary code in the session: it may SET, set_config(), create
        // temporary objects or change what names resolve to, unseen.
        "DoStmt" => out.push(SessionEffect::Taint("do_block")),
        "CallStmt" => out.push(SessionEffect::Taint("procedure_call")),
        _ => {}
    }
    let node = tree
        .pointer(&format!("/node/{top}"))
        .unwrap_or(&Value::Null);
    match top {
        "VariableSetStmt" => {
            if node.get("is_local").and_then(|b| b.as_bool()) == Some(true) {
                return out;
            }
            let name = str_of(node, "name").to_ascii_lowercase();
            let kind = node.get("kind").and_then(|k| k.as_i64()).unwrap_or(0);
            // VariableSetKind: 1 value, 2 default, 3 current, 4 multi, 5 reset, 6 reset all
            match (name.as_str(), kind) {
                ("role" | "session_authorization", _) => {
                    out.push(SessionEffect::Taint("role_change"))
                }
                (_, 1) => out.push(SessionEffect::Set {
                    value: node.get("args").map(canonical).unwrap_or_default(),
                    name,
                }),
                (_, 2) | (_, 5) => out.push(SessionEffect::Reset { name }),
                (_, 3) => out.push(SessionEffect::Taint("set_from_current")),
                (_, 6) => out.push(SessionEffect::ResetAll),
                _ => {}
            }
        }
        // DiscardMode: 1 ALL, 2 PLANS, 3 SEQUENCES, 4 TEMP
        "DiscardStmt" if node.get("target").and_then(|t| t.as_i64()) == Some(1) => {
            out.push(SessionEffect::DiscardAll)
        }
        "DeallocateStmt" => {
            let name = str_of(node, "name");
            let all = node.get("isall").and_then(|b| b.as_bool()) == Some(true) || name.is_empty();
            out.push(SessionEffect::Deallocate((!all).then_some(name)));
        }
        _ => {}
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(sql: &str) -> Result<Read, NotCacheable> {
        analyze(sql).read
    }

    fn t(schema: Option<&str>, name: &str) -> TableRef {
        TableRef {
            schema: schema.map(str::to_string),
            name: name.to_string(),
        }
    }

    #[test]
    fn plain_selects_are_cacheable_with_their_tables() {
        let r = read(
            "select a, lower(b) from public.accounts a join branches b using (bid) where aid = $1",
        )
        .unwrap();
        assert_eq!(
            r.tables,
            vec![t(None, "branches"), t(Some("public"), "accounts")]
        );
        assert!(r.user_functions.is_empty());
        assert!(read("TABLE accounts").is_ok());
        assert!(read("values (1), (2)").is_ok());
        let r = read("with x as (select * from t) select * from x").unwrap();
        assert_eq!(r.tables, vec![t(None, "t"), t(None, "x")]);
        assert_eq!(r.ctes, vec!["x".to_string()]);
        assert!(read("select count(*) from generate_series(1, 10)").is_ok());
    }

    #[test]
    fn volatile_and_unsafe_reads_are_not() {
        let v = |s: &str| read(s).unwrap_err();
        assert!(matches!(v("select now()"), NotCacheable::Volatile(_)));
        assert!(matches!(v("select random()"), NotCacheable::Volatile(_)));
        assert!(matches!(
            v("select * from t limit (random() * 10)::int"),
            NotCacheable::Volatile(_)
        ));
        assert!(matches!(
            v("values (nextval('s'))"),
            NotCacheable::Volatile(_)
        ));
        assert!(matches!(
            v("select current_timestamp"),
            NotCacheable::Volatile(_)
        ));
        assert!(matches!(
            v("select current_user"),
            NotCacheable::Volatile(_)
        ));
        assert_eq!(v("select * from t for update"), NotCacheable::Locking);
        assert_eq!(v("select * into x from t"), NotCacheable::SelectInto);
        assert_eq!(
            v("with d as (delete from t returning *) select * from d"),
            NotCacheable::DataModifying
        );
        assert_eq!(v("select * from pg_class"), NotCacheable::SystemCatalog);
        assert_eq!(
            v("select * from information_schema.tables"),
            NotCacheable::SystemCatalog
        );
        assert_eq!(v("select 'now'::timestamptz"), NotCacheable::TimeLiteral);
        assert_eq!(
            v("select 'today 10:00'::timestamp"),
            NotCacheable::TimeLiteral
        );
        assert_eq!(
            v("select timestamptz 'Tomorrow 01:00 UTC'"),
            NotCacheable::TimeLiteral
        );
        assert!(read("select 'nowhere'::text").is_ok());
        assert_eq!(
            v("select * from t tablesample bernoulli (10)"),
            NotCacheable::TableSample
        );
        assert_eq!(v("select 1; select 2"), NotCacheable::MultiStatement);
        assert_eq!(v("insert into t values (1)"), NotCacheable::NotASelect);
        assert_eq!(v("selec 1"), NotCacheable::ParseError);
        assert!(
            matches!(read("select my_func(1)").unwrap().user_functions.as_slice(), [f] if f == "my_func")
        );
    }

    #[test]
    fn session_effects_are_found() {
        let e = |s: &str| analyze(s).effects;
        assert!(
            matches!(e("set search_path = app, public").as_slice(), [SessionEffect::Set { name, .. }] if name == "search_path")
        );
        assert!(e("set local search_path = app").is_empty());
        assert_eq!(
            e("reset timezone"),
            vec![SessionEffect::Reset {
                name: "timezone".into()
            }]
        );
        assert_eq!(e("reset all"), vec![SessionEffect::ResetAll]);
        assert_eq!(e("set role app"), vec![SessionEffect::Taint("role_change")]);
        assert_eq!(
            e("set session authorization app"),
            vec![SessionEffect::Taint("role_change")]
        );
        assert_eq!(
            e("select set_config('search_path', 'x', false)"),
            vec![SessionEffect::Taint("set_config")]
        );
        assert_eq!(
            e("create temp table x (a int)"),
            vec![SessionEffect::Taint("temporary_objects")]
        );
        assert_eq!(e("discard all"), vec![SessionEffect::DiscardAll]);
        assert_eq!(e("deallocate all"), vec![SessionEffect::Deallocate(None)]);
        assert_eq!(
            e("deallocate s1"),
            vec![SessionEffect::Deallocate(Some("s1".into()))]
        );
        // same value spelled the same way renders the same
        assert_eq!(e("SET TimeZone = 'UTC'"), e("set timezone to 'UTC'"));
    }

    #[test]
    fn time_words_built_at_run_time_are_not_cacheable() {
        let v = |s: &str| read(s).unwrap_err();
        assert_eq!(v("select ('to'||'day')::date"), NotCacheable::TimeCast);
        assert_eq!(v("select d::timestamptz from t"), NotCacheable::TimeCast);
        assert_eq!(
            v("select cast(d as timestamp with time zone) from t"),
            NotCacheable::TimeCast
        );
        assert_eq!(v("select date(d) from t"), NotCacheable::TimeCast);
        assert!(matches!(
            v("select date_in(textout(d)) from t"),
            NotCacheable::Volatile(_)
        ));
        // Values fixed by the request are checked where they are known.
        assert!(read("select '2024-01-01'::date").is_ok());
        assert!(read("select $1::date").is_ok());
        assert!(read("select $1::text::timestamptz").is_ok());
        assert!(read("select d::text from t").is_ok());
        assert_eq!(v("select 'items'::regclass"), NotCacheable::CatalogLookup);
    }

    #[test]
    fn session_private_code_and_objects_taint() {
        let e = |s: &str| analyze(s).effects;
        let temp = vec![SessionEffect::Taint("temporary_objects")];
        assert_eq!(e("create table pg_temp.t (a int)"), temp);
        assert_eq!(e("create view pg_temp.v as select 1"), temp);
        assert_eq!(
            e("create function pg_temp.f() returns int language sql as 'select 1'"),
            temp
        );
        assert_eq!(
            e("do $$ begin perform set_config('search_path', 'x', false); end $$"),
            vec![SessionEffect::Taint("do_block")]
        );
        assert_eq!(e("call p(1)"), vec![SessionEffect::Taint("procedure_call")]);
        assert!(e("select * from pg_temp.t").is_empty());
        assert!(e("create table t (a int)").is_empty());
    }

    #[test]
    fn user_calls_make_a_statement_a_possible_write() {
        let a = analyze("select now(), write_fn()");
        assert!(a.read.is_err());
        assert!(a.may_write);
        assert_eq!(a.user_calls, vec!["write_fn".to_string()]);
        let a = analyze("insert into t values (my_default())");
        assert_eq!(a.user_calls, vec!["my_default".to_string()]);
        let a = analyze("select lower(name), count(*), now() from t group by 1");
        assert!(a.user_calls.is_empty());
        assert!(!a.may_write);
    }

    #[test]
    fn writes_are_found() {
        let a = analyze("update public.accounts set x = 1; delete from b; truncate c, d; alter table e add column z int; drop table f");
        assert!(a.may_write);
        let names: Vec<String> = a.writes.iter().map(|t| t.to_string()).collect();
        assert_eq!(names, vec!["b", "c", "d", "e", "f", "public.accounts"]);
        assert!(!analyze("select 1").may_write);
        assert!(analyze("select my_func()").may_write);
    }
}
