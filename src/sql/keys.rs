//! Key lookups: statements whose result depends only on the rows of their one
//! table that have given values in some columns (`WHERE id = $1`, `WHERE a = $1
//! AND b = 'x'`, `WHERE id IN (1, 2)`, `WHERE id = ANY($1)`, whatever else the
//! WHERE clause, the select list or the grouping does with those rows).
//!
//! Such a result changes only when a row with one of those values is written
//! (inserted with it, deleted with it, or updated from or to it), so it can be
//! invalidated per key instead of per table. Anything else (ranges, scans,
//! joins, subqueries, set operations, an OR at the top) stays table-level.
//! Decided once per statement text, from the parse tree.

use pg_query::protobuf::{a_const, AExpr, AExprKind, BoolExprType, SelectStmt, SetOperation};
use pg_query::protobuf::{Node, TypeName};
use pg_query::NodeEnum;

use super::keyvalue::KeyType;

/// Where a key value comes from in the request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeyValue {
    /// Bind parameter `$number` (1-based), possibly cast (`$1::int8`).
    Param { number: u32, cast: Option<KeyType> },
    /// A literal in the text: `quoted` for a string constant (its type comes
    /// from the column, or from `cast`), otherwise a number or a boolean.
    Literal {
        text: String,
        quoted: bool,
        cast: Option<KeyType>,
    },
    /// An array parameter of `= ANY($1)` (`$1::int8[]`: `cast` is the element
    /// type); its elements are the values.
    ParamArray { number: u32, cast: Option<KeyType> },
    /// An array literal of `= ANY('{1,2}')` (`'{1,2}'::int8[]`), in Postgres's
    /// array text form.
    LiteralArray { text: String, cast: Option<KeyType> },
}

/// A column of the key and the values the statement asks for (several for IN).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyColumn {
    pub column: String,
    pub values: Vec<KeyValue>,
}

/// A statement that reads its table's rows by key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyLookup {
    /// Key columns, sorted by name: the column set of the tag.
    pub columns: Vec<KeyColumn>,
}

/// Why a read is invalidated per table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TableLevel {
    /// Not one plain table in FROM (a join, a subquery, a function, none).
    NotOneTable,
    /// UNION, INTERSECT or EXCEPT.
    SetOperation,
    /// No equality of a column to a value the request fixes, at the top of
    /// the WHERE clause (a range, LIKE, an OR, no WHERE at all).
    NoKeyEquality,
}

impl TableLevel {
    pub fn label(self) -> &'static str {
        match self {
            TableLevel::NotOneTable => "not_one_table",
            TableLevel::SetOperation => "set_operation",
            TableLevel::NoKeyEquality => "no_key_equality",
        }
    }
}

/// The key lookup a SELECT makes, if it makes one. The caller has checked that
/// the statement names exactly one relation and no CTE (so no subquery reads
/// another table, or the same one again).
pub fn key_lookup(select: &SelectStmt) -> Result<KeyLookup, TableLevel> {
    if select.op != SetOperation::SetopNone as i32 {
        return Err(TableLevel::SetOperation);
    }
    let [from] = select.from_clause.as_slice() else {
        return Err(TableLevel::NotOneTable);
    };
    let Some(NodeEnum::RangeVar(table)) = &from.node else {
        return Err(TableLevel::NotOneTable);
    };
    // A column may be written bare, or qualified by the alias or table name.
    let qualifier = table
        .alias
        .as_ref()
        .map_or(table.relname.as_str(), |a| a.aliasname.as_str());
    let mut columns: Vec<KeyColumn> = Vec::new();
    for conjunct in conjuncts(select.where_clause.as_deref()) {
        let Some(NodeEnum::AExpr(e)) = &conjunct.node else {
            continue;
        };
        let Some((column, values)) = equality(e, qualifier) else {
            continue;
        };
        // `a = $1 AND a = $2`: either value fixes the rows; keep the first.
        if !columns.iter().any(|c| c.column == column) {
            columns.push(KeyColumn { column, values });
        }
    }
    if columns.is_empty() {
        return Err(TableLevel::NoKeyEquality);
    }
    columns.sort_by(|a, b| a.column.cmp(&b.column));
    Ok(KeyLookup { columns })
}

/// The lookup without the key columns whose value is a parameter the statement
/// also uses elsewhere (`uses`: how often each `$n` appears). Postgres types a
/// parameter where it first meets it: in `SELECT $1::float8 .. WHERE id = $1`
/// `$1` is a float8, whose binary value read as the column's type would be
/// another number; only a parameter used once takes its type from its key
/// column (or its own cast).
pub fn single_use_params(
    lookup: KeyLookup,
    uses: impl Fn(u32) -> usize,
) -> Result<KeyLookup, TableLevel> {
    let columns: Vec<KeyColumn> = lookup
        .columns
        .into_iter()
        .filter(|c| {
            c.values.iter().all(|v| match v {
                KeyValue::Param { number, .. } | KeyValue::ParamArray { number, .. } => {
                    uses(*number) == 1
                }
                KeyValue::Literal { .. } | KeyValue::LiteralArray { .. } => true,
            })
        })
        .collect();
    if columns.is_empty() {
        return Err(TableLevel::NoKeyEquality);
    }
    Ok(KeyLookup { columns })
}

/// The top-level AND terms of a WHERE clause.
fn conjuncts(clause: Option<&Node>) -> Vec<&Node> {
    let Some(node) = clause else {
        return Vec::new();
    };
    match &node.node {
        Some(NodeEnum::BoolExpr(b)) if b.boolop == BoolExprType::AndExpr as i32 => {
            b.args.iter().flat_map(|a| conjuncts(Some(a))).collect()
        }
        _ => vec![node],
    }
}

/// `column = value`, `value = column`, `column IN (values)` or `column =
/// ANY(array)`.
fn equality(e: &AExpr, qualifier: &str) -> Option<(String, Vec<KeyValue>)> {
    let op = match e.name.as_slice() {
        [n] => string(n)?,
        [schema, n] if string(schema)? == "pg_catalog" => string(n)?,
        _ => return None,
    };
    if op != "=" {
        return None;
    }
    let (l, r) = (e.lexpr.as_deref()?, e.rexpr.as_deref()?);
    if e.kind == AExprKind::AexprOp as i32 {
        if let (Some(c), Some(v)) = (column(l, qualifier), value(r)) {
            return Some((c, vec![v]));
        }
        let (c, v) = (column(r, qualifier)?, value(l)?);
        return Some((c, vec![v]));
    }
    if e.kind == AExprKind::AexprIn as i32 {
        let c = column(l, qualifier)?;
        let Some(NodeEnum::List(list)) = &r.node else {
            return None;
        };
        let values: Option<Vec<KeyValue>> = list.items.iter().map(value).collect();
        return Some((c, values?));
    }
    // `<> ANY` is refused above, and `= ALL` is another kind.
    if e.kind == AExprKind::AexprOpAny as i32 {
        return Some((column(l, qualifier)?, any_values(r)?));
    }
    None
}

/// The right side of `= ANY(...)`: an array parameter, an array literal
/// (either possibly cast to an array of a key type), or `ARRAY[values]`.
/// Postgres types an uncast `$1` or `'{..}'` here as an array of the column's
/// type, as it does a scalar one; `ARRAY[...]` takes the common type of its
/// elements, which for the key types either is the type each element is
/// rendered as, or makes the statement fail (`ARRAY[$1, 2]` against an int8
/// column makes `$1` an int4: a binary int8 is refused by both).
fn any_values(n: &Node) -> Option<Vec<KeyValue>> {
    match &n.node {
        Some(NodeEnum::ParamRef(p)) => Some(vec![KeyValue::ParamArray {
            number: u32::try_from(p.number).ok()?,
            cast: None,
        }]),
        Some(NodeEnum::AConst(c)) => match c.val.as_ref()? {
            a_const::Val::Sval(s) => Some(vec![KeyValue::LiteralArray {
                text: s.sval.clone(),
                cast: None,
            }]),
            _ => None,
        },
        Some(NodeEnum::TypeCast(t)) => {
            let ty = array_cast_type(t.type_name.as_ref()?)?;
            match &t.arg.as_deref()?.node {
                Some(NodeEnum::ParamRef(p)) => Some(vec![KeyValue::ParamArray {
                    number: u32::try_from(p.number).ok()?,
                    cast: Some(ty),
                }]),
                Some(NodeEnum::AConst(c)) => match c.val.as_ref()? {
                    a_const::Val::Sval(s) => Some(vec![KeyValue::LiteralArray {
                        text: s.sval.clone(),
                        cast: Some(ty),
                    }]),
                    _ => None,
                },
                // `ARRAY[..]::int8[]` coerces its elements explicitly (a
                // numeric is rounded): not worth proving.
                _ => None,
            }
        }
        Some(NodeEnum::AArrayExpr(a)) if !a.elements.is_empty() => {
            a.elements.iter().map(value).collect()
        }
        _ => None,
    }
}

fn string(n: &Node) -> Option<&str> {
    match &n.node {
        Some(NodeEnum::String(s)) => Some(s.sval.as_str()),
        _ => None,
    }
}

/// A reference to a column of the statement's table.
fn column(n: &Node, qualifier: &str) -> Option<String> {
    let Some(NodeEnum::ColumnRef(c)) = &n.node else {
        return None;
    };
    match c.fields.as_slice() {
        [col] => string(col).map(str::to_string),
        [q, col] if string(q)? == qualifier => string(col).map(str::to_string),
        _ => None,
    }
}

/// A value fixed by the request: a parameter or a constant, possibly cast.
fn value(n: &Node) -> Option<KeyValue> {
    match &n.node {
        Some(NodeEnum::ParamRef(p)) => Some(KeyValue::Param {
            number: u32::try_from(p.number).ok()?,
            cast: None,
        }),
        Some(NodeEnum::AConst(c)) => {
            let (text, quoted) = match c.val.as_ref()? {
                a_const::Val::Ival(i) => (i.ival.to_string(), false),
                a_const::Val::Fval(f) => (f.fval.clone(), false),
                a_const::Val::Boolval(b) => (b.boolval.to_string(), false),
                a_const::Val::Sval(s) => (s.sval.clone(), true),
                a_const::Val::Bsval(_) => return None,
            };
            Some(KeyValue::Literal {
                text,
                quoted,
                cast: None,
            })
        }
        Some(NodeEnum::TypeCast(t)) => {
            let ty = cast_type(t.type_name.as_ref()?)?;
            match value(t.arg.as_deref()?)? {
                KeyValue::Param { number, cast: None } => Some(KeyValue::Param {
                    number,
                    cast: Some(ty),
                }),
                KeyValue::Literal {
                    text,
                    quoted,
                    cast: None,
                } => Some(KeyValue::Literal {
                    text,
                    quoted,
                    cast: Some(ty),
                }),
                // A cast of a cast may convert the value (`'7.9'::numeric::int`).
                _ => None,
            }
        }
        _ => None,
    }
}

/// The key type a cast names; only built-in names, no typmods or arrays.
fn cast_type(t: &TypeName) -> Option<KeyType> {
    if !t.array_bounds.is_empty() {
        return None;
    }
    type_name(t)
}

/// The element type of a cast to an array of a key type (`int8[]`; Postgres
/// reads `int8[][]` and `int8[3]` as the same type).
fn array_cast_type(t: &TypeName) -> Option<KeyType> {
    if t.array_bounds.is_empty() {
        return None;
    }
    type_name(t)
}

fn type_name(t: &TypeName) -> Option<KeyType> {
    if !t.typmods.is_empty() || t.setof || t.pct_type {
        return None;
    }
    let name = match t.names.as_slice() {
        [n] => string(n)?,
        [schema, n] if string(schema)? == "pg_catalog" => string(n)?,
        _ => return None,
    };
    Some(match name {
        "int2" | "smallint" => KeyType::Int2,
        "int4" | "int" | "integer" => KeyType::Int4,
        "int8" | "bigint" => KeyType::Int8,
        "text" | "varchar" => KeyType::Text,
        "uuid" => KeyType::Uuid,
        "bool" | "boolean" => KeyType::Bool,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lookup(sql: &str) -> Result<KeyLookup, TableLevel> {
        let parsed = pg_query::parse(sql, 0).expect("parses");
        let stmt = parsed.protobuf.stmts[0].stmt.as_ref().expect("stmt");
        let Some(NodeEnum::SelectStmt(s)) = &stmt.node else {
            panic!("not a select");
        };
        key_lookup(s)
    }

    fn param(number: u32) -> KeyValue {
        KeyValue::Param { number, cast: None }
    }

    fn cols(l: &KeyLookup) -> Vec<&str> {
        l.columns.iter().map(|c| c.column.as_str()).collect()
    }

    #[test]
    fn equalities_on_the_table_are_keys() {
        let l = lookup("select abalance from pgbench_accounts where aid = $1").expect("key");
        assert_eq!(l.columns[0].values, vec![param(1)]);
        let l = lookup("select * from t x where $2 = x.b and x.a = $1 and x.c > 3").expect("key");
        assert_eq!(cols(&l), vec!["a", "b"], "sorted, the range ignored");
        let l = lookup("select count(*) from orders where user_id = 7").expect("key");
        assert_eq!(
            l.columns[0].values,
            vec![KeyValue::Literal {
                text: "7".into(),
                quoted: false,
                cast: None
            }]
        );
        let l = lookup("select * from t where id in (1, '2', $3::bigint)").expect("key");
        assert_eq!(l.columns[0].values.len(), 3);
        assert_eq!(
            l.columns[0].values[2],
            KeyValue::Param {
                number: 3,
                cast: Some(KeyType::Int8)
            }
        );
        let l =
            lookup("select * from t where name = E'O\\'Brien' and t.v = $1::varchar").expect("key");
        assert_eq!(
            l.columns[0].values,
            vec![KeyValue::Literal {
                text: "O'Brien".into(),
                quoted: true,
                cast: None
            }]
        );
        assert_eq!(
            l.columns[1].values,
            vec![KeyValue::Param {
                number: 1,
                cast: Some(KeyType::Text)
            }]
        );
        let l = lookup("select * from t where t.id = '007'::int4").expect("key");
        assert!(matches!(
            &l.columns[0].values[0],
            KeyValue::Literal {
                quoted: true,
                cast: Some(KeyType::Int4),
                ..
            }
        ));
    }

    #[test]
    fn any_of_an_array_is_a_key() {
        let l = lookup("select * from t where id = any($1)").expect("key");
        assert_eq!(
            l.columns[0].values,
            vec![KeyValue::ParamArray {
                number: 1,
                cast: None
            }]
        );
        let l = lookup("select * from t where t.id = some($2::bigint[])").expect("key");
        assert_eq!(
            l.columns[0].values,
            vec![KeyValue::ParamArray {
                number: 2,
                cast: Some(KeyType::Int8)
            }]
        );
        let l = lookup("select * from t where id = any('{1,2}'::int[][]) and x > 1").expect("key");
        assert_eq!(
            l.columns[0].values,
            vec![KeyValue::LiteralArray {
                text: "{1,2}".into(),
                cast: Some(KeyType::Int4)
            }]
        );
        let l = lookup("select * from t where id = any('{1,2}')").expect("key");
        assert!(matches!(
            &l.columns[0].values[..],
            [KeyValue::LiteralArray { cast: None, .. }]
        ));
        let l = lookup("select * from t where id = any(array[1, $2, '3'])").expect("key");
        assert_eq!(l.columns[0].values.len(), 3);
        assert_eq!(l.columns[0].values[1], param(2));
    }

    #[test]
    fn everything_else_is_table_level() {
        for (sql, why) in [
            ("select * from t", TableLevel::NoKeyEquality),
            ("select * from t where id > $1", TableLevel::NoKeyEquality),
            (
                "select * from t where id = $1 or id = $2",
                TableLevel::NoKeyEquality,
            ),
            (
                "select * from t where name like $1",
                TableLevel::NoKeyEquality,
            ),
            (
                "select * from t where id = other",
                TableLevel::NoKeyEquality,
            ),
            (
                "select * from t where other.id = $1",
                TableLevel::NoKeyEquality,
            ),
            (
                "select * from t where id = $1::numeric",
                TableLevel::NoKeyEquality,
            ),
            (
                "select * from t where id = '7.9'::numeric::int",
                TableLevel::NoKeyEquality,
            ),
            (
                "select * from t where id = lower($1)",
                TableLevel::NoKeyEquality,
            ),
            (
                "select * from t where name = $1 collate \"C\"",
                TableLevel::NoKeyEquality,
            ),
            (
                "select * from t where name collate \"C\" = $1",
                TableLevel::NoKeyEquality,
            ),
            (
                "select * from t where name = $1::varchar(3)",
                TableLevel::NoKeyEquality,
            ),
            (
                "select * from t where name = 'x'::name",
                TableLevel::NoKeyEquality,
            ),
            (
                "select * from t where id <> any($1)",
                TableLevel::NoKeyEquality,
            ),
            (
                "select * from t where id = all($1)",
                TableLevel::NoKeyEquality,
            ),
            (
                "select * from t where id = any($1::int)",
                TableLevel::NoKeyEquality,
            ),
            (
                "select * from t where id = any($1::numeric[])",
                TableLevel::NoKeyEquality,
            ),
            (
                "select * from t where id = any(array[array[1]])",
                TableLevel::NoKeyEquality,
            ),
            (
                "select * from t where id = any(array[1, 2]::int8[])",
                TableLevel::NoKeyEquality,
            ),
            (
                "select * from t where id = any(array[1, other])",
                TableLevel::NoKeyEquality,
            ),
            (
                "select * from t where id = any(other_ids)",
                TableLevel::NoKeyEquality,
            ),
            (
                "select * from t where $1 = any(ids)",
                TableLevel::NoKeyEquality,
            ),
            (
                "select * from t where id = any(select 1)",
                TableLevel::NoKeyEquality,
            ),
            (
                "select * from t, u where t.id = $1",
                TableLevel::NotOneTable,
            ),
            (
                "select * from t join u using (id) where id = $1",
                TableLevel::NotOneTable,
            ),
            ("select 1 where 1 = $1", TableLevel::NotOneTable),
            (
                "select id from t where id = $1 union select id from t",
                TableLevel::SetOperation,
            ),
        ] {
            assert_eq!(lookup(sql), Err(why), "{sql}");
        }
    }
}
