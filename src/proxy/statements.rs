//! The session's prepared statements as the client sees them.
//!
//! When pgtier answers a Parse itself (a cache hit), the server never learns the
//! statement; it is recorded here with `on_server = false` and its Parse message
//! is replayed ahead of the first request that needs it on the server.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;

use crate::cache::key::statement_hash;
use crate::cache::Decision;
use crate::protocol::frontend::Parse;

pub struct Statement {
    /// The client's Parse message, whole, to replay on the server.
    pub parse: Bytes,
    pub hash: u128,
    pub on_server: bool,
    /// The cache decision for its text, resolved on first use.
    pub decision: Option<Arc<Decision>>,
}

impl Statement {
    /// The statement text (the Parse message was validated when recorded).
    pub fn sql(&self) -> &[u8] {
        Parse::decode(&self.parse[5..]).map_or(&[][..], |p| p.query)
    }

    /// The parameter types the client declared (raw big-endian OIDs).
    pub fn param_types(&self) -> &[u8] {
        Parse::decode(&self.parse[5..]).map_or(&[][..], |p| p.param_types)
    }
}

#[derive(Default)]
pub struct Statements {
    map: HashMap<Bytes, Statement>,
}

impl Statements {
    pub fn get(&self, name: &[u8]) -> Option<&Statement> {
        self.map.get(name)
    }

    pub fn get_mut(&mut self, name: &[u8]) -> Option<&mut Statement> {
        self.map.get_mut(name)
    }

    /// Record a Parse. Re-parsing the same text under the same name (what drivers
    /// do with the unnamed statement on every query) keeps the existing record and
    /// allocates nothing. Returns whether the statement changed.
    pub fn define(&mut self, p: &Parse<'_>, message: &[u8], on_server: bool) -> bool {
        let hash = statement_hash(p.query, p.param_types);
        if let Some(s) = self.map.get_mut(p.name) {
            if s.hash == hash {
                s.on_server |= on_server;
                return false;
            }
        }
        self.map.insert(
            Bytes::copy_from_slice(p.name),
            Statement {
                parse: Bytes::copy_from_slice(message),
                hash,
                on_server,
                decision: None,
            },
        );
        true
    }

    pub fn remove(&mut self, name: &[u8]) {
        self.map.remove(name);
    }

    pub fn clear(&mut self) {
        self.map.clear();
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}
