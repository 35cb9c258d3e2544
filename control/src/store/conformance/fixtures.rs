//! What every case needs: the backend under test (opened again to check durability), the
//! runner's consistency check, and records to write.

use crate::crypto::Sealed;
use crate::paginate::{Cursor, Order, SortField, SortValue};
use crate::store::{
    AuditRecord, Mount, OrgId, PreviousValue, Revision, SandboxId, SandboxRecord, SecretId,
    SecretRecord, Store, TombstoneRecord,
};

/// Opens the store under test; every call opens the same data (the first call: an empty
/// store). A case drops the store it holds before it opens it again (sled locks its dir).
pub trait Backend {
    /// The store over the backend's data.
    fn open(&self) -> Box<dyn Store>;
}

impl<F: Fn() -> Box<dyn Store>> Backend for F {
    fn open(&self) -> Box<dyn Store> {
        self()
    }
}

/// One case of the suite.
pub type Case = fn(&dyn Backend);

/// Runs `case` on `backend`, then checks, on the store opened again, that the records agree
/// with their indexes.
pub fn run(case: Case, backend: &dyn Backend) {
    case(backend);
    let store = backend.open();
    let problems = store.check_consistency().expect("check_consistency");
    assert!(
        problems.is_empty(),
        "the store is inconsistent after the case: {problems:?}"
    );
}

/// An organization id.
pub fn org(name: &str) -> OrgId {
    OrgId::parse(name).expect("org id")
}

/// A secret id.
pub fn sid(id: &str) -> SecretId {
    SecretId::parse(id).expect("secret id")
}

/// A sandbox id.
pub fn sbid(id: &str) -> SandboxId {
    SandboxId::parse(id).expect("sandbox id")
}

/// An audit entry of `org` (the store assigns `seq`).
pub fn audit(org: &str) -> AuditRecord {
    audit_of(org, "t", "")
}

/// An audit entry naming its action and target, to find it again.
pub fn audit_of(org: &str, action: &str, target: &str) -> AuditRecord {
    AuditRecord {
        seq: 0,
        time: 0,
        actor: "t".into(),
        org: org.into(),
        action: action.into(),
        target_type: "secret".into(),
        target_id: target.into(),
        target_name: None,
        changes: serde_json::Value::Null,
    }
}

/// A sealed value (not a real sealing: the store never opens values).
pub fn sealed(key_id: &str, tag: &str) -> Sealed {
    Sealed {
        key_id: key_id.into(),
        nonce: tag.into(),
        ciphertext: tag.into(),
    }
}

/// Secret number `n` of `org_name` created at `time`; ids, names and placeholders distinct per `n`.
pub fn secret(org_name: &str, n: usize, time: i64) -> SecretRecord {
    named_secret(org_name, &format!("id-{n:05}"), n, time)
}

/// Like [`secret`] with the id `id` (the placeholder follows it).
pub fn named_secret(org_name: &str, id: &str, n: usize, time: i64) -> SecretRecord {
    SecretRecord {
        id: sid(id),
        org: org(org_name),
        name: format!("name-{}", (n * 7919) % 10007),
        description: None,
        hosts: vec![],
        placeholder: format!("ph-{id}"),
        created_at: time,
        updated_at: time,
        revision: Revision(1),
        sealed: sealed("k", ""),
        body_substitution: false,
        wrong_host: Default::default(),
        previous: Vec::new(),
    }
}

/// The cursor a page ending at `s` hands out.
pub fn cursor_of(s: &SecretRecord, sort: SortField, order: Order) -> Cursor {
    let v = match sort {
        SortField::Name => SortValue::Text(s.name.clone()),
        SortField::CreatedAt => SortValue::Time(s.created_at),
        SortField::UpdatedAt => SortValue::Time(s.updated_at),
    };
    Cursor {
        s: sort,
        o: order,
        v,
        i: s.id.to_string(),
    }
}

/// A sandbox of org `acme` mounting one variable.
pub fn sandbox(id: &str, cgroup: &str, env: &str) -> SandboxRecord {
    SandboxRecord {
        egress: Default::default(),
        id: sbid(id),
        org: org("acme"),
        cgroup: cgroup.into(),
        netns: None,
        bound: true,
        keep: false,
        cgroup_id: None,
        mounts: vec![Mount {
            env: env.into(),
            secret_id: sid("s"),
            secret_name: "s".into(),
        }],
        created_at: 1,
        updated_at: 1,
        host: None,
    }
}

/// A rotated-out value of `revision`.
pub fn prev(revision: u64, replaced_at: i64) -> PreviousValue {
    PreviousValue {
        revision: Revision(revision),
        sealed: sealed("k", &format!("r{revision}")),
        replaced_at,
    }
}

/// A secret at revision 3 with two rotated-out values.
pub fn rotated(n: usize) -> SecretRecord {
    let mut s = secret("acme", n, 1);
    s.revision = Revision(3);
    s.previous = vec![prev(2, 200), prev(1, 100)];
    s
}

/// The tombstone deleting `s` at `deleted_at` leaves.
pub fn tombstone_of(s: &SecretRecord, deleted_at: i64) -> TombstoneRecord {
    let mut values = vec![PreviousValue {
        revision: s.revision,
        sealed: s.sealed.clone(),
        replaced_at: deleted_at,
    }];
    values.extend(s.previous.iter().cloned());
    TombstoneRecord {
        id: s.id.clone(),
        org: s.org.clone(),
        name: s.name.clone(),
        placeholder: s.placeholder.clone(),
        hosts: s.hosts.clone(),
        revision: s.revision.next(),
        deleted_at,
        values,
    }
}
