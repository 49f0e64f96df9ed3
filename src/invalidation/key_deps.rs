//! What a read by key depends on (key-level invalidation, issue 14).
//!
//! Every table has two generation slots: its table slot, bumped by every write
//! (which reads that scan the table depend on), and its *whole* slot, bumped
//! only by what changes the table as a whole (TRUNCATE, DDL, a write too large
//! to report keys, its announcing switched off). A read of a table by key
//! depends on the whole slot and on one slot per key it asks for, derived from
//! (database, table, column set, values), instead of the table slot (in a
//! join, the other tables keep theirs); a write that reports its keys bumps
//! the table slot and those key slots, so reads of other keys stay cached.
//!
//! A column set is used only once this instance has registered it with the
//! table's triggers and every writer that might not report it has ended
//! (`live`); until then the read stays table-level and asks for the
//! registration (`take_requests`). With the logical source a column set is
//! live once its registration message comes through the stream (see
//! `logical::register`), so every instance uses the same sets at the same
//! stream position.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;

use super::catalog::Catalog;
use super::generations::Generations;
use crate::sql::keys::{KeyLookup, KeyValue};
use crate::sql::keyvalue::{self, KeyType, Refusal};
use crate::sql::TableRef;

/// More key tuples than this (an IN list crossed with another) and the read
/// stays table-level.
const MAX_TUPLES: usize = 64;

/// A table's columns by which reads select rows, registered with its triggers.
pub type ColumnSet = Vec<String>;

/// Key-level state of one database.
#[derive(Default)]
pub struct KeyState {
    /// `invalidation.key_level`.
    pub enabled: AtomicBool,
    /// Column sets whose keys writes report, per table oid.
    live: ArcSwap<HashMap<u32, Vec<ColumnSet>>>,
    /// Changes whenever `live` does: resolutions made before are stale.
    pub version: AtomicU64,
    /// How many times `live` was emptied (`forget`).
    resets: AtomicU64,
    /// Column sets reads wanted that are not live yet.
    requests: Mutex<HashSet<(u32, ColumnSet)>>,
    /// A request was added that the listener has not been woken for.
    pending: AtomicBool,
}

impl KeyState {
    pub fn is_live(&self, oid: u32, cols: &[String]) -> bool {
        self.live
            .load()
            .get(&oid)
            .is_some_and(|sets| sets.iter().any(|s| s == cols))
    }

    /// Writes to `oid` now report the keys of `cols`.
    pub fn mark_live(&self, oid: u32, cols: ColumnSet) {
        let mut map = (**self.live.load()).clone();
        let sets = map.entry(oid).or_default();
        if !sets.contains(&cols) {
            sets.push(cols);
        }
        self.live.store(Arc::new(map));
        self.version.fetch_add(1, Ordering::AcqRel);
    }

    /// Forget every live column set (the listener reconnected, or the
    /// triggers were reinstalled): each is registered afresh when read again.
    /// Returns the tables that had live sets.
    pub fn forget(&self) -> Vec<u32> {
        let was = self.live.swap(Arc::new(HashMap::new()));
        self.resets.fetch_add(1, Ordering::AcqRel);
        self.version.fetch_add(1, Ordering::AcqRel);
        was.keys().copied().collect()
    }

    /// How many times the live sets were forgotten: a registration sent
    /// before the last time must be sent again.
    pub fn resets(&self) -> u64 {
        self.resets.load(Ordering::Acquire)
    }

    /// How many column sets are live for `oid`, and for every table.
    pub fn counts(&self, oid: u32) -> (usize, usize) {
        let live = self.live.load();
        let of = live.get(&oid).map_or(0, Vec::len);
        (of, live.values().map(Vec::len).sum())
    }

    /// Forget the live column sets of the tables `keep` refuses (dropped, or
    /// an oid now naming another table).
    pub fn retain(&self, keep: impl Fn(u32) -> bool) {
        let live = self.live.load();
        if live.keys().all(|oid| keep(*oid)) {
            return;
        }
        let map = live
            .iter()
            .filter(|(oid, _)| keep(**oid))
            .map(|(oid, sets)| (*oid, sets.clone()))
            .collect();
        self.live.store(Arc::new(map));
        self.version.fetch_add(1, Ordering::AcqRel);
    }

    /// The live column sets of `oid`.
    pub fn sets(&self, oid: u32) -> Vec<ColumnSet> {
        self.live.load().get(&oid).cloned().unwrap_or_default()
    }

    /// Whether any column set of `oid` is live (its writes report keys).
    pub fn keyed(&self, oid: u32) -> bool {
        self.live.load().contains_key(&oid)
    }

    fn request(&self, oid: u32, cols: ColumnSet) {
        if let Ok(mut r) = self.requests.lock() {
            if r.insert((oid, cols)) {
                self.pending.store(true, Ordering::Release);
            }
        }
    }

    /// Whether requests were added since the last call (wake the listener).
    pub fn take_pending_notice(&self) -> bool {
        self.pending.swap(false, Ordering::AcqRel)
    }

    /// Column sets requested since the last call.
    pub fn take_requests(&self) -> Vec<(u32, ColumnSet)> {
        self.requests
            .lock()
            .map(|mut r| r.drain().collect())
            .unwrap_or_default()
    }
}

/// How a read by key depends on its table, fixed per statement text.
#[derive(Debug)]
pub struct KeyPlan {
    /// The table slot (every write) the read would otherwise depend on.
    pub table_slot: u32,
    /// The table's whole slot (writes that report no keys).
    pub whole_slot: u32,
    pub schema: String,
    pub table: String,
    /// Key columns (sorted by name) and their types.
    pub columns: Vec<(String, KeyType)>,
    /// Per column, where its values come from in the request.
    pub values: Vec<Vec<KeyValue>>,
}

/// The key plan of a resolved read (`refs`: the relations it names, `tables`:
/// the tables it reads), if its lookup can be keyed; a column set not yet
/// live is requested and the read stays table-level. `fell_back` gets the
/// reason a keyable lookup is left table-level for its columns or the
/// catalog (the caller counts it once per statement and catalog).
pub fn plan(
    database: &str,
    catalog: &Catalog,
    state: &KeyState,
    lookup: &KeyLookup,
    refs: &[TableRef],
    tables: &[u32],
    fell_back: &mut Option<&'static str>,
) -> Option<KeyPlan> {
    let mut fallback = |reason: &'static str| *fell_back = Some(reason);
    // The statement must name the table itself: through a view, its columns
    // are the view's (renamed, grouped, computed), not the table's.
    let [oid] = catalog.named(&lookup.table)[..] else {
        return None;
    };
    if !tables.contains(&oid) {
        return None;
    }
    // An `=` of the user's may be the one the statement's `=` means.
    if catalog.routines.key_equality() {
        return None;
    }
    let r = catalog.get(oid)?;
    let table_slot = Generations::slot(database, &r.schema, &r.name);
    // The read keeps every dependency but the table's own slot: no other
    // reference may read the table (another spelling of its name, a view over
    // it), and no other dependency may share its slot (a collision would drop
    // it with the table's).
    let mut others = vec![Generations::routines_slot(database)];
    for t in refs {
        if t.schema.is_none() {
            others.push(Generations::name_slot(database, &t.name));
        }
        if *t == lookup.table {
            continue;
        }
        let (slots, oids) = catalog.reference_deps(database, t)?;
        if oids.contains(&oid) {
            fallback("read_again");
            return None;
        }
        others.extend(slots);
    }
    if others.contains(&table_slot) {
        fallback("slot_shared");
        return None;
    }
    // Plain tables only: writes to a partition or an inheritance child would
    // change the parent's rows under another table's triggers.
    if r.kind != b'r' || !r.parents.is_empty() || !r.children.is_empty() {
        return None;
    }
    let mut columns = Vec::with_capacity(lookup.columns.len());
    for c in &lookup.columns {
        let (_, ty, deterministic) = r.columns.iter().find(|(n, _, _)| *n == c.column)?;
        // `char(n)` (pads and trims), `name`, `citext`, domains: not key types.
        let Some(ty) = KeyType::from_oid(*ty) else {
            fallback("column_type");
            return None;
        };
        // Under a nondeterministic collation `=` matches other spellings
        // ('A' = 'a' case-insensitively), which a write reports as themselves.
        if !deterministic {
            fallback("collation");
            return None;
        }
        columns.push((c.column.clone(), ty));
    }
    let cols: ColumnSet = columns.iter().map(|(n, _)| n.clone()).collect();
    if !state.is_live(oid, &cols) {
        state.request(oid, cols);
        return None;
    }
    Some(KeyPlan {
        table_slot,
        whole_slot: Generations::whole_slot(database, &r.schema, &r.name),
        schema: r.schema.clone(),
        table: r.name.clone(),
        columns,
        values: lookup.columns.iter().map(|c| c.values.clone()).collect(),
    })
}

/// The request's parameters, to read key values from.
pub trait Params {
    /// Parameter `number` (1-based): binary or text, its value (None: NULL),
    /// and the type the client declared for it (0: none).
    fn param(&self, number: u32) -> Option<(bool, Option<&[u8]>, u32)>;
}

/// No parameters (a simple query).
pub struct NoParams;

impl Params for NoParams {
    fn param(&self, _: u32) -> Option<(bool, Option<&[u8]>, u32)> {
        None
    }
}

/// The type a parameter is read as: the one the client declared (`declared`
/// maps a type OID), else its cast, else the column's (Postgres types an
/// uncast parameter compared with a column as the column). None when the
/// values would not compare with the column's as Postgres prints them.
fn param_type(
    column: KeyType,
    declared: u32,
    cast: Option<KeyType>,
    from_oid: fn(u32) -> Option<KeyType>,
) -> Option<KeyType> {
    let ty = match declared {
        0 => cast.unwrap_or(column),
        oid => from_oid(oid)?,
    };
    ty.compares_with(column).then_some(ty)
}

/// The canonical values of one key value for a column of type `column` (one,
/// or an array's elements), added to `out`; refused if any cannot be rendered.
fn render(
    column: KeyType,
    v: &KeyValue,
    params: &dyn Params,
    out: &mut Vec<String>,
) -> Result<(), Refusal> {
    let unreadable = Refusal::Unreadable;
    // NULL matches no row, and neither does a NULL element: such a read is
    // left table-level all the same.
    let param = |number: u32| match params.param(number) {
        None => Err(unreadable),
        Some((_, None, _)) => Err(Refusal::Null),
        Some((binary, Some(value), declared)) => Ok((binary, value, declared)),
    };
    let room = MAX_TUPLES.checked_sub(out.len()).ok_or(Refusal::TooMany)?;
    match v {
        KeyValue::Param { number, cast } => {
            let (binary, value, declared) = param(*number)?;
            let ty = param_type(column, declared, *cast, KeyType::from_oid).ok_or(unreadable)?;
            let v = if binary {
                keyvalue::from_binary(ty, value)
            } else {
                keyvalue::from_text(ty, value)
            };
            out.push(v.ok_or(unreadable)?);
        }
        KeyValue::Literal { text, quoted, cast } => {
            // A string constant takes the column's type, and so is a bare
            // number or boolean read (refused below if not of that kind).
            let ty = cast.unwrap_or(column);
            let bare_non_bool = !quoted
                && cast.is_none()
                && column == KeyType::Bool
                && text != "true"
                && text != "false";
            // A number made text prints as its type does: `1e3::text` is
            // '1000', `.5::text` '0.5'.
            let number_as_text = !quoted && ty == KeyType::Text;
            if !ty.compares_with(column) || bare_non_bool || number_as_text {
                return Err(unreadable);
            }
            out.push(keyvalue::from_text(ty, text.as_bytes()).ok_or(unreadable)?);
        }
        KeyValue::ParamArray { number, cast } => {
            let (binary, value, declared) = param(*number)?;
            let ty =
                param_type(column, declared, *cast, KeyType::from_array_oid).ok_or(unreadable)?;
            out.extend(if binary {
                keyvalue::array_from_binary(ty, value, room)
            } else {
                keyvalue::array_from_text(ty, value, room)
            }?);
        }
        KeyValue::LiteralArray { text, cast } => {
            let ty = cast.unwrap_or(column);
            if !ty.compares_with(column) {
                return Err(unreadable);
            }
            out.extend(keyvalue::array_from_text(ty, text.as_bytes(), room)?);
        }
    }
    Ok(())
}

/// The key slots a read depends on, given its request's values; refused when
/// a value cannot be rendered (the read then stays table-level). `utf8`: the
/// session's client and server encodings are both UTF-8, so a text key's
/// bytes as the request gives them are the bytes a write reports.
pub fn key_slots(
    database: &str,
    plan: &KeyPlan,
    params: &dyn Params,
    utf8: bool,
) -> Result<Vec<u32>, Refusal> {
    if !utf8 && plan.columns.iter().any(|(_, ty)| *ty == KeyType::Text) {
        return Err(Refusal::Encoding);
    }
    let mut per_column: Vec<Vec<String>> = Vec::with_capacity(plan.columns.len());
    for ((_, ty), values) in plan.columns.iter().zip(&plan.values) {
        let mut rendered = Vec::with_capacity(values.len());
        for v in values {
            render(*ty, v, params, &mut rendered)?;
        }
        per_column.push(rendered);
    }
    let total = per_column
        .iter()
        .try_fold(1usize, |n, vals| n.checked_mul(vals.len()))
        .filter(|n| *n <= MAX_TUPLES)
        .ok_or(Refusal::TooMany)?;
    if total == 0 {
        return Err(Refusal::Unreadable);
    }
    let cols: Vec<&str> = plan.columns.iter().map(|(n, _)| n.as_str()).collect();
    let mut slots = Vec::with_capacity(total);
    let mut index = vec![0usize; per_column.len()];
    loop {
        let tuple: Vec<&str> = index
            .iter()
            .zip(&per_column)
            .map(|(i, vals)| vals[*i].as_str())
            .collect();
        slots.push(Generations::key_slot(
            database,
            &plan.schema,
            &plan.table,
            &cols,
            &tuple,
        ));
        // Next tuple of the cross product.
        let mut k = 0;
        loop {
            if k == index.len() {
                return Ok(slots);
            }
            index[k] += 1;
            if index[k] < per_column[k].len() {
                break;
            }
            index[k] = 0;
            k += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Args(Vec<(bool, Option<Vec<u8>>, u32)>);

    impl Params for Args {
        fn param(&self, n: u32) -> Option<(bool, Option<&[u8]>, u32)> {
            let (b, v, t) = self.0.get(n.checked_sub(1)? as usize)?;
            Some((*b, v.as_deref(), *t))
        }
    }

    fn plan_of(values: Vec<Vec<KeyValue>>, columns: Vec<(&str, KeyType)>) -> KeyPlan {
        KeyPlan {
            table_slot: 1,
            whole_slot: 2,
            schema: "public".into(),
            table: "t".into(),
            columns: columns.into_iter().map(|(n, t)| (n.into(), t)).collect(),
            values,
        }
    }

    fn p(number: u32) -> KeyValue {
        KeyValue::Param { number, cast: None }
    }

    #[test]
    fn every_spelling_of_a_key_gets_the_slot_a_write_of_it_bumps() {
        let plan = plan_of(vec![vec![p(1)]], vec![("id", KeyType::Int4)]);
        let write = Generations::key_slot("db", "public", "t", &["id"], &["7"]);
        for args in [
            Args(vec![(false, Some(b"7".to_vec()), 0)]),
            Args(vec![(false, Some(b"007".to_vec()), 0)]),
            Args(vec![(true, Some(7i32.to_be_bytes().to_vec()), 0)]),
            Args(vec![(true, Some(7i64.to_be_bytes().to_vec()), 20)]),
        ] {
            assert_eq!(key_slots("db", &plan, &args, true), Ok(vec![write]));
        }
        let lit = |text: &str, quoted| KeyValue::Literal {
            text: text.into(),
            quoted,
            cast: None,
        };
        for v in [lit("7", false), lit("007", true)] {
            let plan = plan_of(vec![vec![v]], vec![("id", KeyType::Int4)]);
            assert_eq!(key_slots("db", &plan, &NoParams, true), Ok(vec![write]));
        }
    }

    #[test]
    fn values_that_cannot_be_rendered_leave_the_read_table_level() {
        let plan = plan_of(vec![vec![p(1)]], vec![("id", KeyType::Int4)]);
        for args in [
            Args(vec![(false, None, 0)]),
            Args(vec![(false, Some(b"7.5".to_vec()), 0)]),
            Args(vec![(false, Some(b"7".to_vec()), 1700)]),
            Args(vec![(true, Some(vec![0, 7]), 0)]),
            Args(vec![]),
        ] {
            assert!(key_slots("db", &plan, &args, true).is_err());
        }
        assert_eq!(
            key_slots("db", &plan, &Args(vec![(false, None, 0)]), true),
            Err(Refusal::Null)
        );
    }

    fn array(element: u32, items: &[Option<&[u8]>]) -> Vec<u8> {
        let mut b = Vec::new();
        for v in [1, 0, element as i32, items.len() as i32, 1] {
            b.extend_from_slice(&v.to_be_bytes());
        }
        for item in items {
            let len = item.map_or(-1, |v| v.len() as i32);
            b.extend_from_slice(&len.to_be_bytes());
            b.extend_from_slice(item.unwrap_or_default());
        }
        b
    }

    #[test]
    fn arrays_key_each_element() {
        let slot = |v: &str| Generations::key_slot("db", "public", "t", &["id"], &[v]);
        let want = Ok(vec![slot("7"), slot("9")]);
        let any = |cast| KeyValue::ParamArray { number: 1, cast };
        let plan = plan_of(vec![vec![any(None)]], vec![("id", KeyType::Int8)]);
        let nine = 9i64.to_be_bytes();
        let seven = 7i64.to_be_bytes();
        for args in [
            Args(vec![(false, Some(b"{7,009}".to_vec()), 0)]),
            Args(vec![(false, Some(b"{7,9}".to_vec()), 1007)]),
            Args(vec![(
                true,
                Some(array(20, &[Some(&seven), Some(&nine)])),
                0,
            )]),
            Args(vec![(
                true,
                Some(array(20, &[Some(&seven), Some(&nine)])),
                1016,
            )]),
        ] {
            let mut got = key_slots("db", &plan, &args, true);
            if let Ok(s) = &mut got {
                s.sort_unstable();
            }
            let mut want = want.clone();
            if let Ok(s) = &mut want {
                s.sort_unstable();
            }
            assert_eq!(got, want);
        }
        let nines: Vec<u8> = (0..65).flat_map(|_| *b"9,").collect();
        let long = format!("{{{}}}", String::from_utf8_lossy(&nines[..nines.len() - 1]));
        for (args, why) in [
            (vec![(false, Some(b"{7,NULL}".to_vec()), 0)], Refusal::Null),
            (
                vec![(true, Some(array(20, &[Some(&seven), None])), 0)],
                Refusal::Null,
            ),
            (vec![(false, Some(long.into_bytes()), 0)], Refusal::TooMany),
            (
                vec![(false, Some(b"{{7},{9}}".to_vec()), 0)],
                Refusal::Unreadable,
            ),
            (
                vec![(false, Some(b"{7}".to_vec()), 20)],
                Refusal::Unreadable,
            ),
            (
                vec![(false, Some(b"{7}".to_vec()), 1009)],
                Refusal::Unreadable,
            ),
            (
                vec![(true, Some(array(23, &[Some(&seven)])), 0)],
                Refusal::Unreadable,
            ),
        ] {
            assert_eq!(key_slots("db", &plan, &Args(args), true), Err(why));
        }
        let lit = KeyValue::LiteralArray {
            text: "{ 7 , \"9\"}".into(),
            cast: Some(KeyType::Int4),
        };
        let plan = plan_of(vec![vec![lit]], vec![("id", KeyType::Int8)]);
        assert_eq!(
            key_slots("db", &plan, &NoParams, true).map(|s| s.len()),
            Ok(2)
        );
        let lit = KeyValue::LiteralArray {
            text: "{7}".into(),
            cast: Some(KeyType::Uuid),
        };
        let plan = plan_of(vec![vec![lit]], vec![("id", KeyType::Int8)]);
        assert_eq!(
            key_slots("db", &plan, &NoParams, true),
            Err(Refusal::Unreadable)
        );
    }

    #[test]
    fn text_keys_only_in_utf8_sessions() {
        let plan = plan_of(vec![vec![p(1)]], vec![("name", KeyType::Text)]);
        let write = Generations::key_slot("db", "public", "t", &["name"], &["é 'x'"]);
        for args in [
            Args(vec![(false, Some("é 'x'".as_bytes().to_vec()), 0)]),
            Args(vec![(true, Some("é 'x'".as_bytes().to_vec()), 1043)]),
        ] {
            assert_eq!(key_slots("db", &plan, &args, true), Ok(vec![write]));
            assert_eq!(key_slots("db", &plan, &args, false), Err(Refusal::Encoding));
        }
        for args in [
            Args(vec![(false, Some(vec![0xe9]), 0)]),
            Args(vec![(false, Some(b"a\0".to_vec()), 0)]),
            Args(vec![(false, Some(b"7".to_vec()), 23)]),
            Args(vec![(false, Some(b"abc".to_vec()), 1042)]),
        ] {
            assert_eq!(
                key_slots("db", &plan, &args, true),
                Err(Refusal::Unreadable)
            );
        }
        for text in ["1e3", ".5", "7", "true"] {
            let lit = KeyValue::Literal {
                text: text.into(),
                quoted: false,
                cast: Some(KeyType::Text),
            };
            let plan = plan_of(vec![vec![lit]], vec![("name", KeyType::Text)]);
            assert_eq!(
                key_slots("db", &plan, &NoParams, true),
                Err(Refusal::Unreadable),
                "{text}::text"
            );
        }
        let int = plan_of(vec![vec![p(1)]], vec![("id", KeyType::Int4)]);
        let seven = Args(vec![(false, Some(b"7".to_vec()), 0)]);
        assert!(key_slots("db", &int, &seven, false).is_ok(), "not text");
    }

    #[test]
    fn composite_and_in_lists_cross() {
        let plan = plan_of(
            vec![vec![p(1), p(2)], vec![p(3)]],
            vec![("a", KeyType::Int8), ("b", KeyType::Bool)],
        );
        let args = Args(vec![
            (false, Some(b"1".to_vec()), 0),
            (false, Some(b"2".to_vec()), 0),
            (false, Some(b"yes".to_vec()), 0),
        ]);
        let slots = key_slots("db", &plan, &args, true).expect("keyed");
        assert_eq!(slots.len(), 2);
        assert!(slots.contains(&Generations::key_slot(
            "db",
            "public",
            "t",
            &["a", "b"],
            &["2", "true"]
        )));
    }
}
