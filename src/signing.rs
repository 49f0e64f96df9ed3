//! The deployment's L2 signing key: HMAC-SHA256 over what pgtier stores in
//! Redis (and over its L2 epoch notifications), so that whoever can write to
//! Redis, or NOTIFY the invalidation channel, cannot make pgtier replay bytes
//! that no pgtier of this deployment produced.
//!
//! The key is given as hex (`openssl rand -hex 32`) or as `base64:<...>`,
//! inline (`l2.signing_key`, `PGTIER_L2_SIGNING_KEY`, `--l2-signing-key`) or
//! in a file (`l2.signing_key_file`); at least 32 bytes.

use std::path::{Path, PathBuf};

use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Shorter keys are refused: the MAC is only as strong as its key.
pub const MIN_KEY_BYTES: usize = 32;
pub const TAG_LEN: usize = 32;

/// Why a signing key was refused; says what is wrong with it, never the key.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("not valid base64 ({0})")]
    Base64(#[from] base64::DecodeError),
    #[error("must be hex digits (e.g. `openssl rand -hex 32`) or base64:<base64 text>")]
    NotHex,
    #[error("is {0} bytes; at least {MIN_KEY_BYTES} are required")]
    TooShort(usize),
    #[error("set signing_key or signing_key_file, not both")]
    Both,
    #[error("cannot read {}: {source}", path.display())]
    Unreadable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {source}", path.display())]
    InFile {
        path: PathBuf,
        source: Box<KeyError>,
    },
}

/// Decode a key as written in the configuration.
pub fn parse_key(text: &str) -> Result<Vec<u8>, KeyError> {
    let text = text.trim();
    let bytes = match text.strip_prefix("base64:") {
        Some(b64) => base64::engine::general_purpose::STANDARD.decode(b64.trim())?,
        None => decode_hex(text).ok_or(KeyError::NotHex)?,
    };
    if bytes.len() < MIN_KEY_BYTES {
        return Err(KeyError::TooShort(bytes.len()));
    }
    Ok(bytes)
}

/// The key from the inline setting or the file (not both).
pub fn load_key(inline: Option<&str>, file: Option<&Path>) -> Result<Option<Vec<u8>>, KeyError> {
    match (inline, file) {
        (Some(_), Some(_)) => Err(KeyError::Both),
        (Some(k), None) => parse_key(k).map(Some),
        (None, Some(path)) => {
            let text = std::fs::read_to_string(path).map_err(|source| KeyError::Unreadable {
                path: path.to_path_buf(),
                source,
            })?;
            parse_key(&text).map(Some).map_err(|e| KeyError::InFile {
                path: path.to_path_buf(),
                source: Box::new(e),
            })
        }
        (None, None) => Ok(None),
    }
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if s.is_empty() || !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// A keyed MAC, prepared once (the key's inner and outer pads are computed
/// here, so each use costs only the hashing of its input).
#[derive(Clone)]
pub struct Signer {
    mac: Hmac<Sha256>,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.write_str("Signer(****)")
    }
}

impl Signer {
    pub fn new(key: &[u8]) -> Signer {
        Signer {
            // HMAC takes keys of any length.
            mac: <Hmac<Sha256> as Mac>::new_from_slice(key)
                .unwrap_or_else(|_| unreachable!("HMAC accepts any key length")),
        }
    }

    /// The tag over `parts`, each length-prefixed so no two different lists of
    /// parts hash alike.
    pub fn tag(&self, parts: &[&[u8]]) -> [u8; TAG_LEN] {
        let mut m = self.mac.clone();
        for p in parts {
            m.update(&(p.len() as u64).to_le_bytes());
            m.update(p);
        }
        m.finalize().into_bytes().into()
    }

    /// Constant-time check of a tag over `parts`.
    pub fn verify(&self, parts: &[&[u8]], tag: &[u8]) -> bool {
        let mut m = self.mac.clone();
        for p in parts {
            m.update(&(p.len() as u64).to_le_bytes());
            m.update(p);
        }
        m.verify_slice(tag).is_ok()
    }
}

pub fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn from_hex(s: &str) -> Option<Vec<u8>> {
    decode_hex(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_hex_or_base64_and_long_enough() {
        let hex = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
        assert_eq!(parse_key(hex).unwrap().len(), 32);
        assert_eq!(parse_key(&format!(" {hex}\n")).unwrap().len(), 32);
        let b64 = base64::engine::general_purpose::STANDARD.encode([7u8; 48]);
        assert_eq!(parse_key(&format!("base64:{b64}")).unwrap(), vec![7u8; 48]);
        assert!(parse_key("00112233")
            .unwrap_err()
            .to_string()
            .contains("at least 32"));
        assert!(parse_key("not hex at all").is_err());
        assert!(parse_key(&hex[1..]).is_err(), "odd length");
        assert!(load_key(Some(hex), Some(Path::new("/x"))).is_err());
        assert_eq!(load_key(None, None).unwrap(), None);
        assert!(load_key(None, Some(Path::new("/nonexistent/key")))
            .unwrap_err()
            .to_string()
            .contains("cannot read"));
    }

    #[test]
    fn tags_bind_every_part_and_the_key() {
        let a = Signer::new(&[1u8; 32]);
        let b = Signer::new(&[2u8; 32]);
        let t = a.tag(&[b"key", b"value"]);
        assert!(a.verify(&[b"key", b"value"], &t));
        assert!(!b.verify(&[b"key", b"value"], &t));
        assert!(!a.verify(&[b"key2", b"value"], &t));
        assert!(!a.verify(&[b"keyv", b"alue"], &t), "parts are delimited");
        assert!(!a.verify(&[b"key", b"value"], &t[..16]));
        assert_eq!(from_hex(&to_hex(&t)).as_deref(), Some(&t[..]));
    }
}
