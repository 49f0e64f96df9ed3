//! The one screen a person running pgtier in a terminal sees first: how to
//! connect, where the metrics are, and what to try next. Not printed when the
//! output is not a terminal (services, containers, tests).

use std::io::IsTerminal;

use crate::config::Config;

/// What to try next, for `config` as it runs (`cached`: the databases with a
/// listener).
pub fn text(config: &Config, cached: &[String]) -> String {
    let listen = &config.server.listen;
    let (host, port) = listen.rsplit_once(':').unwrap_or((listen.as_str(), "6432"));
    let db = cached.first().map_or("postgres", String::as_str);
    let mut s = String::new();
    s.push_str(&format!("\npgtier is listening on {listen}\n\n"));
    s.push_str(&format!(
        "  connect   psql \"host={host} port={port} user=postgres dbname={db}\"\n"
    ));
    if config.admin.listen.is_empty() {
        s.push_str("  metrics   (admin.listen is off)\n");
    } else {
        let admin = &config.admin.listen;
        s.push_str(&format!(
            "  metrics   curl -s http://{admin}/metrics | grep pgtier_cache_lookups_total\n"
        ));
        s.push_str(&format!("  ready     curl -s http://{admin}/ready\n"));
    }
    if cached.is_empty() {
        s.push_str(
            "  caching   off: pgtier only proxies. To cache a database, add\n            \
             --control-url postgres://postgres@127.0.0.1:5432/DB --auto-install-triggers\n",
        );
    } else {
        s.push_str(&format!("  caching   {}\n", cached.join(", ")));
        s.push_str(
            "  try       run the same SELECT twice: the second answer comes from the cache;\n            \
             write to the table (through pgtier or not) and read again: it is fresh\n",
        );
    }
    s.push_str("  stop      Ctrl-C (SIGTERM drains open sessions first)\n");
    s
}

/// Print `text` to standard output if it is a terminal.
pub fn print(config: &Config, cached: &[String]) {
    if std::io::stdout().is_terminal() {
        println!("{}", text(config, cached));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_the_psql_line_metrics_and_caching() {
        let c = Config::default();
        let t = text(&c, &["test".to_string()]);
        assert!(
            t.contains("psql \"host=127.0.0.1 port=6432 user=postgres dbname=test\""),
            "{t}"
        );
        assert!(t.contains("http://127.0.0.1:9930/metrics"), "{t}");
        assert!(t.contains("caching   test"), "{t}");
        let t = text(&c, &[]);
        assert!(t.contains("--control-url"), "{t}");
    }
}
