//! The interception CA: created on the agent's first start in its state directory, reused
//! afterwards. ECDSA P-256; subject CN "veil interception CA", OU = the agent id.
//!
//! Files: `ca-key.pem` (0600; the agent refuses to start when group or others can read it) and
//! `ca-cert.pem`. Interception signs leaf certificates with [`InterceptionCa::issuer`].

use std::io::{self, Write as _};
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
};

/// File name of the CA private key.
pub const CA_KEY_FILE: &str = "ca-key.pem";
/// File name of the CA certificate.
pub const CA_CERT_FILE: &str = "ca-cert.pem";
/// Common name of the CA certificate.
pub const CA_COMMON_NAME: &str = "veil interception CA";

/// Why the CA could not be loaded or created.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// The file system failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// The key file is readable by group or others.
    #[error(
        "{path} has mode {mode:o}: the CA key must not be readable by group or others (chmod 600)"
    )]
    KeyExposed {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The key or certificate could not be parsed, generated or signed.
    #[error("{what}: {source}")]
    Crypto {
        /// What was being done.
        what: &'static str,
        /// What rcgen said (never key material).
        source: rcgen::Error,
    },
    /// The certificate on disk is not the one for the key on disk.
    #[error("{0} does not match the CA key")]
    Mismatch(PathBuf),
}

/// The agent's interception CA.
pub struct InterceptionCa {
    key: KeyPair,
    cert_der: Vec<u8>,
    cert_pem: String,
}

impl std::fmt::Debug for InterceptionCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InterceptionCa").finish_non_exhaustive()
    }
}

impl InterceptionCa {
    /// Loads the CA from `state_dir`, creating key and certificate when there is no key yet
    /// (and a certificate alone when only the key exists).
    pub fn load_or_create(state_dir: &Path, agent_id: &str) -> Result<Self, CaError> {
        let key_path = state_dir.join(CA_KEY_FILE);
        let cert_path = state_dir.join(CA_CERT_FILE);
        let io_err = |path: &Path| {
            let path = path.to_owned();
            move |source| CaError::Io { path, source }
        };
        let key = match std::fs::metadata(&key_path) {
            Ok(meta) => {
                let mode = meta.permissions().mode() & 0o777;
                if mode & 0o077 != 0 {
                    return Err(CaError::KeyExposed {
                        path: key_path,
                        mode,
                    });
                }
                let pem = zeroize::Zeroizing::new(
                    std::fs::read_to_string(&key_path).map_err(io_err(&key_path))?,
                );
                KeyPair::from_pem(&pem).map_err(crypto("parsing the CA key"))?
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
                    .map_err(crypto("generating the CA key"))?;
                let pem = zeroize::Zeroizing::new(key.serialize_pem());
                write_new(&key_path, pem.as_bytes(), 0o600).map_err(io_err(&key_path))?;
                // A certificate left without its key belongs to nothing.
                let _ = std::fs::remove_file(&cert_path);
                key
            }
            Err(e) => return Err(io_err(&key_path)(e)),
        };
        let cert_pem = match std::fs::read_to_string(&cert_path) {
            Ok(pem) => pem,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let pem = self_sign(&key, agent_id)?;
                write_new(&cert_path, pem.as_bytes(), 0o644).map_err(io_err(&cert_path))?;
                pem
            }
            Err(e) => return Err(io_err(&cert_path)(e)),
        };
        let cert_der = pem_to_der(&cert_pem).ok_or_else(|| CaError::Mismatch(cert_path.clone()))?;
        if !certifies(&cert_der, &key) {
            return Err(CaError::Mismatch(cert_path));
        }
        Ok(Self {
            key,
            cert_der,
            cert_pem,
        })
    }

    /// The CA certificate, PEM (what sandboxes must trust; sent to control in Hello).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate, DER.
    pub fn cert_der(&self) -> &[u8] {
        &self.cert_der
    }

    /// The CA key pair.
    pub fn key_pair(&self) -> &KeyPair {
        &self.key
    }

    /// An issuer that signs leaf certificates with this CA
    /// (`leaf_params.signed_by(&leaf_key, &ca.issuer()?)`).
    pub fn issuer(&self) -> Result<Issuer<'static, &KeyPair>, CaError> {
        Issuer::from_ca_cert_der(&self.cert_der.as_slice().into(), &self.key)
            .map_err(crypto("reading the CA certificate"))
    }
}

fn crypto(what: &'static str) -> impl FnOnce(rcgen::Error) -> CaError {
    move |source| CaError::Crypto { what, source }
}

fn self_sign(key: &KeyPair, agent_id: &str) -> Result<String, CaError> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, CA_COMMON_NAME);
    dn.push(DnType::OrganizationName, "veil");
    dn.push(DnType::OrganizationalUnitName, format!("agent {agent_id}"));
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let cert = params
        .self_signed(key)
        .map_err(crypto("signing the CA certificate"))?;
    Ok(cert.pem())
}

/// Whether the certificate's public key is the key pair's.
fn certifies(cert_der: &[u8], key: &KeyPair) -> bool {
    use rcgen::PublicKeyData as _;
    x509_parser::parse_x509_certificate(cert_der)
        .is_ok_and(|(_, cert)| cert.public_key().raw == key.subject_public_key_info().as_slice())
}

fn pem_to_der(pem: &str) -> Option<Vec<u8>> {
    let (_, parsed) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).ok()?;
    (parsed.label == "CERTIFICATE").then_some(parsed.contents)
}

fn write_new(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_once_reused_and_a_ca() {
        let dir = tempfile::tempdir().unwrap();
        let ca = InterceptionCa::load_or_create(dir.path(), "abc123").unwrap();
        let mode = std::fs::metadata(dir.path().join(CA_KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let again = InterceptionCa::load_or_create(dir.path(), "abc123").unwrap();
        assert_eq!(again.cert_pem(), ca.cert_pem());

        let (_, cert) = x509_parser::parse_x509_certificate(ca.cert_der()).unwrap();
        let subject = cert.subject().to_string();
        assert!(subject.contains(CA_COMMON_NAME), "{subject}");
        assert!(subject.contains("abc123"), "{subject}");
        assert!(cert.is_ca());
        assert!(!format!("{ca:?}").contains("PRIVATE"));

        // It signs leaves.
        let leaf_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let leaf = CertificateParams::new(vec!["api.example.com".into()])
            .unwrap()
            .signed_by(&leaf_key, &ca.issuer().unwrap())
            .unwrap();
        let (_, leaf) = x509_parser::parse_x509_certificate(leaf.der()).unwrap();
        assert_eq!(leaf.issuer(), cert.subject());
    }

    #[test]
    fn refuses_an_exposed_key_and_a_foreign_cert() {
        let dir = tempfile::tempdir().unwrap();
        InterceptionCa::load_or_create(dir.path(), "a").unwrap();
        let key = dir.path().join(CA_KEY_FILE);
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert!(matches!(
            InterceptionCa::load_or_create(dir.path(), "a"),
            Err(CaError::KeyExposed { .. })
        ));
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();

        let other = tempfile::tempdir().unwrap();
        InterceptionCa::load_or_create(other.path(), "b").unwrap();
        std::fs::copy(
            other.path().join(CA_CERT_FILE),
            dir.path().join(CA_CERT_FILE),
        )
        .unwrap();
        assert!(matches!(
            InterceptionCa::load_or_create(dir.path(), "a"),
            Err(CaError::Mismatch(_))
        ));
    }
}
