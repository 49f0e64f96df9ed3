//! Messages sent by clients after startup. One type per message, `decode` next to
//! `encode`; decoded values borrow from the receive buffer.

use bytes::{BufMut, BytesMut};

use super::codec::{begin, finish, put_cstr, Reader};
use super::error::tag_char;
use super::ProtocolError;

/// Simple query: one string that may hold several statements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Query<'a> {
    pub sql: &'a [u8],
}

impl<'a> Query<'a> {
    pub const TAG: u8 = b'Q';
    pub fn decode(body: &'a [u8]) -> Result<Self, ProtocolError> {
        let mut r = Reader::new(Self::TAG, body);
        let sql = r.cstr("query string")?;
        r.end()?;
        Ok(Query { sql })
    }
    pub fn encode(&self, buf: &mut BytesMut) {
        let at = begin(buf, Self::TAG);
        put_cstr(buf, self.sql);
        finish(buf, at);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parse<'a> {
    pub name: &'a [u8],
    pub query: &'a [u8],
    /// Raw big-endian parameter type OIDs (4 bytes each).
    pub param_types: &'a [u8],
}

impl<'a> Parse<'a> {
    pub const TAG: u8 = b'P';
    pub fn decode(body: &'a [u8]) -> Result<Self, ProtocolError> {
        let mut r = Reader::new(Self::TAG, body);
        let p = Parse {
            name: r.cstr("statement name")?,
            query: r.cstr("query string")?,
            param_types: r.i32_array("parameter types")?,
        };
        r.end()?;
        Ok(p)
    }
    pub fn encode(&self, buf: &mut BytesMut) {
        let at = begin(buf, Self::TAG);
        put_cstr(buf, self.name);
        put_cstr(buf, self.query);
        buf.put_i16((self.param_types.len() / 4) as i16);
        buf.put_slice(self.param_types);
        finish(buf, at);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bind<'a> {
    pub portal: &'a [u8],
    pub statement: &'a [u8],
    /// Everything after the statement name: parameter formats, values and result
    /// formats, exactly as sent. Together with the statement this fully determines
    /// the result, so the cache key hashes it as one slice.
    pub args: &'a [u8],
    /// Raw result format codes (2 bytes each), a sub-slice of `args`.
    pub result_formats: &'a [u8],
    pub param_count: usize,
}

impl<'a> Bind<'a> {
    pub const TAG: u8 = b'B';
    pub fn decode(body: &'a [u8]) -> Result<Self, ProtocolError> {
        let mut r = Reader::new(Self::TAG, body);
        let portal = r.cstr("portal name")?;
        let statement = r.cstr("statement name")?;
        let args = r.remaining();
        r.i16_array("parameter formats")?;
        let n = r.i16("parameter count")?;
        if n < 0 {
            return Err(ProtocolError::Truncated {
                tag: 'B',
                what: "parameter count",
            });
        }
        for _ in 0..n {
            let len = r.i32("parameter length")?;
            if len > 0 {
                r.bytes(len as usize, "parameter value")?;
            } else if len < -1 {
                return Err(ProtocolError::Truncated {
                    tag: 'B',
                    what: "parameter length",
                });
            }
        }
        let result_formats = r.i16_array("result formats")?;
        r.end()?;
        Ok(Bind {
            portal,
            statement,
            args,
            result_formats,
            param_count: n as usize,
        })
    }
    pub fn encode(&self, buf: &mut BytesMut) {
        let at = begin(buf, Self::TAG);
        put_cstr(buf, self.portal);
        put_cstr(buf, self.statement);
        buf.put_slice(self.args);
        finish(buf, at);
    }

    /// Parameter `index` (0-based): whether it is sent in binary, and its
    /// value (`None` for NULL); `None` if there is no such parameter.
    pub fn param(&self, index: usize) -> Option<(bool, Option<&'a [u8]>)> {
        let mut r = Reader::new(Self::TAG, self.args);
        let formats = r.i16_array("parameter formats").ok()?;
        let n = r.i16("parameter count").ok()?.max(0) as usize;
        if index >= n {
            return None;
        }
        // No codes: all text; one code: for every parameter; else one each.
        let code_at = |i: usize| i16::from_be_bytes([formats[2 * i], formats[2 * i + 1]]);
        let binary = match formats.len() / 2 {
            0 => false,
            1 => code_at(0) == 1,
            k if index < k => code_at(index) == 1,
            _ => return None,
        };
        for i in 0..=index {
            let len = r.i32("parameter length").ok()?;
            let value = if len < 0 {
                None
            } else {
                Some(r.bytes(len as usize, "parameter value").ok()?)
            };
            if i == index {
                return Some((binary, value));
            }
        }
        None
    }

    /// Every non-NULL parameter value, whatever its format (a text parameter
    /// may well be sent in binary, where its bytes are the text itself).
    pub fn param_values(&self) -> Vec<&'a [u8]> {
        let mut r = Reader::new(Self::TAG, self.args);
        let _ = r.i16_array("parameter formats");
        let n = r.i16("parameter count").unwrap_or(0).max(0) as usize;
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let Ok(len) = r.i32("parameter length") else {
                break;
            };
            if len < 0 {
                continue;
            }
            let Ok(v) = r.bytes(len as usize, "parameter value") else {
                break;
            };
            out.push(v);
        }
        out
    }
}

/// Describe or Close target: a prepared statement ('S') or a portal ('P').
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Statement,
    Portal,
}

impl Target {
    fn decode(r: &mut Reader<'_>, tag: u8) -> Result<Self, ProtocolError> {
        match r.u8("target kind")? {
            b'S' => Ok(Target::Statement),
            b'P' => Ok(Target::Portal),
            _ => Err(ProtocolError::Truncated {
                tag: tag_char(tag),
                what: "target kind must be 'S' or 'P'",
            }),
        }
    }
    fn byte(self) -> u8 {
        match self {
            Target::Statement => b'S',
            Target::Portal => b'P',
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Describe<'a> {
    pub target: Target,
    pub name: &'a [u8],
}

impl<'a> Describe<'a> {
    pub const TAG: u8 = b'D';
    pub fn decode(body: &'a [u8]) -> Result<Self, ProtocolError> {
        let mut r = Reader::new(Self::TAG, body);
        let d = Describe {
            target: Target::decode(&mut r, Self::TAG)?,
            name: r.cstr("name")?,
        };
        r.end()?;
        Ok(d)
    }
    pub fn encode(&self, buf: &mut BytesMut) {
        let at = begin(buf, Self::TAG);
        buf.put_u8(self.target.byte());
        put_cstr(buf, self.name);
        finish(buf, at);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Execute<'a> {
    pub portal: &'a [u8],
    /// 0 means "all rows"; anything else may leave the portal suspended.
    pub max_rows: i32,
}

impl<'a> Execute<'a> {
    pub const TAG: u8 = b'E';
    pub fn decode(body: &'a [u8]) -> Result<Self, ProtocolError> {
        let mut r = Reader::new(Self::TAG, body);
        let e = Execute {
            portal: r.cstr("portal name")?,
            max_rows: r.i32("row limit")?,
        };
        r.end()?;
        Ok(e)
    }
    pub fn encode(&self, buf: &mut BytesMut) {
        let at = begin(buf, Self::TAG);
        put_cstr(buf, self.portal);
        buf.put_i32(self.max_rows);
        finish(buf, at);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Close<'a> {
    pub target: Target,
    pub name: &'a [u8],
}

impl<'a> Close<'a> {
    pub const TAG: u8 = b'C';
    pub fn decode(body: &'a [u8]) -> Result<Self, ProtocolError> {
        let mut r = Reader::new(Self::TAG, body);
        let c = Close {
            target: Target::decode(&mut r, Self::TAG)?,
            name: r.cstr("name")?,
        };
        r.end()?;
        Ok(c)
    }
    pub fn encode(&self, buf: &mut BytesMut) {
        let at = begin(buf, Self::TAG);
        buf.put_u8(self.target.byte());
        put_cstr(buf, self.name);
        finish(buf, at);
    }
}

/// Messages without a body, or whose body the proxy never needs to look inside.
pub const SYNC: u8 = b'S';
pub const FLUSH: u8 = b'H';
pub const TERMINATE: u8 = b'X';
pub const COPY_DATA: u8 = b'd';
pub const COPY_DONE: u8 = b'c';
pub const COPY_FAIL: u8 = b'f';
pub const FUNCTION_CALL: u8 = b'F';
/// Password, SASLInitialResponse, SASLResponse and GSSResponse share this tag.
pub const PASSWORD: u8 = b'p';

/// Encoded Sync and Terminate, for messages the proxy sends on its own behalf.
pub const SYNC_BYTES: &[u8] = b"S\0\0\0\x04";
pub const TERMINATE_BYTES: &[u8] = b"X\0\0\0\x04";

/// A decoded frontend message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frontend<'a> {
    Query(Query<'a>),
    Parse(Parse<'a>),
    Bind(Bind<'a>),
    Describe(Describe<'a>),
    Execute(Execute<'a>),
    Close(Close<'a>),
    Sync,
    Flush,
    Terminate,
    CopyData(&'a [u8]),
    CopyDone,
    CopyFail(&'a [u8]),
    FunctionCall(&'a [u8]),
    Password(&'a [u8]),
}

impl<'a> Frontend<'a> {
    /// Decode one message given its tag and body (without tag and length).
    pub fn decode(tag: u8, body: &'a [u8]) -> Result<Self, ProtocolError> {
        Ok(match tag {
            Query::TAG => Frontend::Query(Query::decode(body)?),
            Parse::TAG => Frontend::Parse(Parse::decode(body)?),
            Bind::TAG => Frontend::Bind(Bind::decode(body)?),
            Describe::TAG => Frontend::Describe(Describe::decode(body)?),
            Execute::TAG => Frontend::Execute(Execute::decode(body)?),
            Close::TAG => Frontend::Close(Close::decode(body)?),
            // Postgres checks these are empty; CopyDone and Terminate it does not.
            SYNC => {
                Reader::new(tag, body).end()?;
                Frontend::Sync
            }
            FLUSH => {
                Reader::new(tag, body).end()?;
                Frontend::Flush
            }
            TERMINATE => Frontend::Terminate,
            COPY_DATA => Frontend::CopyData(body),
            COPY_DONE => Frontend::CopyDone,
            COPY_FAIL => Frontend::CopyFail(Reader::new(tag, body).cstr("error message")?),
            FUNCTION_CALL => Frontend::FunctionCall(body),
            PASSWORD => Frontend::Password(body),
            other => return Err(ProtocolError::UnknownFrontend(tag_char(other))),
        })
    }

    /// Whether `tag` is a message a client may send after startup.
    pub fn is_known_tag(tag: u8) -> bool {
        matches!(
            tag,
            b'Q' | b'P'
                | b'B'
                | b'D'
                | b'E'
                | b'C'
                | b'S'
                | b'H'
                | b'X'
                | b'd'
                | b'c'
                | b'f'
                | b'F'
                | b'p'
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(f: impl Fn(&mut BytesMut)) -> (u8, Vec<u8>) {
        let mut b = BytesMut::new();
        f(&mut b);
        let len = i32::from_be_bytes([b[1], b[2], b[3], b[4]]) as usize;
        assert_eq!(len + 1, b.len(), "length field must cover the body");
        (b[0], b[5..].to_vec())
    }

    #[test]
    fn parse_bind_execute_roundtrip() {
        let p = Parse {
            name: b"s1",
            query: b"select $1::int",
            param_types: &23i32.to_be_bytes(),
        };
        let (tag, body) = roundtrip(|b| p.encode(b));
        assert_eq!(Frontend::decode(tag, &body).unwrap(), Frontend::Parse(p));

        // one text param "42", one binary result column
        let mut args = Vec::new();
        args.extend_from_slice(&0i16.to_be_bytes());
        args.extend_from_slice(&1i16.to_be_bytes());
        args.extend_from_slice(&2i32.to_be_bytes());
        args.extend_from_slice(b"42");
        args.extend_from_slice(&1i16.to_be_bytes());
        args.extend_from_slice(&1i16.to_be_bytes());
        let b = Bind {
            portal: b"",
            statement: b"s1",
            args: &args,
            result_formats: &args[args.len() - 2..],
            param_count: 1,
        };
        let (tag, body) = roundtrip(|buf| b.encode(buf));
        assert_eq!(Frontend::decode(tag, &body).unwrap(), Frontend::Bind(b));

        let e = Execute {
            portal: b"",
            max_rows: 0,
        };
        let (tag, body) = roundtrip(|buf| e.encode(buf));
        assert_eq!(Frontend::decode(tag, &body).unwrap(), Frontend::Execute(e));
    }

    #[test]
    fn malformed_bind_is_an_error_not_a_panic() {
        // claims 3 params but carries none
        let body = b"\0s\0\0\0\0\x03";
        assert!(Bind::decode(body).is_err());
        // negative parameter length other than -1
        let body = b"\0s\0\0\0\0\x01\xff\xff\xff\xfe\0\0";
        assert!(Bind::decode(body).is_err());
        assert!(Frontend::decode(b'Z', b"").is_err());
        assert!(Describe::decode(b"X\0").is_err());
    }

    /// Found by fuzzing: bytes after a message's last field were ignored, so a
    /// message Postgres refuses ("invalid message format") could be answered
    /// from the cache.
    #[test]
    fn trailing_bytes_are_refused_like_postgres_does() {
        let trailing = |tag: u8, body: &[u8]| {
            matches!(
                Frontend::decode(tag, body),
                Err(ProtocolError::TrailingBytes { extra: 1, .. })
            )
        };
        assert!(trailing(b'Q', b"select 1\0x"));
        assert!(trailing(b'P', b"s\0select 1\0\0\0x"));
        assert!(trailing(b'D', b"Ss\0x"));
        assert!(trailing(b'E', b"\0\0\0\0\0x"));
        assert!(trailing(b'C', b"Ps\0x"));
        assert!(trailing(b'B', b"\0\0\0\0\0\0\0\0x"));
        assert!(trailing(b'S', b"x"));
        assert!(trailing(b'H', b"x"));
        // Postgres reads no further than the message it needs in these
        assert!(Frontend::decode(b'X', b"x").is_ok());
        assert!(Frontend::decode(b'c', b"x").is_ok());
        assert!(Frontend::decode(b'f', b"gave up\0x").is_ok());
    }
}
