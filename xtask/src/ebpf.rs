//! Builds veil's eBPF object (`proxy-ebpf`) from a fresh machine; std only.
//!
//! Shared by `cargo xtask build-ebpf` and `proxy-agent/build.rs` (which includes this file with
//! `#[path = "../../xtask/src/ebpf.rs"] mod ebpf;`). Entry point:
//!
//! ```ignore
//! pub fn build_object(workspace_root: &Path, notify: &mut dyn FnMut(&str)) -> Result<PathBuf, Error>
//! ```
//!
//! It returns the path of the built object, `<root>/target/bpf/bpfel-unknown-none/release/proxy-ebpf`.
//! `notify` receives one line per install step (toolchain, rust-src, bpf-linker) and nothing when
//! everything is already in place; build.rs turns those lines into `cargo:warning=`.
//!
//! Steps, each idempotent and fast when already done:
//! 1. the pinned nightly [`NIGHTLY`] with `rust-src` (installed with rustup when missing);
//! 2. bpf-linker [`BPF_LINKER_VERSION`] built against that nightly's own shared libLLVM into
//!    `<root>/target/tools` (reinstalled when missing, broken, or built for another LLVM);
//! 3. `cargo build` of `proxy-ebpf` for `bpfel-unknown-none` into `<root>/target/bpf`.
//!
//! The tools and inner target directories are always under the workspace root, whatever
//! `CARGO_TARGET_DIR` says, so every outer target directory shares one installation. Installs
//! are serialised with a file lock because several builds may run at once. The inner cargo runs
//! with the environment an outer cargo or build script leaks (toolchain overrides, rustc
//! wrappers, flags, target dirs, jobserver) removed.

use std::{
    env,
    ffi::OsString,
    fmt, fs, io,
    os::fd::AsFd,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

/// The nightly toolchain that compiles the eBPF crate; bpf-linker must use its LLVM.
pub const NIGHTLY: &str = "nightly-2026-05-19";
/// The bpf-linker release installed into the tools directory.
pub const BPF_LINKER_VERSION: &str = "0.13.0";
/// Target triple of the eBPF object.
pub const BPF_TARGET: &str = "bpfel-unknown-none";

/// Why the eBPF object could not be built.
#[derive(Debug)]
pub enum Error {
    /// A file-system operation failed.
    Io {
        /// What was being done.
        what: String,
        /// The underlying error.
        source: io::Error,
    },
    /// A command could not be started or exited unsuccessfully.
    Command {
        /// The command line, for the reader.
        command: String,
        /// Exit status or spawn error.
        detail: String,
    },
    /// The toolchain does not look as expected.
    Toolchain(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Io { what, source } => write!(f, "{what}: {source}"),
            Self::Command { command, detail } => write!(f, "`{command}` failed: {detail}"),
            Self::Toolchain(msg) => write!(f, "{msg}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

/// Builds the eBPF object and returns its path; see the module documentation.
pub fn build_object(workspace_root: &Path, notify: &mut dyn FnMut(&str)) -> Result<PathBuf, Error> {
    let manifest = workspace_root.join("proxy-ebpf").join("Cargo.toml");
    if !manifest.is_file() {
        return Err(Error::Toolchain(format!(
            "{} not found: not a veil workspace root",
            manifest.display()
        )));
    }
    let target = workspace_root.join("target");
    let tools = target.join("tools");
    fs::create_dir_all(&tools).map_err(io_err(format!("creating {}", tools.display())))?;
    let rustup = find_rustup()?;

    let sysroot = ensure_toolchain(&rustup, &tools, notify)?;
    ensure_bpf_linker(&rustup, &tools, &sysroot, notify)?;

    let inner_target = target.join("bpf");
    let mut cmd = inner_command(&rustup, "cargo", &tools)?;
    cmd.args(["build", "--manifest-path"])
        .arg(&manifest)
        .args(["--target", BPF_TARGET, "-Z", "build-std=core", "--release"])
        .arg("--target-dir")
        .arg(&inner_target)
        .env("RUSTFLAGS", "-C debuginfo=2 -C link-arg=--btf");
    run(&mut cmd)?;

    let object = inner_target
        .join(BPF_TARGET)
        .join("release")
        .join("proxy-ebpf");
    if !object.is_file() {
        return Err(Error::Toolchain(format!(
            "the eBPF build succeeded but {} is missing",
            object.display()
        )));
    }
    Ok(object)
}

/// Makes sure [`NIGHTLY`] with rust-src is installed; returns its sysroot.
fn ensure_toolchain(
    rustup: &Path,
    tools: &Path,
    notify: &mut dyn FnMut(&str),
) -> Result<PathBuf, Error> {
    if let Some(sysroot) = sysroot(rustup, tools)?
        && has_rust_src(&sysroot)
    {
        return Ok(sysroot);
    }
    let _lock = InstallLock::acquire(tools)?;
    // Another build may have installed it while we waited for the lock.
    match sysroot(rustup, tools)? {
        Some(sysroot) if has_rust_src(&sysroot) => return Ok(sysroot),
        Some(_) => {
            notify(&format!("adding rust-src to {NIGHTLY}"));
            let mut cmd = inner_command(rustup, "", tools)?;
            cmd.args(["component", "add", "rust-src", "--toolchain", NIGHTLY]);
            run(&mut cmd)?;
        }
        None => {
            notify(&format!("installing toolchain {NIGHTLY} (rust-src)"));
            let mut cmd = inner_command(rustup, "", tools)?;
            cmd.args(["toolchain", "install", NIGHTLY, "--profile", "minimal"])
                .args(["--component", "rust-src"]);
            run(&mut cmd)?;
        }
    }
    match sysroot(rustup, tools)? {
        Some(sysroot) if has_rust_src(&sysroot) => Ok(sysroot),
        _ => Err(Error::Toolchain(format!(
            "{NIGHTLY} with rust-src is still missing after installing it"
        ))),
    }
}

/// The toolchain's sysroot, or `None` when the toolchain is not installed.
fn sysroot(rustup: &Path, tools: &Path) -> Result<Option<PathBuf>, Error> {
    let mut cmd = inner_command(rustup, "rustc", tools)?;
    cmd.args(["--print", "sysroot"]).stdin(Stdio::null());
    let out = cmd.output().map_err(|e| Error::Command {
        command: describe(&cmd),
        detail: e.to_string(),
    })?;
    if !out.status.success() {
        return Ok(None);
    }
    let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    Ok((!text.is_empty()).then(|| PathBuf::from(text)))
}

fn has_rust_src(sysroot: &Path) -> bool {
    sysroot
        .join("lib/rustlib/src/rust/library/core/Cargo.toml")
        .is_file()
}

/// Makes sure `<tools>/bin/bpf-linker` runs and was built against this sysroot's libLLVM.
fn ensure_bpf_linker(
    rustup: &Path,
    tools: &Path,
    sysroot: &Path,
    notify: &mut dyn FnMut(&str),
) -> Result<(), Error> {
    let (libllvm, major) = find_libllvm(&sysroot.join("lib"))?;
    // What the installed linker was built for; a new nightly pin means a new LLVM.
    let stamp_text = format!("bpf-linker {BPF_LINKER_VERSION} {NIGHTLY} {libllvm}\n");
    let stamp = tools.join("bpf-linker.stamp");
    let linker = tools.join("bin").join("bpf-linker");
    let ready =
        || fs::read_to_string(&stamp).is_ok_and(|s| s == stamp_text) && linker_runs(&linker);
    if ready() {
        return Ok(());
    }
    let _lock = InstallLock::acquire(tools)?;
    if ready() {
        return Ok(());
    }
    notify(&format!(
        "building bpf-linker {BPF_LINKER_VERSION} against {NIGHTLY}'s {libllvm} into {} (about a minute)",
        tools.display()
    ));
    // bpf-linker links libLLVM dynamically from $LLVM_PREFIX/lib and records that directory as
    // its rpath, so the prefix lives beside the binary and must be kept.
    let prefix = tools.join("llvm");
    let lib = prefix.join("lib");
    fs::create_dir_all(&lib).map_err(io_err(format!("creating {}", lib.display())))?;
    let real = sysroot.join("lib").join(&libllvm);
    for name in ["libLLVM.so", libllvm.as_str()] {
        let link = lib.join(name);
        match fs::remove_file(&link) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(format!("removing {}", link.display()))(e)),
        }
        std::os::unix::fs::symlink(&real, &link)
            .map_err(io_err(format!("linking {}", link.display())))?;
    }
    let _ = fs::remove_file(&stamp);
    let mut cmd = inner_command(rustup, "cargo", tools)?;
    cmd.args([
        "install",
        "bpf-linker",
        "--locked",
        "--force",
        "--no-default-features",
    ])
    .arg("--version")
    .arg(format!("={BPF_LINKER_VERSION}"))
    .arg("--features")
    .arg(format!("llvm-{major}"))
    .arg("--root")
    .arg(tools)
    .env("LLVM_PREFIX", &prefix);
    run(&mut cmd)?;
    if !linker_runs(&linker) {
        return Err(Error::Toolchain(format!(
            "{} was installed but `--version` does not run",
            linker.display()
        )));
    }
    fs::write(&stamp, stamp_text).map_err(io_err(format!("writing {}", stamp.display())))
}

fn linker_runs(linker: &Path) -> bool {
    Command::new(linker)
        .arg("--version")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Finds the toolchain's shared libLLVM (the ELF file, not the linker script beside it) and
/// its LLVM major version.
fn find_libllvm(lib: &Path) -> Result<(String, u32), Error> {
    let entries = fs::read_dir(lib).map_err(io_err(format!("reading {}", lib.display())))?;
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io_err(format!("reading {}", lib.display())))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(major) = libllvm_major(&name)
            && is_elf(&entry.path())
        {
            found.push((name, major));
        }
    }
    found.sort();
    match found.as_slice() {
        [one] => Ok(one.clone()),
        [] => Err(Error::Toolchain(format!(
            "no shared libLLVM in {}; the nightly toolchain is expected to ship one",
            lib.display()
        ))),
        many => Err(Error::Toolchain(format!(
            "several shared libLLVMs in {}: {many:?}",
            lib.display()
        ))),
    }
}

/// `libLLVM.so.22.1-rust-1.97.0-nightly` or `libLLVM-22-rust-….so` → 22.
fn libllvm_major(name: &str) -> Option<u32> {
    let rest = name
        .strip_prefix("libLLVM.so.")
        .or_else(|| name.strip_prefix("libLLVM-"))?;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

fn is_elf(path: &Path) -> bool {
    use io::Read as _;
    let mut magic = [0u8; 4];
    fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok_and(|()| magic == *b"\x7fELF")
}

/// Locates rustup: PATH first, then `$CARGO_HOME/bin` and `~/.cargo/bin`.
fn find_rustup() -> Result<PathBuf, Error> {
    let mut candidates: Vec<PathBuf> = env::var_os("PATH")
        .map(|p| env::split_paths(&p).map(|d| d.join("rustup")).collect())
        .unwrap_or_default();
    if let Some(home) = env::var_os("CARGO_HOME") {
        candidates.push(PathBuf::from(home).join("bin/rustup"));
    }
    if let Some(home) = env::var_os("HOME") {
        candidates.push(PathBuf::from(home).join(".cargo/bin/rustup"));
    }
    candidates.into_iter().find(|p| p.is_file()).ok_or_else(|| {
        Error::Toolchain("rustup not found in PATH, $CARGO_HOME/bin or ~/.cargo/bin".into())
    })
}

/// Whether an inherited variable would steer the inner cargo or rustup wrongly.
///
/// An outer cargo hands its build scripts its toolchain (`RUSTUP_TOOLCHAIN`, `RUSTC`, `CARGO`),
/// wrappers, flags, target directory, jobserver and package metadata; a user's environment may
/// carry `CARGO_BUILD_*` or `CARGO_PROFILE_*` meant for the host build.
fn is_leaky_var(name: &str) -> bool {
    const KEEP_CARGO_PREFIXES: [&str; 6] = [
        "CARGO_HOME",
        "CARGO_NET_",
        "CARGO_HTTP_",
        "CARGO_REGISTRIES_",
        "CARGO_REGISTRY_",
        "CARGO_TERM_",
    ];
    const BUILD_SCRIPT_VARS: [&str; 12] = [
        "OUT_DIR",
        "TARGET",
        "HOST",
        "PROFILE",
        "OPT_LEVEL",
        "DEBUG",
        "NUM_JOBS",
        "MAKEFLAGS",
        "MFLAGS",
        "CARGO",
        "RUSTUP_TOOLCHAIN",
        "RUSTC_BOOTSTRAP",
    ];
    if name.starts_with("CARGO_") {
        return !KEEP_CARGO_PREFIXES.iter().any(|p| name.starts_with(p));
    }
    BUILD_SCRIPT_VARS.contains(&name)
        || name.starts_with("RUSTC")
        || name.starts_with("RUSTDOC")
        || name == "RUSTFLAGS"
}

/// `rustup run NIGHTLY <program>` (or plain `rustup` when `program` is empty) with a scrubbed
/// environment and the tools directory first in PATH.
fn inner_command(rustup: &Path, program: &str, tools: &Path) -> Result<Command, Error> {
    let mut cmd = Command::new(rustup);
    if !program.is_empty() {
        cmd.args(["run", NIGHTLY, program]);
    }
    for (name, _) in env::vars_os() {
        if name.to_str().is_some_and(is_leaky_var) {
            cmd.env_remove(&name);
        }
    }
    let mut path = vec![tools.join("bin")];
    if let Some(old) = env::var_os("PATH") {
        path.extend(env::split_paths(&old));
    }
    let path: OsString = env::join_paths(path)
        .map_err(|e| Error::Toolchain(format!("cannot put {} in PATH: {e}", tools.display())))?;
    cmd.env("PATH", path);
    Ok(cmd)
}

/// Runs a command with its output on our stderr (stdout of a build script is read by cargo).
fn run(cmd: &mut Command) -> Result<(), Error> {
    let stderr = io::stderr()
        .as_fd()
        .try_clone_to_owned()
        .map_err(io_err("duplicating stderr"))?;
    cmd.stdin(Stdio::null()).stdout(Stdio::from(stderr));
    let status = cmd.status().map_err(|e| Error::Command {
        command: describe(cmd),
        detail: e.to_string(),
    })?;
    if status.success() {
        Ok(())
    } else {
        Err(Error::Command {
            command: describe(cmd),
            detail: status.to_string(),
        })
    }
}

fn describe(cmd: &Command) -> String {
    let mut parts = vec![cmd.get_program().to_string_lossy().into_owned()];
    parts.extend(cmd.get_args().map(|a| a.to_string_lossy().into_owned()));
    parts.join(" ")
}

/// An exclusive lock on `<tools>/.install.lock`, held while installing; released on drop.
struct InstallLock(fs::File);

impl InstallLock {
    fn acquire(tools: &Path) -> Result<Self, Error> {
        let path = tools.join(".install.lock");
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_err(format!("opening {}", path.display())))?;
        file.lock()
            .map_err(io_err(format!("locking {}", path.display())))?;
        Ok(Self(file))
    }
}

impl Drop for InstallLock {
    fn drop(&mut self) {
        let _ = self.0.unlock();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libllvm_major_parses_both_spellings() {
        assert_eq!(
            libllvm_major("libLLVM.so.22.1-rust-1.97.0-nightly"),
            Some(22)
        );
        assert_eq!(libllvm_major("libLLVM-22-rust-1.97.0-nightly.so"), Some(22));
        assert_eq!(libllvm_major("librustc_driver-b5a9.so"), None);
        assert_eq!(libllvm_major("libLLVM.so"), None);
    }

    #[test]
    fn leaky_vars_are_scrubbed_and_registry_settings_kept() {
        for leaky in [
            "RUSTUP_TOOLCHAIN",
            "RUSTC",
            "RUSTC_WRAPPER",
            "RUSTC_WORKSPACE_WRAPPER",
            "RUSTFLAGS",
            "CARGO_ENCODED_RUSTFLAGS",
            "CARGO_TARGET_DIR",
            "CARGO_BUILD_TARGET",
            "CARGO_MAKEFLAGS",
            "CARGO_PRIMARY_PACKAGE",
            "CARGO_MANIFEST_DIR",
            "CARGO",
            "OUT_DIR",
        ] {
            assert!(is_leaky_var(leaky), "{leaky}");
        }
        for kept in [
            "CARGO_HOME",
            "CARGO_NET_OFFLINE",
            "RUSTUP_HOME",
            "PATH",
            "HOME",
        ] {
            assert!(!is_leaky_var(kept), "{kept}");
        }
    }
}
