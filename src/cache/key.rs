//! Cache keys: 128-bit xxh3 hashes, wide enough that a collision (which would
//! serve one query's result for another) is not a practical concern.
//!
//! A session precomputes a seed from everything that shapes the bytes Postgres
//! returns to it (database, user, output-affecting settings); a request's key is
//! the seed plus its statement and parameters, so a hit hashes only those.

use xxhash_rust::xxh3::Xxh3;

pub type Key = u128;

/// Parameters that never change a query's output, so sessions differing only in
/// them share entries.
const IGNORED_PARAMS: [&str; 8] = [
    "application_name",
    "fallback_application_name",
    "user",
    "database",
    "replication",
    "is_superuser",
    "session_authorization",
    "in_hot_standby",
];

fn ignored(name: &str) -> bool {
    IGNORED_PARAMS.iter().any(|p| p.eq_ignore_ascii_case(name))
}

fn put(h: &mut Xxh3, b: &[u8]) {
    h.update(&(b.len() as u32).to_le_bytes());
    h.update(b);
}

/// What a session contributes to every key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Seed {
    /// For per-user entries (the default).
    pub user: u128,
    /// For entries a rule declares public: the same for every user.
    pub public: u128,
}

impl Seed {
    pub fn pick(&self, public: bool) -> u128 {
        if public {
            self.public
        } else {
            self.user
        }
    }
}

/// Compute a session's seed from its settings, given from the oldest source to
/// the newest (startup packet, then what the server reported, then SET): a
/// later value of a name replaces an earlier one, as it does in the server.
/// Names are then hashed in sorted order, so the order in which different
/// settings arrived does not matter.
pub fn session_seed<'a>(
    database: &str,
    user: &str,
    params: impl Iterator<Item = (&'a str, &'a str)>,
) -> Seed {
    let mut effective: std::collections::BTreeMap<String, &str> = Default::default();
    for (k, v) in params.filter(|(k, _)| !ignored(k)) {
        effective.insert(k.to_ascii_lowercase(), v);
    }
    let mut h = Xxh3::new();
    put(&mut h, b"pgtier-seed-v2");
    put(&mut h, database.as_bytes());
    for (k, v) in &effective {
        put(&mut h, k.as_bytes());
        put(&mut h, v.as_bytes());
    }
    let public = h.digest128();
    put(&mut h, user.as_bytes());
    Seed {
        user: h.digest128(),
        public,
    }
}

/// Identity of a prepared statement: its text and declared parameter types.
pub fn statement_hash(sql: &[u8], param_types: &[u8]) -> u128 {
    let mut h = Xxh3::new();
    put(&mut h, sql);
    put(&mut h, param_types);
    h.digest128()
}

/// Key of a simple-protocol query (results always in text format).
pub fn simple_key(seed: u128, sql: &[u8]) -> Key {
    let mut h = Xxh3::new();
    h.update(&seed.to_le_bytes());
    h.update(b"Q");
    h.update(sql);
    h.digest128()
}

/// Key of an extended-protocol execution: statement plus the Bind arguments
/// (parameter formats and values, result formats) exactly as sent.
pub fn extended_key(seed: u128, statement: u128, bind_args: &[u8]) -> Key {
    let mut h = Xxh3::new();
    h.update(&seed.to_le_bytes());
    h.update(b"E");
    h.update(&statement.to_le_bytes());
    h.update(bind_args);
    h.digest128()
}

/// Key of a statement description (Describe 'S'), shared by its executions.
pub fn describe_key(seed: u128, statement: u128) -> Key {
    let mut h = Xxh3::new();
    h.update(&seed.to_le_bytes());
    h.update(b"S");
    h.update(&statement.to_le_bytes());
    h.digest128()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_separate_users_databases_and_settings() {
        let base = [("TimeZone", "UTC"), ("search_path", "public")];
        let a = session_seed("db", "alice", base.iter().copied());
        let b = session_seed("db", "bob", base.iter().copied());
        assert_ne!(a.user, b.user);
        assert_eq!(a.public, b.public);
        let other_db = session_seed("db2", "alice", base.iter().copied());
        assert_ne!(a.public, other_db.public);
        let tz = session_seed(
            "db",
            "alice",
            [("TimeZone", "Europe/Paris"), ("search_path", "public")].into_iter(),
        );
        assert_ne!(a.user, tz.user);
        // order and ignored parameters do not matter
        let reordered = session_seed(
            "db",
            "alice",
            [
                ("search_path", "public"),
                ("application_name", "x"),
                ("timezone", "UTC"),
            ]
            .into_iter(),
        );
        assert_eq!(a, reordered);
    }

    #[test]
    fn the_newest_value_of_a_setting_is_keyed() {
        // Startup said New York, the session then SET UTC: the session renders
        // UTC, exactly like a session that started in UTC.
        let ny_then_utc = session_seed(
            "db",
            "alice",
            [("TimeZone", "America/New_York"), ("timezone", "UTC")].into_iter(),
        );
        let utc = session_seed("db", "alice", [("TimeZone", "UTC")].into_iter());
        let ny = session_seed(
            "db",
            "alice",
            [("TimeZone", "America/New_York")].into_iter(),
        );
        assert_eq!(ny_then_utc, utc);
        assert_ne!(ny_then_utc, ny);
        let utc_then_ny = session_seed(
            "db",
            "alice",
            [("TimeZone", "UTC"), ("TimeZone", "America/New_York")].into_iter(),
        );
        assert_eq!(utc_then_ny, ny);
    }

    #[test]
    fn keys_depend_on_every_part() {
        let s = statement_hash(b"select $1", &23i32.to_be_bytes());
        assert_ne!(s, statement_hash(b"select $1", &25i32.to_be_bytes()));
        assert_ne!(extended_key(1, s, b"a"), extended_key(1, s, b"b"));
        assert_ne!(extended_key(1, s, b"a"), extended_key(2, s, b"a"));
        assert_ne!(simple_key(1, b"select 1"), simple_key(1, b"select 2"));
        assert_ne!(simple_key(1, b"x"), describe_key(1, 0));
    }
}
