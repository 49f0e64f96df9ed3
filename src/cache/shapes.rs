//! A sample statement text per shape (pg_query fingerprint) and the rule that
//! decided it, for the admin console. Bounded; texts never go into metrics,
//! and their literals are replaced by placeholders.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use super::rules::Policy;

const MAX_SHAPES: usize = 10_000;
const MAX_TEXT: usize = 300;

#[derive(Clone, Debug)]
pub struct ShapeInfo {
    pub text: String,
    pub ttl: Duration,
    pub rule: Option<usize>,
    /// How writes reach it: `key (cols)` for a read by key (where the
    /// database invalidates by key), else `table (why)`.
    pub invalidation: String,
}

fn table() -> &'static Mutex<HashMap<u64, ShapeInfo>> {
    static T: OnceLock<Mutex<HashMap<u64, ShapeInfo>>> = OnceLock::new();
    T.get_or_init(|| Mutex::new(HashMap::new()))
}

pub fn remember(shape: u64, text: &str, policy: &Policy, invalidation: impl FnOnce() -> String) {
    if let Ok(mut t) = table().lock() {
        if let Some(known) = t.get_mut(&shape) {
            known.ttl = policy.ttl;
            known.rule = policy.rule;
            return;
        }
        if t.len() >= MAX_SHAPES {
            return;
        }
        t.insert(
            shape,
            ShapeInfo {
                text: sample(text),
                ttl: policy.ttl,
                rule: policy.rule,
                invalidation: invalidation(),
            },
        );
    }
}

/// The text shown for a shape: its constants replaced by `$n` (as
/// pg_stat_statements shows them), so the console shows the shape of what
/// clients ask, never the values they asked with. Once per new shape.
fn sample(text: &str) -> String {
    let normalized = pg_query::normalize(text).unwrap_or_else(|_| "(not shown)".into());
    let text: String = normalized.chars().take(MAX_TEXT).collect();
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

pub fn get(shape: u64) -> Option<ShapeInfo> {
    table().lock().ok().and_then(|t| t.get(&shape).cloned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_show_no_literals() {
        let s = sample("select * from users where email = 'alice@example.com' and id = 42");
        assert!(!s.contains("alice") && !s.contains("42"), "{s}");
        assert!(s.contains("$1") && s.contains("$2"), "{s}");
    }
}
