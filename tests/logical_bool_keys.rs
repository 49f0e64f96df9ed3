//! Key-level invalidation on the logical source with a `bool` key: pgoutput
//! writes a bool as `t`/`f`, a read's key is spelled `true`/`false`. Before the
//! stream's values were spelled alike, a write to a bool key bumped a key no
//! read was tagged with, and the read stayed stale, for writes made elsewhere
//! and for the session's own (found by a helper's adversarial review).

mod common;

use common::connect_str;
use common::logical::{cluster, schema, start_pgtier_with, TTL};
use common::sql::{first, until, warm};

#[tokio::test]
async fn writes_to_a_bool_key_invalidate_reads_by_it() {
    let cluster = cluster();
    let port = cluster.port;
    let ctl = schema(port).await;
    ctl.batch_execute(
        "create table bp(k bool primary key, v int); insert into bp values (true, 1), (false, 2);",
    )
    .await
    .unwrap();
    let p = start_pgtier_with(port, TTL, &["--auto-install-triggers", "--key-level"]).await;
    let direct = connect_str(&format!(
        "host=127.0.0.1 port={port} user=postgres dbname=lg"
    ))
    .await;
    let c = p.connect("lg").await;
    let q = "select v from bp where k = true";
    // Keyed: a write to the other key leaves the read a hit (the column set
    // is registered through the stream, so it may take a write or two).
    let mut keyed = false;
    for _ in 0..20 {
        warm(&p, &c, q, "1").await;
        c.batch_execute("update bp set v = v + 1 where k = false")
            .await
            .unwrap();
        let before = p.metrics().await.hits();
        assert_eq!(first(&c, q).await, "1");
        if p.metrics().await.hits() > before {
            keyed = true;
            break;
        }
    }
    assert!(keyed, "the read by the bool key was never key-tagged");
    // Elsewhere.
    direct
        .batch_execute("update bp set v = 777 where k = true")
        .await
        .unwrap();
    until(&c, q, "777").await;
    // Through pgtier: the very next read.
    warm(&p, &c, q, "777").await;
    c.batch_execute("update bp set v = 888 where k = true")
        .await
        .unwrap();
    assert_eq!(first(&c, q).await, "888", "the session's own write");
}
