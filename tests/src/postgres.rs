//! A private PostgreSQL server for one test: `initdb` and `pg_ctl` in a harness temp dir, its own
//! port on 127.0.0.1 and its own socket directory, stopped and removed on drop — also when the
//! test fails. Nothing is written under /etc or /var (`pg_ctlcluster` would), and no server of
//! the host is touched. Starts in about a second (see ../shared/ENGINEERING.md).
//!
//! A test process killed before its drop leaves a running postmaster in a stale temp dir:
//! [`crate::stale::postgres::cleanup_stale_servers`] stops it by the pid in its
//! `postmaster.pid`, after checking that the pid is a postgres process serving that very
//! directory.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::cmd::wait_until;
use crate::control::free_port;
use crate::owner;

/// Suffix of the harness temp dirs that hold a server (after the owner's prefix).
pub(crate) const DIR_TAG: &str = "pg";
/// The OS user the server runs as (Debian's package creates it).
const PG_USER: &str = "postgres";
/// How long a start or stop may take before the test fails.
const TIMEOUT: Duration = Duration::from_secs(60);

/// A running private server; stopped and removed on drop.
#[must_use = "dropping it stops and removes the server at once"]
#[derive(Debug)]
pub struct Postgres {
    // Dropped after `Drop::drop` stopped the server: removes data, socket dir and log.
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
}

impl Postgres {
    /// Initialises a cluster (trust authentication, superuser `postgres`) and starts it.
    pub fn start() -> Postgres {
        crate::stale::init();
        let bin = bin_dir().unwrap_or_else(|e| panic!("PostgreSQL: {e}"));
        let dir = tempfile::Builder::new()
            .prefix(&format!("{}{DIR_TAG}-", owner::tempdir_prefix()))
            .tempdir()
            .expect("tempdir for PostgreSQL");
        let pg = Postgres {
            dir,
            bin,
            port: free_port(),
        };
        std::fs::create_dir(pg.socket_dir()).expect("socket dir");
        chown_to_postgres(pg.dir.path());
        chown_to_postgres(&pg.socket_dir());
        pg.as_postgres(
            "initdb",
            &[
                "--no-sync",
                "-A",
                "trust",
                "-U",
                PG_USER,
                "-E",
                "UTF8",
                "-D",
                &path_str(&pg.data_dir()),
            ],
        );
        pg.start_again();
        pg
    }

    /// The port it listens on (127.0.0.1 only).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Its Unix socket directory.
    pub fn socket_dir(&self) -> PathBuf {
        self.dir.path().join("sock")
    }

    /// A connection URL over TCP to database `postgres` as the superuser (no password: trust).
    pub fn url(&self) -> String {
        format!("postgresql://{PG_USER}@127.0.0.1:{}/postgres", self.port)
    }

    /// Starts the server again after [`Postgres::stop`] (same data, port and socket dir).
    pub fn start_again(&self) {
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            self.port,
            path_str(&self.socket_dir())
        );
        self.as_postgres(
            "pg_ctl",
            &[
                "-D",
                &path_str(&self.data_dir()),
                "-l",
                &path_str(&self.log_file()),
                "-w",
                "-t",
                &TIMEOUT.as_secs().to_string(),
                "-o",
                &opts,
                "start",
            ],
        );
        assert!(
            wait_until(TIMEOUT, || self.ready()),
            "PostgreSQL on port {} did not accept connections; its log: {}",
            self.port,
            self.log()
        );
    }

    /// Stops the server (`fast`: open sessions are ended, committed data stays).
    pub fn stop(&self) {
        self.as_postgres(
            "pg_ctl",
            &[
                "-D",
                &path_str(&self.data_dir()),
                "-w",
                "-t",
                &TIMEOUT.as_secs().to_string(),
                "-m",
                "fast",
                "stop",
            ],
        );
    }

    /// Runs `sql` with psql as the superuser; returns its unaligned, tuples-only output.
    pub fn psql(&self, sql: &str) -> String {
        let out = Command::new(self.bin.join("psql"))
            .args(["-X", "-q", "-At", "-v", "ON_ERROR_STOP=1"])
            .args(["-h", &path_str(&self.socket_dir())])
            .args([
                "-p",
                &self.port.to_string(),
                "-U",
                PG_USER,
                "-d",
                "postgres",
            ])
            .args(["-c", sql])
            .stdin(Stdio::null())
            .output()
            .expect("run psql");
        assert!(
            out.status.success(),
            "psql {sql:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// The server's log so far (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_file()).unwrap_or_default()
    }

    /// The postmaster's pid while it runs.
    pub fn pid(&self) -> Option<u32> {
        postmaster_pid(&self.data_dir())
    }

    fn ready(&self) -> bool {
        Command::new(self.bin.join("pg_isready"))
            .args(["-q", "-h", "127.0.0.1", "-p", &self.port.to_string()])
            .status()
            .is_ok_and(|s| s.success())
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log_file(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    /// Runs one of the server's programs as the `postgres` user; panics with its output on failure.
    fn as_postgres(&self, program: &str, args: &[&str]) {
        let out = Command::new("runuser")
            .args(["-u", PG_USER, "--"])
            .arg(self.bin.join(program))
            .args(args)
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {program} as {PG_USER}: {e}"));
        assert!(
            out.status.success(),
            "{program} {} failed: {}{}\nserver log: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim(),
            self.log()
        );
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if self.pid().is_some() {
            // `immediate`: nothing is worth waiting for once the test is over.
            let _ = Command::new("runuser")
                .args(["-u", PG_USER, "--"])
                .arg(self.bin.join("pg_ctl"))
                .args(["-D", &path_str(&self.data_dir()), "-w", "-m", "immediate"])
                .arg("stop")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        if let Some(pid) = self.pid() {
            kill_postmaster(pid, &self.data_dir());
        }
    }
}

/// The newest installed server's program directory (`/usr/lib/postgresql/<major>/bin`).
fn bin_dir() -> Result<PathBuf, String> {
    let root = Path::new("/usr/lib/postgresql");
    owner::list_dir(root)
        .into_iter()
        .filter_map(|p| {
            let major = p.file_name()?.to_str()?.parse::<u32>().ok()?;
            p.join("bin/initdb")
                .exists()
                .then_some((major, p.join("bin")))
        })
        .max_by_key(|(major, _)| *major)
        .map(|(_, bin)| bin)
        .ok_or_else(|| {
            format!(
                "no server under {} (`cargo xtask test` installs Debian's postgresql)",
                root.display()
            )
        })
}

/// The pid in `data/postmaster.pid`, if a postmaster of that directory still runs.
pub(crate) fn postmaster_pid(data: &Path) -> Option<u32> {
    let text = std::fs::read_to_string(data.join("postmaster.pid")).ok()?;
    let pid = text.lines().next()?.trim().parse::<u32>().ok()?;
    owner::pid_alive(pid).then_some(pid)
}

/// Kills postmaster `pid` (its backends exit with it) if it is a postgres process of `data`.
pub(crate) fn kill_postmaster(pid: u32, data: &Path) {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
    if !cmdline.contains("postgres") || !cmdline.contains(&path_str(data)) {
        return;
    }
    let Ok(raw) = i32::try_from(pid) else {
        return;
    };
    let pid = nix::unistd::Pid::from_raw(raw);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
    wait_until(TIMEOUT, || !owner::pid_alive(pid.as_raw().unsigned_abs()));
}

fn chown_to_postgres(path: &Path) {
    let user = nix::unistd::User::from_name(PG_USER)
        .ok()
        .flatten()
        .unwrap_or_else(|| panic!("no user {PG_USER} (Debian's postgresql package creates it)"));
    std::os::unix::fs::chown(path, Some(user.uid.as_raw()), Some(user.gid.as_raw()))
        .unwrap_or_else(|e| panic!("chown {} to {PG_USER}: {e}", path.display()));
}

fn path_str(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}
