//! What makes a statement read the clock although it calls no clock function:
//! the special date/time inputs ('now', 'today', ...), whether written in the
//! request or produced at run time and cast to a date/time type.

use serde_json::Value;

const TIME_WORDS: [&str; 4] = ["now", "today", "tomorrow", "yesterday"];

/// Date/time types whose input accepts the special words; a cast of a run-time
/// value to one of them (or the function-style `date(x)`) may read the clock.
pub(crate) const TIME_TYPES: [&str; 5] = ["date", "timestamp", "timestamptz", "time", "timetz"];

/// Input functions of those types: called on a run-time text they read the
/// clock for the special words, so they are never safe built-ins.
pub(crate) const TIME_INPUTS: [&str; 5] = [
    "date_in",
    "timestamp_in",
    "timestamptz_in",
    "time_in",
    "timetz_in",
];

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

/// Whether an expression is a literal or a Bind parameter, possibly cast: its
/// value is fixed by the request text, where time words are looked for.
pub(crate) fn fixed_by_request(v: &Value) -> bool {
    let node = v.get("node").unwrap_or(v);
    if node.get("AConst").is_some() || node.get("A_Const").is_some() {
        return true;
    }
    if node.get("ParamRef").is_some() {
        return true;
    }
    node.get("TypeCast")
        .and_then(|c| c.get("arg"))
        .is_some_and(fixed_by_request)
}
