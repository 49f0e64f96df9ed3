//! What pgtier knows about a database's relations: kind, row security, whether
//! the invalidation trigger is in place, inheritance, and the base tables of
//! views. A statement is cacheable only if every relation it names resolves to
//! tables whose writes pgtier will hear about, and every function, operator and
//! cast it (or a view it reads) uses is safe in this database.

mod routines;
mod views;

use std::collections::{HashMap, HashSet};

use tokio_postgres::Client;

use super::generations::Generations;
use crate::bypass::BypassReason;
use crate::cache::Decision;
use crate::sql::TableRef;
pub use routines::Routines;
pub use views::ViewBody;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    pub oid: u32,
    pub schema: String,
    pub name: String,
    /// pg_class.relkind: r table, p partitioned, v view, m matview, f foreign.
    pub kind: u8,
    pub row_security: bool,
    pub has_trigger: bool,
    /// The trigger's oid: a trigger dropped and installed again (with a new
    /// watch sequence) is a different one, and the table's watch is void.
    pub trigger_oid: u32,
    /// Columns and types, to notice schema changes made without event triggers.
    pub shape: String,
    /// For views: relations the view reads (oids).
    pub reads: Vec<u32>,
    pub parents: Vec<u32>,
    pub children: Vec<u32>,
    /// Columns: (name, type oid, collation deterministic), for key lookups.
    pub columns: Vec<(String, u32, bool)>,
    /// Triggers other than pgtier's (foreign-key actions included), rules, or
    /// defaults, CHECKs and policies calling a role's functions: a write to it
    /// may write other tables too.
    pub side_effects: bool,
}

#[derive(Debug, Default)]
pub struct Catalog {
    pub version: u64,
    pub relations: Vec<Relation>,
    by_oid: HashMap<u32, usize>,
    by_name: HashMap<String, Vec<usize>>,
    /// Functions, operators and casts outside pg_catalog.
    pub routines: Routines,
    /// Each view's body, analysed like a statement.
    views: HashMap<u32, ViewBody>,
}

const RELATIONS: &str = "
SELECT c.oid::int8, n.nspname::text, c.relname::text, c.relkind::text, c.relrowsecurity,
       -- Announcing only counts if it cannot be switched off by
       -- session_replication_role: the statement trigger ENABLE ALWAYS, the
       -- row trigger (for logical replication's apply worker) at least REPLICA.
       -- A keyed table's statement trigger fires on TRUNCATE only: its three
       -- key-reporting triggers must then all be there (tgtype 28: I/U/D).
       EXISTS (SELECT 1 FROM pg_trigger t
               WHERE t.tgrelid = c.oid AND t.tgname = 'pgtier_notify' AND t.tgenabled = 'A'
                 AND t.tgnargs = 2
                 AND ((t.tgtype & 28) = 28
                      OR (SELECT count(*) FROM pg_trigger k
                          WHERE k.tgrelid = c.oid AND k.tgenabled = 'A'
                            AND k.tgname IN ('pgtier_keys_ins', 'pgtier_keys_upd', 'pgtier_keys_del')) = 3))
       AND (c.relkind <> 'r' OR EXISTS (SELECT 1 FROM pg_trigger t
               WHERE t.tgrelid = c.oid AND t.tgname = 'pgtier_notify_replica' AND t.tgenabled IN ('R', 'A')
                 AND t.tgnargs = 2)),
       coalesce((SELECT md5(string_agg(a.attname || ':' || a.atttypid || ':' || a.atttypmod, ',' ORDER BY a.attnum))
                 FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped), ''),
       coalesce((SELECT t.oid::int8 FROM pg_trigger t
                 WHERE t.tgrelid = c.oid AND t.tgname = 'pgtier_notify' LIMIT 1), 0),
       coalesce((SELECT json_agg(json_build_array(a.attname, a.atttypid::int8,
                                                  coalesce(co.collisdeterministic, true)))::text
                 FROM pg_attribute a LEFT JOIN pg_collation co ON co.oid = a.attcollation
                 WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped), '[]'),
       c.relhasrules OR EXISTS (SELECT 1 FROM pg_trigger t
                                WHERE t.tgrelid = c.oid AND t.tgname NOT LIKE 'pgtier\\_%')
       -- A column default, a CHECK (of the table or of a column's domain) or a
       -- policy that calls a function of a role's may write other tables too.
       OR EXISTS (SELECT 1 FROM pg_depend d JOIN pg_proc f ON f.oid = d.refobjid
                  WHERE d.refclassid = 'pg_proc'::regclass
                    AND f.pronamespace <> 'pg_catalog'::regnamespace
                    AND ((d.classid = 'pg_attrdef'::regclass
                          AND d.objid IN (SELECT ad.oid FROM pg_attrdef ad WHERE ad.adrelid = c.oid))
                      OR (d.classid = 'pg_constraint'::regclass
                          AND d.objid IN (SELECT co.oid FROM pg_constraint co
                                          WHERE co.conrelid = c.oid
                                             OR co.contypid IN (SELECT a.atttypid FROM pg_attribute a
                                                                WHERE a.attrelid = c.oid AND a.attnum > 0)))
                      OR (d.classid = 'pg_policy'::regclass
                          AND d.objid IN (SELECT po.oid FROM pg_policy po WHERE po.polrelid = c.oid))))
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f')
  AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'pgtier')
  AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp%'";

const VIEW_READS: &str = "
SELECT DISTINCT r.ev_class::int8, d.refobjid::int8
FROM pg_rewrite r
JOIN pg_depend d ON d.classid = 'pg_rewrite'::regclass AND d.objid = r.oid
                AND d.refclassid = 'pg_class'::regclass AND d.deptype = 'n'
WHERE d.refobjid <> r.ev_class";

const INHERITS: &str = "SELECT inhrelid::int8, inhparent::int8 FROM pg_inherits";

/// The columns of a relation from the catalog query's JSON; none if unreadable
/// (the table then has no key lookups).
fn columns(json: &str) -> Vec<(String, u32, bool)> {
    serde_json::from_str::<Vec<(String, i64, bool)>>(json)
        .map(|cols| {
            cols.into_iter()
                .filter_map(|(n, t, d)| Some((n, u32::try_from(t).ok()?, d)))
                .collect()
        })
        .unwrap_or_default()
}

impl Catalog {
    /// Read the catalog through a control connection.
    pub async fn load(client: &Client, version: u64) -> Result<Catalog, tokio_postgres::Error> {
        let mut relations: Vec<Relation> = client
            .query(RELATIONS, &[])
            .await?
            .iter()
            .map(|r| Relation {
                oid: r.get::<_, i64>(0) as u32,
                schema: r.get(1),
                name: r.get(2),
                kind: r.get::<_, String>(3).bytes().next().unwrap_or(b'?'),
                row_security: r.get(4),
                has_trigger: r.get(5),
                shape: r.get(6),
                trigger_oid: r.get::<_, i64>(7) as u32,
                reads: Vec::new(),
                parents: Vec::new(),
                children: Vec::new(),
                columns: columns(&r.get::<_, String>(8)),
                side_effects: r.get(9),
            })
            .collect();
        relations.sort_by_key(|r| r.oid);
        let by_oid: HashMap<u32, usize> = relations
            .iter()
            .enumerate()
            .map(|(i, r)| (r.oid, i))
            .collect();
        for row in client.query(VIEW_READS, &[]).await? {
            let (view, base) = (row.get::<_, i64>(0) as u32, row.get::<_, i64>(1) as u32);
            if let Some(&i) = by_oid.get(&view) {
                relations[i].reads.push(base);
            }
        }
        for row in client.query(INHERITS, &[]).await? {
            let (child, parent) = (row.get::<_, i64>(0) as u32, row.get::<_, i64>(1) as u32);
            if let Some(&i) = by_oid.get(&child) {
                relations[i].parents.push(parent);
            }
            if let Some(&i) = by_oid.get(&parent) {
                relations[i].children.push(child);
            }
        }
        let routines = Routines::load(client).await?;
        let views = views::load(client).await?;
        let mut catalog = Catalog::build(version, relations, HashSet::new());
        catalog.routines = routines;
        catalog.views = views;
        Ok(catalog)
    }

    /// A catalog of these relations; `immutable` names the user functions
    /// (`name` or `schema.name`) that exist, all immutable (for tests).
    pub fn build(version: u64, relations: Vec<Relation>, immutable: HashSet<String>) -> Catalog {
        let mut by_name: HashMap<String, Vec<usize>> = HashMap::new();
        let mut by_oid = HashMap::new();
        for (i, r) in relations.iter().enumerate() {
            by_name.entry(r.name.clone()).or_default().push(i);
            by_oid.insert(r.oid, i);
        }
        Catalog {
            version,
            relations,
            by_oid,
            by_name,
            routines: Routines::from_immutable(&immutable),
            views: HashMap::new(),
        }
    }

    /// Set a view's analysed body (for tests; `load` reads them all).
    pub fn set_view_body(&mut self, oid: u32, body: &str) {
        self.views.insert(oid, views::body(body));
    }

    /// The oid of `schema.name`, if the catalog has it.
    pub fn oid_of(&self, schema: &str, name: &str) -> Option<u32> {
        self.by_name
            .get(name)?
            .iter()
            .map(|&i| &self.relations[i])
            .find(|r| r.schema == schema)
            .map(|r| r.oid)
    }

    pub fn get(&self, oid: u32) -> Option<&Relation> {
        self.by_oid.get(&oid).map(|&i| &self.relations[i])
    }

    /// The relations whose writes can change what a query on `oid` returns,
    /// and whose rows it reads: `oid` and its descendants (a query reads them
    /// all unless it says ONLY), and every ancestor of any of those (a write
    /// naming an ancestor reaches the rows of its descendants; with multiple
    /// inheritance that includes a descendant's other parents).
    pub fn family(&self, oid: u32) -> Vec<u32> {
        let mut seen = vec![oid];
        let mut i = 0;
        while i < seen.len() {
            if let Some(r) = self.get(seen[i]) {
                for c in &r.children {
                    if !seen.contains(c) {
                        seen.push(*c);
                    }
                }
            }
            i += 1;
        }
        let mut j = 0;
        while j < seen.len() {
            if let Some(r) = self.get(seen[j]) {
                for p in &r.parents {
                    if !seen.contains(p) {
                        seen.push(*p);
                    }
                }
            }
            j += 1;
        }
        seen
    }

    /// Whether every one of these user functions is IMMUTABLE (so cannot change
    /// session state or read tables, by its declaration).
    pub fn all_immutable(&self, functions: &[String]) -> bool {
        functions.iter().all(|f| self.routines.immutable(f))
    }

    pub fn any_user_defined(&self, functions: &[String]) -> bool {
        functions.iter().any(|f| self.routines.user_defined(f))
    }

    /// The generation slots a cacheable statement depends on, or why it cannot be
    /// cached in this database. Tables with a trigger that this pgtier does not
    /// watch yet are added to `unwatched` (and the statement is not cacheable
    /// until they are).
    pub fn resolve(
        &self,
        database: &str,
        decision: &Decision,
        watched: &HashSet<u32>,
        unwatched: &mut Vec<u32>,
    ) -> Result<(Vec<u32>, Vec<u32>), BypassReason> {
        let read = decision.analysis.read.as_ref().map_err(|n| n.reason())?;
        let public = decision.cacheable().is_some_and(|p| p.public);
        self.routines.check(read, public)?;
        // Function, operator and cast definitions (and role settings) are not
        // tied to tables: any change to them is announced on this slot.
        let mut slots = vec![Generations::routines_slot(database)];
        let mut oids = Vec::new();
        for t in &read.tables {
            if t.schema.is_none() {
                // What an unqualified name resolves to changes when a relation
                // of that name appears anywhere (created, renamed, moved).
                slots.push(Generations::name_slot(database, &t.name));
            }
            let maybe_cte = t.schema.is_none() && read.ctes.contains(&t.name);
            if maybe_cte && !self.by_name.contains_key(&t.name) {
                continue; // only ever the CTE
            }
            if maybe_cte && public {
                return Err(BypassReason::PublicUnqualified);
            }
            // Possibly a table of that name (in the CTE's own body, say): depend
            // on it, which at worst invalidates more than needed.
            self.resolve_table(database, t, &mut slots, &mut oids)?;
        }
        unwatched.extend(oids.iter().filter(|o| !watched.contains(o)));
        if !unwatched.is_empty() {
            return Err(BypassReason::NotWatched);
        }
        slots.sort_unstable();
        slots.dedup();
        oids.sort_unstable();
        oids.dedup();
        Ok((slots, oids))
    }

    /// The relations a reference may name (any schema's, if unqualified).
    fn candidates(&self, t: &TableRef) -> Vec<usize> {
        self.by_name
            .get(&t.name)
            .into_iter()
            .flatten()
            .copied()
            .filter(|&i| {
                t.schema
                    .as_deref()
                    .is_none_or(|s| self.relations[i].schema == s)
            })
            .collect()
    }

    /// Whether a write of rows to these tables reaches none of `watched`:
    /// each is a plain table (no partitions, no inheritance) outside it, with
    /// no trigger but pgtier's and no rule (so the write reaches no other
    /// table). A name this catalog does not know is no table pgtier caches.
    pub fn writes_reach_none(&self, writes: &[TableRef], watched: &HashSet<u32>) -> bool {
        !writes.is_empty()
            && writes.iter().all(|t| {
                self.named(t).iter().all(|oid| {
                    !watched.contains(oid)
                        && self.get(*oid).is_some_and(|r| {
                            r.kind == b'r'
                                && r.parents.is_empty()
                                && r.children.is_empty()
                                && !r.side_effects
                        })
                })
            })
    }

    /// The oids of the relations a reference may name: a statement reads table
    /// `oid` itself, not through a view, when this is `[oid]`.
    pub fn named(&self, t: &TableRef) -> Vec<u32> {
        self.candidates(t)
            .into_iter()
            .map(|i| self.relations[i].oid)
            .collect()
    }

    /// The slots and table oids a resolved statement's reference `t` made it
    /// depend on (None if it does not resolve).
    pub fn reference_deps(&self, database: &str, t: &TableRef) -> Option<(Vec<u32>, Vec<u32>)> {
        let (mut slots, mut oids) = (Vec::new(), Vec::new());
        self.resolve_table(database, t, &mut slots, &mut oids)
            .ok()?;
        Some((slots, oids))
    }

    fn resolve_table(
        &self,
        database: &str,
        t: &TableRef,
        slots: &mut Vec<u32>,
        oids: &mut Vec<u32>,
    ) -> Result<(), BypassReason> {
        let candidates = self.candidates(t);
        if candidates.is_empty() {
            return Err(BypassReason::UnknownTable);
        }
        // An unqualified name may be any of them, depending on search_path: all
        // must be cacheable, and the result depends on all of them.
        for i in candidates {
            self.resolve_relation(database, self.relations[i].oid, slots, oids, 0)?;
        }
        Ok(())
    }

    fn resolve_relation(
        &self,
        database: &str,
        oid: u32,
        slots: &mut Vec<u32>,
        oids: &mut Vec<u32>,
        depth: usize,
    ) -> Result<(), BypassReason> {
        if depth > 16 {
            return Err(BypassReason::ViewTooDeep);
        }
        let r = self.get(oid).ok_or(BypassReason::UnknownTable)?;
        match r.kind {
            b'r' | b'p' => {
                if r.row_security {
                    return Err(BypassReason::RowSecurity);
                }
                for member in self.family(oid) {
                    match self.get(member) {
                        Some(m) if m.has_trigger => {
                            slots.push(Generations::slot(database, &m.schema, &m.name));
                            oids.push(member);
                        }
                        Some(_) => return Err(BypassReason::NoTrigger),
                        None => return Err(BypassReason::UnknownTable),
                    }
                }
                Ok(())
            }
            b'v' => {
                // The body's names were bound when the view was made: judged as
                // any user's, never as shared across search paths.
                match self.views.get(&oid) {
                    Some(Ok(body)) => self
                        .routines
                        .check(body, false)
                        .map_err(|_| BypassReason::UnsafeView)?,
                    Some(Err(why)) => return Err(*why),
                    None => return Err(BypassReason::UnknownTable),
                }
                // DDL on the view itself is announced under its own name.
                slots.push(Generations::slot(database, &r.schema, &r.name));
                if r.reads.is_empty() {
                    return Ok(());
                }
                for base in &r.reads {
                    self.resolve_relation(database, *base, slots, oids, depth + 1)?;
                }
                Ok(())
            }
            b'm' => Err(BypassReason::MaterializedView),
            b'f' => Err(BypassReason::ForeignTable),
            _ => Err(BypassReason::NotATable),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::Cache;
    use crate::config::Config;

    fn rel(oid: u32, name: &str, kind: u8, trig: bool) -> Relation {
        Relation {
            oid,
            schema: "public".into(),
            name: name.into(),
            kind,
            row_security: false,
            has_trigger: trig,
            trigger_oid: if trig { oid + 1000 } else { 0 },
            shape: String::new(),
            reads: vec![],
            parents: vec![],
            children: vec![],
            columns: vec![],
            side_effects: false,
        }
    }

    #[test]
    fn resolution_rules() {
        let mut rels = vec![
            rel(1, "t", b'r', true),
            rel(2, "untracked", b'r', false),
            rel(3, "v", b'v', false),
            rel(4, "mv", b'm', false),
            rel(5, "parent", b'p', true),
            rel(6, "part1", b'r', true),
            rel(7, "rls", b'r', true),
            rel(8, "vnow", b'v', false),
            rel(9, "vfn", b'v', false),
        ];
        rels[2].reads = vec![1];
        rels[4].children = vec![6];
        rels[5].parents = vec![5];
        rels[6].row_security = true;
        let mut cat = Catalog::build(1, rels, HashSet::from(["safe_fn".to_string()]));
        cat.set_view_body(3, " SELECT t.a FROM t;");
        cat.set_view_body(8, " SELECT t.a FROM t WHERE (t.a > now());");
        cat.set_view_body(9, " SELECT f.x FROM stable_lookup(1) f(x);");
        let cache = Cache::new(&Config::default());
        let all: HashSet<u32> = (1..=7).collect();
        let r = |sql: &str| {
            cat.resolve("db", &cache.decide(sql.as_bytes()), &all, &mut Vec::new())
                .map(|(slots, _)| slots)
        };
        // Every result depends on the routines slot; an unqualified name also
        // on its name slot.
        assert_eq!(r("select * from t").unwrap().len(), 3);
        assert_eq!(r("select * from public.t").unwrap().len(), 2);
        assert_eq!(r("select * from untracked"), Err(BypassReason::NoTrigger));
        assert_eq!(
            r("select * from v").unwrap().len(),
            4,
            "view and its base table"
        );
        assert_eq!(r("select * from mv"), Err(BypassReason::MaterializedView));
        assert_eq!(
            r("select * from parent").unwrap().len(),
            4,
            "parent and partition"
        );
        assert_eq!(r("select * from part1").unwrap().len(), 4);
        assert_eq!(r("select * from rls"), Err(BypassReason::RowSecurity));
        assert_eq!(r("select * from vnow"), Err(BypassReason::UnsafeView));
        assert_eq!(
            r("select * from vfn"),
            Err(BypassReason::UnsafeView),
            "a function in a view's body is judged like one in the statement"
        );
        assert_eq!(r("select * from nowhere"), Err(BypassReason::UnknownTable));
        assert_eq!(r("select * from other.t"), Err(BypassReason::UnknownTable));
        assert!(r("select safe_fn(1) from t").is_ok());
        assert_eq!(
            r("with c as (select * from t) select * from c")
                .unwrap()
                .len(),
            4
        );
        assert_eq!(
            r("with t as (select * from t where id > 0) select * from t")
                .unwrap()
                .len(),
            3,
            "a CTE named like the table it reads still depends on the table"
        );
        assert!(r("select other_fn(1) from t").is_err());
        let mut unwatched = Vec::new();
        let none = HashSet::new();
        let res = cat.resolve(
            "db",
            &cache.decide(b"select * from parent"),
            &none,
            &mut unwatched,
        );
        assert_eq!(res, Err(BypassReason::NotWatched));
        unwatched.sort();
        assert_eq!(unwatched, vec![5, 6], "a watch covers the whole family");
    }
}
