//! A throwaway certificate authority for TLS tests: a CA, a server certificate for
//! 127.0.0.1/localhost and a client certificate signed by it, written as PEM files into a test
//! dir.
//!
//! Generated per test, in-process (ECDSA P-256: milliseconds), so no key material is checked in
//! and nothing can expire between runs.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

use crate::process::ensure_dir;

/// Common name of the client certificate: the MQTT username mosquitto gives a client that
/// presents it (`use_identity_as_username`).
pub const CLIENT_CN: &str = "edge-tests-client";

/// Paths of the PEM files [`TlsFiles::generate`] wrote.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// The CA certificate: the trust anchor for both sides.
    pub ca_cert: PathBuf,
    /// Server certificate for `127.0.0.1` and `localhost`, signed by the CA.
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    /// Client certificate ([`CLIENT_CN`]), signed by the CA.
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

impl TlsFiles {
    /// Creates a fresh CA and both certificates under `dir` (created if missing).
    pub fn generate(dir: &Path) -> Result<TlsFiles> {
        ensure_dir(dir)?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())
            .context("cannot set up the CA certificate")?;
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "edge-tests throwaway CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_key = KeyPair::generate().context("cannot generate the CA key")?;
        let ca = CertifiedIssuer::self_signed(ca_params, ca_key)
            .context("cannot self-sign the CA certificate")?;

        let files = TlsFiles {
            ca_cert: dir.join("ca.pem"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server-key.pem"),
            client_cert: dir.join("client.pem"),
            client_key: dir.join("client-key.pem"),
        };
        write(&files.ca_cert, &ca.pem())?;
        // rustls checks an IP address against IP SANs, so the IP (what every URL in the
        // harness uses) must be one; localhost is for manual runs.
        let (cert, key) = leaf(
            &ca,
            &["127.0.0.1", "localhost"],
            "127.0.0.1",
            ExtendedKeyUsagePurpose::ServerAuth,
        )?;
        write(&files.server_cert, &cert)?;
        write(&files.server_key, &key)?;
        let (cert, key) = leaf(&ca, &[], CLIENT_CN, ExtendedKeyUsagePurpose::ClientAuth)?;
        write(&files.client_cert, &cert)?;
        write(&files.client_key, &key)?;
        Ok(files)
    }

    /// `[mqtt]` keys for an agent that trusts the CA and, with `client_cert`, presents the
    /// client certificate; merge into [`crate::AgentOptions::extra`] under `mqtt`.
    pub fn agent_mqtt(&self, client_cert: bool) -> Result<toml::Table> {
        let mut t = toml::Table::new();
        t.insert("ca_file".into(), toml::Value::String(utf8(&self.ca_cert)?));
        if client_cert {
            t.insert(
                "cert_file".into(),
                toml::Value::String(utf8(&self.client_cert)?),
            );
            t.insert(
                "key_file".into(),
                toml::Value::String(utf8(&self.client_key)?),
            );
        }
        Ok(t)
    }

    /// `edge-coordinator serve` flags that trust the CA and present the client certificate.
    pub fn coordinator_args(&self) -> Result<Vec<String>> {
        Ok(vec![
            "--ca-file".into(),
            utf8(&self.ca_cert)?,
            "--cert-file".into(),
            utf8(&self.client_cert)?,
            "--key-file".into(),
            utf8(&self.client_key)?,
        ])
    }
}

/// A certificate for `sans` with common name `cn`, signed by `ca`: (cert PEM, key PEM).
fn leaf(
    ca: &CertifiedIssuer<'_, KeyPair>,
    sans: &[&str],
    cn: &str,
    usage: ExtendedKeyUsagePurpose,
) -> Result<(String, String)> {
    let sans: Vec<String> = sans.iter().map(|s| (*s).to_owned()).collect();
    let mut params =
        CertificateParams::new(sans).with_context(|| format!("cannot set up certificate {cn}"))?;
    params.distinguished_name.push(DnType::CommonName, cn);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![usage];
    params.use_authority_key_identifier_extension = true;
    let key = KeyPair::generate().with_context(|| format!("cannot generate the key of {cn}"))?;
    let cert = params
        .signed_by(&key, ca)
        .with_context(|| format!("cannot sign certificate {cn}"))?;
    Ok((cert.pem(), key.serialize_pem()))
}

fn write(path: &Path, pem: &str) -> Result<()> {
    std::fs::write(path, pem).with_context(|| format!("cannot write {}", path.display()))
}

fn utf8(p: &Path) -> Result<String> {
    p.to_str()
        .map(str::to_owned)
        .with_context(|| format!("path {} is not UTF-8", p.display()))
}
