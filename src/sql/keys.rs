//! Key lookups: statements whose result depends only on the rows of their one
//! table that have given values in some columns (`WHERE id = $1`, `WHERE a = $1
//! AND b = 'x'`, `WHERE id IN (1, 2)`, `WHERE id = ANY($1)`, whatever else the
//! WHERE clause, the select list or the grouping does with those rows).
//!
//! Such a result changes only when a row with one of those values is written
//! (inserted with it, deleted with it, or updated from or to it), so it can be
//! invalidated per key instead of per table. In a join, one table's rows may
//! be fixed so (`FROM a JOIN b ON .. WHERE a.id = $1`): that table is keyed,
//! the others stay table-level (see `keyfrom`). Anything else (ranges, scans,
//! subqueries, set operations, an OR at the top) stays table-level. Decided
//! once per statement text, from the parse tree.

use pg_query::protobuf::{a_const, AExpr, AExprKind, BoolExprType, SelectStmt, SetOperation};
use pg_query::protobuf::{Node, TypeName};
use pg_query::NodeEnum;

use super::keyfrom::{from_tables, NotTables};
use super::keyvalue::KeyType;
use super::table_ref::TableRef;

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
    /// The table whose rows the key selects, as named in FROM.
    pub table: TableRef,
    /// The statement joins other tables to it (which stay table-level).
    pub joined: bool,
    /// Key columns, sorted by name: the column set of the tag.
    pub columns: Vec<KeyColumn>,
}

/// Why a read is invalidated per table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TableLevel {
    /// Not tables in FROM (a subquery, a function, none), or a subquery
    /// elsewhere that reads a table.
    NotOneTable,
    /// A join that renames its tables (an alias on the join) or names one
    /// table twice.
    JoinShape,
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
            TableLevel::JoinShape => "join_shape",
            TableLevel::SetOperation => "set_operation",
            TableLevel::NoKeyEquality => "no_key_equality",
        }
    }
}

/// The key lookup a SELECT makes, if it makes one. `references`: how many
/// relation references the whole statement has (the caller has checked it has
/// no CTE); unless they are all FROM's, a subquery reads a table.
pub fn key_lookup(select: &SelectStmt, references: usize) -> Result<KeyLookup, TableLevel> {
    if select.op != SetOperation::SetopNone as i32 {
        return Err(TableLevel::SetOperation);
    }
    let tables = from_tables(&select.from_clause).map_err(|e| match e {
        NotTables::Other => TableLevel::NotOneTable,
        NotTables::JoinShape => TableLevel::JoinShape,
    })?;
    if tables.len() != references {
        return Err(TableLevel::NotOneTable);
    }
    let joined = tables.len() > 1;
    // The first table (in FROM order) that the WHERE clause fixes by key.
    for t in tables {
        let mut columns: Vec<KeyColumn> = Vec::new();
        for conjunct in conjuncts(select.where_clause.as_deref()) {
            let Some(NodeEnum::AExpr(e)) = &conjunct.node else {
                continue;
            };
            // Bare columns only when there is no other table to own them.
            let Some((column, values)) = equality(e, t.qualifier, !joined) else {
                continue;
            };
            // `a = $1 AND a = $2`: either value fixes the rows; keep the first.
            if !columns.iter().any(|c| c.column == column) {
                columns.push(KeyColumn { column, values });
            }
        }
        if !columns.is_empty() {
            columns.sort_by(|a, b| a.column.cmp(&b.column));
            return Ok(KeyLookup {
                table: t.table,
                joined,
                columns,
            });
        }
    }
    Err(TableLevel::NoKeyEquality)
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
    Ok(KeyLookup { columns, ..lookup })
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
fn equality(e: &AExpr, qualifier: &str, bare: bool) -> Option<(String, Vec<KeyValue>)> {
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
        if let (Some(c), Some(v)) = (column(l, qualifier, bare), value(r)) {
            return Some((c, vec![v]));
        }
        let (c, v) = (column(r, qualifier, bare)?, value(l)?);
        return Some((c, vec![v]));
    }
    if e.kind == AExprKind::AexprIn as i32 {
        let c = column(l, qualifier, bare)?;
        let Some(NodeEnum::List(list)) = &r.node else {
            return None;
        };
        let values: Option<Vec<KeyValue>> = list.items.iter().map(value).collect();
        return Some((c, values?));
    }
    // `<> ANY` is refused above, and `= ALL` is another kind.
    if e.kind == AExprKind::AexprOpAny as i32 {
        return Some((column(l, qualifier, bare)?, any_values(r)?));
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

/// A reference to a column of the table qualified as `qualifier` (or bare).
fn column(n: &Node, qualifier: &str, bare: bool) -> Option<String> {
    let Some(NodeEnum::ColumnRef(c)) = &n.node else {
        return None;
    };
    match c.fields.as_slice() {
        [col] if bare => string(col).map(str::to_string),
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
        crate::sql::analyze(sql).keys
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
    fn a_joined_table_fixed_by_its_own_columns_is_keyed() {
        let table = |name: &str| TableRef {
            schema: None,
            name: name.into(),
        };
        for (sql, keyed, col) in [
            (
                "select * from a join b on b.id = a.b_id where a.id = $1",
                "a",
                "id",
            ),
            (
                "select * from a x left join b on b.id = x.b_id where x.id = $1",
                "a",
                "id",
            ),
            (
                "select * from b right join a on b.id = a.b_id where b.k > 1 and a.id = any($1)",
                "a",
                "id",
            ),
            ("select * from a, b where b.n = 7 and a.n = b.n", "b", "n"),
            (
                "select * from a natural join b where b.id = $1 and a.id = $2",
                "a",
                "id",
            ),
            (
                "select * from a full join s.b using (id) where b.k = 'x'",
                "b",
                "k",
            ),
        ] {
            let l = lookup(sql).unwrap_or_else(|e| panic!("{sql}: {e:?}"));
            assert!(l.joined, "{sql}");
            assert_eq!(l.table.name, keyed, "{sql}");
            assert_eq!(cols(&l), [col], "{sql}");
        }
        let l = lookup("select * from public.a where id = 1").expect("key");
        assert!(!l.joined);
        assert_eq!(l.table.schema.as_deref(), Some("public"));
        assert_eq!(
            lookup("select * from t where id = 1").map(|l| l.table),
            Ok(table("t"))
        );
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
                "select * from t join u using (id) where id = $1",
                TableLevel::NoKeyEquality,
            ),
            (
                "select * from (t join u on t.x = u.y) j where t.id = $1",
                TableLevel::JoinShape,
            ),
            (
                "select * from t join u using (id) as j where t.id = $1",
                TableLevel::JoinShape,
            ),
            (
                "select * from t join t u on t.x = u.y where t.id = $1",
                TableLevel::JoinShape,
            ),
            (
                "select * from t x join u x on true where x.id = $1",
                TableLevel::JoinShape,
            ),
            (
                "select * from t join generate_series(1, 3) g on true where t.id = $1",
                TableLevel::NotOneTable,
            ),
            (
                "select * from t join (select * from u) s on true where t.id = $1",
                TableLevel::NotOneTable,
            ),
            (
                "select * from t join u on u.x in (select y from v) where t.id = $1",
                TableLevel::NotOneTable,
            ),
            (
                "select * from t join u on u.x = t.x where t.id = u.id",
                TableLevel::NoKeyEquality,
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
