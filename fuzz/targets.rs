//! The fuzz targets: one function per decoder family, each taking arbitrary
//! bytes. Shared by the fuzz driver (`fuzz/decoders.rs`) and the corpus replay
//! test (`tests/fuzz_corpus.rs`), so every input the fuzzer kept stays a
//! regression test.
//!
//! A target returns the features the input exercised (the driver keeps inputs
//! that add new ones, a cheap stand-in for coverage) or a finding: an oracle that
//! failed. Panics are caught by the caller. Oracles go beyond "no crash": every
//! message a decoder accepts must re-encode to the very bytes it came from, so
//! pgtier never acts on a different reading of a message than Postgres would.
#![allow(dead_code)]

use std::collections::BTreeSet;

use bytes::BytesMut;
use pgtier::protocol::backend::{
    self, Authentication, BackendKeyData, ErrorFields, ParameterStatus, ReadyForQuery,
};
use pgtier::protocol::codec::peek_header;
use pgtier::protocol::frontend::Frontend;
use pgtier::protocol::startup::{packet_len, StartupPacket, MAX_STARTUP_PACKET, PROTOCOL_3_0};
use pgtier::protocol::ProtocolError;
use pgtier::sql::{analyze, NotCacheable, SessionEffect};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    Frontend,
    Backend,
    Startup,
    Sql,
}

pub const ALL: [Target; 4] = [
    Target::Frontend,
    Target::Backend,
    Target::Startup,
    Target::Sql,
];

impl Target {
    pub fn name(self) -> &'static str {
        match self {
            Target::Frontend => "frontend",
            Target::Backend => "backend",
            Target::Startup => "startup",
            Target::Sql => "sql",
        }
    }

    pub fn parse(s: &str) -> Option<Target> {
        ALL.into_iter().find(|t| t.name() == s)
    }
}

pub type Features = BTreeSet<String>;

/// Run one input through a target.
pub fn run(target: Target, data: &[u8]) -> Result<Features, String> {
    match target {
        Target::Frontend => frontend_stream(data),
        Target::Backend => backend_stream(data),
        Target::Startup => startup_packet(data),
        Target::Sql => sql(data),
    }
}

/// Same limit as the proxy's default `max_message_size`, small enough that a
/// fuzzed length field is usually out of range.
const MAX_MESSAGE: usize = 1 << 20;

fn err_kind(e: &ProtocolError) -> String {
    match e {
        ProtocolError::BadLength { .. } => "bad_length".into(),
        ProtocolError::TooLarge { .. } => "too_large".into(),
        ProtocolError::Truncated { what, .. } => format!("truncated:{what}"),
        ProtocolError::UnknownFrontend(_) => "unknown_frontend".into(),
        ProtocolError::UnknownBackend(_) => "unknown_backend".into(),
        ProtocolError::BadStartup(m) => {
            let m: String = m.chars().filter(|c| !c.is_ascii_digit()).collect();
            format!("bad_startup:{m}")
        }
        ProtocolError::TrailingBytes { .. } => "trailing_bytes".into(),
        ProtocolError::UnsupportedVersion { .. } => "unsupported_version".into(),
    }
}

/// Walks a buffer the way the session loop does: header, tag check, decode.
fn frames(
    data: &[u8],
    known: fn(u8) -> bool,
    mut each: impl FnMut(u8, &[u8], &[u8]) -> Result<String, String>,
    f: &mut Features,
) -> Result<(), String> {
    let mut at = 0;
    let mut prev = '^';
    loop {
        let rest = &data[at..];
        let h = match peek_header(rest, MAX_MESSAGE) {
            Ok(Some(h)) => h,
            Ok(None) => {
                f.insert(format!("end:{}", rest.len().min(5)));
                return Ok(());
            }
            Err(e) => {
                f.insert(format!("header:{}", err_kind(&e)));
                return Ok(());
            }
        };
        if !known(h.tag) {
            f.insert("unknown_tag".into());
            return Ok(());
        }
        if h.total_len < 5 {
            return Err(format!("header accepted total_len {} < 5", h.total_len));
        }
        if rest.len() < h.total_len {
            f.insert(format!("partial:{}", h.tag as char));
            return Ok(());
        }
        let msg = &rest[..h.total_len];
        let outcome = each(h.tag, &msg[5..], msg)?;
        let tag = h.tag as char;
        f.insert(format!("{tag}:{outcome}"));
        f.insert(format!("{prev}{tag}"));
        prev = tag;
        at += h.total_len;
    }
}

fn frontend_stream(data: &[u8]) -> Result<Features, String> {
    let mut f = Features::new();
    frames(data, Frontend::is_known_tag, frontend_message, &mut f)?;
    Ok(f)
}

/// Decode one frontend message; an accepted message must re-encode exactly.
pub fn frontend_message(tag: u8, body: &[u8], raw: &[u8]) -> Result<String, String> {
    let msg = match Frontend::decode(tag, body) {
        Ok(m) => m,
        Err(e) => return Ok(err_kind(&e)),
    };
    let mut out = BytesMut::new();
    match msg {
        Frontend::Query(m) => m.encode(&mut out),
        Frontend::Parse(m) => m.encode(&mut out),
        Frontend::Bind(m) => {
            let values = m.param_values();
            if values.len() > m.param_count {
                return Err(format!(
                    "Bind: {} values for {} parameters",
                    values.len(),
                    m.param_count
                ));
            }
            if !m.args.ends_with(m.result_formats) {
                return Err("Bind: result formats are not the tail of args".into());
            }
            m.encode(&mut out)
        }
        Frontend::Describe(m) => m.encode(&mut out),
        Frontend::Execute(m) => m.encode(&mut out),
        Frontend::Close(m) => m.encode(&mut out),
        // Postgres rejects a body on these ("invalid message format").
        Frontend::Sync | Frontend::Flush => {
            if !body.is_empty() {
                return Err(format!(
                    "'{}' accepted with a {}-byte body",
                    tag as char,
                    body.len()
                ));
            }
            return Ok("ok".into());
        }
        // Postgres does not look past what it needs in these: neither do we.
        Frontend::CopyDone
        | Frontend::Terminate
        | Frontend::CopyFail(_)
        | Frontend::CopyData(_)
        | Frontend::FunctionCall(_)
        | Frontend::Password(_) => return Ok("opaque".into()),
    }
    if &out[..] != raw {
        return Err(format!(
            "'{}' accepted but re-encodes differently ({} bytes in, {} out)",
            tag as char,
            raw.len(),
            out.len()
        ));
    }
    Ok("ok".into())
}

fn backend_stream(data: &[u8]) -> Result<Features, String> {
    let mut f = Features::new();
    frames(data, backend::is_known_tag, backend_message, &mut f)?;
    Ok(f)
}

/// Decode one backend message the proxy looks inside of.
pub fn backend_message(tag: u8, body: &[u8], raw: &[u8]) -> Result<String, String> {
    let mut out = BytesMut::new();
    let res: Result<bool, ProtocolError> = match tag {
        backend::AUTHENTICATION => Authentication::decode(body).map(|a| {
            let exact = matches!(
                a,
                Authentication::SaslContinue(_) | Authentication::SaslFinal(_)
            ) || (matches!(a, Authentication::Ok | Authentication::CleartextPassword)
                && body.len() == 4)
                || (matches!(a, Authentication::Md5Password { .. }) && body.len() == 8);
            a.encode(&mut out);
            exact
        }),
        backend::PARAMETER_STATUS => ParameterStatus::decode(body).map(|p| {
            p.encode(&mut out);
            body.len() == p.name.len() + p.value.len() + 2
        }),
        backend::BACKEND_KEY_DATA => BackendKeyData::decode(body).map(|k| {
            k.encode(&mut out);
            body.len() == 8
        }),
        backend::READY_FOR_QUERY => ReadyForQuery::decode(body).map(|r| {
            r.encode(&mut out);
            body.len() == 1
        }),
        backend::COMMAND_COMPLETE => backend::CommandComplete::decode(body).map(|c| {
            c.encode(&mut out);
            body.len() == c.tag.len() + 1
        }),
        backend::ERROR_RESPONSE | backend::NOTICE_RESPONSE => {
            ErrorFields::decode(tag, body).map(|_| false)
        }
        backend::ROW_DESCRIPTION => backend::row_description_columns(body).map(|_| false),
        _ => return Ok("relayed".into()),
    };
    match res {
        Err(e) => Ok(err_kind(&e)),
        Ok(true) if &out[..] != raw => Err(format!(
            "backend '{}' decoded and re-encoded differently",
            tag as char
        )),
        Ok(_) => Ok("ok".into()),
    }
}

fn startup_packet(data: &[u8]) -> Result<Features, String> {
    let mut f = Features::new();
    let len = match packet_len(data) {
        Ok(Some(len)) => len,
        Ok(None) => {
            f.insert("short".into());
            return Ok(f);
        }
        Err(e) => {
            f.insert(format!("len:{}", err_kind(&e)));
            return Ok(f);
        }
    };
    if !(8..=MAX_STARTUP_PACKET).contains(&len) {
        return Err(format!("packet_len accepted {len}"));
    }
    if data.len() < len {
        f.insert("partial".into());
        return Ok(f);
    }
    let packet = &data[..len];
    match StartupPacket::decode(packet) {
        Err(e) => {
            f.insert(format!("decode:{}", err_kind(&e)));
        }
        Ok(StartupPacket::Startup(m)) => {
            f.insert(format!("startup:{}", m.params.len().min(8)));
            for (k, _) in &m.params {
                if ["user", "database", "options", "replication"].contains(&k.as_str()) {
                    f.insert(format!("param:{k}"));
                }
            }
            let mut out = BytesMut::new();
            m.encode(&mut out);
            // encode() always writes 3.0: compare with the version put back.
            let mut again = out.to_vec();
            again[4..8].copy_from_slice(&(PROTOCOL_3_0 | i32::from(m.minor_version)).to_be_bytes());
            if again != packet {
                return Err("startup message accepted but re-encodes differently".into());
            }
        }
        Ok(StartupPacket::Cancel(c)) => {
            f.insert("cancel".into());
            let mut out = BytesMut::new();
            c.encode(&mut out);
            if &out[..] != packet {
                return Err("cancel request re-encodes differently".into());
            }
        }
        Ok(p) => {
            f.insert(format!("{p:?}"));
            if len != 8 {
                f.insert("request_with_body".into());
            }
        }
    }
    Ok(f)
}

const SQL_WORDS: [&str; 24] = [
    "select",
    "with",
    "values",
    "table",
    "set",
    "reset",
    "discard",
    "deallocate",
    "insert",
    "update",
    "delete",
    "merge",
    "create",
    "drop",
    "alter",
    "truncate",
    "do",
    "call",
    "copy",
    "into",
    "for",
    "pg_temp",
    "union",
    "lateral",
];

fn label(e: &SessionEffect) -> &'static str {
    match e {
        SessionEffect::Set { .. } => "set",
        SessionEffect::Reset { .. } => "reset",
        SessionEffect::ResetAll => "reset_all",
        SessionEffect::DiscardAll => "discard_all",
        SessionEffect::Deallocate(_) => "deallocate",
        SessionEffect::Taint(t) => t.label(),
        SessionEffect::CreatesUnqualified => "creates_unqualified",
    }
}

/// Statement analysis of arbitrary text, as the cache does it (lossy UTF-8).
fn sql(data: &[u8]) -> Result<Features, String> {
    let text = String::from_utf8_lossy(data);
    let a = analyze(&text);
    let mut f = Features::new();
    let verdict = match &a.read {
        Ok(r) => {
            if !r.user_functions.is_empty() && !a.may_write {
                return Err("a read calling user functions is not counted as a write".into());
            }
            if r.user_functions.is_empty() && a.may_write {
                return Err("a cacheable read without user functions may write".into());
            }
            format!("read:{}:{}", r.tables.len().min(4), r.ctes.len().min(2))
        }
        Err(e) => e.reason().label().to_string(),
    };
    let lower = text.to_ascii_lowercase();
    for w in SQL_WORDS {
        if lower.contains(w) {
            f.insert(format!("{w}:{verdict}"));
        }
    }
    f.insert(verdict.clone());
    for e in &a.effects {
        f.insert(format!("effect:{}", label(e)));
    }
    f.insert(format!("may_write:{}", a.may_write));
    if a.read.is_ok() && !a.writes.is_empty() {
        return Err(format!("a cacheable read writes {:?}", a.writes));
    }
    // Metamorphic: a leading comment changes no statement's meaning.
    let b = analyze(&format!("/* c */ {text}"));
    if a.read != b.read
        || a.effects != b.effects
        || a.writes != b.writes
        || a.may_write != b.may_write
    {
        // An unterminated comment or quote at the end can swallow differently.
        if !matches!(a.read, Err(NotCacheable::ParseError)) {
            return Err(format!(
                "a leading comment changes the analysis: {:?} vs {:?}",
                a.read, b.read
            ));
        }
    }
    Ok(f)
}
