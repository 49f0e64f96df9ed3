//! A sample statement text per shape (pg_query fingerprint) and the rule that
//! decided it, for the admin console. Bounded; texts never go into metrics.

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
}

fn table() -> &'static Mutex<HashMap<u64, ShapeInfo>> {
    static T: OnceLock<Mutex<HashMap<u64, ShapeInfo>>> = OnceLock::new();
    T.get_or_init(|| Mutex::new(HashMap::new()))
}

pub fn remember(shape: u64, text: &str, policy: &Policy) {
    if let Ok(mut t) = table().lock() {
        if t.len() >= MAX_SHAPES && !t.contains_key(&shape) {
            return;
        }
        let mut text: String = text.chars().take(MAX_TEXT).collect();
        text = text.split_whitespace().collect::<Vec<_>>().join(" ");
        t.insert(
            shape,
            ShapeInfo {
                text,
                ttl: policy.ttl,
                rule: policy.rule,
            },
        );
    }
}

pub fn get(shape: u64) -> Option<ShapeInfo> {
    table().lock().ok().and_then(|t| t.get(&shape).cloned())
}
