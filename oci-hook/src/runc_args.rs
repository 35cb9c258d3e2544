//! The runc command line the shim receives: its own `--veil-*` flags are taken out, the rest is
//! passed to the real runc unchanged; for `create` and `run` the bundle and container id are
//! found the way runc finds them.

use std::ffi::OsString;
use std::path::PathBuf;

/// Flag (among runc's global flags) naming the agent's local socket, e.g. from Docker's
/// `runtimeArgs` or Podman's `--runtime-flag veil-socket=PATH`.
pub const SOCKET_FLAG: &str = "--veil-socket";
/// Flag naming the real runtime.
pub const RUNC_FLAG: &str = "--veil-runc";

/// runc's global flags that take a value as the next argument.
const GLOBAL_WITH_VALUE: &[&str] = &["--root", "--log", "--log-format", "--criu", "--rootless"];
/// `create`/`run` flags that take a value as the next argument.
const CREATE_WITH_VALUE: &[&str] = &[
    "--bundle",
    "-b",
    "--console-socket",
    "--pid-file",
    "--preserve-fds",
];

/// A parsed invocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invocation {
    /// What to pass to runc (the `--veil-*` flags removed).
    pub args: Vec<OsString>,
    /// `--veil-socket`.
    pub socket: Option<PathBuf>,
    /// `--veil-runc`.
    pub runc: Option<PathBuf>,
    /// Set for `create` and `run`: the container about to be created.
    pub create: Option<Create>,
    /// runc's `--log` file with `--log-format json`: where containerd looks for the runtime's
    /// error (it never sees stderr), so a refusal is written there too.
    pub json_log: Option<PathBuf>,
}

/// A `create` (or `run`) of one container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Create {
    /// `--bundle`/`-b`; `None` = the working directory.
    pub bundle: Option<PathBuf>,
    /// The container id (runc's last positional argument).
    pub id: String,
}

/// Why the command line is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ArgsError {
    /// A `--veil-*` flag without a value.
    #[error("{0} needs a value ({0}=PATH)")]
    MissingValue(&'static str),
    /// An argument that is not UTF-8 where a path or id is expected.
    #[error("an argument of runc {0} is not UTF-8")]
    NotUtf8(&'static str),
    /// `create` without a container id.
    #[error("runc {0} without a container id")]
    NoId(&'static str),
}

/// Splits `args` (everything after the shim's own subcommand).
pub fn parse(args: Vec<OsString>) -> Result<Invocation, ArgsError> {
    let mut pass = Vec::with_capacity(args.len());
    let mut socket = None;
    let mut runc = None;
    let mut command: Option<usize> = None;
    let mut log = None;
    let mut json = false;
    let mut iter = args.into_iter();
    while let Some(arg) = iter.next() {
        if command.is_none() {
            let text = arg.to_str();
            if let Some(t) = text {
                if let Some(v) = veil_flag(t, SOCKET_FLAG, &mut iter)? {
                    socket = Some(v);
                    continue;
                }
                if let Some(v) = veil_flag(t, RUNC_FLAG, &mut iter)? {
                    runc = Some(v);
                    continue;
                }
                let (flag, inline) = match t.split_once('=') {
                    Some((f, v)) => (f, Some(v.to_owned())),
                    None => (t, None),
                };
                if GLOBAL_WITH_VALUE.contains(&flag) {
                    let is_inline = inline.is_some();
                    let value = match inline {
                        Some(v) => Some(OsString::from(v)),
                        None => {
                            pass.push(arg.clone());
                            iter.next()
                        }
                    };
                    match (flag, value.as_ref().and_then(|v| v.to_str())) {
                        ("--log", Some(v)) => log = Some(PathBuf::from(v)),
                        ("--log-format", Some(v)) => json = v == "json",
                        _ => {}
                    }
                    if is_inline {
                        pass.push(arg);
                    } else if let Some(v) = value {
                        pass.push(v);
                    }
                    continue;
                }
                if !t.starts_with('-') {
                    command = Some(pass.len());
                }
            } else {
                command = Some(pass.len());
            }
        }
        pass.push(arg);
    }
    let create = match command.and_then(|i| pass[i].to_str().map(|c| (i, c))) {
        Some((i, "create")) => Some(parse_create(&pass[i + 1..], "create")?),
        Some((i, "run")) => Some(parse_create(&pass[i + 1..], "run")?),
        _ => None,
    };
    Ok(Invocation {
        args: pass,
        socket,
        runc,
        create,
        json_log: log.filter(|_| json),
    })
}

/// `--veil-x=V` or `--veil-x V`.
fn veil_flag(
    t: &str,
    name: &'static str,
    rest: &mut impl Iterator<Item = OsString>,
) -> Result<Option<PathBuf>, ArgsError> {
    if t == name {
        return rest
            .next()
            .map(|v| Some(PathBuf::from(v)))
            .ok_or(ArgsError::MissingValue(name));
    }
    match t.strip_prefix(name).and_then(|r| r.strip_prefix('=')) {
        Some("") => Err(ArgsError::MissingValue(name)),
        Some(v) => Ok(Some(PathBuf::from(v))),
        None => Ok(None),
    }
}

fn parse_create(args: &[OsString], cmd: &'static str) -> Result<Create, ArgsError> {
    let mut bundle = None;
    let mut id = None;
    let mut i = 0;
    while i < args.len() {
        let a = args[i].to_str().ok_or(ArgsError::NotUtf8(cmd))?;
        i += 1;
        if let Some((flag, value)) = a.split_once('=')
            && CREATE_WITH_VALUE.contains(&flag)
        {
            if matches!(flag, "--bundle" | "-b") {
                bundle = Some(PathBuf::from(value));
            }
        } else if CREATE_WITH_VALUE.contains(&a) {
            let value = args.get(i).ok_or(ArgsError::NoId(cmd))?;
            i += 1;
            if matches!(a, "--bundle" | "-b") {
                bundle = Some(PathBuf::from(value));
            }
        } else if a == "--" {
            id = args.get(i).and_then(|v| v.to_str()).map(str::to_owned);
            break;
        } else if !a.starts_with('-') {
            id = Some(a.to_owned());
        }
    }
    let id = id.ok_or(ArgsError::NoId(cmd))?;
    Ok(Create { bundle, id })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    #[test]
    fn docker_create_is_found_and_passed_unchanged() {
        // What containerd-shim-runc-v2 runs (with runtimeArgs before it).
        let a = os(&[
            "--veil-socket=/tmp/a.sock",
            "--root",
            "/var/run/docker/runtime-runc/moby",
            "--log",
            "/run/x/log.json",
            "--log-format",
            "json",
            "create",
            "--bundle",
            "/run/x/bundle",
            "--pid-file",
            "/run/x/init.pid",
            "abc123",
        ]);
        let inv = parse(a.clone()).unwrap();
        assert_eq!(inv.args, a[1..].to_vec());
        assert_eq!(inv.socket.as_deref(), Some("/tmp/a.sock".as_ref()));
        assert_eq!(inv.json_log.as_deref(), Some("/run/x/log.json".as_ref()));
        assert_eq!(
            inv.create,
            Some(Create {
                bundle: Some("/run/x/bundle".into()),
                id: "abc123".into()
            })
        );
    }

    #[test]
    fn podman_and_plain_runc_shapes() {
        let inv = parse(os(&[
            "--veil-runc",
            "/opt/runc",
            "--systemd-cgroup",
            "create",
            "-b=/b",
            "--no-pivot",
            "--console-socket=/c",
            "ctr",
        ]))
        .unwrap();
        assert_eq!(inv.runc.as_deref(), Some("/opt/runc".as_ref()));
        assert_eq!(inv.json_log, None);
        assert_eq!(inv.create.unwrap().bundle.as_deref(), Some("/b".as_ref()));
        let inv = parse(os(&["run", "-d", "c1"])).unwrap();
        assert_eq!(
            inv.create,
            Some(Create {
                bundle: None,
                id: "c1".into()
            })
        );
    }

    #[test]
    fn other_commands_pass_through_and_errors_name_the_problem() {
        for cmd in [
            &["state", "c"][..],
            &["--root", "/r", "delete", "--force", "c"],
            &["--version"],
            &["features"],
        ] {
            let inv = parse(os(cmd)).unwrap();
            assert_eq!(inv.args, os(cmd));
            assert_eq!(inv.create, None);
        }
        // A flag after the command is runc's, even one spelled like the shim's.
        let inv = parse(os(&["exec", "c", "--veil-socket=/x"])).unwrap();
        assert_eq!(inv.socket, None);
        assert_eq!(inv.args.len(), 3);
        assert_eq!(
            parse(os(&["--veil-socket="])).unwrap_err(),
            ArgsError::MissingValue(SOCKET_FLAG)
        );
        assert_eq!(
            parse(os(&["create", "--bundle", "/b"])).unwrap_err(),
            ArgsError::NoId("create")
        );
    }
}
