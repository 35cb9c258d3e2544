//! The fleet CA: an ECDSA P-256 key made on first use and kept in PostgreSQL (sealed under the
//! data key), which signs host certificates (client auth) and the replicas' server
//! certificates. Its certificate is the trust anchor on both sides of the fleet link.

use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType, SerialNumber,
};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::crypto::{CryptoError, Keyring, RecordBinding};
use crate::store::fleet::{FleetCaRecord, FleetStore, ca_key_ids};
use crate::store::{Revision, StoreError};
use crate::timefmt::now_ms;

/// How long a host certificate is valid (renewed by enrolling again).
pub const HOST_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);
/// How long the CA is valid.
const CA_VALIDITY: Duration = Duration::from_secs(20 * 365 * 24 * 3600);
/// How long a replica's server certificate is valid: a new one is made at every start, so a
/// replica must restart within a year (like a host re-enrolling).
const SERVER_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);
/// Backdating of `not_before`, for peers whose clock is a little behind.
const BACKDATE: Duration = Duration::from_secs(300);
/// The CA's common name.
const CA_NAME: &str = "veil fleet CA";

/// Why the CA could not be made, opened or used.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The sealed key did not open (missing or wrong data key).
    #[error("opening the fleet CA key: {0}")]
    Crypto(#[from] CryptoError),
    /// Certificate generation failed (never quotes key material).
    #[error("{what}: {detail}")]
    Cert {
        /// What was being made.
        what: &'static str,
        /// rcgen's message.
        detail: String,
    },
    /// The keyring lock was poisoned.
    #[error("keyring poisoned")]
    KeyringPoisoned,
}

fn cert_err(what: &'static str) -> impl FnOnce(rcgen::Error) -> CaError {
    move |e| CaError::Cert {
        what,
        detail: e.to_string(),
    }
}

/// A certificate with its key, as files want them.
pub struct Issued {
    /// PEM certificate.
    pub cert_pem: String,
    /// DER certificate.
    pub cert_der: Vec<u8>,
    /// PEM PKCS#8 private key.
    pub key_pem: Zeroizing<String>,
    /// Serial number (hex).
    pub serial: String,
    /// Expiry, ms since the epoch.
    pub not_after: i64,
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issued")
            .field("serial", &self.serial)
            .finish_non_exhaustive()
    }
}

/// The opened fleet CA.
pub struct FleetCa {
    /// PEM certificate (what agents trust as `control_ca` and replicas verify hosts against).
    pub cert_pem: String,
    key: KeyPair,
}

impl std::fmt::Debug for FleetCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FleetCa").finish_non_exhaustive()
    }
}

/// SHA-256 of a certificate's DER, hex: how an enrollment names its one accepted certificate.
pub fn fingerprint(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, CA_NAME);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

fn random_serial() -> (SerialNumber, String) {
    let mut bytes = [0u8; 16];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut bytes);
    // Positive: the top bit clear.
    bytes[0] &= 0x7f;
    (SerialNumber::from_slice(&bytes), hex::encode(bytes))
}

fn ms(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

impl FleetCa {
    /// Opens the CA kept in `fleet`, creating it on first use (the first replica to store one
    /// wins; the others open that one).
    pub fn open_or_create(fleet: &dyn FleetStore, keyring: &Keyring) -> Result<Self, CaError> {
        let record = match fleet.fleet_ca()? {
            Some(r) => r,
            None => fleet.init_fleet_ca(&Self::create(keyring)?)?,
        };
        let (org, id) = ca_key_ids();
        let binding = RecordBinding {
            org: &org,
            secret_id: &id,
            revision: Revision(0),
        };
        let pem = keyring.open(binding, &record.key)?;
        let pem = Zeroizing::new(String::from_utf8_lossy(&pem).into_owned());
        let key = KeyPair::from_pem(&pem).map_err(cert_err("parsing the fleet CA key"))?;
        Ok(Self {
            cert_pem: record.cert_pem,
            key,
        })
    }

    fn create(keyring: &Keyring) -> Result<FleetCaRecord, CaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
            .map_err(cert_err("generating the fleet CA key"))?;
        let now = SystemTime::now();
        let mut params = ca_params();
        params.not_before = (now - BACKDATE).into();
        params.not_after = (now + CA_VALIDITY).into();
        params.serial_number = Some(random_serial().0);
        let cert = params
            .self_signed(&key)
            .map_err(cert_err("signing the fleet CA"))?;
        let (org, id) = ca_key_ids();
        let binding = RecordBinding {
            org: &org,
            secret_id: &id,
            revision: Revision(0),
        };
        let pem = Zeroizing::new(key.serialize_pem());
        let sealed = keyring.seal(binding, pem.as_bytes())?;
        Ok(FleetCaRecord {
            cert_pem: cert.pem(),
            key: sealed,
            created_at: now_ms(),
        })
    }

    fn issue(
        &self,
        name: &str,
        validity: Duration,
        usage: ExtendedKeyUsagePurpose,
        names: &[String],
    ) -> Result<Issued, CaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
            .map_err(cert_err("generating a certificate key"))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        params.distinguished_name = dn;
        params.subject_alt_names = names
            .iter()
            .map(|n| match n.parse::<std::net::IpAddr>() {
                Ok(ip) => Ok(SanType::IpAddress(ip)),
                Err(_) => n.clone().try_into().map(SanType::DnsName),
            })
            .collect::<Result<_, _>>()
            .map_err(cert_err("a certificate name"))?;
        let now = SystemTime::now();
        let not_after = now + validity;
        params.not_before = (now - BACKDATE.min(validity)).into();
        params.not_after = not_after.into();
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![usage];
        params.use_authority_key_identifier_extension = true;
        let (serial, serial_hex) = random_serial();
        params.serial_number = Some(serial);
        let issuer = Issuer::new(ca_params(), &self.key);
        let cert = params
            .signed_by(&key, &issuer)
            .map_err(cert_err("signing a certificate"))?;
        Ok(Issued {
            cert_pem: cert.pem(),
            cert_der: cert.der().to_vec(),
            key_pem: Zeroizing::new(key.serialize_pem()),
            serial: serial_hex,
            not_after: ms(not_after),
        })
    }

    /// A host certificate (client auth) for `host`, valid `validity`.
    pub fn issue_host(&self, host: &str, validity: Duration) -> Result<Issued, CaError> {
        self.issue(
            host,
            validity,
            ExtendedKeyUsagePurpose::ClientAuth,
            &[host.to_owned()],
        )
    }

    /// A replica's server certificate for `names` (DNS names or IP addresses).
    pub fn issue_server(&self, names: &[String]) -> Result<Issued, CaError> {
        let cn = names.first().map_or("veil-control", String::as_str);
        self.issue(
            cn,
            SERVER_VALIDITY,
            ExtendedKeyUsagePurpose::ServerAuth,
            names,
        )
    }
}

/// Checks a host name: a DNS label sequence (it becomes a certificate's DNS name).
pub fn check_host_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && !name.starts_with(['-', '.'])
        && !name.ends_with(['-', '.'])
        && !name.contains("..");
    if ok {
        Ok(())
    } else {
        Err(format!(
            "host {name:?} must be 1-63 characters of a-z 0-9 - . (a DNS name, not starting or \
             ending with - or .)"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names() {
        for ok in ["h1", "host-2", "a.b.c"] {
            check_host_name(ok).unwrap();
        }
        for bad in ["", "-a", "a-", "A", "a b", "a..b", "a/b", &"x".repeat(64)] {
            assert!(check_host_name(bad).is_err(), "{bad:?}");
        }
    }
}
