//! What a read by key depends on (key-level invalidation, issue 14).
//!
//! Every table has two generation slots: its table slot, bumped by every write
//! (which reads that scan the table depend on), and its *whole* slot, bumped
//! only by what changes the table as a whole (TRUNCATE, DDL, a write too large
//! to report keys, its announcing switched off). A read of one table by key
//! depends on the whole slot and on one slot per key it asks for, derived from
//! (database, table, column set, values); a write that reports its keys bumps
//! the table slot and those key slots, so reads of other keys stay cached.
//!
//! A column set is used only once this instance has registered it with the
//! table's triggers and every writer that might not report it has ended
//! (`live`); until then the read stays table-level and asks for the
//! registration (`take_requests`).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;

use super::catalog::Catalog;
use super::generations::Generations;
use crate::sql::keys::{KeyLookup, KeyValue};
use crate::sql::keyvalue::{self, KeyType};
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
    pub fn forget(&self) {
        self.live.store(Arc::new(HashMap::new()));
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

/// The key plan of a resolved read of table `oid`, if its lookup can be keyed;
/// a column set not yet live is requested and the read stays table-level.
pub fn plan(
    database: &str,
    catalog: &Catalog,
    state: &KeyState,
    lookup: &KeyLookup,
    refs: &[TableRef],
    tables: &[u32],
) -> Option<KeyPlan> {
    let [oid] = tables else {
        return None;
    };
    // The statement must name the table itself: through a view, its columns
    // are the view's (renamed, grouped, computed), not the table's.
    let [named] = refs else {
        return None;
    };
    if catalog.named(named) != [*oid] {
        return None;
    }
    // An `=` of the user's may be the one the statement's `=` means.
    if catalog.routines.key_equality() {
        return None;
    }
    let r = catalog.get(*oid)?;
    // Plain tables only: writes to a partition or an inheritance child would
    // change the parent's rows under another table's triggers.
    if r.kind != b'r' || !r.parents.is_empty() || !r.children.is_empty() {
        return None;
    }
    let mut columns = Vec::with_capacity(lookup.columns.len());
    for c in &lookup.columns {
        let (_, ty, deterministic) = r.columns.iter().find(|(n, _, _)| *n == c.column)?;
        let ty = KeyType::from_oid(*ty)?;
        // Text keys wait for the session's encoding to be part of the plan.
        if ty == KeyType::Text || !deterministic {
            return None;
        }
        columns.push((c.column.clone(), ty));
    }
    let cols: ColumnSet = columns.iter().map(|(n, _)| n.clone()).collect();
    if !state.is_live(*oid, &cols) {
        state.request(*oid, cols);
        return None;
    }
    Some(KeyPlan {
        table_slot: Generations::slot(database, &r.schema, &r.name),
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

/// The canonical value of one key value for a column of type `column`.
fn render(column: KeyType, v: &KeyValue, params: &dyn Params) -> Option<String> {
    match v {
        KeyValue::Param { number, cast } => {
            let (binary, value, declared) = params.param(*number)?;
            // NULL matches no row: such a read is left table-level.
            let value = value?;
            let ty = match declared {
                0 => cast.unwrap_or(column),
                oid => KeyType::from_oid(oid)?,
            };
            if !ty.compares_with(column) {
                return None;
            }
            if binary {
                keyvalue::from_binary(ty, value)
            } else {
                keyvalue::from_text(ty, value)
            }
        }
        KeyValue::Literal { text, quoted, cast } => {
            // A string constant takes the column's type, and so is a bare
            // number or boolean read (refused below if not of that kind).
            let ty = cast.unwrap_or(column);
            if !ty.compares_with(column) {
                return None;
            }
            if !quoted
                && cast.is_none()
                && column == KeyType::Bool
                && text != "true"
                && text != "false"
            {
                return None;
            }
            keyvalue::from_text(ty, text.as_bytes())
        }
    }
}

/// The key slots a read depends on, given its request's values; `None` when a
/// value cannot be rendered (the read then stays table-level).
pub fn key_slots(database: &str, plan: &KeyPlan, params: &dyn Params) -> Option<Vec<u32>> {
    let mut per_column: Vec<Vec<String>> = Vec::with_capacity(plan.columns.len());
    for ((_, ty), values) in plan.columns.iter().zip(&plan.values) {
        let rendered: Option<Vec<String>> = values.iter().map(|v| render(*ty, v, params)).collect();
        per_column.push(rendered?);
    }
    let total: usize = per_column.iter().map(Vec::len).product();
    if total == 0 || total > MAX_TUPLES {
        return None;
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
                return Some(slots);
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
            assert_eq!(key_slots("db", &plan, &args), Some(vec![write]));
        }
        let lit = |text: &str, quoted| KeyValue::Literal {
            text: text.into(),
            quoted,
            cast: None,
        };
        for v in [lit("7", false), lit("007", true)] {
            let plan = plan_of(vec![vec![v]], vec![("id", KeyType::Int4)]);
            assert_eq!(key_slots("db", &plan, &NoParams), Some(vec![write]));
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
            assert_eq!(key_slots("db", &plan, &args), None);
        }
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
        let slots = key_slots("db", &plan, &args).expect("keyed");
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
