//! The pure decisions behind "declare, then bind": whether an agent may bind, unbind or reap a
//! sandbox, and what the stored record becomes. No store, no host: [`crate::api::binding`]
//! reads the record, asks here, and writes what this answers.

use std::path::Path;

use veil_link::{AgentId, RefusalKind};

use crate::store::SandboxRecord;

/// Why an agent's request is refused: the kind the tool sees and one line naming the problem.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// The class of refusal.
    pub kind: RefusalKind,
    /// The message (names ids and paths, never a value).
    pub message: String,
}

impl Refusal {
    /// A refusal of `kind` saying `message`.
    pub fn new(kind: RefusalKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }
}

/// Who asks: an agent, and the fleet host it is connected as (`None`: control's own host,
/// over the local socket). The host comes from the link's authentication, never from the agent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Requester {
    /// The agent's id (the audit's actor).
    pub agent: AgentId,
    /// The fleet host of its connection.
    pub host: Option<String>,
}

/// Whether `who` may see, bind or unbind `record`: only a sandbox declared for its host (on a
/// single host: one without `host`). Another host's sandbox is answered as an unknown one, so
/// a host learns nothing of the others.
pub fn may_bind(id: &str, who: &Requester, record: &SandboxRecord) -> Result<(), Refusal> {
    if record.host == who.host {
        Ok(())
    } else {
        Err(not_declared(id))
    }
}

fn not_declared(id: &str) -> Refusal {
    Refusal::new(
        RefusalKind::NotDeclared,
        format!("sandbox {id} is not declared"),
    )
}

/// The record a Describe answers: a sandbox declared for `who`'s host.
pub fn describable<'a>(
    id: &str,
    record: Option<&'a SandboxRecord>,
    who: &Requester,
) -> Result<&'a SandboxRecord, Refusal> {
    let record = record.ok_or_else(|| not_declared(id))?;
    may_bind(id, who, record)?;
    Ok(record)
}

/// The record a bind starts from: a declared, unbound sandbox `agent` may bind.
pub fn bindable<'a>(
    id: &str,
    record: Option<&'a SandboxRecord>,
    who: &Requester,
) -> Result<&'a SandboxRecord, Refusal> {
    let record = describable(id, record, who)?;
    if record.bound {
        return Err(Refusal::new(
            RefusalKind::AlreadyBound,
            format!("sandbox {id} is already bound"),
        ));
    }
    Ok(record)
}

/// The record a bind stores: `declared` placed on `cgroup` (whose id is `cgroup_id`) and
/// `netns`.
pub fn bound(
    declared: &SandboxRecord,
    cgroup: String,
    cgroup_id: u64,
    netns: Option<String>,
    now: i64,
) -> SandboxRecord {
    SandboxRecord {
        cgroup,
        netns,
        bound: true,
        cgroup_id: Some(cgroup_id),
        updated_at: now,
        ..declared.clone()
    }
}

/// What an unbind leaves of `record`: its declaration when it was declared with `keep`,
/// nothing otherwise.
pub fn unbound(record: &SandboxRecord, now: i64) -> Option<SandboxRecord> {
    record.keep.then(|| SandboxRecord {
        cgroup: String::new(),
        netns: None,
        bound: false,
        cgroup_id: None,
        updated_at: now,
        ..record.clone()
    })
}

/// The record an unbind starts from: a bound sandbox `agent` may unbind.
pub fn unbindable<'a>(
    id: &str,
    record: Option<&'a SandboxRecord>,
    who: &Requester,
) -> Result<&'a SandboxRecord, Refusal> {
    let record = describable(id, record, who)?;
    if !record.bound {
        return Err(Refusal::new(
            RefusalKind::BadRequest,
            format!("sandbox {id} is not bound"),
        ));
    }
    Ok(record)
}

/// Whether an agent's report that cgroup `cgroup_id` of `record` is gone concerns the binding
/// stored now: a report about an earlier binding (another id, or one made by path) unbinds
/// nothing.
pub fn gone_applies(record: Option<&SandboxRecord>, cgroup_id: u64) -> bool {
    record.is_some_and(|r| r.bound && r.cgroup_id == Some(cgroup_id))
}

/// A netns path an agent sent: absolute and plain (no `.`, `..` or empty components); that
/// it is a network namespace is checked on the host.
pub fn netns_path(path: &str) -> Result<(), Refusal> {
    let p = Path::new(path);
    let plain = p.is_absolute()
        && path
            .split('/')
            .skip(1)
            .all(|c| !c.is_empty() && c != "." && c != "..")
        && !path.bytes().any(|b| b.is_ascii_control());
    if plain {
        Ok(())
    } else {
        Err(Refusal::new(
            RefusalKind::BadTarget,
            format!("netns {path:?} must be an absolute path without `.` or `..` components"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::conformance::fixtures::sandbox;

    fn agent() -> Requester {
        Requester {
            agent: AgentId::parse("0123456789abcdef0123456789abcdef").unwrap(),
            host: None,
        }
    }

    fn declared(keep: bool) -> SandboxRecord {
        SandboxRecord {
            cgroup: String::new(),
            bound: false,
            keep,
            ..sandbox("sb", "", "A")
        }
    }

    #[test]
    fn only_a_declared_unbound_sandbox_binds() {
        let e = bindable("sb", None, &agent()).unwrap_err();
        assert_eq!(e.kind, RefusalKind::NotDeclared);
        let d = declared(false);
        assert_eq!(bindable("sb", Some(&d), &agent()).unwrap(), &d);
        let b = bound(
            &d,
            "docker/abc".into(),
            42,
            Some("/run/veil/netns/sb".into()),
            5,
        );
        assert!(b.bound && b.cgroup_id == Some(42) && b.cgroup == "docker/abc");
        assert_eq!(
            (b.mounts.clone(), b.created_at),
            (d.mounts.clone(), d.created_at)
        );
        let e = bindable("sb", Some(&b), &agent()).unwrap_err();
        assert_eq!(e.kind, RefusalKind::AlreadyBound);
        // A one-step PUT is bound too.
        let put = sandbox("sb", "veil.slice/sb", "A");
        assert_eq!(
            bindable("sb", Some(&put), &agent()).unwrap_err().kind,
            RefusalKind::AlreadyBound
        );
    }

    #[test]
    fn unbind_keeps_the_declaration_only_with_keep() {
        let b = bound(&declared(false), "docker/abc".into(), 42, None, 5);
        assert_eq!(unbound(&b, 6), None);
        let kept = bound(&declared(true), "docker/abc".into(), 42, None, 5);
        let back = unbound(&kept, 6).unwrap();
        assert!(!back.bound && back.cgroup.is_empty() && back.cgroup_id.is_none());
        assert_eq!(back.indexed_cgroup(), None, "frees its cgroup");
        assert_eq!(
            unbindable("sb", Some(&declared(true)), &agent())
                .unwrap_err()
                .kind,
            RefusalKind::BadRequest
        );
        assert_eq!(
            unbindable("sb", None, &agent()).unwrap_err().kind,
            RefusalKind::NotDeclared
        );
        assert!(unbindable("sb", Some(&b), &agent()).is_ok());
    }

    #[test]
    fn a_host_sees_binds_and_unbinds_only_its_own_sandboxes() {
        let host = |h: Option<&str>| Requester {
            host: h.map(str::to_owned),
            ..agent()
        };
        let mut d = declared(false);
        d.host = Some("h2".into());
        for who in [host(None), host(Some("h1"))] {
            for refused in [
                describable("sb", Some(&d), &who),
                bindable("sb", Some(&d), &who),
            ] {
                // Exactly what an unknown id gets: nothing tells the host the sandbox exists.
                assert_eq!(
                    refused.unwrap_err(),
                    bindable("sb", None, &who).unwrap_err()
                );
            }
        }
        let b = bound(&d, "docker/abc".into(), 42, None, 5);
        assert_eq!(
            unbindable("sb", Some(&b), &host(Some("h1")))
                .unwrap_err()
                .kind,
            RefusalKind::NotDeclared
        );
        assert!(bindable("sb", Some(&d), &host(Some("h2"))).is_ok());
        assert!(unbindable("sb", Some(&b), &host(Some("h2"))).is_ok());
        // A single host's sandbox is not a fleet host's.
        let local = declared(false);
        assert!(bindable("sb", Some(&local), &host(Some("h2"))).is_err());
    }

    #[test]
    fn a_stale_gone_report_unbinds_nothing() {
        let b = bound(&declared(false), "docker/abc".into(), 42, None, 5);
        assert!(gone_applies(Some(&b), 42));
        // The cgroup was replaced and the sandbox bound again: the old id's report is stale.
        assert!(!gone_applies(Some(&b), 41));
        assert!(!gone_applies(Some(&declared(true)), 42));
        assert!(!gone_applies(None, 42));
        // A sandbox registered by path is not the agent's to reap.
        assert!(!gone_applies(
            Some(&sandbox("sb", "veil.slice/sb", "A")),
            42
        ));
    }

    #[test]
    fn netns_paths_are_plain_and_absolute() {
        for ok in [
            "/run/veil/netns/sb",
            "/proc/42/ns/net",
            "/tmp/x y/netns/sb-1",
        ] {
            netns_path(ok).unwrap();
        }
        for bad in [
            "run/netns/x",
            "/run/netns/../../etc/passwd",
            "/run//netns",
            "/run/netns/",
            "",
            "/run/netns/a\nb",
            "/run/./netns/x",
            "/run/netns/.",
        ] {
            assert_eq!(
                netns_path(bad).unwrap_err().kind,
                RefusalKind::BadTarget,
                "{bad:?}"
            );
        }
    }
}
