//! SCRAM-SHA-256, server side, for the admin console: pgtier checks these
//! passwords itself (the console has no upstream), against verifiers in the
//! config (the format Postgres stores in pg_authid; `pgtier hash-password`
//! makes one with postgres-protocol).

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::{Digest, Sha256};

type HmacSha256 = Hmac<Sha256>;

/// `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verifier {
    pub iterations: u32,
    pub salt: Vec<u8>,
    pub stored_key: Vec<u8>,
    pub server_key: Vec<u8>,
}

impl Verifier {
    pub fn parse(s: &str) -> Option<Verifier> {
        let rest = s.strip_prefix("SCRAM-SHA-256$")?;
        let (params, keys) = rest.split_once('$')?;
        let (iter, salt) = params.split_once(':')?;
        let (stored, server) = keys.split_once(':')?;
        let v = Verifier {
            iterations: iter.parse().ok().filter(|&i| i > 0)?,
            salt: B64.decode(salt).ok()?,
            stored_key: B64.decode(stored).ok()?,
            server_key: B64.decode(server).ok()?,
        };
        (v.stored_key.len() == 32 && v.server_key.len() == 32).then_some(v)
    }

    /// A verifier no password matches, for unknown users (so the exchange looks
    /// the same whether or not the user exists).
    pub fn decoy() -> Verifier {
        let mut r = [0u8; 16];
        rand::thread_rng().fill_bytes(&mut r);
        Verifier {
            iterations: 4096,
            salt: r.to_vec(),
            stored_key: vec![0; 32],
            server_key: vec![0; 32],
        }
    }
}

/// A verifier for a password (for `pgtier hash-password`).
pub fn hash_password(password: &str) -> String {
    postgres_protocol::password::scram_sha_256(password.as_bytes())
}

fn hmac(key: &[u8], msg: &[u8]) -> Vec<u8> {
    let mut m = match HmacSha256::new_from_slice(key) {
        Ok(m) => m,
        Err(_) => return vec![0; 32],
    };
    m.update(msg);
    m.finalize().into_bytes().to_vec()
}

/// One server-side exchange.
pub struct Exchange {
    verifier: Verifier,
    client_first_bare: String,
    server_first: String,
    nonce: String,
}

/// Why an exchange failed; `Malformed` is a protocol error, `Rejected` a wrong password.
#[derive(Debug, PartialEq, Eq)]
pub enum Failure {
    Malformed(&'static str),
    Rejected,
}

impl Exchange {
    /// Handle the client-first message; returns the exchange and server-first.
    pub fn start(verifier: Verifier, client_first: &str) -> Result<(Exchange, String), Failure> {
        // gs2 header: "n,," (no channel binding) or "y,," (client supports it,
        // server did not offer it). "p=..." would ask for binding we never offer.
        let bare = client_first
            .strip_prefix("n,,")
            .or_else(|| client_first.strip_prefix("y,,"))
            .ok_or(Failure::Malformed(
                "unsupported channel binding in SCRAM client-first message",
            ))?;
        let cnonce = bare
            .split(',')
            .find_map(|p| p.strip_prefix("r="))
            .filter(|n| !n.is_empty())
            .ok_or(Failure::Malformed(
                "SCRAM client-first message has no nonce",
            ))?;
        let mut r = [0u8; 18];
        rand::thread_rng().fill_bytes(&mut r);
        let nonce = format!("{cnonce}{}", B64.encode(r));
        let server_first = format!(
            "r={nonce},s={},i={}",
            B64.encode(&verifier.salt),
            verifier.iterations
        );
        Ok((
            Exchange {
                verifier,
                client_first_bare: bare.to_string(),
                server_first: server_first.clone(),
                nonce,
            },
            server_first,
        ))
    }

    /// Check the client-final message; returns server-final on success.
    pub fn finish(&self, client_final: &str) -> Result<String, Failure> {
        let (without_proof, proof) = client_final.rsplit_once(",p=").ok_or(Failure::Malformed(
            "SCRAM client-final message has no proof",
        ))?;
        let nonce = without_proof
            .split(',')
            .find_map(|p| p.strip_prefix("r="))
            .ok_or(Failure::Malformed(
                "SCRAM client-final message has no nonce",
            ))?;
        if nonce != self.nonce {
            return Err(Failure::Malformed("SCRAM nonce mismatch"));
        }
        let binding = without_proof
            .split(',')
            .find_map(|p| p.strip_prefix("c="))
            .ok_or(Failure::Malformed(
                "SCRAM client-final message has no channel binding",
            ))?;
        if binding != "biws" && binding != "eSws" {
            return Err(Failure::Malformed("unexpected SCRAM channel binding"));
        }
        let proof = B64
            .decode(proof)
            .map_err(|_| Failure::Malformed("SCRAM proof is not base64"))?;
        let auth_message = format!(
            "{},{},{without_proof}",
            self.client_first_bare, self.server_first
        );
        let client_signature = hmac(&self.verifier.stored_key, auth_message.as_bytes());
        if proof.len() != client_signature.len() {
            return Err(Failure::Rejected);
        }
        let client_key: Vec<u8> = proof
            .iter()
            .zip(&client_signature)
            .map(|(a, b)| a ^ b)
            .collect();
        let stored = Sha256::digest(&client_key);
        // Constant-time comparison.
        let diff = stored
            .iter()
            .zip(&self.verifier.stored_key)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        if diff != 0 {
            return Err(Failure::Rejected);
        }
        let server_signature = hmac(&self.verifier.server_key, auth_message.as_bytes());
        Ok(format!("v={}", B64.encode(server_signature)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pbkdf2_like::client_final;

    /// A minimal SCRAM client, to test the server side against.
    mod pbkdf2_like {
        use super::*;

        fn hi(password: &[u8], salt: &[u8], iterations: u32) -> Vec<u8> {
            let mut u = hmac(password, &[salt, &1u32.to_be_bytes()].concat());
            let mut out = u.clone();
            for _ in 1..iterations {
                u = hmac(password, &u);
                for (o, x) in out.iter_mut().zip(&u) {
                    *o ^= x;
                }
            }
            out
        }

        pub fn client_final(password: &str, first_bare: &str, server_first: &str) -> String {
            let mut salt = Vec::new();
            let mut iter = 0;
            let mut nonce = "";
            for p in server_first.split(',') {
                if let Some(s) = p.strip_prefix("s=") {
                    salt = B64.decode(s).unwrap();
                } else if let Some(i) = p.strip_prefix("i=") {
                    iter = i.parse().unwrap();
                } else if let Some(n) = p.strip_prefix("r=") {
                    nonce = n;
                }
            }
            let salted = hi(password.as_bytes(), &salt, iter);
            let client_key = hmac(&salted, b"Client Key");
            let stored = Sha256::digest(&client_key);
            let without = format!("c=biws,r={nonce}");
            let auth = format!("{first_bare},{server_first},{without}");
            let sig = hmac(&stored, auth.as_bytes());
            let proof: Vec<u8> = client_key.iter().zip(&sig).map(|(a, b)| a ^ b).collect();
            format!("{without},p={}", B64.encode(proof))
        }
    }

    #[test]
    fn exchange_accepts_the_right_password_only() {
        let v = Verifier::parse(&hash_password("s3cret")).unwrap();
        let first = "n,,n=,r=abcdef";
        let (ex, server_first) = Exchange::start(v.clone(), first).unwrap();
        let good = client_final("s3cret", "n=,r=abcdef", &server_first);
        assert!(ex.finish(&good).unwrap().starts_with("v="));
        let (ex, server_first) = Exchange::start(v, first).unwrap();
        let bad = client_final("wrong", "n=,r=abcdef", &server_first);
        assert_eq!(ex.finish(&bad), Err(Failure::Rejected));
        assert!(Verifier::parse("plain-password").is_none());
        assert!(Exchange::start(Verifier::decoy(), "p=tls-unique,,n=,r=x").is_err());
    }
}
