//! libpq's sslmodes over rustls: how much of a server's certificate to check, and the client
//! configuration that checks it.

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

use crate::error::{Error, Result};

/// How much of the server's certificate to check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verification {
    /// Accept any certificate (encryption without authentication).
    None,
    /// Check the chain, not the name.
    Chain,
    /// Check the chain and the host name.
    Full,
}

/// The crypto provider, named explicitly so no process-wide default has to be installed.
pub(crate) fn crypto_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Root certificates: the PEM file when given, else the Mozilla roots built into the wheel.
pub(crate) fn root_store(ca_file: Option<&Path>) -> Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let pem = std::fs::read(path)
                .map_err(|e| Error::config(format!("cannot read the CA file {}", path.display())).with_source(e))?;
            let mut found = 0;
            for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
                let cert = cert.map_err(|e| {
                    Error::config(format!("the CA file {} is not valid PEM", path.display())).with_source(e)
                })?;
                roots.add(cert).map_err(|e| {
                    Error::config(format!("the CA file {} holds a bad certificate", path.display())).with_source(e)
                })?;
                found += 1;
            }
            if found == 0 {
                return Err(Error::config(format!("the CA file {} holds no certificate", path.display())));
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    Ok(roots)
}

/// A rustls client config that checks as much of the server's certificate as `verification` asks.
pub(crate) fn client_tls_config(verification: Verification, ca_file: Option<&Path>) -> Result<ClientConfig> {
    let provider = crypto_provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::config("TLS setup failed").with_source(e))?;
    let config = match verification {
        Verification::Full => builder.with_root_certificates(root_store(ca_file)?).with_no_client_auth(),
        Verification::Chain | Verification::None => {
            let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(root_store(ca_file)?), provider.clone())
                .build()
                .map_err(|e| Error::config("TLS setup failed").with_source(e))?;
            let verifier = RelaxedVerifier { inner: webpki, check_chain: verification == Verification::Chain };
            builder.dangerous().with_custom_certificate_verifier(Arc::new(verifier)).with_no_client_auth()
        }
    };
    Ok(config)
}

/// libpq's `verify-ca` (chain only) and `require`/`prefer` (nothing): handshake signatures are
/// still checked, so the session is encrypted to whoever holds the presented key.
#[derive(Debug)]
struct RelaxedVerifier {
    inner: Arc<WebPkiServerVerifier>,
    check_chain: bool,
}

impl ServerCertVerifier for RelaxedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        if !self.check_chain {
            return Ok(ServerCertVerified::assertion());
        }
        match self.inner.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName | rustls::CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
