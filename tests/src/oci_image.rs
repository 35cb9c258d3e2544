//! A container root filesystem without a registry: busybox-static, curl and the libraries
//! `ldd` lists, the host's trust store (so the trust-store bind mount has a target), minimal
//! `/etc`. Built once per content (cached under `target/tmp/oci-rootfs-<hash>`), shared
//! read-only by every container of the test run.

use std::collections::BTreeSet;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use sha2::{Digest, Sha256};

use crate::control::target_dir;

/// busybox applets the tests' commands use.
const APPLETS: &[&str] = &[
    "sh", "cat", "env", "echo", "sleep", "true", "false", "touch", "ls", "tr", "grep", "nc",
    "wget", "id",
];

/// Files copied from the host, by their path in the image.
fn host_files() -> Vec<PathBuf> {
    let curl = which("curl");
    let mut files: BTreeSet<PathBuf> = [
        PathBuf::from("/bin/busybox"),
        curl.clone(),
        PathBuf::from("/etc/ssl/certs/ca-certificates.crt"),
    ]
    .into_iter()
    .collect();
    let out = Command::new("ldd")
        .arg(&curl)
        .output()
        .unwrap_or_else(|e| panic!("ldd {}: {e}", curl.display()));
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        // "libz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x…)" or "/lib64/ld-linux-x86-64.so.2 (0x…)"
        let path = line
            .split("=>")
            .last()
            .and_then(|r| r.split_whitespace().next())
            .filter(|p| p.starts_with('/'));
        if let Some(p) = path {
            files.insert(PathBuf::from(p));
        }
    }
    files.into_iter().collect()
}

fn which(name: &str) -> PathBuf {
    let out = Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .output()
        .unwrap_or_else(|e| panic!("command -v {name}: {e}"));
    let p = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(
        !p.is_empty(),
        "{name} is not installed (cargo xtask test installs it)"
    );
    PathBuf::from(p)
}

const ETC: &[(&str, &str)] = &[
    (
        "etc/passwd",
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/sh\n",
    ),
    ("etc/group", "root:x:0:\nnogroup:x:65534:\n"),
    ("etc/hosts", "127.0.0.1 localhost\n::1 localhost\n"),
    (
        "etc/nsswitch.conf",
        "hosts: files dns\npasswd: files\ngroup: files\n",
    ),
    ("etc/resolv.conf", ""),
];

/// The shared rootfs (built on first use by this process, or reused from the cache).
pub fn rootfs() -> &'static Path {
    static ROOTFS: OnceLock<PathBuf> = OnceLock::new();
    ROOTFS.get_or_init(build)
}

fn build() -> PathBuf {
    let files = host_files();
    let mut hash = Sha256::new();
    for f in &files {
        hash.update(f.as_os_str().as_encoded_bytes());
        hash.update(std::fs::read(f).unwrap_or_else(|e| panic!("reading {}: {e}", f.display())));
    }
    for (p, text) in ETC {
        hash.update(p.as_bytes());
        hash.update(text.as_bytes());
    }
    hash.update(APPLETS.join(",").as_bytes());
    let key = hex::encode(&hash.finalize()[..8]);
    let cache = target_dir()
        .parent()
        .map_or_else(|| target_dir().join("tmp"), |t| t.join("tmp"));
    let dir = cache.join(format!("oci-rootfs-{key}"));
    if dir.join(".complete").exists() {
        return dir;
    }
    std::fs::create_dir_all(&cache).unwrap_or_else(|e| panic!("mkdir {}: {e}", cache.display()));
    let tmp = tempfile::Builder::new()
        .prefix("oci-rootfs-build-")
        .tempdir_in(&cache)
        .unwrap_or_else(|e| panic!("tempdir in {}: {e}", cache.display()));
    let root = tmp.path();
    for d in [
        "bin", "proc", "sys", "dev", "tmp", "run", "root", "etc/veil", "out",
    ] {
        mkdir(&root.join(d));
    }
    for f in &files {
        let to = root.join(f.strip_prefix("/").unwrap_or(f));
        mkdir(to.parent().unwrap_or(root));
        // Follows symlinks: the image gets the library itself under the name ldd printed.
        std::fs::copy(f, &to).unwrap_or_else(|e| panic!("copying {}: {e}", f.display()));
    }
    for applet in APPLETS {
        symlink("busybox", root.join("bin").join(applet))
            .unwrap_or_else(|e| panic!("symlink {applet}: {e}"));
    }
    for (p, text) in ETC {
        std::fs::write(root.join(p), text).unwrap_or_else(|e| panic!("writing {p}: {e}"));
    }
    // veil-oci-hook mounts its CA bundle here; with the target present a read-only rootfs works.
    std::fs::write(root.join("etc/veil/ca-bundle.pem"), "").expect("ca-bundle target");
    std::fs::write(root.join(".complete"), "").expect("marker");
    let built = tmp.keep();
    match std::fs::rename(&built, &dir) {
        Ok(()) => dir,
        // Another test process built the same content meanwhile: use it, drop ours.
        Err(_) if dir.join(".complete").exists() => {
            let _ = std::fs::remove_dir_all(&built);
            dir
        }
        Err(e) => panic!("renaming {} to {}: {e}", built.display(), dir.display()),
    }
}

fn mkdir(d: &Path) {
    std::fs::create_dir_all(d).unwrap_or_else(|e| panic!("mkdir {}: {e}", d.display()));
}

/// The rootfs as a tar stream file for `docker import` / `podman import`.
pub fn tarball(into: &Path) -> PathBuf {
    let tar = into.join("rootfs.tar");
    let status = Command::new("tar")
        .arg("-C")
        .arg(rootfs())
        .args(["--exclude=./.complete", "-cf"])
        .arg(&tar)
        .arg(".")
        .status()
        .unwrap_or_else(|e| panic!("tar: {e}"));
    assert!(status.success(), "tar of the rootfs failed ({status})");
    tar
}
