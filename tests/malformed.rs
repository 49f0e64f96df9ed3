//! Bad input on the wire: every case gets a FATAL error naming the problem and a
//! closed connection, while other sessions carry on.

mod common;

use std::time::Duration;

use common::Pgtier;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn startup_packet(user: &str, db: &str) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&196608i32.to_be_bytes());
    for (k, v) in [("user", user), ("database", db)] {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut p = ((body.len() + 4) as i32).to_be_bytes().to_vec();
    p.extend_from_slice(&body);
    p
}

/// Read everything until the peer closes (bounded), returning the bytes.
async fn read_to_close(s: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    assert!(r.is_ok(), "pgtier did not close the connection");
    out
}

/// Find the first ErrorResponse in a byte stream: (severity, code, message).
fn first_error(bytes: &[u8]) -> Option<(String, String, String)> {
    let mut i = 0;
    while i + 5 <= bytes.len() {
        let tag = bytes[i];
        let len =
            i32::from_be_bytes([bytes[i + 1], bytes[i + 2], bytes[i + 3], bytes[i + 4]]) as usize;
        let end = (i + 1 + len).min(bytes.len());
        if tag == b'E' {
            let mut fields = (String::new(), String::new(), String::new());
            for f in bytes[i + 5..end].split(|&b| b == 0) {
                if f.is_empty() {
                    continue;
                }
                let v = String::from_utf8_lossy(&f[1..]).into_owned();
                match f[0] {
                    b'S' => fields.0 = v,
                    b'C' => fields.1 = v,
                    b'M' => fields.2 = v,
                    _ => {}
                }
            }
            return Some(fields);
        }
        i = end;
    }
    None
}

/// Connect raw, complete startup (trust auth), return the stream at ReadyForQuery.
async fn raw_session(port: u16) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.write_all(&startup_packet("postgres", "test"))
        .await
        .unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut chunk))
            .await
            .expect("startup timed out")
            .unwrap();
        assert!(n > 0, "closed during startup");
        buf.extend_from_slice(&chunk[..n]);
        // ReadyForQuery is the last startup message: 'Z' len=5 status
        if buf.len() >= 6 && buf[buf.len() - 6] == b'Z' {
            return s;
        }
    }
}

async fn expect_fatal(s: &mut TcpStream, code: &str, needle: &str) {
    let bytes = read_to_close(s).await;
    let (sev, c, msg) =
        first_error(&bytes).unwrap_or_else(|| panic!("no ErrorResponse in {bytes:?}"));
    assert_eq!(sev, "FATAL");
    assert_eq!(c, code, "message: {msg}");
    assert!(msg.contains(needle), "'{msg}' should mention '{needle}'");
}

#[tokio::test]
async fn malformed_input_is_refused_and_others_continue() {
    let p = Pgtier::start(&[]);
    let healthy = p.connect("test").await;
    let check_healthy = || async {
        let r: i32 = healthy
            .query_one("select 41 + 1", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(r, 42);
    };
    check_healthy().await;

    // garbage before startup
    let mut s = TcpStream::connect(("127.0.0.1", p.port)).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    expect_fatal(&mut s, "08P01", "invalid startup packet").await;
    check_healthy().await;

    // a protocol version other than 3
    let mut s = TcpStream::connect(("127.0.0.1", p.port)).await.unwrap();
    let mut pkt = 8i32.to_be_bytes().to_vec();
    pkt.extend_from_slice(&(2i32 << 16).to_be_bytes());
    s.write_all(&pkt).await.unwrap();
    expect_fatal(&mut s, "08P01", "unsupported frontend protocol 2.0").await;

    // a 2 GB length field after startup
    let mut s = raw_session(p.port).await;
    s.write_all(&[b'Q', 0x7f, 0xff, 0xff, 0xff, b's'])
        .await
        .unwrap();
    expect_fatal(&mut s, "08P01", "larger than max_message_size").await;
    check_healthy().await;

    // a message whose fields are truncated: Bind announcing 3 parameters, carrying none
    let mut s = raw_session(p.port).await;
    let body = b"\0s\0\0\0\0\x03";
    let mut msg = vec![b'B'];
    msg.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    msg.extend_from_slice(body);
    s.write_all(&msg).await.unwrap();
    expect_fatal(&mut s, "08P01", "truncated").await;

    // a length field smaller than the length field itself
    let mut s = raw_session(p.port).await;
    s.write_all(&[b'Q', 0, 0, 0, 2]).await.unwrap();
    expect_fatal(&mut s, "08P01", "invalid message length").await;

    // an unknown message type
    let mut s = raw_session(p.port).await;
    s.write_all(&[b'y', 0, 0, 0, 4]).await.unwrap();
    expect_fatal(&mut s, "08P01", "invalid frontend message type").await;

    // half a message, then the client vanishes: nothing to report, nothing breaks
    let mut s = raw_session(p.port).await;
    s.write_all(&[b'Q', 0, 0, 0, 100, b's', b'e'])
        .await
        .unwrap();
    drop(s);

    check_healthy().await;
    // and new sessions still work
    let again = p.connect("test").await;
    assert_eq!(
        again
            .query_one("select 1", &[])
            .await
            .unwrap()
            .get::<_, i32>(0),
        1
    );
}
