//! A client's cancel request is relayed to its server connection, where
//! pgtier may be running a request of its own ahead of the client's (a
//! stale-while-revalidate refresh). The cancel is for the client's statement:
//! if it stopped pgtier's refresh instead, it is sent again, and the client
//! gets `57014` as Postgres would send it. Before, the refresh was cancelled
//! and the client's statement ran to its end (found by a helper's review).

mod common;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use common::wire::{query, Until, Wire};
use common::{direct, fresh_db, Pgtier};

const SCHEMA: &str = "
create table t(id int primary key, v text); insert into t values (1, 'a');
-- IMMUTABLE by declaration (pgtier trusts it), and slow.
create function slow(i int) returns int language plpgsql immutable as
  $$ begin perform pg_sleep(1); return i; end $$;";

/// Send a CancelRequest for `w`'s session to `port` (the key pgtier relayed
/// in BackendKeyData) and wait for the connection to close.
fn cancel(port: u16, w: &Wire) {
    let key = w
        .startup
        .iter()
        .find(|m| m.tag == b'K')
        .expect("BackendKeyData");
    let mut packet = 16i32.to_be_bytes().to_vec();
    packet.extend_from_slice(&80_877_102i32.to_be_bytes());
    packet.extend_from_slice(&key.body[..8]);
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.write_all(&packet).expect("cancel");
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = s.read(&mut [0u8; 16]);
}

#[tokio::test]
async fn a_cancel_that_stopped_a_refresh_reaches_the_clients_statement() {
    let db = fresh_db("cancel_refresh").await;
    direct(&db).await.batch_execute(SCHEMA).await.unwrap();
    let toml = "[cache]\ndefault_ttl = \"10m\"\n[[cache.rules]]\nquery = \"slow\"\nttl = \"1s\"\nswr = \"30s\"\n";
    let p = Pgtier::cached(&db, toml, &[]).await;
    let sql = "select slow(id), v from t where id = 1";
    let mut w = Wire::connect(p.port, "postgres", &db);
    w.step(&query(sql), Until::Ready(1));
    let expired = Instant::now() + Duration::from_millis(1200);
    while Instant::now() < expired {
        std::thread::sleep(Duration::from_millis(50));
    }
    // Stale: answered at once, refreshed on the session's connection (1 s).
    let r = w.step(&query(sql), Until::Ready(1));
    assert_eq!(r.tags(), "T D C Z");
    // The client's own slow statement queues behind the refresh; cancelled.
    let sent = Instant::now();
    w.send(&query("select pg_sleep(3), 'q2'"));
    std::thread::sleep(Duration::from_millis(300));
    cancel(p.port, &w);
    let r = w.read(Until::Ready(1), Duration::from_secs(10));
    let code = r.msgs.iter().find_map(|m| m.code());
    assert_eq!(
        code.as_deref(),
        Some("57014"),
        "the client's statement was not cancelled: {:?} after {:?}",
        r.msgs,
        sent.elapsed()
    );
    assert!(
        sent.elapsed() < Duration::from_secs(3),
        "{:?}",
        sent.elapsed()
    );
    let r = w.step(&query("select 'in step'"), Until::Ready(1));
    assert_eq!(r.tags(), "T D C Z");
}
