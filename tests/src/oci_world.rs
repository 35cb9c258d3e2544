//! What the OCI hook's tests share: a world whose TLS upstream echoes each request back (so
//! scrubbing shows), a secret allowed for its name, a place (cgroup parent, netns, output dir)
//! for containers, and the shell script a container runs to report what it sees.

use std::path::{Path, PathBuf};

use serde_json::json;

use crate::cgroup::Cgroup;
use crate::https::{HttpsUpstream, Reply};
use crate::intercept_world::{InterceptWorld, Secret};
use crate::netns::NetNs;
use crate::runc::RuncSpec;

/// The name the upstream answers for (and the secret allows).
pub const ALLOWED: &str = "api.allowed.test";
/// The variable the secret is mounted as.
pub const VAR: &str = "MY_KEY";

/// A world with an echoing upstream and one secret allowed for [`ALLOWED`].
pub fn echo_world(ca_name: &str) -> (InterceptWorld, Secret) {
    let w = InterceptWorld::builder(ca_name, &[ALLOWED]).start_with(|ns, ip, ca, names| {
        HttpsUpstream::start_with(ns, ip, Some((ca, names)), Reply::Echo)
    });
    let key = w.secret("upstream-key", &[ALLOWED], json!({}));
    (w, key)
}

/// Where one container runs: a cgroup below a harness cgroup (allowed by control), a netns of
/// its own (the sandbox's egress is `host`: veil is its only way out) and a host directory
/// mounted at `/out`.
#[derive(Debug)]
pub struct Place {
    /// The cgroup parent (removed on drop).
    pub parent: Cgroup,
    /// The container's netns.
    pub netns: NetNs,
    /// Host side of `/out`.
    pub out: tempfile::TempDir,
}

impl Place {
    /// A fresh place tagged `tag`.
    pub fn new(tag: &str) -> Place {
        Place {
            parent: Cgroup::new(tag),
            netns: NetNs::new(tag),
            out: tempfile::Builder::new()
                .prefix(&crate::owner::tempdir_prefix())
                .tempdir()
                .expect("tempdir"),
        }
    }

    /// A spec running `script` under `sh -c` with `env`, here.
    pub fn spec(&self, script: &str, env: &[String]) -> RuncSpec {
        RuncSpec {
            args: vec!["sh".into(), "-c".into(), script.into()],
            env: env.to_vec(),
            cgroup: format!("{}/ctr", self.parent.relative()),
            netns: Some(self.netns.path().to_owned()),
            binds: vec![(self.out.path().to_owned(), "/out".into())],
            ..RuncSpec::default()
        }
    }

    /// A file the container wrote to `/out`, or `None`.
    pub fn read(&self, name: &str) -> Option<String> {
        std::fs::read_to_string(self.out.path().join(name)).ok()
    }

    /// Host path of `/out/<name>`.
    pub fn path(&self, name: &str) -> PathBuf {
        self.out.path().join(name)
    }

    /// The container's cgroup directory (absolute).
    pub fn cgroup_dir(&self) -> PathBuf {
        self.parent.path().join("ctr")
    }
}

/// A script that records `/proc/1/environ` in `/out/environ` and sends `$MY_KEY` as a bearer
/// token to the upstream with curl given no CA flag or variable (`env -u` the ones veil sets:
/// the mounted trust store must do), writing the answer to `/out/echo` and curl's status to
/// `/out/curl`. `/out/ran` marks that the workload started.
pub fn report_script(w: &InterceptWorld) -> String {
    let addr = w.up.addr();
    format!(
        "touch /out/ran; tr '\\0' '\\n' < /proc/1/environ > /out/environ; \
         env -u SSL_CERT_FILE -u CURL_CA_BUNDLE -u REQUESTS_CA_BUNDLE curl -sS --max-time 20 \
         --resolve {ALLOWED}:{port}:{ip} -H \"Authorization: Bearer ${VAR}\" \
         https://{ALLOWED}:{port}/echo > /out/echo 2>/out/curl-err; echo $? > /out/curl",
        port = addr.port(),
        ip = addr.ip(),
    )
}

/// The `NAME=` entries of an environ dump for `name`.
pub fn env_values<'a>(environ: &'a str, name: &str) -> Vec<&'a str> {
    let prefix = format!("{name}=");
    environ
        .lines()
        .filter_map(|l| l.strip_prefix(prefix.as_str()))
        .collect()
}

/// The bearer token the upstream's last request carried equals `value` (compared, not shown).
pub fn last_bearer_is(w: &InterceptWorld, value: &str) -> bool {
    w.seen().last().is_some_and(|s| {
        s.headers
            .iter()
            .any(|(n, v)| n == "authorization" && *v == format!("Bearer {value}"))
    })
}

/// Whether a runtime dir of veil-oci-hook is left for container `id`.
pub fn rundir_left(id: &str) -> bool {
    Path::new("/run/veil/oci").join(id).exists()
}
