//! Which functions, operators and casts a cacheable statement may use, judged
//! against the database's catalog.
//!
//! pgtier does not resolve overloads as Postgres does (that needs the argument
//! types); it resolves conservatively instead. A name that exists outside
//! pg_catalog may be the one Postgres picks for some session (a better-matching
//! `public.lower(int)`, a function in a schema earlier on someone's path), so
//! every function of that name in every schema must be immutable, and the name
//! alone is not enough to share a result across users. Operators are judged the
//! same way, and the comparison operators count for every statement (sorting,
//! grouping, IN and joins use them without naming them). A user-defined cast or
//! type input/output function that is not immutable makes casts (or, where it can
//! apply implicitly, everything) unsafe.

use std::collections::{HashMap, HashSet};

use tokio_postgres::Client;

use crate::bypass::BypassReason;
use crate::sql::{is_safe_builtin, Read};

/// Functions outside pg_catalog: whether each is immutable (an aggregate counts
/// as immutable only if its support functions are), and a digest of its
/// definition (a replaced body must invalidate what was cached with the old one).
/// pgtier's own trigger functions are left out: no statement can call them,
/// and the key-reporting ones are generated per table as reads register key
/// columns (each would otherwise invalidate the whole database).
const FUNCTIONS: &str = "
SELECT n.nspname::text, p.proname::text,
       p.provolatile = 'i' AND NOT EXISTS (
         SELECT 1 FROM pg_aggregate a JOIN pg_proc f
           ON f.oid IN (a.aggtransfn, a.aggfinalfn, a.aggcombinefn, a.aggserialfn,
                        a.aggdeserialfn, a.aggmtransfn, a.aggminvtransfn, a.aggmfinalfn)
         WHERE a.aggfnoid = p.oid AND f.provolatile <> 'i'),
       md5(concat_ws('|', p.oid, p.provolatile, p.proargtypes, p.prorettype, p.prosrc,
                     p.probin, p.prosqlbody, p.proconfig, p.prosecdef, p.proisstrict))
FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
WHERE n.nspname <> 'pg_catalog'
  AND NOT (n.nspname = 'pgtier' AND p.prorettype IN ('trigger'::regtype, 'event_trigger'::regtype))
ORDER BY p.oid";

const BUILTIN_NAMES: &str = "
SELECT DISTINCT proname::text FROM pg_proc WHERE pronamespace = 'pg_catalog'::regnamespace";

const OPERATORS: &str = "
SELECT o.oprname::text, coalesce(p.provolatile = 'i', false),
       md5(concat_ws('|', o.oid, o.oprcode, o.oprleft, o.oprright, n.nspname)),
       -- An = on a key type (int2/4/8, uuid, bool, text, varchar): key
       -- lookups may mean it.
       o.oprname = '=' AND (o.oprleft IN (16, 20, 21, 23, 2950, 25, 1043)
                            OR o.oprright IN (16, 20, 21, 23, 2950, 25, 1043))
FROM pg_operator o JOIN pg_namespace n ON n.oid = o.oprnamespace
LEFT JOIN pg_proc p ON p.oid = o.oprcode
WHERE n.nspname <> 'pg_catalog'
ORDER BY o.oid";

/// User-defined casts (oids from FirstNormalObjectId on) and base types with
/// their own input/output functions (array, record and enum types use the
/// audited built-in ones): (implicit, immutable, digest).
const CASTS_AND_TYPES: &str = "
SELECT c.castcontext = 'i', coalesce(p.provolatile = 'i', true),
       md5(concat_ws('|', 'c', c.oid, c.castsource, c.casttarget, c.castfunc, c.castcontext, c.castmethod))
FROM pg_cast c LEFT JOIN pg_proc p ON p.oid = c.castfunc
WHERE c.oid >= 16384
UNION ALL
SELECT true,
       NOT EXISTS (SELECT 1 FROM pg_proc f
                   WHERE f.oid IN (t.typinput, t.typoutput, t.typreceive, t.typsend)
                     AND f.provolatile <> 'i' AND f.pronamespace <> 'pg_catalog'::regnamespace),
       md5(concat_ws('|', 't', t.oid, t.typinput, t.typoutput, t.typreceive, t.typsend))
FROM pg_type t
WHERE t.oid >= 16384 AND t.typtype = 'b'
  -- Every CREATE TABLE makes an array type of its row type; reading one
  -- changes nothing, and counting it would flush the database at each new
  -- table. Arrays of user-defined base types read through the element's
  -- functions, which are listed under the element type.
  AND NOT (t.typelem <> 0 AND t.typinput = 'pg_catalog.array_in'::regproc)
ORDER BY 3";

/// Settings made with ALTER ROLE / ALTER DATABASE ... SET: they change what a
/// new session resolves and renders (search_path, extra_float_digits, ...)
/// without the session saying so.
const ROLE_SETTINGS: &str = "
SELECT coalesce(md5(string_agg(concat_ws('|', setdatabase, setrole, setconfig), ';'
                               ORDER BY setdatabase, setrole)), '')
FROM pg_db_role_setting";

/// Type names outside pg_catalog: a cast to one of them written without a
/// schema may mean another type for another user.
const TYPES: &str = "
SELECT DISTINCT t.typname::text
FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
WHERE n.nspname <> 'pg_catalog'";

/// Settings given to roles (in this database or all): a result shared across
/// users is only the same for all of them if none of these can change it.
const ROLE_SETTING_NAMES: &str = "
SELECT DISTINCT split_part(cfg, '=', 1)
FROM pg_db_role_setting s, unnest(s.setconfig) cfg
WHERE s.setrole <> 0
  AND s.setdatabase IN (0, (SELECT oid FROM pg_database WHERE datname = current_database()))";

/// Settings that cannot change a shared result's bytes, or that Postgres
/// reports (and the cache key therefore carries). search_path is one: a shared
/// result names every relation with its schema, and every function and operator
/// either with its schema or by a name that exists only in pg_catalog.
const HARMLESS_SETTINGS: [&str; 15] = [
    "search_path",
    "statement_timeout",
    "lock_timeout",
    "idle_in_transaction_session_timeout",
    "idle_session_timeout",
    "work_mem",
    "maintenance_work_mem",
    "temp_buffers",
    "application_name",
    "datestyle",
    "intervalstyle",
    "timezone",
    "client_encoding",
    "synchronous_commit",
    "default_statistics_target",
];
const HARMLESS_PREFIXES: [&str; 10] = [
    "log_",
    "enable_",
    "jit",
    "track_",
    "cpu_",
    "parallel_",
    "max_parallel_",
    "geqo",
    "random_page_cost",
    "seq_page_cost",
];

fn harmless_setting(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    // Custom settings (`app.tenant`) are read only through current_setting(),
    // which is never cached.
    name.contains('.')
        || HARMLESS_SETTINGS.contains(&name.as_str())
        || HARMLESS_PREFIXES.iter().any(|p| name.starts_with(p))
}

/// Operators every statement may use without naming them.
const IMPLICIT_OPERATORS: [&str; 6] = ["=", "<>", "<", ">", "<=", ">="];

#[derive(Debug, Default)]
pub struct Routines {
    /// Names of pg_catalog functions (empty when not loaded: the allow-list
    /// stands in for it).
    builtin: HashSet<String>,
    /// Functions outside pg_catalog by bare name: whether every one of that name,
    /// in every schema, is immutable.
    by_name: HashMap<String, bool>,
    /// The same per `schema.name`.
    by_qualified: HashMap<String, bool>,
    /// Operators outside pg_catalog by name: whether all have immutable functions.
    operators: HashMap<String, bool>,
    /// Type names outside pg_catalog.
    types: HashSet<String>,
    /// A cast or type input/output function that is not immutable and may run
    /// without the statement naming it.
    implicit_unsafe: bool,
    /// One that runs only when a statement casts explicitly.
    explicit_unsafe: bool,
    /// Some `=` outside pg_catalog takes a key type (an integer, uuid or
    /// bool): with its schema before pg_catalog in search_path, `id = $1` may
    /// match rows of other keys, so no read is keyed.
    key_equality: bool,
    /// Some role has a setting of its own that may change results
    /// (extra_float_digits, role, ...): no result is the same for every user.
    role_settings: bool,
    /// Changes whenever any of the above, a function body or a role/database
    /// setting changes: results cached before may be wrong after.
    pub fingerprint: u64,
}

impl Routines {
    pub async fn load(client: &Client) -> Result<Routines, tokio_postgres::Error> {
        let mut r = Routines::default();
        let mut digest = xxhash_rust::xxh3::Xxh3::new();
        for row in client.query(FUNCTIONS, &[]).await? {
            let (schema, name): (String, String) = (row.get(0), row.get(1));
            let immutable = row.get::<_, Option<bool>>(2) == Some(true);
            digest.update(row.get::<_, Option<&str>>(3).unwrap_or("").as_bytes());
            r.add_function(&schema, &name, immutable);
        }
        r.builtin = client
            .query(BUILTIN_NAMES, &[])
            .await?
            .iter()
            .map(|row| row.get(0))
            .collect();
        for row in client.query(OPERATORS, &[]).await? {
            let immutable = row.get::<_, Option<bool>>(1) == Some(true);
            let e = r.operators.entry(row.get(0)).or_insert(true);
            *e &= immutable;
            digest.update(row.get::<_, Option<&str>>(2).unwrap_or("").as_bytes());
            r.key_equality |= row.get::<_, Option<bool>>(3) == Some(true);
        }
        for row in client.query(CASTS_AND_TYPES, &[]).await? {
            let implicit = row.get::<_, Option<bool>>(0) == Some(true);
            if row.get::<_, Option<bool>>(1) != Some(true) {
                if implicit {
                    r.implicit_unsafe = true;
                } else {
                    r.explicit_unsafe = true;
                }
            }
            digest.update(row.get::<_, Option<&str>>(2).unwrap_or("").as_bytes());
        }
        r.types = client
            .query(TYPES, &[])
            .await?
            .iter()
            .map(|row| row.get(0))
            .collect();
        for row in client.query(ROLE_SETTINGS, &[]).await? {
            digest.update(row.get::<_, Option<&str>>(0).unwrap_or("").as_bytes());
        }
        for row in client.query(ROLE_SETTING_NAMES, &[]).await? {
            if !harmless_setting(row.get::<_, Option<&str>>(0).unwrap_or("")) {
                r.role_settings = true;
            }
        }
        r.fingerprint = digest.digest() | 1;
        Ok(r)
    }

    /// For tests: these user functions (bare or `schema.name`) exist and are
    /// immutable, nothing else outside pg_catalog.
    pub fn from_immutable(names: &HashSet<String>) -> Routines {
        let mut r = Routines::default();
        for n in names {
            match n.rsplit_once('.') {
                Some((s, f)) => r.add_function(s, f, true),
                None => r.add_function("public", n, true),
            }
        }
        r
    }

    fn add_function(&mut self, schema: &str, name: &str, immutable: bool) {
        *self.by_name.entry(name.to_string()).or_insert(true) &= immutable;
        *self
            .by_qualified
            .entry(format!("{schema}.{name}"))
            .or_insert(true) &= immutable;
    }

    /// Why a statement (or a view's body) using these may not be cached, if it
    /// may not. With `public`, the result is shared across users, so every name
    /// must mean the same object for every user's search_path.
    /// Whether a user-defined `=` on a key type exists (see `key_equality`).
    pub fn key_equality(&self) -> bool {
        self.key_equality
    }

    pub fn check(&self, read: &Read, public: bool) -> Result<(), BypassReason> {
        if self.implicit_unsafe || (read.casts && self.explicit_unsafe) {
            return Err(BypassReason::VolatileCast);
        }
        if public && self.role_settings {
            return Err(BypassReason::PublicRoleSettings);
        }
        for f in &read.functions {
            self.check_function(f, public)?;
        }
        if public
            && read
                .cast_types
                .iter()
                .any(|t| !t.contains('.') && self.types.contains(t))
        {
            return Err(BypassReason::PublicUnqualified);
        }
        let implicit = IMPLICIT_OPERATORS.iter().copied();
        for op in read.operators.iter().map(String::as_str).chain(implicit) {
            self.check_operator(op, public)?;
        }
        Ok(())
    }

    /// Whether a call of `name` is of IMMUTABLE functions only, as far as the
    /// catalog can tell (every function of that name, in every schema).
    pub fn immutable(&self, name: &str) -> bool {
        self.check_function(name, false).is_ok()
    }

    /// Whether a call by this name may run code a role defined (outside
    /// `pg_catalog`). Postgres lets an IMMUTABLE function call set_config().
    pub fn user_defined(&self, name: &str) -> bool {
        match name.rsplit_once('.') {
            Some((schema, _)) => schema != "pg_catalog",
            None => self.by_name.contains_key(name),
        }
    }

    fn check_function(&self, name: &str, public: bool) -> Result<(), BypassReason> {
        match name.rsplit_once('.') {
            Some(("pg_catalog", bare)) if is_safe_builtin(bare) => Ok(()),
            Some(("pg_catalog", _)) => Err(BypassReason::VolatileFunction),
            Some(_) => match self.by_qualified.get(name) {
                Some(true) => Ok(()),
                Some(false) => Err(BypassReason::VolatileFunction),
                None => Err(BypassReason::UnknownFunction),
            },
            None => {
                let user = self.by_name.get(name).copied();
                if user == Some(false) {
                    return Err(BypassReason::VolatileFunction);
                }
                if user.is_some() && public {
                    return Err(BypassReason::PublicUnqualified);
                }
                let builtin = self.builtin.contains(name) || is_safe_builtin(name);
                match (builtin, user) {
                    (true, _) if !is_safe_builtin(name) => Err(BypassReason::VolatileFunction),
                    (false, None) => Err(BypassReason::UnknownFunction),
                    _ => Ok(()),
                }
            }
        }
    }

    fn check_operator(&self, op: &str, public: bool) -> Result<(), BypassReason> {
        let (schema, bare) = match op.rsplit_once('.') {
            Some((s, o)) => (Some(s), o),
            None => (None, op),
        };
        if schema == Some("pg_catalog") {
            return Ok(());
        }
        match self.operators.get(bare) {
            Some(false) => Err(BypassReason::VolatileOperator),
            Some(true) if public && schema.is_none() => Err(BypassReason::PublicUnqualified),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sql::analyze;

    fn read(sql: &str) -> Read {
        analyze(sql).read.expect("cacheable statement")
    }

    #[test]
    fn shadowed_and_user_defined_names_are_judged_in_every_schema() {
        let mut r = Routines::default();
        r.add_function("public", "lower", false);
        r.add_function("app", "f", true);
        r.add_function("other", "f", true);
        r.add_function("app", "g", true);
        r.add_function("other", "g", false);
        assert_eq!(
            r.check(&read("select lower(x) from t"), false),
            Err(BypassReason::VolatileFunction),
            "a volatile public.lower shadows the built-in"
        );
        assert_eq!(
            r.check(&read("select pg_catalog.lower(x) from t"), false),
            Ok(())
        );
        assert_eq!(r.check(&read("select upper(x) from t"), false), Ok(()));
        assert_eq!(r.check(&read("select f(x) from t"), false), Ok(()));
        assert_eq!(
            r.check(&read("select f(x) from t"), true),
            Err(BypassReason::PublicUnqualified)
        );
        assert_eq!(r.check(&read("select app.f(x) from t"), true), Ok(()));
        assert_eq!(
            r.check(&read("select g(x) from t"), false),
            Err(BypassReason::VolatileFunction)
        );
        assert_eq!(r.check(&read("select app.g(x) from t"), false), Ok(()));
        assert_eq!(
            r.check(&read("select nope.g(x) from t"), false),
            Err(BypassReason::UnknownFunction)
        );
        assert_eq!(
            r.check(&read("select h(x) from t"), false),
            Err(BypassReason::UnknownFunction)
        );
    }

    #[test]
    fn operators_and_casts() {
        let mut r = Routines::default();
        r.operators.insert("===".into(), false);
        r.operators.insert("@@@".into(), true);
        assert_eq!(
            r.check(&read("select a === b from t"), false),
            Err(BypassReason::VolatileOperator)
        );
        assert_eq!(r.check(&read("select a @@@ b from t"), false), Ok(()));
        assert_eq!(
            r.check(&read("select a @@@ b from t"), true),
            Err(BypassReason::PublicUnqualified)
        );
        r.operators.insert("=".into(), false);
        assert_eq!(
            r.check(&read("select * from t order by a"), false),
            Err(BypassReason::VolatileOperator),
            "comparisons are used without being named"
        );
        let mut r = Routines {
            explicit_unsafe: true,
            ..Routines::default()
        };
        assert_eq!(
            r.check(&read("select a::text from t"), false),
            Err(BypassReason::VolatileCast)
        );
        assert_eq!(r.check(&read("select a from t"), false), Ok(()));
        r.implicit_unsafe = true;
        assert_eq!(
            r.check(&read("select a from t"), false),
            Err(BypassReason::VolatileCast)
        );
    }

    #[test]
    fn role_settings_stop_sharing_across_users() {
        let r = Routines {
            role_settings: true,
            ..Routines::default()
        };
        assert_eq!(r.check(&read("select a from public.t"), false), Ok(()));
        assert_eq!(
            r.check(&read("select a from public.t"), true),
            Err(BypassReason::PublicRoleSettings)
        );
        let mut r = Routines::default();
        r.types.insert("mood".into());
        let shared = |r: &Routines, sql: &str| r.check(&read(sql), true);
        assert_eq!(
            shared(&r, "select 'x'::mood"),
            Err(BypassReason::PublicUnqualified)
        );
        assert_eq!(shared(&r, "select 'x'::app.mood"), Ok(()));
        assert_eq!(shared(&r, "select 'x'::text"), Ok(()));
        assert!(harmless_setting("statement_timeout"));
        assert!(harmless_setting("TimeZone"));
        assert!(harmless_setting("app.tenant"));
        assert!(harmless_setting("search_path"));
        assert!(!harmless_setting("extra_float_digits"));
        assert!(!harmless_setting("role"));
    }
}
