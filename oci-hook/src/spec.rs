//! The edits to an OCI bundle's `config.json` (kept as JSON so fields this code does not know
//! survive): which sandbox a container names, and what it is given — the declared placeholders
//! (replacing whatever the image's `ENV` set under those names), veil's CA bundle mounted
//! read-only over the trust stores, the CA variables, and the bind/unbind hooks.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};
use veil_link::SandboxId;

use crate::error::HookError;

/// The OCI annotation naming the sandbox (Podman `--annotation`, containerd, CRI).
pub const ANNOTATION: &str = "dev.veil.sandbox";
/// The environment variable naming the sandbox (Docker 20.10 passes no annotation).
pub const ENV_ID: &str = "VEIL_SANDBOX_ID";

/// The variables that point runtimes at a CA bundle (one list for every way into a sandbox).
pub use veil_link::local::CA_VARS;

/// Where the CA bundle is always mounted in the container (created by the runtime when the
/// image lacks it); the CA variables point here.
pub const CA_MOUNT: &str = "/etc/veil/ca-bundle.pem";

/// The distributions' trust stores, covered by the bundle when the image has them as regular
/// files (Debian/Alpine, Fedora/RHEL, LibreSSL/macOS-style). A missing one is not created: a
/// program that looks there finds nothing either way, and creating files in an image's tree is
/// left to the one path veil owns. A symlink is left alone: it points at one of the others.
pub const TRUST_PATHS: [&str; 3] = [
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/cert.pem",
];

/// The sandbox a container's spec names: the annotation, or `VEIL_SANDBOX_ID` in its
/// environment; both present must agree. `None`: not a veil container.
pub fn sandbox_id(spec: &Value) -> Result<Option<SandboxId>, HookError> {
    let annotation = spec
        .pointer("/annotations")
        .and_then(|a| a.get(ANNOTATION))
        .map(|v| {
            v.as_str()
                .ok_or_else(|| HookError::Spec(format!("annotation {ANNOTATION} is not a string")))
        })
        .transpose()?;
    let mut from_env: Option<&str> = None;
    for entry in env_entries(spec)? {
        if let Some(v) = entry.strip_prefix(ENV_ID).and_then(|r| r.strip_prefix('=')) {
            if from_env.is_some_and(|prev| prev != v) {
                return Err(HookError::Spec(format!(
                    "{ENV_ID} is set twice to different sandboxes"
                )));
            }
            from_env = Some(v);
        }
    }
    let named = match (annotation, from_env) {
        (Some(a), Some(e)) if a != e => {
            return Err(HookError::Spec(format!(
                "annotation {ANNOTATION} and {ENV_ID} name different sandboxes"
            )));
        }
        (Some(a), _) => a,
        (None, Some(e)) => e,
        (None, None) => return Ok(None),
    };
    SandboxId::parse(named)
        .map(Some)
        .map_err(|e| HookError::Spec(format!("{ENV_ID}: {e}")))
}

/// `process.env` as strings (an absent list is empty).
fn env_entries(spec: &Value) -> Result<Vec<&str>, HookError> {
    match spec.pointer("/process/env") {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| {
                v.as_str()
                    .ok_or_else(|| HookError::Spec("process.env holds a non-string".into()))
            })
            .collect(),
        Some(_) => Err(HookError::Spec("process.env is not a list".into())),
    }
}

/// What [`give`] adds to a spec.
#[derive(Debug, Clone)]
pub struct Grant<'a> {
    /// Variable → placeholder (from the agent's `Declared`).
    pub env: &'a BTreeMap<String, String>,
    /// The CA bundle file on the host.
    pub ca_file: &'a Path,
    /// The trust-store paths that exist as regular files in the container's rootfs.
    pub trust_paths: &'a [&'a str],
    /// This binary, which the runtime runs as the hooks.
    pub hook_exe: &'a Path,
    /// The agent's local socket, handed to the hooks.
    pub socket: &'a Path,
    /// Environment of the hooks (`NAME=VALUE`; the runtime gives them nothing else).
    pub hook_env: &'a [String],
}

/// Gives the container what its sandbox declares: see the module doc. Entries of
/// `process.env` whose name the declaration maps, or a CA variable, are removed first, so the
/// image cannot set or override them.
pub fn give(spec: &mut Value, grant: &Grant<'_>) -> Result<(), HookError> {
    let root = spec
        .as_object_mut()
        .ok_or_else(|| HookError::Spec("config.json is not an object".into()))?;
    let process = root
        .entry("process")
        .or_insert_with(|| json!({}))
        .as_object_mut()
        .ok_or_else(|| HookError::Spec("process is not an object".into()))?;
    let env = process
        .entry("env")
        .or_insert_with(|| json!([]))
        .as_array_mut()
        .ok_or_else(|| HookError::Spec("process.env is not a list".into()))?;
    env.retain(|e| {
        let name = e.as_str().map_or("", |s| s.split('=').next().unwrap_or(""));
        !grant.env.contains_key(name) && !CA_VARS.contains(&name)
    });
    for (name, placeholder) in grant.env {
        env.push(Value::String(format!("{name}={placeholder}")));
    }
    for var in CA_VARS {
        env.push(Value::String(format!("{var}={CA_MOUNT}")));
    }

    let source = grant.ca_file.to_string_lossy().into_owned();
    let mounts = root
        .entry("mounts")
        .or_insert_with(|| json!([]))
        .as_array_mut()
        .ok_or_else(|| HookError::Spec("mounts is not a list".into()))?;
    for dest in std::iter::once(CA_MOUNT).chain(grant.trust_paths.iter().copied()) {
        // Mounts apply in order: appended last, nothing the image or runtime mounts covers it.
        mounts.push(json!({
            "destination": dest,
            "type": "bind",
            "source": source,
            "options": ["bind", "ro", "nosuid", "nodev", "noexec"],
        }));
    }

    let exe = grant.hook_exe.to_string_lossy().into_owned();
    let socket = grant.socket.to_string_lossy().into_owned();
    let hooks = root
        .entry("hooks")
        .or_insert_with(|| json!({}))
        .as_object_mut()
        .ok_or_else(|| HookError::Spec("hooks is not an object".into()))?;
    for (stage, mode, timeout) in [
        ("createRuntime", "create-runtime", 30),
        ("poststop", "poststop", 15),
    ] {
        let list = hooks
            .entry(stage)
            .or_insert_with(|| json!([]))
            .as_array_mut()
            .ok_or_else(|| HookError::Spec(format!("hooks.{stage} is not a list")))?;
        let mut hook = json!({
            "path": exe,
            "args": ["veil-oci-hook", mode, "--agent-socket", socket],
            "timeout": timeout,
        });
        if !grant.hook_env.is_empty() {
            hook["env"] = json!(grant.hook_env);
        }
        if !list.contains(&hook) {
            list.push(hook);
        }
    }
    Ok(())
}

/// The container's root filesystem on the host (`root.path`, relative to the bundle).
pub fn rootfs(spec: &Value, bundle: &Path) -> Option<PathBuf> {
    let path = spec.pointer("/root/path")?.as_str()?;
    Some(bundle.join(path))
}

/// Which of [`TRUST_PATHS`] are regular files in `rootfs`.
pub fn trust_paths_in(rootfs: &Path) -> Vec<&'static str> {
    TRUST_PATHS
        .iter()
        .copied()
        .filter(|p| {
            std::fs::symlink_metadata(rootfs.join(p.trim_start_matches('/')))
                .is_ok_and(|m| m.file_type().is_file())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn spec(env: &[&str]) -> Value {
        json!({
            "ociVersion": "1.0.2",
            "process": {"args": ["sh"], "env": env, "cwd": "/"},
            "root": {"path": "rootfs"},
            "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"}],
            "linux": {"namespaces": [{"type": "pid"}]},
        })
    }

    fn declared() -> BTreeMap<String, String> {
        [
            ("OPENAI_API_KEY".to_owned(), "veil-ph-aaaa".to_owned()),
            ("GH_TOKEN".to_owned(), "veil-ph-bbbb".to_owned()),
        ]
        .into_iter()
        .collect()
    }

    fn grant<'a>(env: &'a BTreeMap<String, String>, trust: &'a [&'a str]) -> Grant<'a> {
        Grant {
            env,
            ca_file: Path::new("/run/veil/oci/c1/ca.pem"),
            trust_paths: trust,
            hook_exe: Path::new("/usr/local/bin/veil-oci-hook"),
            socket: Path::new("/run/veil/agent-local.sock"),
            hook_env: &[],
        }
    }

    fn env_of(spec: &Value) -> Vec<String> {
        env_entries(spec)
            .unwrap()
            .into_iter()
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn the_sandbox_comes_from_the_annotation_or_the_environment() {
        assert_eq!(sandbox_id(&spec(&["PATH=/bin"])).unwrap(), None);
        let s = spec(&["PATH=/bin", "VEIL_SANDBOX_ID=sb-1"]);
        assert_eq!(sandbox_id(&s).unwrap().unwrap().as_str(), "sb-1");
        let mut s = spec(&[]);
        s["annotations"] = json!({ANNOTATION: "sb-2"});
        assert_eq!(sandbox_id(&s).unwrap().unwrap().as_str(), "sb-2");
        // Both present and different, twice and different, or malformed: refused.
        let mut s = spec(&["VEIL_SANDBOX_ID=sb-1"]);
        s["annotations"] = json!({ANNOTATION: "sb-2"});
        let e = sandbox_id(&s).unwrap_err().to_string();
        assert!(e.contains("different sandboxes"), "{e}");
        let s = spec(&["VEIL_SANDBOX_ID=sb-1", "VEIL_SANDBOX_ID=sb-3"]);
        assert!(sandbox_id(&s).is_err());
        let s = spec(&["VEIL_SANDBOX_ID=../etc"]);
        let e = sandbox_id(&s).unwrap_err().to_string();
        assert!(e.starts_with("VEIL_SANDBOX_ID: "), "{e}");
        // The same id twice is one sandbox; a prefix-named variable is not the id.
        let s = spec(&[
            "VEIL_SANDBOX_ID=sb-1",
            "VEIL_SANDBOX_ID=sb-1",
            "VEIL_SANDBOX_IDX=x",
        ]);
        assert_eq!(sandbox_id(&s).unwrap().unwrap().as_str(), "sb-1");
    }

    #[test]
    fn the_image_cannot_set_a_mounted_variable_or_a_ca_variable() {
        let mut s = spec(&[
            "PATH=/bin",
            "OPENAI_API_KEY=sk-from-the-image",
            "OPENAI_API_KEY=another",
            "SSL_CERT_FILE=/evil.pem",
            "GH_TOKENS=kept",
            "VEIL_SANDBOX_ID=sb-1",
        ]);
        let env = declared();
        give(&mut s, &grant(&env, &[])).unwrap();
        let e = env_of(&s);
        assert!(
            !e.iter()
                .any(|v| v.contains("sk-from-the-image") || v == "OPENAI_API_KEY=another")
        );
        assert_eq!(
            e.iter()
                .filter(|v| v.starts_with("OPENAI_API_KEY="))
                .count(),
            1
        );
        assert!(e.contains(&"OPENAI_API_KEY=veil-ph-aaaa".to_owned()));
        assert!(e.contains(&"GH_TOKEN=veil-ph-bbbb".to_owned()));
        assert!(e.contains(&"GH_TOKENS=kept".to_owned()));
        assert!(e.contains(&"VEIL_SANDBOX_ID=sb-1".to_owned()));
        assert!(e.contains(&format!("SSL_CERT_FILE={CA_MOUNT}")));
        assert!(!e.contains(&"SSL_CERT_FILE=/evil.pem".to_owned()));
        for var in CA_VARS {
            assert_eq!(
                e.iter()
                    .filter(|v| v.starts_with(&format!("{var}=")))
                    .count(),
                1
            );
        }
    }

    #[test]
    fn the_bundle_is_mounted_read_only_last_and_the_hooks_run_this_binary() {
        let mut s = spec(&[]);
        let env = declared();
        let trust = ["/etc/ssl/certs/ca-certificates.crt"];
        give(&mut s, &grant(&env, &trust)).unwrap();
        let mounts = s["mounts"].as_array().unwrap();
        assert_eq!(mounts.len(), 3);
        assert_eq!(mounts[0]["destination"], "/proc");
        assert_eq!(mounts[1]["destination"], CA_MOUNT);
        assert_eq!(mounts[2]["destination"], trust[0]);
        for m in &mounts[1..] {
            assert_eq!(m["source"], "/run/veil/oci/c1/ca.pem");
            assert!(m["options"].as_array().unwrap().contains(&json!("ro")));
        }
        let create = &s["hooks"]["createRuntime"][0];
        assert_eq!(create["path"], "/usr/local/bin/veil-oci-hook");
        assert_eq!(
            create["args"],
            json!([
                "veil-oci-hook",
                "create-runtime",
                "--agent-socket",
                "/run/veil/agent-local.sock"
            ])
        );
        assert_eq!(s["hooks"]["poststop"][0]["args"][1], "poststop");
        // Fields this code does not know survive.
        assert_eq!(s["linux"]["namespaces"][0]["type"], "pid");
        // Giving twice does not add the hooks twice.
        give(&mut s, &grant(&env, &trust)).unwrap();
        assert_eq!(s["hooks"]["createRuntime"].as_array().unwrap().len(), 1);
    }

    #[test]
    fn a_spec_of_the_wrong_shape_is_refused_not_mangled() {
        let env = declared();
        for bad in [
            json!([]),
            json!({"process": []}),
            json!({"process": {"env": "A=b"}}),
            json!({"process": {"env": []}, "mounts": {}}),
            json!({"process": {"env": []}, "hooks": {"poststop": {}}}),
        ] {
            let mut s = bad.clone();
            assert!(give(&mut s, &grant(&env, &[])).is_err(), "{bad}");
        }
        assert!(sandbox_id(&json!({"process": {"env": [1]}})).is_err());
        assert!(sandbox_id(&json!({"annotations": {ANNOTATION: 1}})).is_err());
    }

    #[test]
    fn trust_paths_are_the_regular_files_of_the_rootfs() {
        let dir = tempfile::tempdir().unwrap();
        let certs = dir.path().join("etc/ssl/certs");
        std::fs::create_dir_all(&certs).unwrap();
        std::fs::write(certs.join("ca-certificates.crt"), "x").unwrap();
        std::os::unix::fs::symlink(
            "certs/ca-certificates.crt",
            dir.path().join("etc/ssl/cert.pem"),
        )
        .unwrap();
        assert_eq!(
            trust_paths_in(dir.path()),
            vec!["/etc/ssl/certs/ca-certificates.crt"]
        );
        assert_eq!(
            rootfs(&spec(&[]), Path::new("/b")).as_deref(),
            Some(Path::new("/b/rootfs"))
        );
    }

    proptest! {
        /// Whatever the image's environment, each mounted name ends up exactly once, holding
        /// its placeholder, and every other entry is kept.
        #[test]
        fn every_mounted_name_holds_its_placeholder_once(
            image in proptest::collection::vec(
                ("(OPENAI_API_KEY|GH_TOKEN|PATH|HOME|[A-Z]{1,4})", "[ -~]{0,12}"), 0..12)
        ) {
            let entries: Vec<String> = image.iter().map(|(n, v)| format!("{n}={v}")).collect();
            let refs: Vec<&str> = entries.iter().map(String::as_str).collect();
            let mut s = spec(&refs);
            let env = declared();
            give(&mut s, &grant(&env, &[])).unwrap();
            let out = env_of(&s);
            for (name, ph) in &env {
                let with: Vec<_> = out.iter().filter(|e| e.starts_with(&format!("{name}="))).collect();
                let want = format!("{name}={ph}");
                prop_assert_eq!(with, vec![&want]);
            }
            for e in &entries {
                let name = e.split('=').next().unwrap_or("");
                if !env.contains_key(name) && !CA_VARS.contains(&name) {
                    prop_assert!(out.contains(e));
                }
            }
        }
    }
}
