//! Operator rules (per table, per query pattern) turned into a decision per
//! statement: cache it or not, for how long, and whether users share entries.

use std::time::Duration;

use regex::Regex;

use crate::bypass::BypassReason;
use crate::config::{CacheConfig, CacheMode, RuleConfig};
use crate::sql::TableRef;

/// How a cacheable statement is cached.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    pub ttl: Duration,
    pub swr: Duration,
    /// Entries are shared by all users (no user in the key).
    pub public: bool,
    /// Index of the rule that decided, for SHOW CACHES.
    pub rule: Option<usize>,
}

/// Why the rules refused a statement.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// A `cache = false` rule matched.
    Rule,
    /// Allowlist mode and nothing listed it.
    NotListed,
    /// TTL is zero (caching off).
    Disabled,
}

impl Refusal {
    pub fn reason(self) -> BypassReason {
        match self {
            Refusal::Rule => BypassReason::Rule,
            Refusal::NotListed => BypassReason::NotListed,
            Refusal::Disabled => BypassReason::Disabled,
        }
    }
}

enum Target {
    Table {
        schema: Option<String>,
        name: String,
    },
    Query(Regex),
    Fingerprint(u64),
}

struct Rule {
    target: Target,
    cfg: RuleConfig,
}

/// The compiled rule set of one configuration snapshot.
pub struct Rules {
    rules: Vec<Rule>,
    /// Some rule shares entries across users: hits must consult the decision to
    /// pick the key's seed. Without such rules they need not.
    pub has_public: bool,
    mode: CacheMode,
    default_ttl: Duration,
}

impl Rules {
    /// Compile rules; config validation has already checked every pattern.
    pub fn new(cfg: &CacheConfig) -> Rules {
        let rules = cfg
            .rules
            .iter()
            .filter_map(|r| {
                let target = if let Some(t) = &r.table {
                    let (schema, name) = match t.split_once('.') {
                        Some((s, n)) => (Some(s.to_string()), n.to_string()),
                        None => (None, t.clone()),
                    };
                    Target::Table { schema, name }
                } else if let Some(q) = &r.query {
                    Target::Query(Regex::new(q).ok()?)
                } else {
                    Target::Fingerprint(u64::from_str_radix(r.fingerprint.as_deref()?, 16).ok()?)
                };
                Some(Rule {
                    target,
                    cfg: r.clone(),
                })
            })
            .collect();
        Rules {
            has_public: cfg.rules.iter().any(|r| r.public == Some(true)),
            rules,
            mode: cfg.mode,
            default_ttl: cfg.default_ttl.0,
        }
    }

    fn table_rule(&self, t: &TableRef) -> Option<(usize, &RuleConfig)> {
        self.rules
            .iter()
            .enumerate()
            .find_map(|(i, r)| match &r.target {
                Target::Table { schema, name } => {
                    let schema_ok = match (schema, &t.schema) {
                        (Some(a), Some(b)) => a == b,
                        // An unqualified reference may be this table: let the rule apply.
                        _ => true,
                    };
                    (schema_ok && *name == t.name).then_some((i, &r.cfg))
                }
                _ => None,
            })
    }

    /// Decide for a statement that is safe to cache.
    pub fn decide(
        &self,
        sql: &str,
        fingerprint: u64,
        tables: &[TableRef],
        ctes: &[String],
    ) -> Result<Policy, Refusal> {
        let query_rule = self
            .rules
            .iter()
            .enumerate()
            .find(|(_, r)| match &r.target {
                Target::Query(re) => re.is_match(sql),
                Target::Fingerprint(f) => *f == fingerprint,
                Target::Table { .. } => false,
            });
        let policy = if let Some((i, r)) = query_rule {
            if r.cfg.cache == Some(false) {
                return Err(Refusal::Rule);
            }
            if self.mode == CacheMode::Allowlist && r.cfg.cache != Some(true) {
                return Err(Refusal::NotListed);
            }
            Policy {
                ttl: r.cfg.ttl.map_or(self.default_ttl, |d| d.0),
                swr: r.cfg.swr.map_or(Duration::ZERO, |d| d.0),
                public: r.cfg.public.unwrap_or(false),
                rule: Some(i),
            }
        } else {
            // Each table contributes its own TTL (its rule's, or the default); the
            // result lives as long as the shortest.
            let mut ttl: Option<Duration> = None;
            let mut swr: Option<Duration> = None;
            let mut public = !tables.is_empty();
            let mut listed = !tables.is_empty();
            let mut rule = None;
            for t in tables {
                match self.table_rule(t) {
                    Some((i, r)) => {
                        if r.cache == Some(false) {
                            return Err(Refusal::Rule);
                        }
                        listed &= r.cache == Some(true);
                        let t = r.ttl.map_or(self.default_ttl, |d| d.0);
                        ttl = Some(ttl.map_or(t, |x| x.min(t)));
                        let s = r.swr.map_or(Duration::ZERO, |d| d.0);
                        swr = Some(swr.map_or(s, |x| x.min(s)));
                        public &= r.public == Some(true);
                        rule.get_or_insert(i);
                    }
                    None => {
                        listed = false;
                        public = false;
                        swr = Some(Duration::ZERO);
                        ttl = Some(ttl.map_or(self.default_ttl, |x| x.min(self.default_ttl)));
                    }
                }
            }
            if self.mode == CacheMode::Allowlist && !listed {
                return Err(Refusal::NotListed);
            }
            Policy {
                ttl: ttl.unwrap_or(self.default_ttl),
                swr: swr.unwrap_or(Duration::ZERO),
                public,
                rule,
            }
        };
        if policy.ttl.is_zero() {
            return Err(Refusal::Disabled);
        }
        // An unqualified name resolves through each user's search_path (by
        // default `"$user", public`): alice's `items` may be `alice.items`. Only
        // a schema-qualified relation is provably the same for every user; the
        // others are cached per user. (Names that may be CTEs are left to the
        // catalog, which refuses sharing when a relation has that name too.)
        let mut policy = policy;
        policy.public &= tables
            .iter()
            .all(|t| t.schema.is_some() || ctes.contains(&t.name));
        Ok(policy)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn rules(toml: &str) -> Rules {
        let c = Config::from_toml(toml).unwrap();
        c.validate().unwrap();
        Rules::new(&c.cache)
    }

    impl Rules {
        fn decide_t(&self, sql: &str, f: u64, tables: &[TableRef]) -> Result<Policy, Refusal> {
            self.decide(sql, f, tables, &[])
        }
    }

    fn t(s: &str) -> TableRef {
        match s.split_once('.') {
            Some((a, b)) => TableRef {
                schema: Some(a.into()),
                name: b.into(),
            },
            None => TableRef {
                schema: None,
                name: s.into(),
            },
        }
    }

    #[test]
    fn table_rules_combine() {
        let r = rules(
            r#"
[cache]
default_ttl = "30s"
[[cache.rules]]
table = "public.accounts"
ttl = "5m"
public = true
[[cache.rules]]
table = "secrets"
cache = false
[[cache.rules]]
table = "branches"
ttl = "10s"
public = true
"#,
        );
        let p = r.decide_t("", 0, &[t("accounts")]).unwrap();
        assert_eq!(p.ttl, Duration::from_secs(300));
        assert!(
            !p.public,
            "an unqualified name may be another schema's table for some user"
        );
        let p = r.decide_t("", 0, &[t("public.accounts")]).unwrap();
        assert!(p.public);
        let p = r
            .decide_t("", 0, &[t("public.accounts"), t("public.branches")])
            .unwrap();
        assert_eq!(p.ttl, Duration::from_secs(10));
        assert!(p.public);
        let p = r
            .decide_t("", 0, &[t("public.accounts"), t("branches")])
            .unwrap();
        assert!(!p.public);
        let p = r.decide_t("", 0, &[t("accounts"), t("other")]).unwrap();
        assert_eq!(p.ttl, Duration::from_secs(30));
        assert!(
            !p.public,
            "a table without a public rule makes the entry per-user"
        );
        assert_eq!(
            r.decide_t("", 0, &[t("accounts"), t("secrets")]),
            Err(Refusal::Rule)
        );
        assert!(r.decide_t("", 0, &[t("other.accounts")]).unwrap().ttl == Duration::from_secs(30));
    }

    #[test]
    fn query_rules_and_allowlist() {
        let r = rules(
            r#"
[cache]
mode = "allowlist"
[[cache.rules]]
query = "^select .* from hot"
ttl = "1m"
cache = true
[[cache.rules]]
table = "listed"
cache = true
"#,
        );
        assert_eq!(
            r.decide_t("select * from hot", 0, &[t("hot")]).unwrap().ttl,
            Duration::from_secs(60)
        );
        assert!(r
            .decide_t("select * from listed", 0, &[t("listed")])
            .is_ok());
        assert_eq!(
            r.decide_t("select * from cold", 0, &[t("cold")]),
            Err(Refusal::NotListed)
        );
        assert_eq!(r.decide_t("select 1", 0, &[]), Err(Refusal::NotListed));
        let off = rules("[cache]\ndefault_ttl = \"0\"\n");
        assert_eq!(off.decide_t("select 1", 0, &[]), Err(Refusal::Disabled));
    }
}
