//! The untagged packets a client may send before the session starts.

use bytes::{BufMut, BytesMut};

use super::ProtocolError;

/// Postgres refuses longer startup packets; so do we, before buffering them.
pub const MAX_STARTUP_PACKET: usize = 10_000;

pub const SSL_REQUEST_CODE: i32 = 80877103;
pub const GSSENC_REQUEST_CODE: i32 = 80877104;
pub const CANCEL_REQUEST_CODE: i32 = 80877102;
pub const PROTOCOL_3_0: i32 = 196608;

/// A cancel request: the backend key the server handed out at startup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CancelRequest {
    pub pid: i32,
    pub secret: i32,
}

impl CancelRequest {
    pub fn encode(&self, buf: &mut BytesMut) {
        buf.put_i32(16);
        buf.put_i32(CANCEL_REQUEST_CODE);
        buf.put_i32(self.pid);
        buf.put_i32(self.secret);
    }
}

/// The StartupMessage proper: protocol version and `name=value` parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartupMessage {
    pub minor_version: u16,
    pub params: Vec<(String, String)>,
}

impl StartupMessage {
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The role the client logs in as (required by Postgres).
    pub fn user(&self) -> Option<&str> {
        self.param("user")
    }

    /// The database, which defaults to the user name.
    pub fn database(&self) -> Option<&str> {
        self.param("database").or_else(|| self.user())
    }

    /// Always encodes protocol 3.0: pgtier negotiates newer minors down itself.
    pub fn encode(&self, buf: &mut BytesMut) {
        let at = buf.len();
        buf.put_i32(0);
        buf.put_i32(PROTOCOL_3_0);
        for (k, v) in &self.params {
            buf.put_slice(k.as_bytes());
            buf.put_u8(0);
            buf.put_slice(v.as_bytes());
            buf.put_u8(0);
        }
        buf.put_u8(0);
        let len = (buf.len() - at) as i32;
        buf[at..at + 4].copy_from_slice(&len.to_be_bytes());
    }
}

/// Anything a client may open a connection with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartupPacket {
    SslRequest,
    GssEncRequest,
    Cancel(CancelRequest),
    Startup(StartupMessage),
}

/// Length of the packet at the front of `buf`, once its 4-byte length is readable.
pub fn packet_len(buf: &[u8]) -> Result<Option<usize>, ProtocolError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = i32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
    if len < 8 || len as usize > MAX_STARTUP_PACKET {
        return Err(ProtocolError::BadStartup(format!(
            "invalid length {len} (expected 8 to {MAX_STARTUP_PACKET} bytes)"
        )));
    }
    Ok(Some(len as usize))
}

impl StartupPacket {
    /// Decode a whole packet (length prefix included).
    pub fn decode(packet: &[u8]) -> Result<Self, ProtocolError> {
        if packet.len() < 8 {
            return Err(ProtocolError::BadStartup("packet too short".into()));
        }
        let code = i32::from_be_bytes([packet[4], packet[5], packet[6], packet[7]]);
        let rest = &packet[8..];
        match code {
            SSL_REQUEST_CODE => Ok(StartupPacket::SslRequest),
            GSSENC_REQUEST_CODE => Ok(StartupPacket::GssEncRequest),
            CANCEL_REQUEST_CODE => {
                if rest.len() != 8 {
                    return Err(ProtocolError::BadStartup(
                        "cancel request must be 16 bytes".into(),
                    ));
                }
                Ok(StartupPacket::Cancel(CancelRequest {
                    pid: i32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]),
                    secret: i32::from_be_bytes([rest[4], rest[5], rest[6], rest[7]]),
                }))
            }
            _ => {
                let major = (code >> 16) as u16;
                let minor = (code & 0xffff) as u16;
                if major != 3 {
                    return Err(ProtocolError::UnsupportedVersion { major, minor });
                }
                Ok(StartupPacket::Startup(StartupMessage {
                    minor_version: minor,
                    params: decode_params(rest)?,
                }))
            }
        }
    }
}

fn decode_params(mut rest: &[u8]) -> Result<Vec<(String, String)>, ProtocolError> {
    let mut params = Vec::new();
    loop {
        let (key, r) = cstr(rest)?;
        if key.is_empty() {
            if !r.is_empty() {
                return Err(ProtocolError::BadStartup(
                    "trailing bytes after the parameter list".into(),
                ));
            }
            return Ok(params);
        }
        let (value, r) = cstr(r)?;
        let key = utf8(key)?;
        // Postgres lets a repeated key override the earlier one; anything that
        // read the first (the cache key, the console) would then disagree with
        // the server about who the session is. No driver repeats keys.
        if params
            .iter()
            .any(|(k, _): &(String, String)| k.eq_ignore_ascii_case(&key))
        {
            return Err(ProtocolError::BadStartup(format!(
                "parameter \"{key}\" appears more than once"
            )));
        }
        params.push((key, utf8(value)?));
        rest = r;
    }
}

fn cstr(buf: &[u8]) -> Result<(&[u8], &[u8]), ProtocolError> {
    let pos = buf
        .iter()
        .position(|&b| b == 0)
        .ok_or_else(|| ProtocolError::BadStartup("parameter list is not NUL-terminated".into()))?;
    Ok((&buf[..pos], &buf[pos + 1..]))
}

fn utf8(b: &[u8]) -> Result<String, ProtocolError> {
    String::from_utf8(b.to_vec())
        .map_err(|_| ProtocolError::BadStartup("parameter is not valid UTF-8".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn startup_roundtrip() {
        let m = StartupMessage {
            minor_version: 0,
            params: vec![
                ("user".into(), "alice".into()),
                ("database".into(), "db".into()),
            ],
        };
        let mut b = BytesMut::new();
        m.encode(&mut b);
        assert_eq!(packet_len(&b).unwrap(), Some(b.len()));
        assert_eq!(
            StartupPacket::decode(&b).unwrap(),
            StartupPacket::Startup(m)
        );
    }

    #[test]
    fn rejects_garbage() {
        assert!(packet_len(b"GET / HTTP/1.1\r\n").is_err());
        assert!(packet_len(&[0, 0, 0, 3]).is_err());
        let mut v2 = vec![0, 0, 0, 9];
        v2.extend_from_slice(&(2i32 << 16).to_be_bytes());
        v2.push(0);
        assert!(matches!(
            StartupPacket::decode(&v2),
            Err(ProtocolError::UnsupportedVersion { major: 2, .. })
        ));
        let mut bad = vec![0, 0, 0, 12];
        bad.extend_from_slice(&PROTOCOL_3_0.to_be_bytes());
        bad.extend_from_slice(b"user");
        assert!(StartupPacket::decode(&bad).is_err());
    }

    #[test]
    fn rejects_repeated_keys() {
        for params in [
            vec![("user", "alice"), ("database", "db"), ("user", "bob")],
            vec![("user", "alice"), ("database", "a"), ("database", "b")],
            vec![("user", "alice"), ("TimeZone", "UTC"), ("timezone", "EST")],
        ] {
            let m = StartupMessage {
                minor_version: 0,
                params: params
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            };
            let mut b = BytesMut::new();
            m.encode(&mut b);
            assert!(
                matches!(StartupPacket::decode(&b), Err(ProtocolError::BadStartup(e)) if e.contains("more than once")),
                "{:?}",
                m.params
            );
        }
    }
}
