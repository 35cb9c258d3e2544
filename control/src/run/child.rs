//! The sandboxed command: who it runs as, what its environment holds, and the steps it takes
//! between fork and exec (join the cgroup, enter the netns, private resolv.conf, drop
//! privileges, no_new_privs) so that its very first socket is already the sandbox's.

use std::collections::BTreeMap;
use std::ffi::{CString, OsStr, OsString};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// The variables that point runtimes at a CA bundle (Python requests, curl, OpenSSL, Node, git,
/// cargo, the AWS SDKs, Deno).
pub const CA_VARS: [&str; 8] = [
    "SSL_CERT_FILE",
    "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE",
    "NODE_EXTRA_CA_CERTS",
    "GIT_SSL_CAINFO",
    "CARGO_HTTP_CAINFO",
    "AWS_CA_BUNDLE",
    "DENO_CERT",
];

/// The user the command runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// User name.
    pub name: String,
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Home directory.
    pub home: PathBuf,
}

/// Errors resolving the user.
#[derive(Debug, thiserror::Error)]
pub enum UserError {
    /// No such user.
    #[error("no user {0:?} on this host")]
    Unknown(String),
    /// The user database could not be read.
    #[error("looking up user {0:?}: {1}")]
    Lookup(String, nix::Error),
}

/// Resolves a user name or numeric uid.
pub fn resolve_user(spec: &str) -> Result<Identity, UserError> {
    let found = match spec.parse::<u32>() {
        Ok(uid) => nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)),
        Err(_) => nix::unistd::User::from_name(spec),
    }
    .map_err(|e| UserError::Lookup(spec.to_owned(), e))?
    .ok_or_else(|| UserError::Unknown(spec.to_owned()))?;
    Ok(Identity {
        name: found.name,
        uid: found.uid.as_raw(),
        gid: found.gid.as_raw(),
        home: found.dir,
    })
}

/// The command's environment: the caller's, without any `VEIL_*` variable (veil's own
/// credentials) and without its CA variables, plus the CA bundle variables, the user's
/// HOME/USER/LOGNAME and the placeholders.
pub fn child_env(
    parent: impl IntoIterator<Item = (OsString, OsString)>,
    placeholders: &BTreeMap<String, String>,
    ca_bundle: &Path,
    user: &Identity,
) -> BTreeMap<OsString, OsString> {
    let mut env: BTreeMap<OsString, OsString> = parent
        .into_iter()
        .filter(|(k, _)| !k.as_bytes().starts_with(b"VEIL_"))
        .collect();
    for var in CA_VARS {
        env.insert(var.into(), ca_bundle.as_os_str().to_owned());
    }
    env.insert("HOME".into(), user.home.as_os_str().to_owned());
    env.insert("USER".into(), user.name.clone().into());
    env.insert("LOGNAME".into(), user.name.clone().into());
    for (k, v) in placeholders {
        env.insert(k.into(), v.into());
    }
    env
}

/// What the child does between fork and exec; everything is prepared before the fork.
#[derive(Debug)]
pub struct Entry {
    /// `cgroup.procs` of the sandbox cgroup, open for writing.
    pub cgroup_procs: File,
    /// The sandbox netns, when it has its own.
    pub netns: Option<File>,
    /// A resolv.conf to bind over /etc/resolv.conf (in a private mount namespace).
    pub resolv_conf: Option<CString>,
    /// Who to become.
    pub uid: u32,
    /// Primary (and only) group.
    pub gid: u32,
}

fn check(rc: libc::c_int) -> std::io::Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

impl Entry {
    /// Runs in the forked child. Only async-signal-safe system calls on data prepared before
    /// the fork.
    pub fn enter(&self) -> std::io::Result<()> {
        // SAFETY (whole block): plain system calls on fds we own and NUL-terminated strings
        // built before fork; no allocation, no locks.
        unsafe {
            // The cgroup first: every socket the command creates must be the sandbox's.
            let n = libc::write(self.cgroup_procs.as_raw_fd(), b"0".as_ptr().cast(), 1);
            if n != 1 {
                return Err(std::io::Error::last_os_error());
            }
            if let Some(ns) = &self.netns {
                check(libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET))?;
            }
            if let Some(resolv) = &self.resolv_conf {
                check(libc::unshare(libc::CLONE_NEWNS))?;
                // Private, so the bind below never propagates back to the host.
                check(libc::mount(
                    std::ptr::null(),
                    c"/".as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                ))?;
                check(libc::mount(
                    resolv.as_ptr(),
                    c"/etc/resolv.conf".as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND,
                    std::ptr::null(),
                ))?;
            }
            let groups = [self.gid];
            check(libc::setgroups(1, groups.as_ptr()))?;
            check(libc::setgid(self.gid))?;
            check(libc::setuid(self.uid))?;
            check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))?;
        }
        Ok(())
    }
}

/// A path as a C string (for mount(2) in the child).
pub fn c_path(path: &Path) -> Result<CString, std::ffi::NulError> {
    CString::new(OsStr::as_bytes(path.as_os_str()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_drops_veil_credentials_and_sets_trust() {
        let parent = vec![
            ("VEIL_API_KEY".into(), "k".into()),
            ("VEIL_API_URL".into(), "u".into()),
            ("PATH".into(), "/usr/bin".into()),
            ("SSL_CERT_FILE".into(), "/elsewhere".into()),
            ("HOME".into(), "/root".into()),
        ];
        let mut ph = BTreeMap::new();
        ph.insert("OPENAI_KEY".to_owned(), "veil_ph_123".to_owned());
        let user = Identity {
            name: "nobody".into(),
            uid: 65534,
            gid: 65534,
            home: "/nonexistent".into(),
        };
        let env = child_env(parent, &ph, Path::new("/tmp/x/ca.pem"), &user);
        assert!(env.keys().all(|k| !k.as_bytes().starts_with(b"VEIL_")));
        for var in CA_VARS {
            assert_eq!(env[OsStr::new(var)], "/tmp/x/ca.pem");
        }
        assert_eq!(env[OsStr::new("OPENAI_KEY")], "veil_ph_123");
        assert_eq!(env[OsStr::new("PATH")], "/usr/bin");
        assert_eq!(env[OsStr::new("HOME")], "/nonexistent");
        assert_eq!(env[OsStr::new("USER")], "nobody");
    }

    #[test]
    fn resolves_users() {
        let root = resolve_user("root").unwrap();
        assert_eq!((root.uid, root.gid), (0, 0));
        assert_eq!(resolve_user("0").unwrap().name, "root");
        assert!(matches!(
            resolve_user("no-such-user-veil"),
            Err(UserError::Unknown(_))
        ));
    }
}
