//! Attacks from inside `veil-control run` sandboxes, written as the workload would run them.
//!
//! - A sandbox holds no API key: whatever the caller's environment or argv carried, the command
//!   finds no key in its own environment nor in any process it can see, and none it tries
//!   works against veil's API (which it can reach: without `--netns` it shares the host netns).
//! - `run` sandboxes are isolated from each other and from veil: each has its own uid and pid
//!   namespace, so one cannot read another's `/proc/<pid>/environ`, open its memory or ptrace
//!   it, even when told its host pid, and it sees no veil process.
//! - The `run --netns` lock is root-only: a sandbox cannot open it (and so cannot hold it to
//!   stall every later `run --netns`); a held lock makes `run --netns` fail after a timeout
//!   with a message naming the file.
//!
//! Assertions never print a secret value or an API key: they report booleans.

use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

use veil_tests::agent::AgentOptions;
use veil_tests::cgroup::PARENT;
use veil_tests::control::random_token;
use veil_tests::runcli::{
    DEFAULT_UIDS, Running, Setup, line_value, run_with_pid, sandbox_id, sandbox_pids,
};

/// What the attacker does with every readable `/proc/*/environ` and `/proc/*/cmdline`: dumps it
/// (the test looks for the key in the dump), collects whatever looks like an API key (veil's
/// `veil_…` format, values of `*KEY*`/`*TOKEN*`/`*SECRET*` variables, `--api-key` arguments) and
/// tries each one against veil's API. argv[1] is the API URL.
const HARVEST_KEYS_PY: &str = r#"
import os, re, sys, urllib.request, urllib.error
url = sys.argv[1]
print('own-env-names=' + ','.join(sorted(os.environ)))
candidates = set()
readable = 0
for p in os.listdir('/proc'):
    if not p.isdigit():
        continue
    for f in ('environ', 'cmdline'):
        try:
            data = open('/proc/%s/%s' % (p, f), 'rb').read()
        except OSError:
            continue
        readable += 1
        text = data.replace(b'\0', b'\n').decode('utf-8', 'replace')
        sys.stdout.write(text + '\n')
        candidates.update(re.findall(r'veil_[0-9A-Za-z_]{10,}', text))
        lines = text.split('\n')
        for i, line in enumerate(lines):
            name, eq, value = line.partition('=')
            if eq and re.search('KEY|TOKEN|SECRET|PASS', name.upper()) and value:
                candidates.add(value)
            if line == '--api-key' and i + 1 < len(lines):
                candidates.add(lines[i + 1])
ok = 0
for c in sorted(candidates)[:2000]:
    req = urllib.request.Request(url + '/secret', headers={'Authorization': 'Bearer ' + c})
    try:
        urllib.request.urlopen(req, timeout=5)
        ok += 1
    except urllib.error.HTTPError:
        pass
    except Exception as e:
        print('api-error %s' % type(e).__name__)
print('readable=%d tried=%d' % (readable, len(candidates)))
print('api-ok=%d' % ok)
"#;

/// `sh -c` text that runs `program` with `/usr/bin/python3` (not a PATH lookup: root's pyenv
/// shims are not readable by a sandbox uid) and `args`.
fn python(program: &str, args: &str) -> String {
    format!("/usr/bin/python3 - {args} <<'VEIL_PY_EOF'\n{program}\nVEIL_PY_EOF\n")
}

#[test]
fn a_sandbox_holds_no_api_key_and_cannot_use_one() {
    let s = Setup::new(AgentOptions::default());
    let key = s.veil.key().to_owned();
    let url = s.veil.control().url();
    let foo = format!("foo-{}", random_token(24));
    let script = python(HARVEST_KEYS_PY, &url);

    // The walk-through's shell: the key in VEIL_API_KEY and DAYTONA_API_KEY, and something else.
    let mut in_env = s.command(&[], &script);
    in_env
        .env("DAYTONA_API_KEY", &key)
        .env("DAYTONA_API_URL", &url)
        .env("FOO", &foo);
    // A caller who passes the key in argv (discouraged, but possible).
    let mut in_argv = s.command(&["--api-key", &key], &script);
    in_argv.env_remove("VEIL_API_KEY");

    for (how, cmd) in [("environment", &mut in_env), ("argv", &mut in_argv)] {
        let (_, out) = run_with_pid(cmd);
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !stderr.contains(&key) && !stderr.contains(&foo),
            "key in {how}: a key or FOO reached the command's stderr"
        );
        assert_eq!(
            out.status.code(),
            Some(0),
            "key in {how}: the attacker did not run to its end (stderr:\n{stderr})"
        );
        let names = line_value(&stdout, "own-env-names=").unwrap_or_default();
        for leaked in ["VEIL_API_KEY", "DAYTONA_API_KEY", "FOO"] {
            assert!(
                !names.split(',').any(|n| n == leaked),
                "key in {how}: the sandbox's environment holds {leaked} (names: {names})"
            );
        }
        assert!(
            !stdout.contains(&key),
            "key in {how}: the sandbox read the API key from /proc (its own environment or \
             another process's environ/cmdline)"
        );
        assert!(
            !stdout.contains(&foo),
            "key in {how}: the sandbox read the caller's FOO"
        );
        assert!(
            line_value(&stdout, "readable=").is_some(),
            "key in {how}: the scan did not finish:\n{stdout}"
        );
        assert_eq!(
            line_value(&stdout, "api-ok="),
            Some("0"),
            "key in {how}: a key the sandbox found worked against veil's API"
        );
    }
}

/// What the attacker does to every process outside its own cgroup that it can name (those in
/// its /proc, and host pids given as arguments): read its cmdline, environ, open its memory,
/// PTRACE_ATTACH.
const PROBE_OTHERS_PY: &str = r#"
import ctypes, os, sys
given = [int(a) for a in sys.argv[1:]]
libc = ctypes.CDLL(None, use_errno=True)
own = open('/proc/self/cgroup').read()
pids = set(int(p) for p in os.listdir('/proc') if p.isdigit()) | set(given)
for pid in sorted(pids):
    try:
        if open('/proc/%d/cgroup' % pid).read() == own:
            continue
    except OSError:
        pass
    try:
        cmd = open('/proc/%d/cmdline' % pid, 'rb').read().replace(b'\0', b' ')
        print('visible %d %s' % (pid, cmd.decode('utf-8', 'replace')))
    except OSError:
        pass
    try:
        env = open('/proc/%d/environ' % pid, 'rb').read()
        print('environ-read %d' % pid)
        sys.stdout.write(env.replace(b'\0', b'\n').decode('utf-8', 'replace') + '\n')
    except OSError:
        pass
    try:
        with open('/proc/%d/mem' % pid, 'rb'):
            print('mem-open %d' % pid)
    except OSError:
        pass
    if libc.ptrace(16, pid, None, None) == 0:
        print('ptrace-attached %d' % pid)
        try:
            os.waitpid(pid, 0x40000000)
        except OSError:
            pass
        libc.ptrace(17, pid, None, None)
print('scan-done')
"#;

#[test]
fn run_sandboxes_cannot_read_or_trace_each_other_or_see_veil() {
    let s = Setup::new(AgentOptions::default());
    // Sandbox A holds the placeholder in its environment and keeps running.
    let (a, seen) = Running::start(&mut s.command(
        &[],
        "echo \"uid=$(id -u)\"; cat /proc/self/cgroup; echo ready; exec sleep 60",
    ));
    let a_id = sandbox_id(&seen);
    let a_uid: u32 = line_value(&seen, "uid=")
        .and_then(|u| u.trim().parse().ok())
        .unwrap_or_else(|| panic!("sandbox A printed no uid:\n{seen}"));
    let a_pids = sandbox_pids(&a_id);
    assert!(!a_pids.is_empty(), "sandbox A has no processes");
    let given: Vec<String> = a_pids.iter().map(u32::to_string).collect();
    // Sandbox B, at the same time, goes after A (told A's host pids) and after veil.
    let script = format!(
        "echo \"uid=$(id -u)\"; cat /proc/self/cgroup; {}",
        python(PROBE_OTHERS_PY, &given.join(" "))
    );
    let (_, out) = run_with_pid(&mut s.bare(PARENT, &[], &script));
    drop(a);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stdout.contains(&s.value) && !stderr.contains(&s.value),
        "the secret value reached a sandbox"
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "sandbox B's probe failed (stderr:\n{stderr})"
    );
    assert!(
        stdout.contains("scan-done"),
        "sandbox B's probe did not finish"
    );
    assert!(
        !stdout.contains(&s.placeholder),
        "sandbox B read sandbox A's environment (its placeholder) from /proc/<pid>/environ"
    );
    let attached: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("ptrace-attached ") || l.starts_with("mem-open "))
        .collect();
    assert!(
        attached.is_empty(),
        "sandbox B traced or opened the memory of processes outside it: {attached:?}"
    );
    let veil: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("visible ") && l.contains("veil-"))
        .collect();
    assert!(veil.is_empty(), "sandbox B sees veil's processes: {veil:?}");
    let b_uid: u32 = line_value(&stdout, "uid=")
        .and_then(|u| u.trim().parse().ok())
        .unwrap_or_else(|| panic!("sandbox B printed no uid:\n{stdout}"));
    assert_ne!(
        a_uid, b_uid,
        "two concurrent run sandboxes share uid {a_uid}"
    );
    for uid in [a_uid, b_uid] {
        assert!(
            DEFAULT_UIDS.contains(&uid),
            "sandbox uid {uid} is not from the default run.uid_range {DEFAULT_UIDS:?}"
        );
    }
}

/// Where `veil-control run` serializes its network set-up (root-only directory, 0600 file).
const LOCK: &str = "/run/veil/run/net.lock";
/// Where versions before the root-only directory kept it (0644 in a 0755 directory).
const LEGACY_LOCK: &str = "/run/veil/run-net.lock";

/// Tries to open (read, then write) and flock each path given; prints what worked.
const GRAB_LOCK_PY: &str = r#"
import fcntl, os, sys
for path in sys.argv[1:]:
    for mode in ('rb', 'ab'):
        try:
            f = open(path, mode)
        except OSError as e:
            print('denied %s %s %s' % (mode, path, e.errno))
            continue
        print('opened %s %s' % (mode, path))
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            print('locked %s' % path)
        except OSError:
            pass
        f.close()
print('grab-done')
"#;

#[test]
fn the_netns_lock_is_root_only_and_taken_with_a_timeout() {
    let s = Setup::new(AgentOptions::default());
    // A lock an older version left must not make this test pass or fail.
    let _ = std::fs::remove_file(LEGACY_LOCK);
    // One `run --netns` makes sure the lock file exists wherever this version keeps it.
    let (_, out) = run_with_pid(&mut s.command(&["--netns"], "exit 0"));
    assert_eq!(out.status.code(), Some(0), "run --netns failed: {out:?}");

    // A sandbox process (unprivileged uid) goes for it.
    let script = python(GRAB_LOCK_PY, &format!("{LOCK} {LEGACY_LOCK}"));
    let (_, out) = run_with_pid(&mut s.command(&[], &script));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("grab-done"),
        "the probe did not run: {out:?}"
    );
    let opened: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("opened "))
        .collect();
    assert!(
        opened.is_empty(),
        "a sandbox opened the run --netns lock: {opened:?}"
    );

    // Held (here by the test, as a stuck or hostile holder would), it makes run --netns give
    // up after its timeout, naming the file.
    let dir = Path::new(LOCK).parent().expect("lock dir");
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .expect("create the lock dir");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(LOCK)
        .expect("open the lock");
    let held = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| e)
        .expect("hold the lock");
    let mut cmd = s.command(&["--netns"], "echo ran");
    cmd.env("VEIL_RUN_LOCK_TIMEOUT", "2");
    let start = Instant::now();
    let (pid, out) = run_with_pid(&mut cmd);
    let took = start.elapsed();
    drop(held);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stdout.contains("ran"),
        "run --netns ran its command while the lock was held (took {took:?})"
    );
    assert_eq!(out.status.code(), Some(125), "exit status: {out:?}");
    assert!(
        stderr.contains(LOCK),
        "the error does not name the lock file: {stderr}"
    );
    assert!(
        took >= Duration::from_secs(2),
        "gave up before the 2 s timeout ({took:?})"
    );
    let prefix = format!("run-{pid}-");
    let left: Vec<String> = [
        veil_tests::cgroup2_mount().join(PARENT),
        "/run/netns".into(),
    ]
    .iter()
    .flat_map(|d| std::fs::read_dir(d).into_iter().flatten().flatten())
    .map(|e| e.file_name().to_string_lossy().into_owned())
    .filter(|n| n.trim_start_matches("veil-").starts_with(&prefix))
    .collect();
    assert!(left.is_empty(), "the timed-out run left {left:?}");
}
