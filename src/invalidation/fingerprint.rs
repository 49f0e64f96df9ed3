//! Everything besides rows that decides what a query returns to a role, read
//! as checksums so the listener can tell when it changed: per relation its
//! owner, privileges (table and column), row security and policies, view or
//! rule definition, options, and inheritance or partition place; and per
//! database the roles, their memberships and attributes, which no event
//! trigger reports since roles are cluster-wide objects.
//!
//! A change found here kills the affected entries in every pgtier: it is
//! announced on the notification channel (`d[...]` or `*`), never applied only
//! locally, because L2 keys derive from the notification stream and every
//! instance must derive the same ones.

use std::collections::{HashMap, HashSet};

use tokio_postgres::Client;

use super::catalog::Catalog;
use super::payload::QualifiedName;

/// Per relation (the same relations as the catalog reads): a checksum of what,
/// besides its rows and columns, can change a result read through it.
const RELATIONS: &str = "
SELECT c.oid::int8, md5(ROW(
    c.relkind, c.relowner, c.relacl, c.relrowsecurity, c.relforcerowsecurity, c.reloptions,
    c.relispartition, pg_get_expr(c.relpartbound, c.oid),
    (SELECT array_agg(i.inhparent ORDER BY i.inhseqno) FROM pg_inherits i WHERE i.inhrelid = c.oid),
    (SELECT array_agg(i.inhrelid ORDER BY i.inhrelid) FROM pg_inherits i WHERE i.inhparent = c.oid),
    (SELECT array_agg(ROW(a.attnum, a.attacl)::text ORDER BY a.attnum)
       FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attacl IS NOT NULL),
    (SELECT array_agg(ROW(p.polname, p.polcmd, p.polpermissive, p.polroles,
                          pg_get_expr(p.polqual, p.polrelid), pg_get_expr(p.polwithcheck, p.polrelid))::text
                      ORDER BY p.polname)
       FROM pg_policy p WHERE p.polrelid = c.oid),
    (SELECT array_agg(ROW(r.rulename, r.ev_type, r.ev_enabled, md5(r.ev_qual::text), md5(r.ev_action::text))::text
                      ORDER BY r.rulename)
       FROM pg_rewrite r WHERE r.ev_class = c.oid)
  )::text)
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f')
  AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'pgtier')
  AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp%'";

/// Roles (cluster-wide: no event trigger fires for them), and whether both of
/// pgtier's event triggers are in place; without them, also the privileges of
/// everything in this database, so privilege changes are found at this poll's
/// pace rather than at the (slower, costlier) catalog rescan's.
///
/// Only changes can narrow what a role sees, not additions: a new role, table
/// or function has no entries yet. So that other tenants' role and table churn
/// does not flush this cache, roles are also summed up to the highest oid of
/// the previous look (`$1`), and only rows that carry privileges or row
/// security are summed (new objects have none until granted); temporary and
/// system relations never count.
const GLOBAL: &str = "
WITH et AS (
  SELECT count(*) = 2 AS ok FROM pg_event_trigger
  WHERE evtname IN ('pgtier_ddl', 'pgtier_drop') AND evtenabled = 'A')
SELECT md5(ROW(
    (SELECT array_agg(m::text ORDER BY m::text) FROM pg_auth_members m),
    (SELECT array_agg(s::text ORDER BY s::text) FROM pg_db_role_setting s)
  )::text),
  (SELECT md5(array_agg(ROW(r.oid, r.rolname, r.rolsuper, r.rolinherit, r.rolbypassrls, r.rolcanlogin)::text
                        ORDER BY r.oid)::text) FROM pg_roles r WHERE r.oid::int8 <= $1::int8),
  (SELECT md5(array_agg(ROW(r.oid, r.rolname, r.rolsuper, r.rolinherit, r.rolbypassrls, r.rolcanlogin)::text
                        ORDER BY r.oid)::text) FROM pg_roles r),
  (SELECT max(r.oid::int8) FROM pg_roles r),
  et.ok,
  CASE WHEN et.ok THEN '' ELSE md5(ROW(
    (SELECT array_agg(ROW(n.oid, n.nspname, n.nspacl)::text ORDER BY n.oid)
       FROM pg_namespace n WHERE n.nspacl IS NOT NULL),
    (SELECT array_agg(ROW(c.oid, c.relacl, c.relrowsecurity, c.relforcerowsecurity)::text ORDER BY c.oid)
       FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
       WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f')
         AND (c.relacl IS NOT NULL OR c.relrowsecurity OR c.relforcerowsecurity)
         AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'pgtier')
         AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp%'),
    (SELECT array_agg(ROW(a.attrelid, a.attnum, a.attacl)::text ORDER BY a.attrelid, a.attnum)
       FROM pg_attribute a WHERE a.attacl IS NOT NULL),
    (SELECT array_agg(ROW(p.oid, p.proacl)::text ORDER BY p.oid) FROM pg_proc p WHERE p.proacl IS NOT NULL),
    (SELECT array_agg(p::text ORDER BY p.oid) FROM pg_policy p)
  )::text) END
FROM et";

/// Per-relation checksums, by oid.
pub type Relations = HashMap<u32, String>;

pub async fn relations(client: &Client) -> Result<Relations, tokio_postgres::Error> {
    Ok(client
        .query(RELATIONS, &[])
        .await?
        .iter()
        .map(|r| (r.get::<_, i64>(0) as u32, r.get::<_, String>(1)))
        .collect())
}

/// The database-wide state `GLOBAL` reads.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Global {
    /// Memberships and per-role settings.
    pub members: String,
    /// Roles up to the previous look's highest oid.
    pub roles_before: String,
    /// All roles, and the highest oid among them.
    pub roles: String,
    pub max_role: i64,
    pub event_triggers: bool,
    /// Privileges of everything, read only while event triggers are missing.
    pub access: String,
}

impl Global {
    /// Whether `now` may let some role see more or less than at `self`.
    pub fn changed(&self, now: &Global) -> bool {
        self.members != now.members
            || self.roles != now.roles_before
            || self.event_triggers != now.event_triggers
            || self.access != now.access
    }
}

/// Read the state; `last` is the previous look's, if any.
pub async fn global(
    client: &Client,
    last: Option<&Global>,
) -> Result<Global, tokio_postgres::Error> {
    let bound = last.map_or(i64::MAX, |g| g.max_role);
    let row = client.query_one(GLOBAL, &[&bound]).await?;
    let text = |i: usize| row.get::<_, Option<String>>(i).unwrap_or_default();
    Ok(Global {
        members: text(0),
        roles_before: text(1),
        roles: text(2),
        max_role: row.get::<_, Option<i64>>(3).unwrap_or(0),
        event_triggers: row.get::<_, Option<bool>>(4).unwrap_or(false),
        access: text(5),
    })
}

/// What the listener remembers between polls.
#[derive(Debug, Default)]
pub struct Tracked {
    pub relations: Relations,
    pub global: Option<Global>,
    /// Tables whose triggers the control role may not install: not retried
    /// until the listener reconnects.
    pub refused: HashSet<u32>,
}

/// Relations whose cached results may have changed between two catalog reads.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// Old and new names of everything that changed: their entries must go.
    pub names: Vec<QualifiedName>,
    /// Old names of tables whose trigger went or was replaced: their watch is
    /// void.
    pub triggers: Vec<QualifiedName>,
}

/// Compare two catalog reads. A relation changed when it was dropped, renamed
/// or moved, changed columns, kind, row security, trigger, or checksum. A new
/// relation also counts as a change of every relation of the same name, which
/// an unqualified name may have resolved to before and may not now.
pub fn compare(old: &Catalog, old_fp: &Relations, new: &Catalog, new_fp: &Relations) -> Changes {
    let mut c = Changes::default();
    let name = |s: &str, n: &str| (s.to_string(), n.to_string());
    for r in &old.relations {
        let Some(n) = new.get(r.oid) else {
            c.names.push(name(&r.schema, &r.name));
            c.triggers.push(name(&r.schema, &r.name));
            continue;
        };
        let trigger_same = n.has_trigger == r.has_trigger && n.trigger_oid == r.trigger_oid;
        // A relation that gained or lost an inheritance parent or child: its
        // reads cover other rows now (and a table read by key is no longer a
        // plain table).
        let family_same = |a: &[u32], b: &[u32]| {
            let (mut a, mut b) = (a.to_vec(), b.to_vec());
            a.sort_unstable();
            b.sort_unstable();
            a == b
        };
        let same = trigger_same
            && family_same(&n.parents, &r.parents)
            && family_same(&n.children, &r.children)
            && n.schema == r.schema
            && n.name == r.name
            && n.kind == r.kind
            && n.shape == r.shape
            && n.row_security == r.row_security
            && old_fp.get(&r.oid) == new_fp.get(&r.oid);
        if !same {
            c.names.push(name(&r.schema, &r.name));
            c.names.push(name(&n.schema, &n.name));
        }
        if !trigger_same {
            c.triggers.push(name(&r.schema, &r.name));
        }
    }
    for n in new.relations.iter().filter(|n| old.get(n.oid).is_none()) {
        c.names.push(name(&n.schema, &n.name));
        for r in old.relations.iter().filter(|r| r.name == n.name) {
            c.names.push(name(&r.schema, &r.name));
        }
    }
    c.names.sort();
    c.names.dedup();
    c
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::invalidation::catalog::Relation;

    fn rel(oid: u32, schema: &str, name: &str) -> Relation {
        Relation {
            oid,
            schema: schema.into(),
            name: name.into(),
            kind: b'r',
            row_security: false,
            has_trigger: true,
            trigger_oid: oid + 1000,
            shape: "s".into(),
            reads: vec![],
            parents: vec![],
            children: vec![],
            columns: vec![],
            side_effects: false,
        }
    }

    fn cat(rels: Vec<Relation>) -> Catalog {
        Catalog::build(1, rels, HashSet::new())
    }

    fn names(v: &[(&str, &str)]) -> Vec<QualifiedName> {
        let mut v: Vec<QualifiedName> = v
            .iter()
            .map(|(s, n)| (s.to_string(), n.to_string()))
            .collect();
        v.sort();
        v
    }

    #[test]
    fn a_table_that_gains_a_child_changed() {
        let old = cat(vec![rel(1, "public", "kv")]);
        let mut kv = rel(1, "public", "kv");
        kv.children = vec![2];
        let mut child = rel(2, "public", "c");
        child.parents = vec![1];
        let new = cat(vec![kv, child]);
        let c = compare(&old, &Relations::default(), &new, &Relations::default());
        assert!(
            c.names.contains(&("public".to_string(), "kv".to_string())),
            "{c:?}"
        );
    }

    #[test]
    fn new_roles_alone_are_no_change() {
        let last = Global {
            members: "m".into(),
            roles_before: "x".into(),
            roles: "r1".into(),
            max_role: 10,
            event_triggers: true,
            access: String::new(),
        };
        // A role added: the sum up to oid 10 is what it was.
        let added = Global {
            roles_before: "r1".into(),
            roles: "r2".into(),
            max_role: 11,
            ..last.clone()
        };
        assert!(!last.changed(&added));
        // An existing role altered (or dropped), a membership, privileges.
        assert!(last.changed(&Global {
            roles_before: "other".into(),
            ..added.clone()
        }));
        assert!(last.changed(&Global {
            members: "m2".into(),
            ..added.clone()
        }));
        assert!(last.changed(&Global {
            access: "a".into(),
            ..added.clone()
        }));
        assert!(last.changed(&Global {
            event_triggers: false,
            ..added
        }));
    }

    #[test]
    fn changes_are_found_by_oid() {
        let old = cat(vec![rel(1, "public", "r"), rel(2, "public", "keep")]);
        let fp: Relations = [(1, "a".into()), (2, "b".into())].into();
        assert_eq!(compare(&old, &fp, &old, &fp), Changes::default());

        // Renamed: both names go, the watch stays.
        let renamed = cat(vec![rel(1, "public", "r2"), rel(2, "public", "keep")]);
        let c = compare(&old, &fp, &renamed, &fp);
        assert_eq!(c.names, names(&[("public", "r"), ("public", "r2")]));
        assert!(c.triggers.is_empty());

        // A privilege, policy or partition change shows in the checksum only.
        let mut fp2 = fp.clone();
        fp2.insert(2, "changed".into());
        let c = compare(&old, &fp, &old, &fp2);
        assert_eq!(c.names, names(&[("public", "keep")]));

        // Row security switched on.
        let mut rls = rel(2, "public", "keep");
        rls.row_security = true;
        let c = compare(&old, &fp, &cat(vec![rel(1, "public", "r"), rls]), &fp);
        assert_eq!(c.names, names(&[("public", "keep")]));

        // Trigger replaced: watch void too.
        let mut t = rel(1, "public", "r");
        t.trigger_oid = 99;
        let c = compare(&old, &fp, &cat(vec![t, rel(2, "public", "keep")]), &fp);
        assert_eq!(c.triggers, names(&[("public", "r")]));

        // Rename swap: r_new (3) takes r's name; a new table shadows `keep`.
        let old = cat(vec![rel(1, "public", "r"), rel(3, "public", "r_new")]);
        let new = cat(vec![
            rel(1, "public", "r_old"),
            rel(3, "public", "r"),
            rel(4, "app", "r_new"),
        ]);
        let c = compare(&old, &Relations::new(), &new, &Relations::new());
        assert_eq!(
            c.names,
            names(&[
                ("app", "r_new"),
                ("public", "r"),
                ("public", "r_new"),
                ("public", "r_old"),
            ])
        );

        // Dropped.
        let c = compare(&old, &fp, &cat(vec![rel(3, "public", "r_new")]), &fp);
        assert_eq!(c.names, names(&[("public", "r")]));
        assert_eq!(c.triggers, names(&[("public", "r")]));
    }
}
