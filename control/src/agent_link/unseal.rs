//! What agents receive of a secret: its values opened from the store's sealed records, with
//! the rotated-out ones, or a deleted secret's last values (retired: scrubbed, never
//! substituted). Errors name secrets and revisions, never a value.

use veil_link::{
    MAX_PREVIOUS_VALUES, OrgId, Revision, SecretId, SecretState, SecretValue, WrongHost,
};

use super::{AgentLinkError, BuildError};
use crate::crypto::{Keyring, RecordBinding, Sealed};
use crate::store::{PreviousValue, SecretRecord, TombstoneRecord};

/// Opens one sealed value of secret `id` (bound to `revision`). Errors never carry the value.
fn open_value(
    ring: &Keyring,
    org: &OrgId,
    id: &SecretId,
    revision: Revision,
    sealed: &Sealed,
) -> Result<SecretValue, AgentLinkError> {
    let binding = RecordBinding {
        org,
        secret_id: id,
        revision,
    };
    let plain = ring
        .open(binding, sealed)
        .map_err(|source| BuildError::Unseal {
            id: id.clone(),
            revision,
            source,
        })?;
    let text = String::from_utf8(plain.to_vec()).map_err(|_| BuildError::NotUtf8 {
        id: id.clone(),
        revision,
    })?;
    Ok(SecretValue::new(text))
}

/// The values of secret `id` that open, newest first, at most `limit`. One that does not is left
/// out and logged (`veil-control verify` reports it): it must not keep the current value from
/// the agents.
fn earlier_values(
    ring: &Keyring,
    org: &OrgId,
    id: &SecretId,
    values: &[PreviousValue],
    limit: usize,
) -> Vec<SecretValue> {
    values
        .iter()
        .filter_map(|v| match open_value(ring, org, id, v.revision, &v.sealed) {
            Ok(value) => Some(value),
            Err(e) => {
                tracing::warn!(error = %e, "an earlier value is left out: it will not be scrubbed");
                None
            }
        })
        .take(limit)
        .collect()
}

/// A mounted secret with its opened value and rotated-out values. Errors never carry a value.
pub fn unseal_for_agent(ring: &Keyring, s: &SecretRecord) -> Result<SecretState, AgentLinkError> {
    Ok(SecretState {
        value: open_value(ring, &s.org, &s.id, s.revision, &s.sealed)?,
        previous: earlier_values(ring, &s.org, &s.id, &s.previous, MAX_PREVIOUS_VALUES),
        retired: false,
        id: s.id.clone(),
        org: s.org.clone(),
        name: s.name.clone(),
        placeholder: s.placeholder.clone(),
        hosts: s.hosts.clone(),
        revision: s.revision,
        body_substitution: s.body_substitution,
        wrong_host: s.wrong_host,
    })
}

/// A deleted secret inside its grace period, as agents scrub it: its last value (or the newest
/// that opens) and the older ones, never substituted.
pub fn unseal_retired_for_agent(
    ring: &Keyring,
    t: &TombstoneRecord,
) -> Result<SecretState, AgentLinkError> {
    let limit = MAX_PREVIOUS_VALUES + 1;
    let mut values = earlier_values(ring, &t.org, &t.id, &t.values, limit).into_iter();
    let value = values
        .next()
        .ok_or_else(|| AgentLinkError::from(BuildError::NoRetiredValue(t.id.clone())))?;
    Ok(SecretState {
        value,
        previous: values.collect(),
        retired: true,
        id: t.id.clone(),
        org: t.org.clone(),
        name: t.name.clone(),
        placeholder: t.placeholder.clone(),
        hosts: t.hosts.clone(),
        revision: t.revision,
        body_substitution: false,
        wrong_host: WrongHost::Forward,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_carry_earlier_values_and_tombstones_are_scrub_only() {
        let dir = tempfile::tempdir().unwrap();
        let ring = Keyring::open_or_create(dir.path()).unwrap();
        let (acme, s1) = (
            OrgId::parse("acme").unwrap(),
            SecretId::parse("s1").unwrap(),
        );
        let seal = |revision: u64, text: &str| {
            let binding = RecordBinding {
                org: &acme,
                secret_id: &s1,
                revision: Revision(revision),
            };
            ring.seal(binding, text.as_bytes()).unwrap()
        };
        let prev = |revision: u64, sealed: Sealed| PreviousValue {
            revision: Revision(revision),
            sealed,
            replaced_at: 0,
        };
        let record = SecretRecord {
            id: s1.clone(),
            org: acme.clone(),
            name: "key".into(),
            description: None,
            hosts: vec!["api.test".into()],
            placeholder: "ph-s1".into(),
            created_at: 0,
            updated_at: 0,
            revision: Revision(3),
            sealed: seal(3, "value-three"),
            body_substitution: true,
            wrong_host: WrongHost::Block,
            // Revision 1's ciphertext was sealed for another revision: it does not open.
            previous: vec![prev(2, seal(2, "value-two")), prev(1, seal(9, "value-one"))],
        };
        let live = unseal_for_agent(&ring, &record).unwrap();
        assert_eq!(live.value.expose(), "value-three");
        let previous: Vec<&str> = live.previous.iter().map(SecretValue::expose).collect();
        assert_eq!(
            previous,
            ["value-two"],
            "a value that does not open is left out"
        );
        assert!(!live.retired && live.revision == Revision(3));
        let tombstone = TombstoneRecord {
            id: s1.clone(),
            org: acme.clone(),
            name: "key".into(),
            placeholder: "ph-s1".into(),
            hosts: vec!["api.test".into()],
            revision: Revision(4),
            deleted_at: 0,
            values: vec![
                prev(3, record.sealed.clone()),
                prev(2, seal(2, "value-two")),
            ],
        };
        let retired = unseal_retired_for_agent(&ring, &tombstone).unwrap();
        assert!(retired.retired && retired.revision == Revision(4));
        assert_eq!(retired.value.expose(), "value-three");
        assert_eq!(retired.previous.len(), 1);
        assert!(!retired.body_substitution && retired.wrong_host == WrongHost::Forward);
        let shown = format!("{live:?} {retired:?}");
        assert!(!shown.contains("value-"), "{shown}");
        // A tombstone with no value that opens is an error that names no value.
        let broken = TombstoneRecord {
            values: vec![prev(1, seal(9, "value-one"))],
            ..tombstone
        };
        let e = unseal_retired_for_agent(&ring, &broken)
            .unwrap_err()
            .to_string();
        assert!(e.contains("s1") && !e.contains("value-"), "{e}");
    }
}
