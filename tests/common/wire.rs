//! A raw wire-protocol client for tests: frontend messages built as bytes and
//! written exactly as given (one write per step, so coalescing is under the
//! test's control), backend replies read back as whole messages with a bounded
//! wait. `same_replies` runs one script against Postgres and against pgtier and
//! compares the reply streams message by message and byte for byte.
//!
//! Blocking std sockets on purpose: usable from any test, thread or harness
//! without a runtime. Trust authentication only (the shared Postgres uses it).

use std::fmt;
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// How long one step may take before the reply counts as missing (a hang).
pub const STEP_TIMEOUT: Duration = Duration::from_secs(5);

/// One backend message.
#[derive(Clone, PartialEq, Eq)]
pub struct Msg {
    pub tag: u8,
    pub body: Vec<u8>,
}

impl Msg {
    /// The message as it was on the wire.
    pub fn bytes(&self) -> Vec<u8> {
        frame(self.tag, &self.body)
    }

    /// A field of an ErrorResponse or NoticeResponse ('C' code, 'M' message, ...).
    pub fn field(&self, code: u8) -> Option<String> {
        if !matches!(self.tag, b'E' | b'N') {
            return None;
        }
        self.body
            .split(|&b| b == 0)
            .find(|f| f.first() == Some(&code))
            .map(|f| String::from_utf8_lossy(&f[1..]).into_owned())
    }

    /// The SQLSTATE of an ErrorResponse.
    pub fn code(&self) -> Option<String> {
        self.field(b'C')
    }

    /// The body as text, without the trailing NUL (CommandComplete tags).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(self.body.strip_suffix(&[0]).unwrap_or(&self.body)).into_owned()
    }
}

impl fmt::Debug for Msg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let t = self.tag as char;
        match self.tag {
            b'E' | b'N' => write!(
                f,
                "{t}({} {})",
                self.code().unwrap_or_default(),
                self.field(b'M').unwrap_or_default()
            ),
            b'C' => write!(f, "C({})", self.text()),
            b'Z' => write!(f, "Z({})", self.body.first().map_or('?', |&b| b as char)),
            _ => write!(f, "{t}[{}]", self.body.len()),
        }
    }
}

/// Message tags as one string, e.g. "1 2 T D C Z".
pub fn tags(msgs: &[Msg]) -> String {
    msgs.iter()
        .map(|m| (m.tag as char).to_string())
        .collect::<Vec<_>>()
        .join(" ")
}

// ---- frontend messages ----

pub fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(body.len() + 5);
    m.push(tag);
    m.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    m.extend_from_slice(body);
    m
}

fn cstr(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(s.as_bytes());
    out.push(0);
}

/// A protocol 3.0 StartupMessage with these parameters, in this order.
pub fn startup(params: &[(&str, &str)]) -> Vec<u8> {
    let mut body = 196608i32.to_be_bytes().to_vec();
    for (k, v) in params {
        cstr(&mut body, k);
        cstr(&mut body, v);
    }
    body.push(0);
    let mut p = ((body.len() + 4) as i32).to_be_bytes().to_vec();
    p.extend_from_slice(&body);
    p
}

pub fn query(sql: &str) -> Vec<u8> {
    let mut b = Vec::new();
    cstr(&mut b, sql);
    frame(b'Q', &b)
}

pub fn parse(name: &str, sql: &str, types: &[u32]) -> Vec<u8> {
    let mut b = Vec::new();
    cstr(&mut b, name);
    cstr(&mut b, sql);
    b.extend_from_slice(&(types.len() as i16).to_be_bytes());
    for t in types {
        b.extend_from_slice(&t.to_be_bytes());
    }
    frame(b'P', &b)
}

/// Bind with explicit format codes (0 text, 1 binary); `None` is SQL NULL.
pub fn bind_formats(
    portal: &str,
    statement: &str,
    param_formats: &[i16],
    params: &[Option<&[u8]>],
    result_formats: &[i16],
) -> Vec<u8> {
    let mut b = Vec::new();
    cstr(&mut b, portal);
    cstr(&mut b, statement);
    b.extend_from_slice(&(param_formats.len() as i16).to_be_bytes());
    for f in param_formats {
        b.extend_from_slice(&f.to_be_bytes());
    }
    b.extend_from_slice(&(params.len() as i16).to_be_bytes());
    for p in params {
        match p {
            Some(v) => {
                b.extend_from_slice(&(v.len() as i32).to_be_bytes());
                b.extend_from_slice(v);
            }
            None => b.extend_from_slice(&(-1i32).to_be_bytes()),
        }
    }
    b.extend_from_slice(&(result_formats.len() as i16).to_be_bytes());
    for f in result_formats {
        b.extend_from_slice(&f.to_be_bytes());
    }
    frame(b'B', &b)
}

/// Bind with text parameters and text results.
pub fn bind(portal: &str, statement: &str, params: &[Option<&[u8]>]) -> Vec<u8> {
    bind_formats(portal, statement, &[], params, &[])
}

pub fn describe_statement(name: &str) -> Vec<u8> {
    let mut b = vec![b'S'];
    cstr(&mut b, name);
    frame(b'D', &b)
}

pub fn describe_portal(name: &str) -> Vec<u8> {
    let mut b = vec![b'P'];
    cstr(&mut b, name);
    frame(b'D', &b)
}

pub fn execute(portal: &str, max_rows: i32) -> Vec<u8> {
    let mut b = Vec::new();
    cstr(&mut b, portal);
    b.extend_from_slice(&max_rows.to_be_bytes());
    frame(b'E', &b)
}

pub fn close_statement(name: &str) -> Vec<u8> {
    let mut b = vec![b'S'];
    cstr(&mut b, name);
    frame(b'C', &b)
}

pub fn close_portal(name: &str) -> Vec<u8> {
    let mut b = vec![b'P'];
    cstr(&mut b, name);
    frame(b'C', &b)
}

pub fn sync() -> Vec<u8> {
    frame(b'S', &[])
}

pub fn flush() -> Vec<u8> {
    frame(b'H', &[])
}

pub fn terminate() -> Vec<u8> {
    frame(b'X', &[])
}

pub fn copy_data(data: &[u8]) -> Vec<u8> {
    frame(b'd', data)
}

pub fn copy_done() -> Vec<u8> {
    frame(b'c', &[])
}

pub fn copy_fail(message: &str) -> Vec<u8> {
    let mut b = Vec::new();
    cstr(&mut b, message);
    frame(b'f', &b)
}

/// Messages written as one unit.
pub fn concat(parts: &[Vec<u8>]) -> Vec<u8> {
    parts.concat()
}

/// The unnamed-statement round trip a driver sends for one query:
/// Parse, Bind, Describe portal, Execute, Sync.
pub fn extended_query(sql: &str, params: &[Option<&[u8]>]) -> Vec<u8> {
    concat(&[
        parse("", sql, &[]),
        bind("", "", params),
        describe_portal(""),
        execute("", 0),
        sync(),
    ])
}

/// Whole backend messages at the front of `buf`, and how many bytes they took.
pub fn split_messages(buf: &[u8]) -> (Vec<Msg>, usize) {
    let mut out = Vec::new();
    let mut at = 0;
    while at + 5 <= buf.len() {
        let len = i32::from_be_bytes([buf[at + 1], buf[at + 2], buf[at + 3], buf[at + 4]]);
        let end = at + 1 + len.max(4) as usize;
        if end > buf.len() {
            break;
        }
        out.push(Msg {
            tag: buf[at],
            body: buf[at + 5..end].to_vec(),
        });
        at = end;
    }
    (out, at)
}

// ---- a connection ----

/// How reading a reply ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    /// The expected number of ReadyForQuery messages (or the tag) arrived.
    Ready,
    /// The server closed the connection.
    Closed,
    /// Neither happened in time: the client would hang.
    TimedOut,
}

/// What to read after a step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Until {
    /// This many ReadyForQuery messages (0: read nothing).
    Ready(usize),
    /// Until a message with this tag (e.g. b'G', CopyInResponse).
    Tag(u8),
    /// Until the server closes the connection.
    Closed,
}

#[derive(Clone, Debug)]
pub struct Reply {
    pub msgs: Vec<Msg>,
    pub end: End,
}

impl Reply {
    pub fn tags(&self) -> String {
        tags(&self.msgs)
    }
}

/// One raw connection.
pub struct Wire {
    pub stream: TcpStream,
    buf: Vec<u8>,
    /// What the server sent up to and including the first ReadyForQuery.
    pub startup: Vec<Msg>,
}

impl Wire {
    /// A TCP connection with nothing sent yet.
    pub fn open(port: u16) -> Wire {
        let stream = TcpStream::connect(("127.0.0.1", port))
            .unwrap_or_else(|e| panic!("connect to port {port}: {e}"));
        let _ = stream.set_nodelay(true);
        Wire {
            stream,
            buf: Vec::new(),
            startup: Vec::new(),
        }
    }

    /// Connect and start a session as `user` on `db` (trust authentication),
    /// sending `extra` in the same write as the startup packet.
    pub fn start(port: u16, user: &str, db: &str, extra: &[u8]) -> (Wire, Reply) {
        let mut w = Wire::open(port);
        let mut first = startup(&[("user", user), ("database", db)]);
        first.extend_from_slice(extra);
        w.send(&first);
        let r = w.read(Until::Ready(1), STEP_TIMEOUT);
        assert_eq!(r.end, End::Ready, "startup on port {port}: {:?}", r.msgs);
        (w, r)
    }

    /// A session at its first ReadyForQuery.
    pub fn connect(port: u16, user: &str, db: &str) -> Wire {
        let (mut w, r) = Wire::start(port, user, db, &[]);
        w.startup = r.msgs;
        w
    }

    /// Write all of `bytes` in one call.
    pub fn send(&mut self, bytes: &[u8]) {
        if let Err(e) = self.stream.write_all(bytes) {
            // A server that closed early is a result the reads report.
            if !matches!(e.kind(), ErrorKind::BrokenPipe | ErrorKind::ConnectionReset) {
                panic!("write: {e}");
            }
        }
    }

    /// Read messages until `until` or `within` passes.
    pub fn read(&mut self, until: Until, within: Duration) -> Reply {
        let deadline = Instant::now() + within;
        let mut msgs = Vec::new();
        let mut ready = 0;
        let mut chunk = [0u8; 16 * 1024];
        loop {
            while let Some(m) = self.next_buffered() {
                ready += usize::from(m.tag == b'Z');
                let tag = m.tag;
                msgs.push(m);
                if until == Until::Ready(ready) || until == Until::Tag(tag) {
                    // Whatever followed stays buffered for the next read.
                    return Reply {
                        msgs,
                        end: End::Ready,
                    };
                }
            }
            if until == Until::Ready(0) {
                return Reply {
                    msgs,
                    end: End::Ready,
                };
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Reply {
                    msgs,
                    end: End::TimedOut,
                };
            }
            let _ = self.stream.set_read_timeout(Some(left));
            match self.stream.read(&mut chunk) {
                Ok(0) => {
                    return Reply {
                        msgs,
                        end: End::Closed,
                    }
                }
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => {
                    return Reply {
                        msgs,
                        end: End::Closed,
                    }
                }
            }
        }
    }

    fn next_buffered(&mut self) -> Option<Msg> {
        let b = &self.buf;
        if b.len() < 5 {
            return None;
        }
        let len = i32::from_be_bytes([b[1], b[2], b[3], b[4]]).max(4) as usize;
        if b.len() < len + 1 {
            return None;
        }
        let m = Msg {
            tag: b[0],
            body: b[5..len + 1].to_vec(),
        };
        self.buf.drain(..len + 1);
        Some(m)
    }

    /// Send one step and read its reply.
    pub fn step(&mut self, bytes: &[u8], until: Until) -> Reply {
        self.send(bytes);
        self.read(until, STEP_TIMEOUT)
    }
}

/// One write and what to read after it.
#[derive(Clone, Debug)]
pub struct Step {
    pub send: Vec<u8>,
    pub until: Until,
}

pub fn step(send: Vec<u8>, until: Until) -> Step {
    Step { send, until }
}

/// A query after the script: its reply proves the stream is still in step.
pub fn probe() -> Step {
    step(query("SELECT 'in step' AS probe"), Until::Ready(1))
}

/// Run `steps` on a new session on `port` (startup written together with the
/// first step when `with_startup` is set).
pub fn run_script(port: u16, db: &str, steps: &[Step], with_startup: bool) -> Vec<Reply> {
    let mut out = Vec::new();
    let (mut w, rest) = if with_startup && !steps.is_empty() {
        // `start` consumed the startup's own ReadyForQuery; the rest is the step's.
        let (mut w, _) = Wire::start(port, "postgres", db, &steps[0].send);
        out.push(w.read(steps[0].until, STEP_TIMEOUT));
        (w, &steps[1..])
    } else {
        (Wire::connect(port, "postgres", db), steps)
    };
    for s in rest {
        out.push(w.step(&s.send, s.until));
    }
    out
}

/// Messages whose bytes legitimately differ between two connections.
fn comparable(m: &Msg) -> Vec<u8> {
    match m.tag {
        // NotificationResponse carries the sending backend's pid.
        b'A' => vec![b'A'],
        _ => m.bytes(),
    }
}

/// Run the script against Postgres and against pgtier on `port`; assert that
/// every step gets the same messages, byte for byte, ending the same way.
/// Returns pgtier's replies.
pub fn same_replies(port: u16, db: &str, what: &str, steps: &[Step]) -> Vec<Reply> {
    same_replies_with(port, db, what, steps, false)
}

pub fn same_replies_with(
    port: u16,
    db: &str,
    what: &str,
    steps: &[Step],
    with_startup: bool,
) -> Vec<Reply> {
    same_replies_at(super::PG_PORT, port, db, what, steps, with_startup)
}

/// [`same_replies_with`] against the Postgres on `direct` (a test's own
/// cluster).
pub fn same_replies_at(
    direct: u16,
    port: u16,
    db: &str,
    what: &str,
    steps: &[Step],
    with_startup: bool,
) -> Vec<Reply> {
    let want = run_script(direct, db, steps, with_startup);
    let got = run_script(port, db, steps, with_startup);
    for (i, (w, g)) in want.iter().zip(&got).enumerate() {
        assert_ne!(
            w.end,
            End::TimedOut,
            "{what}: step {i} timed out against Postgres itself: {:?}",
            w.msgs
        );
        assert!(
            (g.end, g.tags()) == (w.end, w.tags()),
            "{what}: step {i}: pgtier answered\n  {:?} {:?}\nwhere Postgres answered\n  {:?} {:?}",
            g.end,
            g.msgs,
            w.end,
            w.msgs
        );
        let wb: Vec<Vec<u8>> = w.msgs.iter().map(comparable).collect();
        let gb: Vec<Vec<u8>> = g.msgs.iter().map(comparable).collect();
        assert!(
            wb == gb,
            "{what}: step {i}: same message types, different bytes:\n  {:?}\n  {:?}",
            g.msgs,
            w.msgs
        );
    }
    got
}

/// A write run as the unnamed statement, then that statement used again with
/// no Parse; then the write again with a read parsed as the unnamed statement
/// pipelined behind it (on the server before the write's fence), and that
/// read used again. Whatever pgtier sends on the session's connection after a
/// write (a read-your-writes fence) must leave the client's unnamed statement
/// as Postgres has it. `read` runs first, so the written table is one pgtier
/// caches; the write must not change what `read` returns.
pub fn unnamed_write_reused(read: &str, write: &str) -> Vec<Step> {
    let again = concat(&[bind("", "", &[]), execute("", 0), sync()]);
    vec![
        step(extended_query(read, &[]), Until::Ready(1)),
        step(
            concat(&[
                parse("", write, &[]),
                bind("", "", &[]),
                execute("", 0),
                sync(),
            ]),
            Until::Ready(1),
        ),
        step(again.clone(), Until::Ready(1)),
        step(
            concat(&[again.clone(), extended_query(read, &[])]),
            Until::Ready(2),
        ),
        step(again, Until::Ready(1)),
        step(concat(&[describe_statement(""), sync()]), Until::Ready(1)),
        probe(),
    ]
}
