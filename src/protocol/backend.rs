//! Messages sent by the server. The proxy relays most of them untouched and only
//! decodes the ones whose contents it needs (status, parameters, errors, auth).

use bytes::{BufMut, Bytes, BytesMut};

use super::codec::{begin, finish, put_cstr, Reader};
use super::error::tag_char;
use super::{ProtocolError, TxStatus};

pub const AUTHENTICATION: u8 = b'R';
pub const PARAMETER_STATUS: u8 = b'S';
pub const BACKEND_KEY_DATA: u8 = b'K';
pub const READY_FOR_QUERY: u8 = b'Z';
pub const ERROR_RESPONSE: u8 = b'E';
pub const NOTICE_RESPONSE: u8 = b'N';
pub const NOTIFICATION_RESPONSE: u8 = b'A';
pub const ROW_DESCRIPTION: u8 = b'T';
pub const DATA_ROW: u8 = b'D';
pub const COMMAND_COMPLETE: u8 = b'C';
pub const EMPTY_QUERY_RESPONSE: u8 = b'I';
pub const PARSE_COMPLETE: u8 = b'1';
pub const BIND_COMPLETE: u8 = b'2';
pub const CLOSE_COMPLETE: u8 = b'3';
pub const NO_DATA: u8 = b'n';
pub const PORTAL_SUSPENDED: u8 = b's';
pub const PARAMETER_DESCRIPTION: u8 = b't';
pub const COPY_IN_RESPONSE: u8 = b'G';
pub const COPY_OUT_RESPONSE: u8 = b'H';
pub const COPY_BOTH_RESPONSE: u8 = b'W';
pub const COPY_DATA: u8 = b'd';
pub const COPY_DONE: u8 = b'c';
pub const FUNCTION_CALL_RESPONSE: u8 = b'V';
pub const NEGOTIATE_PROTOCOL_VERSION: u8 = b'v';

/// Pre-encoded replies the proxy emits itself; static so a cache hit allocates nothing.
pub const PARSE_COMPLETE_BYTES: &[u8] = b"1\0\0\0\x04";
pub const BIND_COMPLETE_BYTES: &[u8] = b"2\0\0\0\x04";
pub const CLOSE_COMPLETE_BYTES: &[u8] = b"3\0\0\0\x04";
pub const NO_DATA_BYTES: &[u8] = b"n\0\0\0\x04";
pub const READY_IDLE_BYTES: &[u8] = b"Z\0\0\0\x05I";

pub fn is_known_tag(tag: u8) -> bool {
    matches!(
        tag,
        b'R' | b'S'
            | b'K'
            | b'Z'
            | b'E'
            | b'N'
            | b'A'
            | b'T'
            | b'D'
            | b'C'
            | b'I'
            | b'1'
            | b'2'
            | b'3'
            | b'n'
            | b's'
            | b't'
            | b'G'
            | b'H'
            | b'W'
            | b'd'
            | b'c'
            | b'V'
            | b'v'
    )
}

/// Authentication request from the server ('R').
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Authentication<'a> {
    Ok,
    CleartextPassword,
    Md5Password {
        salt: [u8; 4],
    },
    /// Mechanism names, NUL-separated, as sent.
    Sasl {
        mechanisms: Vec<&'a [u8]>,
    },
    SaslContinue(&'a [u8]),
    SaslFinal(&'a [u8]),
    /// Kerberos, GSS, SSPI: relayed opaquely, the client must answer.
    Other {
        code: i32,
    },
}

impl<'a> Authentication<'a> {
    pub const TAG: u8 = AUTHENTICATION;
    pub fn decode(body: &'a [u8]) -> Result<Self, ProtocolError> {
        let mut r = Reader::new(Self::TAG, body);
        Ok(match r.i32("authentication code")? {
            0 => Authentication::Ok,
            3 => Authentication::CleartextPassword,
            5 => {
                let s = r.bytes(4, "md5 salt")?;
                Authentication::Md5Password {
                    salt: [s[0], s[1], s[2], s[3]],
                }
            }
            10 => {
                let mut mechanisms = Vec::new();
                loop {
                    let m = r.cstr("SASL mechanism")?;
                    if m.is_empty() {
                        break;
                    }
                    mechanisms.push(m);
                }
                Authentication::Sasl { mechanisms }
            }
            11 => Authentication::SaslContinue(r.remaining()),
            12 => Authentication::SaslFinal(r.remaining()),
            code => Authentication::Other { code },
        })
    }

    /// Whether the client must reply with a 'p' message.
    pub fn expects_response(&self) -> bool {
        !matches!(self, Authentication::Ok | Authentication::SaslFinal(_))
    }

    pub fn encode(&self, buf: &mut BytesMut) {
        let at = begin(buf, Self::TAG);
        match self {
            Authentication::Ok => buf.put_i32(0),
            Authentication::CleartextPassword => buf.put_i32(3),
            Authentication::Md5Password { salt } => {
                buf.put_i32(5);
                buf.put_slice(salt);
            }
            Authentication::Sasl { mechanisms } => {
                buf.put_i32(10);
                for m in mechanisms {
                    put_cstr(buf, m);
                }
                buf.put_u8(0);
            }
            Authentication::SaslContinue(d) => {
                buf.put_i32(11);
                buf.put_slice(d);
            }
            Authentication::SaslFinal(d) => {
                buf.put_i32(12);
                buf.put_slice(d);
            }
            Authentication::Other { code } => buf.put_i32(*code),
        }
        finish(buf, at);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParameterStatus<'a> {
    pub name: &'a [u8],
    pub value: &'a [u8],
}

impl<'a> ParameterStatus<'a> {
    pub const TAG: u8 = PARAMETER_STATUS;
    pub fn decode(body: &'a [u8]) -> Result<Self, ProtocolError> {
        let mut r = Reader::new(Self::TAG, body);
        Ok(ParameterStatus {
            name: r.cstr("parameter name")?,
            value: r.cstr("parameter value")?,
        })
    }
    pub fn encode(&self, buf: &mut BytesMut) {
        let at = begin(buf, Self::TAG);
        put_cstr(buf, self.name);
        put_cstr(buf, self.value);
        finish(buf, at);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackendKeyData {
    pub pid: i32,
    pub secret: i32,
}

impl BackendKeyData {
    pub const TAG: u8 = BACKEND_KEY_DATA;
    pub fn decode(body: &[u8]) -> Result<Self, ProtocolError> {
        let mut r = Reader::new(Self::TAG, body);
        Ok(BackendKeyData {
            pid: r.i32("process id")?,
            secret: r.i32("secret key")?,
        })
    }
    pub fn encode(&self, buf: &mut BytesMut) {
        let at = begin(buf, Self::TAG);
        buf.put_i32(self.pid);
        buf.put_i32(self.secret);
        finish(buf, at);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadyForQuery {
    pub status: TxStatus,
}

impl ReadyForQuery {
    pub const TAG: u8 = READY_FOR_QUERY;
    pub fn decode(body: &[u8]) -> Result<Self, ProtocolError> {
        let b = Reader::new(Self::TAG, body).u8("transaction status")?;
        let status = TxStatus::from_byte(b).ok_or(ProtocolError::Truncated {
            tag: 'Z',
            what: "unknown transaction status",
        })?;
        Ok(ReadyForQuery { status })
    }
    pub fn encode(&self, buf: &mut BytesMut) {
        let at = begin(buf, Self::TAG);
        buf.put_u8(self.status.as_byte());
        finish(buf, at);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommandComplete<'a> {
    pub tag: &'a [u8],
}

impl<'a> CommandComplete<'a> {
    pub const TAG: u8 = COMMAND_COMPLETE;
    pub fn decode(body: &'a [u8]) -> Result<Self, ProtocolError> {
        Ok(CommandComplete {
            tag: Reader::new(Self::TAG, body).cstr("command tag")?,
        })
    }
    pub fn encode(&self, buf: &mut BytesMut) {
        let at = begin(buf, Self::TAG);
        put_cstr(buf, self.tag);
        finish(buf, at);
    }
}

/// ErrorResponse and NoticeResponse share one layout: (field code, value) pairs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorFields<'a> {
    pub severity: &'a [u8],
    pub code: &'a [u8],
    pub message: &'a [u8],
}

impl<'a> ErrorFields<'a> {
    pub fn decode(tag: u8, body: &'a [u8]) -> Result<Self, ProtocolError> {
        let mut r = Reader::new(tag, body);
        let mut out = ErrorFields {
            severity: b"",
            code: b"",
            message: b"",
        };
        loop {
            let field = r.u8("field type")?;
            if field == 0 {
                break;
            }
            let value = r.cstr("field value")?;
            match field {
                b'V' => out.severity = value,
                b'S' if out.severity.is_empty() => out.severity = value,
                b'C' => out.code = value,
                b'M' => out.message = value,
                _ => {}
            }
        }
        Ok(out)
    }
}

/// Severity of an error or notice the proxy itself emits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Error,
    Fatal,
    Notice,
}

impl Severity {
    fn as_bytes(self) -> &'static [u8] {
        match self {
            Severity::Error => b"ERROR",
            Severity::Fatal => b"FATAL",
            Severity::Notice => b"NOTICE",
        }
    }
}

/// An ErrorResponse (or NoticeResponse) composed by pgtier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorResponse<'a> {
    pub severity: Severity,
    /// SQLSTATE, five characters.
    pub code: &'a str,
    pub message: &'a str,
}

impl ErrorResponse<'_> {
    pub fn encode(&self, buf: &mut BytesMut) {
        let tag = if self.severity == Severity::Notice {
            NOTICE_RESPONSE
        } else {
            ERROR_RESPONSE
        };
        let at = begin(buf, tag);
        buf.put_u8(b'S');
        put_cstr(buf, self.severity.as_bytes());
        buf.put_u8(b'V');
        put_cstr(buf, self.severity.as_bytes());
        buf.put_u8(b'C');
        put_cstr(buf, self.code.as_bytes());
        buf.put_u8(b'M');
        // NUL bytes would end the field early; no message of ours should carry one.
        let msg: Vec<u8> = self.message.bytes().filter(|&b| b != 0).collect();
        put_cstr(buf, &msg);
        buf.put_u8(0);
        finish(buf, at);
    }

    pub fn to_bytes(&self) -> Bytes {
        let mut b = BytesMut::with_capacity(64 + self.message.len());
        self.encode(&mut b);
        b.freeze()
    }
}

/// NegotiateProtocolVersion: tells a client asking for 3.x (x > 0) that we speak 3.0,
/// and which `_pq_.` options we did not recognise.
pub struct NegotiateProtocolVersion<'a> {
    pub newest_minor: i32,
    pub unrecognized: &'a [&'a [u8]],
}

impl NegotiateProtocolVersion<'_> {
    pub fn encode(&self, buf: &mut BytesMut) {
        let at = begin(buf, NEGOTIATE_PROTOCOL_VERSION);
        buf.put_i32((3 << 16) | self.newest_minor);
        buf.put_i32(self.unrecognized.len() as i32);
        for o in self.unrecognized {
            put_cstr(buf, o);
        }
        finish(buf, at);
    }
}

/// A column in a RowDescription composed by pgtier (the admin console).
pub struct Column<'a> {
    pub name: &'a str,
    pub type_oid: i32,
}

pub fn encode_row_description(buf: &mut BytesMut, columns: &[Column<'_>]) {
    let at = begin(buf, ROW_DESCRIPTION);
    buf.put_i16(columns.len() as i16);
    for c in columns {
        put_cstr(buf, c.name.as_bytes());
        buf.put_i32(0); // table oid
        buf.put_i16(0); // column number
        buf.put_i32(c.type_oid);
        buf.put_i16(-1); // type size
        buf.put_i32(-1); // type modifier
        buf.put_i16(0); // text format
    }
    finish(buf, at);
}

/// A DataRow in text format; `None` is SQL NULL.
pub fn encode_data_row(buf: &mut BytesMut, values: &[Option<&[u8]>]) {
    let at = begin(buf, DATA_ROW);
    buf.put_i16(values.len() as i16);
    for v in values {
        match v {
            Some(v) => {
                buf.put_i32(v.len() as i32);
                buf.put_slice(v);
            }
            None => buf.put_i32(-1),
        }
    }
    finish(buf, at);
}

/// Field count of a RowDescription body, used to sanity-check cached results.
pub fn row_description_columns(body: &[u8]) -> Result<i16, ProtocolError> {
    Reader::new(ROW_DESCRIPTION, body).i16("field count")
}

pub fn describe_tag(tag: u8) -> char {
    tag_char(tag)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(b: &BytesMut) -> &[u8] {
        &b[5..]
    }

    #[test]
    fn auth_sasl_roundtrip_and_strip() {
        let a = Authentication::Sasl {
            mechanisms: vec![b"SCRAM-SHA-256-PLUS", b"SCRAM-SHA-256"],
        };
        let mut b = BytesMut::new();
        a.encode(&mut b);
        assert_eq!(Authentication::decode(body(&b)).unwrap(), a);
        assert!(a.expects_response());
        assert!(!Authentication::Ok.expects_response());
    }

    #[test]
    fn error_response_encodes_fields() {
        let e = ErrorResponse {
            severity: Severity::Fatal,
            code: "08P01",
            message: "bad",
        };
        let b = e.to_bytes();
        let f = ErrorFields::decode(b'E', &b[5..]).unwrap();
        assert_eq!(f.severity, b"FATAL");
        assert_eq!(f.code, b"08P01");
        assert_eq!(f.message, b"bad");
    }

    #[test]
    fn ready_for_query_roundtrip() {
        let mut b = BytesMut::new();
        ReadyForQuery {
            status: TxStatus::Idle,
        }
        .encode(&mut b);
        assert_eq!(&b[..], READY_IDLE_BYTES);
        assert!(ReadyForQuery::decode(b"X").is_err());
    }
}
