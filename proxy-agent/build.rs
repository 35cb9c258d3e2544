//! Builds the eBPF object with the same code as `cargo xtask build-ebpf` and hands its path to
//! `bpf.rs` as `VEIL_EBPF_OBJ`, so a plain `cargo build -p proxy-agent` works on a fresh machine.

#[path = "../xtask/src/ebpf.rs"]
#[allow(dead_code, reason = "xtask uses the rest of the module")]
mod ebpf;

use std::{env, fs, path::PathBuf, process::ExitCode};

fn main() -> ExitCode {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
    let Some(root) = manifest_dir.parent().map(PathBuf::from) else {
        eprintln!("CARGO_MANIFEST_DIR has no parent");
        return ExitCode::FAILURE;
    };
    for watched in [
        "proxy-ebpf/src",
        "proxy-ebpf/Cargo.toml",
        "proxy-ebpf/Cargo.lock",
        "proxy-common/src",
        "proxy-common/Cargo.toml",
        "xtask/src/ebpf.rs",
    ] {
        println!("cargo:rerun-if-changed={}", root.join(watched).display());
    }
    let mut notify = |line: &str| println!("cargo:warning={line}");
    let object = match ebpf::build_object(&root, &mut notify) {
        Ok(object) => object,
        Err(e) => {
            eprintln!("building the eBPF object failed: {e}");
            return ExitCode::FAILURE;
        }
    };
    // A private copy: another build may rewrite the shared object while rustc embeds this one.
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").unwrap_or_default());
    let copy = out_dir.join("proxy-ebpf.o");
    if let Err(e) = fs::copy(&object, &copy) {
        eprintln!("copying {} to {}: {e}", object.display(), copy.display());
        return ExitCode::FAILURE;
    }
    println!("cargo:rustc-env=VEIL_EBPF_OBJ={}", copy.display());
    ExitCode::SUCCESS
}
