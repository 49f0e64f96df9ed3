//! The FROM clause of a key lookup: the tables a read by key may select from,
//! one plain table or tables joined with `JOIN ... ON`, `USING`, `NATURAL`,
//! outer joins or commas.
//!
//! In a join, only a column qualified by its table's name or alias can be a
//! key (a bare `id` may be another table's, or under `USING (id)` a full
//! join's `COALESCE(a.id, b.id)`), and a join that renames its tables (an
//! alias on the join hides the names inside it) or a table named twice is not
//! keyed. Any kind of join will do: a WHERE conjunct `a.id = v` is false for
//! a row where `a` is NULL-extended, so every row of the result comes from a
//! row of `a` with `id = v`, and whether such a row is matched or unmatched
//! depends on the other tables only (which keep their table-level
//! dependencies).

use pg_query::protobuf::{Node, RangeVar};
use pg_query::NodeEnum;

use super::table_ref::TableRef;

/// Why a FROM clause has no table to key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NotTables {
    /// A subquery, a function, VALUES, or nothing: rows that are no table's.
    Other,
    /// A join that renames its tables, or names one twice.
    JoinShape,
}

/// A table in FROM, and the name its columns are qualified by.
pub struct FromTable<'a> {
    pub table: TableRef,
    pub qualifier: &'a str,
}

/// The tables of a FROM clause made of tables and joins only, in order.
pub fn from_tables(from: &[Node]) -> Result<Vec<FromTable<'_>>, NotTables> {
    let mut out = Vec::new();
    for item in from {
        walk(item, &mut out)?;
    }
    if out.is_empty() {
        return Err(NotTables::Other);
    }
    for (i, t) in out.iter().enumerate() {
        let twice = out[..i]
            .iter()
            .any(|o| o.qualifier == t.qualifier || o.table == t.table);
        if twice {
            return Err(NotTables::JoinShape);
        }
    }
    Ok(out)
}

fn walk<'a>(n: &'a Node, out: &mut Vec<FromTable<'a>>) -> Result<(), NotTables> {
    match &n.node {
        Some(NodeEnum::RangeVar(r)) => {
            out.push(from_table(r)?);
            Ok(())
        }
        Some(NodeEnum::JoinExpr(j)) => {
            if j.alias.is_some() || j.join_using_alias.is_some() {
                return Err(NotTables::JoinShape);
            }
            let (l, r) = (j.larg.as_deref(), j.rarg.as_deref());
            walk(l.ok_or(NotTables::JoinShape)?, out)?;
            walk(r.ok_or(NotTables::JoinShape)?, out)
        }
        // A subquery, a function, VALUES: rows that are no table's.
        _ => Err(NotTables::Other),
    }
}

fn from_table(r: &RangeVar) -> Result<FromTable<'_>, NotTables> {
    if !r.catalogname.is_empty() {
        return Err(NotTables::Other);
    }
    Ok(FromTable {
        table: TableRef {
            schema: (!r.schemaname.is_empty()).then(|| r.schemaname.clone()),
            name: r.relname.clone(),
        },
        qualifier: r
            .alias
            .as_ref()
            .map_or(r.relname.as_str(), |a| a.aliasname.as_str()),
    })
}
