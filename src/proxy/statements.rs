//! The session's prepared statements as the client sees them.
//!
//! When pgtier answers a Parse itself (a cache hit), the server never learns the
//! statement; it is recorded here with `on_server = false` and its Parse message
//! is replayed ahead of the first request that needs it on the server.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use bytes::Bytes;

use crate::cache::key::statement_hash;
use crate::cache::Decision;
use crate::protocol::frontend::Parse;

#[derive(Clone)]
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
    /// Changes made for Parse and Close messages sent to the server and not
    /// answered yet, oldest first. After an error the server skips what
    /// follows up to Sync: those changes never happened there and are undone.
    pending: VecDeque<Pending>,
    next_pending: u64,
}

struct Pending {
    id: u64,
    name: Bytes,
    before: Option<Statement>,
    parse: bool,
}

/// Pending changes kept at most: a session that stopped tracking replies
/// (blind) confirms nothing, and must not grow without bound.
const MAX_PENDING: usize = 4096;

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

    /// Remember `name` as it stands before a Parse (`parse`) or Close sent to
    /// the server changes it: the id to undo or confirm the change with.
    pub fn pending(&mut self, name: &[u8], parse: bool) -> u64 {
        let id = self.next_pending;
        self.next_pending += 1;
        if self.pending.len() >= MAX_PENDING {
            self.pending.pop_front();
        }
        self.pending.push_back(Pending {
            id,
            name: Bytes::copy_from_slice(name),
            before: self.map.get(name).cloned(),
            parse,
        });
        id
    }

    /// The server answered the message of `id` (so every earlier one too).
    pub fn confirmed(&mut self, id: u64) {
        while self.pending.front().is_some_and(|p| p.id <= id) {
            self.pending.pop_front();
        }
    }

    /// The server refused the message of `failed` (if it was one of these)
    /// and skipped those of `skipped`: their changes never happened there.
    /// Undone newest first, so each name ends as the server has it.
    pub fn refused(&mut self, failed: Option<u64>, skipped: &[u64]) {
        for id in skipped.iter().rev().copied().chain(failed) {
            let Some(at) = self.pending.iter().position(|p| p.id == id) else {
                continue;
            };
            let Some(p) = self.pending.remove(at) else {
                continue;
            };
            // A failed unnamed Parse has dropped the previous unnamed
            // statement before failing; a skipped one left it.
            let dropped = failed == Some(id) && p.parse && p.name.is_empty();
            let before = p.before.filter(|_| !dropped);
            // A later request pipelined behind this one changed the name too,
            // and the server did apply that: the record stands; only that
            // change's own undo must now lead back to `before`.
            if let Some(later) = self
                .pending
                .iter_mut()
                .find(|l| l.id > id && l.name == p.name)
            {
                later.before = before;
                continue;
            }
            match before {
                Some(before) => {
                    self.map.insert(p.name, before);
                }
                None => {
                    self.map.remove(&p.name);
                }
            }
        }
    }

    pub fn clear(&mut self) {
        self.map.clear();
        self.pending.clear();
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}
