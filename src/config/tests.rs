//! Unit tests of the configuration: parsing, validation, defaults, secrets.

use super::*;

#[test]
fn defaults_are_valid() {
    Config::default().validate().unwrap();
}

#[test]
fn unknown_key_is_rejected_with_its_name() {
    let e = Config::from_toml("[server]\nlisten_addr = \"x\"\n").unwrap_err();
    assert!(e.to_string().contains("listen_addr"), "{e}");
}

#[test]
fn bad_values_name_the_key() {
    let e = Config::from_toml("[upstream]\nconnect_timeout = \"soon\"\n").unwrap_err();
    assert!(e.to_string().contains("soon"), "{e}");
    let e = Config::from_toml("[upstream]\ntls = \"maybe\"\n").unwrap_err();
    assert!(e.to_string().contains("maybe"), "{e}");
    let mut c = Config::default();
    c.server.listen = "nonsense".into();
    assert!(c
        .validate()
        .unwrap_err()
        .to_string()
        .contains("server.listen"));
    let mut c = Config::default();
    c.server.tls_cert = Some("/nonexistent.pem".into());
    assert!(c
        .validate()
        .unwrap_err()
        .to_string()
        .contains("server.tls_cert"));
    let mut c = Config::default();
    c.l2.tls_ca_file = Some("/nonexistent-ca.pem".into());
    let e = c.validate().unwrap_err().to_string();
    assert!(e.contains("l2.tls_ca_file"), "{e}");
    let mut c = Config::default();
    c.l2.tls_cert_file = Some("/dev/null".into());
    let e = c.validate().unwrap_err().to_string();
    assert!(e.contains("go together"), "{e}");
}

#[test]
fn the_example_config_is_valid() {
    let c = Config::from_toml(include_str!("../../config/pgtier.toml")).unwrap();
    c.validate().unwrap();
}

#[test]
fn redaction_hides_passwords() {
    let mut c = Config::default();
    c.invalidation.control_urls = vec!["postgres://app:s3cret@db:5432/shop".into()];
    c.l2.redis_url = Some("redis://default:pw@cache:6379".into());
    let text = toml::to_string(&c.redacted()).unwrap();
    assert!(!text.contains("s3cret") && !text.contains(":pw@"), "{text}");
    assert!(text.contains("postgres://app:****@db:5432/shop"));
}

#[test]
fn host_port() {
    assert_eq!(
        split_host_port("db.example:5433").unwrap(),
        ("db.example".into(), 5433)
    );
    assert_eq!(split_host_port("[::1]:5432").unwrap(), ("::1".into(), 5432));
    assert!(split_host_port("nohost").is_err());
    assert!(split_host_port("h:99999").is_err());
}

#[test]
fn l2_needs_a_key_and_the_key_is_never_printed() {
    let mut c = crate::config::Config::default();
    c.l2.redis_url = Some("redis://127.0.0.1:6379".into());
    let e = c.validate().unwrap_err().to_string();
    assert!(e.contains("l2.signing_key"), "{e}");
    let hex = "ab".repeat(32);
    c.l2.signing_key = Some(hex.clone());
    c.validate().unwrap();
    let text = toml::to_string(&c.redacted()).unwrap();
    assert!(!text.contains(&hex), "{text}");
    c.l2.signing_key = Some("abcd".into());
    let e = c.validate().unwrap_err().to_string();
    assert!(
        e.contains("l2.signing_key") && e.contains("at least 32"),
        "{e}"
    );
    // L2 off: no key needed, but a key given must still be valid.
    c.l2.redis_url = None;
    assert!(c.validate().is_err());
    c.l2.signing_key = None;
    c.validate().unwrap();
}

/// The example file says "the values shown are the defaults": every value it
/// sets, other than the sample rules and users, must be exactly the default.
#[test]
fn the_example_config_documents_the_defaults() {
    let example = Config::from_toml(include_str!("../../config/pgtier.toml")).unwrap();
    let as_json = |c: &Config| {
        let mut v = serde_json::to_value(c).unwrap();
        // samples of what can be configured, not defaults
        v["cache"]["rules"] = serde_json::Value::Null;
        v["admin"]["users"] = serde_json::Value::Null;
        v
    };
    let (got, want) = (as_json(&example), as_json(&Config::default()));
    for (section, values) in want.as_object().unwrap() {
        for (key, value) in values.as_object().into_iter().flatten() {
            assert_eq!(
                &got[section][key], value,
                "config/pgtier.toml: {section}.{key} is not the default"
            );
        }
    }
    assert_eq!(got, want);
}

#[test]
fn the_logical_source_checks_its_settings() {
    let c = Config::from_toml("[invalidation]\nsource = \"logical\"\n").unwrap();
    assert_eq!(c.invalidation.source, Source::Logical);
    c.validate().unwrap();
    let e = Config::from_toml("[invalidation]\nsource = \"wal\"\n").unwrap_err();
    assert!(e.to_string().contains("wal"), "{e}");
    let mut l2 = c.clone();
    l2.l2.redis_url = Some("redis://127.0.0.1:6379".into());
    l2.l2.signing_key = Some("ab".repeat(32));
    l2.validate().unwrap();
    let mut k = c.clone();
    k.invalidation.key_level = true;
    k.validate().unwrap();
    // Key column sets come through the stream alike to every instance, so
    // key-level invalidation with the L2 is allowed on the logical source.
    k.l2 = l2.l2.clone();
    k.validate().unwrap();
    let mut p = c;
    p.invalidation.publication = String::new();
    let e = p.validate().unwrap_err().to_string();
    assert!(e.contains("invalidation.publication"), "{e}");
    assert_eq!("logical".parse::<Source>().ok(), Some(Source::Logical));
    assert!("wal".parse::<Source>().is_err());
}
