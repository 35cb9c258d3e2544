//! Leaf certificates per SNI, signed by the interception CA, cached for every sandbox.
//!
//! A leaf is short-lived ([`LEAF_VALIDITY`]) and re-issued once less than [`LEAF_RENEW_BEFORE`]
//! of it is left, so a long-running agent never serves an expired one. The cache is bounded
//! ([`LeafCache::new`]'s capacity); when it is full the least recently used name goes. A cached
//! name costs one lock and one `Arc` clone: key generation and signing only happen on a miss.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::tls::ca::{CaError, InterceptionCa};

/// How long a leaf certificate is valid.
pub const LEAF_VALIDITY: Duration = Duration::from_secs(7 * 24 * 3600);
/// A cached leaf with less than this left is re-issued.
pub const LEAF_RENEW_BEFORE: Duration = Duration::from_secs(24 * 3600);
/// Backdating of `not_before`, for clients whose clock is a little behind.
const BACKDATE: Duration = Duration::from_secs(3600);
/// Default number of names kept.
pub const DEFAULT_LEAF_CACHE: usize = 1024;

/// Why a leaf could not be issued.
#[derive(Debug, thiserror::Error)]
pub enum LeafError {
    /// The CA could not sign.
    #[error(transparent)]
    Ca(#[from] CaError),
    /// Key generation, signing or key loading failed.
    #[error("issuing a leaf for {name}: {message}")]
    Issue {
        /// The server name.
        name: String,
        /// What failed (never key material).
        message: String,
    },
}

#[derive(Debug)]
struct Entry {
    key: Arc<CertifiedKey>,
    renew_at: SystemTime,
    last_used: u64,
}

#[derive(Debug, Default)]
struct Inner {
    map: HashMap<String, Entry>,
    tick: u64,
}

/// Leaf certificates by server name, shared by every sandbox.
#[derive(Debug)]
pub struct LeafCache {
    ca: Arc<InterceptionCa>,
    capacity: usize,
    inner: Mutex<Inner>,
}

impl LeafCache {
    /// A cache of at most `capacity` names (at least one) over `ca`.
    pub fn new(ca: Arc<InterceptionCa>, capacity: usize) -> Self {
        Self {
            ca,
            capacity: capacity.max(1),
            inner: Mutex::new(Inner::default()),
        }
    }

    /// Number of names cached.
    pub fn len(&self) -> usize {
        self.lock().map.len()
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Every update is a single insert/remove: a panic elsewhere leaves the map consistent.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The leaf for `name` (a validated, normalised server name), issuing it on a miss or when
    /// it is due for renewal.
    pub fn get(&self, name: &str) -> Result<Arc<CertifiedKey>, LeafError> {
        let now = SystemTime::now();
        {
            let mut inner = self.lock();
            inner.tick += 1;
            let tick = inner.tick;
            if let Some(e) = inner.map.get_mut(name)
                && now < e.renew_at
            {
                e.last_used = tick;
                return Ok(e.key.clone());
            }
        }
        // Issued outside the lock: other names stay served meanwhile. Two tasks racing for
        // the same new name both issue one; the later insert wins, both are valid.
        let key = Arc::new(self.issue(name, now)?);
        let mut inner = self.lock();
        inner.tick += 1;
        let tick = inner.tick;
        if inner.map.len() >= self.capacity && !inner.map.contains_key(name) {
            let oldest = inner
                .map
                .iter()
                .min_by_key(|(_, e)| e.last_used)
                .map(|(k, _)| k.clone());
            if let Some(oldest) = oldest {
                inner.map.remove(&oldest);
            }
        }
        inner.map.insert(
            name.to_owned(),
            Entry {
                key: key.clone(),
                renew_at: now + LEAF_VALIDITY - LEAF_RENEW_BEFORE,
                last_used: tick,
            },
        );
        Ok(key)
    }

    fn issue(&self, name: &str, now: SystemTime) -> Result<CertifiedKey, LeafError> {
        let fail = |message: String| LeafError::Issue {
            name: name.to_owned(),
            message,
        };
        let key =
            KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| fail(e.to_string()))?;
        let mut params = CertificateParams::default();
        let dns = name
            .try_into()
            .map_err(|e: rcgen::Error| fail(e.to_string()))?;
        params.subject_alt_names = vec![SanType::DnsName(dns)];
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        params.distinguished_name = dn;
        params.not_before = (now - BACKDATE).into();
        params.not_after = (now + LEAF_VALIDITY).into();
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let cert = params
            .signed_by(&key, &self.ca.issuer()?)
            .map_err(|e| fail(e.to_string()))?;
        let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let signing =
            rustls::crypto::ring::sign::any_ecdsa_type(&der).map_err(|e| fail(e.to_string()))?;
        Ok(CertifiedKey::new(
            vec![
                cert.der().clone(),
                CertificateDer::from(self.ca.cert_der().to_vec()),
            ],
            signing,
        ))
    }
}

/// Serves the leaf of the SNI the client asked for (no SNI: the handshake fails, which never
/// happens on the intercept path: it is only taken for a valid SNI).
#[derive(Debug)]
pub struct LeafResolver(pub Arc<LeafCache>);

impl ResolvesServerCert for LeafResolver {
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let sni = client_hello.server_name()?;
        let name = veil_policy::ServerName::parse(sni).ok()?;
        match self.0.get(name.as_str()) {
            Ok(k) => Some(k),
            Err(e) => {
                tracing::warn!(error = %e, "cannot issue a leaf certificate");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache(capacity: usize) -> (tempfile::TempDir, LeafCache) {
        let dir = tempfile::tempdir().unwrap();
        let ca = InterceptionCa::load_or_create(dir.path(), "t").unwrap();
        (dir, LeafCache::new(Arc::new(ca), capacity))
    }

    #[test]
    fn issues_once_per_name_signed_by_the_ca_for_that_name() {
        let (_d, c) = cache(4);
        let a = c.get("api.example.test").unwrap();
        let again = c.get("api.example.test").unwrap();
        assert!(Arc::ptr_eq(&a, &again), "a cached name was issued again");
        let (_, leaf) = x509_parser::parse_x509_certificate(&a.cert[0]).unwrap();
        let (_, ca) = x509_parser::parse_x509_certificate(c.ca.cert_der()).unwrap();
        assert_eq!(leaf.issuer(), ca.subject());
        leaf.verify_signature(Some(ca.public_key())).unwrap();
        let sans = leaf.subject_alternative_name().unwrap().unwrap();
        assert_eq!(
            format!("{:?}", sans.value.general_names),
            "[DNSName(\"api.example.test\")]"
        );
        let validity = leaf.validity();
        let days = (validity.not_after.timestamp() - validity.not_before.timestamp()) / 86_400;
        assert!((7..=8).contains(&days), "{days} days");
        assert!(!leaf.is_ca());
    }

    #[test]
    fn bounded_and_evicts_least_recently_used() {
        let (_d, c) = cache(2);
        let a = c.get("a.test").unwrap();
        c.get("b.test").unwrap();
        c.get("a.test").unwrap(); // b is now the oldest
        c.get("c.test").unwrap();
        assert_eq!(c.len(), 2);
        assert!(Arc::ptr_eq(&a, &c.get("a.test").unwrap()), "a was evicted");
        let before = c.len();
        c.get("b.test").unwrap();
        assert_eq!(before, c.len());
    }

    #[test]
    fn renews_when_due() {
        let (_d, c) = cache(2);
        let a = c.get("a.test").unwrap();
        c.lock().map.get_mut("a.test").unwrap().renew_at = SystemTime::now();
        let b = c.get("a.test").unwrap();
        assert!(
            !Arc::ptr_eq(&a, &b),
            "a leaf due for renewal was served again"
        );
    }
}
