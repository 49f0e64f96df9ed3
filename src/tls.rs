//! rustls configurations: terminating client TLS, and originating upstream TLS.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{ring, CryptoProvider};
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};

use crate::config::TlsMode;

/// A TLS setting pgtier cannot use; names the setting and the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{key}: cannot read {}", path.display())]
    Unreadable {
        key: &'static str,
        path: PathBuf,
        source: pem::Error,
    },
    #[error("{key}: {} is not PEM", path.display())]
    NotPem {
        key: &'static str,
        path: PathBuf,
        source: pem::Error,
    },
    #[error("server.tls_cert: {} holds no certificate", .0.display())]
    NoCertificate(PathBuf),
    #[error("server.tls_key: cannot read a private key from {}", path.display())]
    NoKey { path: PathBuf, source: pem::Error },
    #[error("server.tls_cert/tls_key: certificate and key do not match")]
    KeyMismatch(#[source] rustls::Error),
    #[error("upstream.tls_ca_file: bad CA certificate")]
    BadCa(#[source] rustls::Error),
    #[error("upstream.tls = verify-full needs CA certificates (upstream.tls_ca_file)")]
    NoRoots,
    #[error("TLS setup")]
    Setup(#[from] rustls::Error),
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(ring::default_provider())
}

/// Client-facing TLS from a PEM certificate chain and private key.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let unreadable = |source| TlsError::Unreadable {
        key: "server.tls_cert",
        path: cert.to_path_buf(),
        source,
    };
    let not_pem = |source| TlsError::NotPem {
        key: "server.tls_cert",
        path: cert.to_path_buf(),
        source,
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(unreadable)?
        .collect::<Result<_, _>>()
        .map_err(not_pem)?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate(cert.to_path_buf()));
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|source| TlsError::NoKey {
        path: key.to_path_buf(),
        source,
    })?;
    let cfg = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(TlsError::KeyMismatch)?;
    Ok(Arc::new(cfg))
}

/// Encryption without authenticating the server (libpq's prefer/require).
pub fn unverified_client_config() -> Result<Arc<ClientConfig>, TlsError> {
    let cfg = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(NoVerify(provider())))
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}

/// Upstream TLS for `mode`, or `None` for `disable`.
pub fn client_config(
    mode: TlsMode,
    ca_file: Option<&Path>,
) -> Result<Option<Arc<ClientConfig>>, TlsError> {
    match mode {
        TlsMode::Disable => Ok(None),
        TlsMode::Prefer | TlsMode::Require => unverified_client_config().map(Some),
        TlsMode::VerifyFull => {
            let mut roots = RootCertStore::empty();
            match ca_file {
                Some(path) => {
                    let key = "upstream.tls_ca_file";
                    let certs = CertificateDer::pem_file_iter(path).map_err(|source| {
                        TlsError::Unreadable {
                            key,
                            path: path.to_path_buf(),
                            source,
                        }
                    })?;
                    for c in certs {
                        let c = c.map_err(|source| TlsError::NotPem {
                            key,
                            path: path.to_path_buf(),
                            source,
                        })?;
                        roots.add(c).map_err(TlsError::BadCa)?;
                    }
                }
                None => {
                    for c in rustls_native_certs::load_native_certs().certs {
                        let _ = roots.add(c);
                    }
                }
            }
            if roots.is_empty() {
                return Err(TlsError::NoRoots);
            }
            let cfg = ClientConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()?
                .with_root_certificates(roots)
                .with_no_client_auth();
            Ok(Some(Arc::new(cfg)))
        }
    }
}

/// Accepts any server certificate but still checks handshake signatures, matching
/// libpq's sslmode=require: encryption without authentication.
#[derive(Debug)]
struct NoVerify(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
