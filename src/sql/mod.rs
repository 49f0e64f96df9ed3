//! What a statement does, decided once per statement text with the real Postgres
//! grammar (libpg_query): whether it is a read pgtier may cache, which tables it
//! reads or writes, and how it changes session state that the cache key covers.
//!
//! The parse tree is walked in full (through its serde form) rather than with a
//! hand-picked traversal, so a volatile call hidden in LIMIT, VALUES or a
//! sub-select cannot slip past.

mod builtins;
mod clock;
mod keyfrom;
pub mod keys;
pub mod keyvalue;
mod table_ref;

use std::collections::HashSet;

use serde_json::Value;

use crate::bypass::BypassReason;

pub use builtins::is_safe_builtin;
use builtins::{builtin_volatile, catalog_lookup_type};
pub use clock::is_time_literal;
use clock::{fixed_by_request, TIME_TYPES};
pub use table_ref::TableRef;

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
    /// A cast to a type whose input looks objects up in the catalog by name
    /// (`'t'::regclass`): the result changes with DDL the statement does not name.
    CatalogLookup,
}

impl NotCacheable {
    pub fn reason(&self) -> BypassReason {
        match self {
            NotCacheable::ParseError => BypassReason::ParseError,
            NotCacheable::NotASelect => BypassReason::NotSelect,
            NotCacheable::MultiStatement => BypassReason::MultiStatement,
            NotCacheable::Volatile(_) => BypassReason::Volatile,
            NotCacheable::UnknownFunction(_) => BypassReason::UnknownFunction,
            NotCacheable::Locking => BypassReason::Locking,
            NotCacheable::SelectInto => BypassReason::SelectInto,
            NotCacheable::DataModifying => BypassReason::DataModifying,
            NotCacheable::TableSample => BypassReason::TableSample,
            NotCacheable::SystemCatalog => BypassReason::SystemCatalog,
            NotCacheable::TempTable => BypassReason::TempTable,
            NotCacheable::TimeLiteral => BypassReason::TimeLiteral,
            NotCacheable::TimeCast => BypassReason::TimeCast,
            NotCacheable::CatalogLookup => BypassReason::CatalogLookup,
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
    /// Every function called, as written (built-ins too: a function of the same
    /// name outside pg_catalog may be the one Postgres picks).
    pub functions: Vec<String>,
    /// Operators named in the statement, as written (`=`, `@>`, `myschema.+`).
    pub operators: Vec<String>,
    /// The statement has an explicit cast (`::`, `CAST`, `type 'literal'`).
    pub casts: bool,
    /// The types cast to, as written.
    pub cast_types: Vec<String>,
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
    Taint(BypassReason),
    /// Creates a relation or type under a name without a schema: a temporary
    /// one, session-private, where `pg_temp` comes first in the search_path.
    CreatesUnqualified,
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
    /// Whether every statement is an INSERT, UPDATE, DELETE or MERGE calling
    /// nothing but safe built-ins: it changes rows, not definitions, so it can
    /// only change results that read tables.
    pub plain_dml: bool,
    /// Functions it calls by name that are not built-ins known to be volatile
    /// (those change no session state; set_config is found on its own). The
    /// catalog decides what each name means: a user function, or one shadowing
    /// a built-in, may write, change settings or create temporary objects
    /// unless it is IMMUTABLE.
    pub calls: Vec<String>,
    /// Changes roles (membership, attributes, drops): what any user may see can
    /// change in every database, with no event trigger to say so.
    pub roles_changed: bool,
    /// pg_query fingerprint: the statement's shape with constants removed.
    pub fingerprint: u64,
    /// For a read of one table: the key its rows are selected by, or why it
    /// depends on the whole table (key-level invalidation, issue 14).
    pub keys: Result<keys::KeyLookup, keys::TableLevel>,
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
                plain_dml: false,
                calls: Vec::new(),
                roles_changed: false,
                fingerprint,
                keys: Err(keys::TableLevel::NotOneTable),
            }
        }
    };
    let mut out = Analysis {
        read: Err(NotCacheable::NotASelect),
        effects: Vec::new(),
        writes: Vec::new(),
        may_write: false,
        plain_dml: false,
        calls: Vec::new(),
        roles_changed: false,
        fingerprint,
        keys: Err(keys::TableLevel::NotOneTable),
    };
    let stmts = &parsed.protobuf.stmts;
    let mut dml = true;
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
        out.calls.extend(facts.calls());
        if matches!(
            top.as_str(),
            "GrantRoleStmt" | "AlterRoleStmt" | "DropRoleStmt"
        ) {
            out.roles_changed = true;
        }
        dml &= matches!(
            top.as_str(),
            "InsertStmt" | "UpdateStmt" | "DeleteStmt" | "MergeStmt"
        );
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
            // No CTE, and (checked by key_lookup) every relation reference in
            // FROM: no subquery reads another table, or a keyed one again.
            // (`facts.tables` has every reference, `Read::tables` each once.)
            let keyable = out.read.is_ok() && facts.ctes.is_empty();
            if let (true, Some(pg_query::NodeEnum::SelectStmt(select))) = (keyable, &stmt.node) {
                let uses = param_uses(&tree);
                out.keys = keys::key_lookup(select, facts.tables.len()).and_then(|l| {
                    keys::single_use_params(l, |n| uses.iter().filter(|u| **u == n).count())
                });
            }
        }
    }
    if stmts.len() > 1 {
        out.read = Err(NotCacheable::MultiStatement);
    }
    // A user function may write, whatever else makes the statement
    // uncacheable (`SELECT now(), write_fn()`): the write must be fenced.
    if out.calls.iter().any(|f| !is_safe_builtin(f)) {
        out.may_write = true;
        dml = false;
    }
    out.plain_dml = dml && !stmts.is_empty();
    out.calls.sort();
    out.calls.dedup();
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
    operators: Vec<String>,
    casts: bool,
    cast_types: Vec<String>,
    catalog_cast: bool,
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

/// The number of every parameter reference (`$n`) in a statement's tree, once
/// per occurrence.
fn param_uses(tree: &Value) -> Vec<u32> {
    let mut uses = Vec::new();
    let mut stack = vec![tree];
    while let Some(v) = stack.pop() {
        match v {
            Value::Object(map) => {
                if let Some(n) = map
                    .get("ParamRef")
                    .and_then(|p| p.get("number"))
                    .and_then(Value::as_u64)
                {
                    uses.push(u32::try_from(n).unwrap_or(u32::MAX));
                }
                stack.extend(map.values());
            }
            Value::Array(items) => stack.extend(items.iter()),
            _ => {}
        }
    }
    uses
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
                        .is_some_and(|args| args.iter().any(|a| !fixed_by_request(a)))
                {
                    self.time_cast = true;
                }
                self.functions.push(name);
            }
            // CREATE FUNCTION/TYPE/... pg_temp.x: a session-private object.
            "funcname" | "defnames" | "domainname" | "type_name"
                if qualified_name(Some(v)).starts_with("pg_temp") =>
            {
                self.pg_temp_name = true;
            }
            "SQLValueFunction" | "SqlvalueFunction" => self.sql_value_functions = true,
            "AExpr" | "A_Expr" => {
                let name = qualified_name(v.get("name"));
                // BETWEEN and friends name a keyword; they use the comparison
                // operators, which the catalog checks for every statement.
                if !name.is_empty()
                    && !name
                        .chars()
                        .all(|c| c.is_ascii_alphabetic() || c == '_' || c == ' ')
                {
                    self.operators.push(name);
                }
            }
            "useOp" | "use_op" => {
                let name = qualified_name(Some(v));
                if !name.is_empty() {
                    self.operators.push(name);
                }
            }
            "TypeCast" => {
                self.casts = true;
                let ty = qualified_name(v.pointer("/type_name/names"));
                let bare = ty.rsplit('.').next().unwrap_or("");
                if catalog_lookup_type(bare) {
                    self.catalog_cast = true;
                }
                if TIME_TYPES.contains(&bare) && !v.get("arg").is_some_and(fixed_by_request) {
                    self.time_cast = true;
                }
                self.cast_types.push(ty);
            }
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
        if self.catalog_cast {
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
        let mut functions = self.functions.clone();
        functions.sort();
        functions.dedup();
        let mut operators = self.operators.clone();
        operators.sort();
        operators.dedup();
        let mut cast_types = self.cast_types.clone();
        cast_types.sort();
        cast_types.dedup();
        Ok(Read {
            tables,
            ctes,
            user_functions,
            functions,
            operators,
            casts: self.casts,
            cast_types,
        })
    }
}

impl Facts {
    /// Called functions the catalog must vet (see `Analysis::calls`).
    fn calls(&self) -> impl Iterator<Item = String> + '_ {
        self.functions.iter().filter_map(|f| {
            let bare = f.strip_prefix("pg_catalog.").unwrap_or(f);
            (!f.starts_with("pg_catalog.") && !builtin_volatile(bare)).then(|| f.clone())
        })
    }
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
        out.push(SessionEffect::Taint(BypassReason::SetConfig));
    }
    if facts.temp_into || (facts.pg_temp_name && top != "SelectStmt") {
        out.push(SessionEffect::Taint(BypassReason::TemporaryObjects));
    }
    match top {
        // Arbitrary code in the session: it may SET, set_config(), create
        // temporary objects or change what names resolve to, unseen.
        "DoStmt" => out.push(SessionEffect::Taint(BypassReason::DoBlock)),
        "CallStmt" => out.push(SessionEffect::Taint(BypassReason::ProcedureCall)),
        _ => {}
    }
    let node = tree
        .pointer(&format!("/node/{top}"))
        .unwrap_or(&Value::Null);
    if !facts.temp_into && creates_unqualified(top, node) {
        out.push(SessionEffect::CreatesUnqualified);
    }
    if facts
        .written
        .iter()
        .any(|t| t.name == "pg_settings" && t.schema.as_deref().is_none_or(|s| s == "pg_catalog"))
    {
        // Its update rule calls set_config() out of sight.
        out.push(SessionEffect::Taint(BypassReason::SetConfig));
    }
    match top {
        "VariableSetStmt" => {
            let name = str_of(node, "name").to_ascii_lowercase();
            if node.get("is_local").and_then(|b| b.as_bool()) == Some(true) {
                // An asynchronous commit the session's own setting does not
                // show: a read-your-writes fence of the logical source could
                // not tell how far to wait.
                if name == "synchronous_commit" {
                    out.push(SessionEffect::Taint(
                        BypassReason::SettingChangedInTransaction,
                    ));
                }
                return out;
            }
            let kind = node.get("kind").and_then(|k| k.as_i64()).unwrap_or(0);
            // VariableSetKind: 1 value, 2 default, 3 current, 4 multi, 5 reset, 6 reset all
            match (name.as_str(), kind) {
                ("role" | "session_authorization", _) => {
                    out.push(SessionEffect::Taint(BypassReason::RoleChange))
                }
                (_, 1) => out.push(SessionEffect::Set {
                    value: node.get("args").map(canonical).unwrap_or_default(),
                    name,
                }),
                (_, 2) | (_, 5) => out.push(SessionEffect::Reset { name }),
                (_, 3) => out.push(SessionEffect::Taint(BypassReason::SetFromCurrent)),
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

/// Whether a statement creates a relation or type under a name without a
/// schema: where it lands depends on the session's search_path.
fn creates_unqualified(top: &str, node: &Value) -> bool {
    let rel = |path: &str| {
        node.pointer(path)
            .is_some_and(|r| r.is_object() && str_of(r, "schemaname").is_empty())
    };
    let one_name = |key: &str| {
        node.get(key)
            .and_then(Value::as_array)
            .is_some_and(|l| l.len() == 1)
    };
    match top {
        "CreateStmt" => rel("/relation"),
        "CreateTableAsStmt" => rel("/into/rel"),
        "SelectStmt" => rel("/into_clause/rel"),
        "ViewStmt" => rel("/view"),
        "CreateSeqStmt" => rel("/sequence"),
        "CompositeTypeStmt" => rel("/typevar"),
        "CreateEnumStmt" | "CreateRangeStmt" => one_name("type_name"),
        "CreateDomainStmt" => one_name("domainname"),
        _ => false,
    }
}

#[cfg(test)]
mod tests;
