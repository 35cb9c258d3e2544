//! The sandboxed command's environment, built from an allowlist: never the caller's whole
//! environment, which holds veil's API key in `VEIL_API_KEY` (and often others: cloud
//! credentials, `DAYTONA_API_KEY`, tokens of every kind).
//!
//! What the command gets: the caller's PATH, LANG, LC_*, TERM and TZ; its own HOME (and USER /
//! LOGNAME when it runs as a named user); what the caller passes with `--env NAME[=VALUE]`;
//! veil's CA bundle in every CA variable; the placeholders.

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// The variables that point runtimes at a CA bundle (one list for every way into a sandbox).
pub use veil_link::local::CA_VARS;

/// The caller's variables the command gets without asking (besides `LC_*`).
pub const PASSED: [&str; 4] = ["PATH", "LANG", "TERM", "TZ"];

/// PATH when the caller has none.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// One `--env NAME[=VALUE]`: a value, or (None) the caller's value of NAME.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvArg {
    /// Variable name.
    pub name: String,
    /// Its value; None copies the caller's.
    pub value: Option<String>,
}

/// Parses `NAME[=VALUE]`.
pub fn parse_env(s: &str) -> Result<EnvArg, String> {
    let (name, value) = match s.split_once('=') {
        Some((name, value)) => (name, Some(value.to_owned())),
        None => (s, None),
    };
    veil_api::names::env_name(name)?;
    if name.starts_with("VEIL_") {
        return Err(format!(
            "{name}: VEIL_* variables are reserved for veil (they hold its API URL and key)"
        ));
    }
    if CA_VARS.contains(&name) {
        return Err(format!(
            "{name} is set by veil-control run (it points at veil's CA bundle)"
        ));
    }
    Ok(EnvArg {
        name: name.to_owned(),
        value,
    })
}

/// An `--env` name that is also a `--secret` ENV (its placeholder would be overridden, or the
/// caller's value of it handed to the sandbox): the error names it.
pub fn check_conflicts(env: &[EnvArg], secrets: &[(String, String)]) -> Result<(), String> {
    match env
        .iter()
        .find(|e| secrets.iter().any(|(s, _)| *s == e.name))
    {
        Some(e) => Err(format!(
            "--env {0}: {0} is also a --secret variable (it holds the secret's placeholder)",
            e.name
        )),
        None => Ok(()),
    }
}

/// Who the command is, for HOME, USER and LOGNAME.
#[derive(Debug, Clone, Copy)]
pub struct Person<'a> {
    /// Its HOME.
    pub home: &'a Path,
    /// The user name, when it runs as a named user (a sandbox uid has none).
    pub name: Option<&'a str>,
}

fn passed(name: &OsStr) -> bool {
    let b = name.as_bytes();
    PASSED.iter().any(|p| p.as_bytes() == b) || b.starts_with(b"LC_")
}

/// The command's whole environment.
pub fn child_env(
    caller: impl IntoIterator<Item = (OsString, OsString)>,
    extra: &[EnvArg],
    placeholders: &BTreeMap<String, String>,
    ca_bundle: &Path,
    person: Person<'_>,
) -> BTreeMap<OsString, OsString> {
    let caller: BTreeMap<OsString, OsString> = caller.into_iter().collect();
    let mut env: BTreeMap<OsString, OsString> = caller
        .iter()
        .filter(|(k, _)| passed(k))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    env.entry("PATH".into())
        .or_insert_with(|| DEFAULT_PATH.into());
    env.insert("HOME".into(), person.home.as_os_str().to_owned());
    if let Some(name) = person.name {
        env.insert("USER".into(), name.into());
        env.insert("LOGNAME".into(), name.into());
    }
    for e in extra {
        let value = match &e.value {
            Some(v) => Some(OsString::from(v)),
            // As with `docker run -e NAME`: a name the caller has not set is left out.
            None => caller.get(OsStr::new(&e.name)).cloned(),
        };
        if let Some(v) = value {
            env.insert(e.name.clone().into(), v);
        }
    }
    for var in CA_VARS {
        env.insert(var.into(), ca_bundle.as_os_str().to_owned());
    }
    for (k, v) in placeholders {
        env.insert(k.into(), v.into());
    }
    env
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller() -> Vec<(OsString, OsString)> {
        [
            ("VEIL_API_KEY", "k"),
            ("VEIL_API_URL", "u"),
            ("DAYTONA_API_KEY", "d"),
            ("AWS_SECRET_ACCESS_KEY", "a"),
            ("PATH", "/usr/bin"),
            ("LANG", "C.UTF-8"),
            ("LC_ALL", "C"),
            ("TERM", "xterm"),
            ("TZ", "UTC"),
            ("SSL_CERT_FILE", "/elsewhere"),
            ("HOME", "/root"),
            ("USER", "root"),
            ("PASSED_ON", "yes"),
            ("FOO", "foo"),
        ]
        .into_iter()
        .map(|(k, v)| (k.into(), v.into()))
        .collect()
    }

    fn get<'a>(env: &'a BTreeMap<OsString, OsString>, k: &str) -> Option<&'a OsStr> {
        env.get(OsStr::new(k)).map(OsString::as_os_str)
    }

    #[test]
    fn only_the_allowlist_passes() {
        let mut ph = BTreeMap::new();
        ph.insert("OPENAI_KEY".to_owned(), "veil_ph_123".to_owned());
        let person = Person {
            home: Path::new("/tmp/home"),
            name: None,
        };
        let env = child_env(caller(), &[], &ph, Path::new("/b/ca.pem"), person);
        let names: Vec<&str> = env.keys().filter_map(|k| k.to_str()).collect();
        let mut want = vec!["HOME", "LANG", "LC_ALL", "OPENAI_KEY", "PATH", "TERM", "TZ"];
        want.extend(CA_VARS);
        want.sort_unstable();
        assert_eq!(names, want);
        for var in CA_VARS {
            assert_eq!(get(&env, var), Some(OsStr::new("/b/ca.pem")));
        }
        assert_eq!(get(&env, "OPENAI_KEY"), Some(OsStr::new("veil_ph_123")));
        assert_eq!(get(&env, "PATH"), Some(OsStr::new("/usr/bin")));
        assert_eq!(get(&env, "HOME"), Some(OsStr::new("/tmp/home")));
    }

    #[test]
    fn env_args_set_or_copy_and_named_users_get_user() {
        let extra = [
            parse_env("PASSED_ON").unwrap(),
            parse_env("GIVEN=a=b").unwrap(),
            parse_env("NOT_SET_ANYWHERE").unwrap(),
            parse_env("PATH=/opt/bin").unwrap(),
        ];
        let person = Person {
            home: Path::new("/nonexistent"),
            name: Some("nobody"),
        };
        let env = child_env(caller(), &extra, &BTreeMap::new(), Path::new("/b"), person);
        assert_eq!(get(&env, "PASSED_ON"), Some(OsStr::new("yes")));
        assert_eq!(get(&env, "GIVEN"), Some(OsStr::new("a=b")));
        assert_eq!(get(&env, "NOT_SET_ANYWHERE"), None);
        assert_eq!(get(&env, "PATH"), Some(OsStr::new("/opt/bin")));
        assert_eq!(get(&env, "USER"), Some(OsStr::new("nobody")));
        assert_eq!(get(&env, "LOGNAME"), Some(OsStr::new("nobody")));
        assert_eq!(get(&env, "FOO"), None);
    }

    #[test]
    fn path_defaults_when_the_caller_has_none() {
        let person = Person {
            home: Path::new("/h"),
            name: None,
        };
        let env = child_env(Vec::new(), &[], &BTreeMap::new(), Path::new("/b"), person);
        assert_eq!(get(&env, "PATH"), Some(OsStr::new(DEFAULT_PATH)));
    }

    #[test]
    fn env_args_are_validated() {
        assert!(parse_env("VEIL_API_KEY").is_err());
        assert!(parse_env("VEIL_API_URL=x").is_err());
        assert!(parse_env("SSL_CERT_FILE=/x").is_err());
        assert!(parse_env("1BAD").is_err());
        assert!(parse_env("=x").is_err());
        assert!(parse_env("BAD NAME=x").is_err());
        assert_eq!(
            parse_env("EMPTY=").unwrap(),
            EnvArg {
                name: "EMPTY".into(),
                value: Some(String::new())
            }
        );
    }

    #[test]
    fn env_names_that_are_secret_mounts_are_refused_by_name() {
        let secrets = [("OPENAI_KEY".to_owned(), "openai".to_owned())];
        let err = check_conflicts(&[parse_env("OPENAI_KEY").unwrap()], &secrets).unwrap_err();
        assert!(err.contains("OPENAI_KEY"), "{err}");
        check_conflicts(&[parse_env("OTHER=1").unwrap()], &secrets).unwrap();
    }
}
