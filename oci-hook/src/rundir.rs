//! The per-container runtime directory, `/run/veil/oci/<container-id>/`: the CA bundle the
//! container mounts, the sandbox it named, and whether this container bound it. Removed at
//! poststop.

use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use veil_link::SandboxId;

use crate::error::HookError;

/// Where the runtime directories live.
pub const BASE: &str = "/run/veil/oci";
/// The host's trust store, copied into the bundle so the container keeps trusting the public
/// roots.
pub const HOST_ROOTS: &str = "/etc/ssl/certs/ca-certificates.crt";

/// One container's runtime directory.
#[derive(Debug, Clone)]
pub struct RunDir {
    dir: PathBuf,
}

impl RunDir {
    /// The directory of container `id` under `base`; an id runc would refuse is refused here.
    pub fn new(base: &Path, id: &str) -> Result<RunDir, HookError> {
        let ok = !id.is_empty()
            && id != "."
            && id != ".."
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'+' | b'-' | b'.'));
        if !ok {
            return Err(HookError::Spec(format!(
                "container id {id:?} is not a valid runc id"
            )));
        }
        Ok(RunDir { dir: base.join(id) })
    }

    /// The CA bundle file.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    fn sandbox_file(&self) -> PathBuf {
        self.dir.join("sandbox")
    }

    fn bound_file(&self) -> PathBuf {
        self.dir.join("bound")
    }

    fn create(&self) -> Result<(), HookError> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o711)
            .create(&self.dir)
            .map_err(HookError::io(&self.dir))
    }

    /// Creates the directory and writes the CA bundle (host roots + veil's CA) and the sandbox.
    pub fn prepare(
        &self,
        host_roots: &Path,
        ca_pem: &str,
        sandbox: &SandboxId,
    ) -> Result<(), HookError> {
        self.create()?;
        let mut bundle = match std::fs::read(host_roots) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(HookError::io(host_roots)(e)),
        };
        if !bundle.is_empty() && !bundle.ends_with(b"\n") {
            bundle.push(b'\n');
        }
        bundle.extend_from_slice(ca_pem.as_bytes());
        write_file(&self.ca_file(), &bundle, 0o644)?;
        write_file(&self.sandbox_file(), sandbox.as_str().as_bytes(), 0o600)
    }

    /// Records that this container's createRuntime hook bound its sandbox: only then does its
    /// poststop unbind (a container that named someone else's bound sandbox must not unbind it).
    /// The directory is created when missing: hooks configured without the shim (a Podman
    /// hooks.d file) have none.
    pub fn mark_bound(&self, sandbox: &SandboxId) -> Result<(), HookError> {
        self.create()?;
        write_file(&self.sandbox_file(), sandbox.as_str().as_bytes(), 0o600)?;
        write_file(&self.bound_file(), b"", 0o600)
    }

    /// The sandbox this container bound, if it did.
    pub fn bound_sandbox(&self) -> Option<SandboxId> {
        if !self.bound_file().exists() {
            return None;
        }
        let text = std::fs::read_to_string(self.sandbox_file()).ok()?;
        SandboxId::parse(text.trim()).ok()
    }

    /// Removes the directory (gone already is fine).
    pub fn remove(&self) -> Result<(), HookError> {
        match std::fs::remove_dir_all(&self.dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(HookError::io(&self.dir)(e)),
            _ => Ok(()),
        }
    }
}

/// Writes `bytes` to `path` with `mode`, through a temporary file renamed over it.
pub fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), HookError> {
    let tmp = path.with_extension("veil-tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(HookError::io(&tmp))?;
    // No fsync: readers are the runtime and the container, moments later, through the page
    // cache; the rename alone keeps them from seeing a partial file. Nothing here must outlive
    // a host crash (the containers do not either).
    f.write_all(bytes).map_err(HookError::io(&tmp))?;
    // The umask may have narrowed the mode of a new file.
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))
        .map_err(HookError::io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(HookError::io(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bundle_is_the_host_roots_then_veils_ca_and_unbinding_needs_the_mark() {
        let base = tempfile::tempdir().unwrap();
        let roots = base.path().join("roots.crt");
        std::fs::write(&roots, "HOST").unwrap();
        let d = RunDir::new(base.path(), "abc").unwrap();
        let sb = SandboxId::parse("sb-1").unwrap();
        d.prepare(&roots, "VEIL\n", &sb).unwrap();
        assert_eq!(
            std::fs::read_to_string(d.ca_file()).unwrap(),
            "HOST\nVEIL\n"
        );
        let mode = std::fs::metadata(d.ca_file()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o644);
        assert_eq!(d.bound_sandbox(), None);
        d.mark_bound(&sb).unwrap();
        assert_eq!(d.bound_sandbox(), Some(sb.clone()));
        // Without the shim's directory (hooks.d), binding records it all the same.
        let other = RunDir::new(base.path(), "hooks-d").unwrap();
        other.mark_bound(&sb).unwrap();
        assert_eq!(other.bound_sandbox(), Some(sb));
        d.remove().unwrap();
        assert!(!base.path().join("abc").exists());
        d.remove().unwrap();
        // Missing host roots: veil's CA alone.
        d.prepare(
            &base.path().join("none"),
            "VEIL\n",
            &SandboxId::parse("s").unwrap(),
        )
        .unwrap();
        assert_eq!(std::fs::read_to_string(d.ca_file()).unwrap(), "VEIL\n");
    }

    #[test]
    fn ids_that_escape_the_base_are_refused() {
        for bad in ["", ".", "..", "a/b", "../x", "a b"] {
            assert!(
                RunDir::new(Path::new("/run/veil/oci"), bad).is_err(),
                "{bad}"
            );
        }
    }
}
