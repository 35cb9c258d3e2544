//! The unmodified Daytona Python SDK (PyPI `daytona` 0.226.1) against veil-control: create,
//! paginated list, get, update, delete, and its documented exceptions for 409 and 404.

#![allow(clippy::unwrap_used)] // tests may unwrap (house rule)

use std::path::Path;
use std::process::Command;

use veil_tests::control::{Control, daytona_venv, random_token};

#[test]
fn daytona_python_sdk_runs_unchanged() {
    let python = daytona_venv();
    let control = Control::start();
    let key = control.apikey("sdk-org", &["manage:secrets"]);
    let value = format!("sdkvalue-{}", random_token(24));
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("py/daytona_sdk_secrets.py");
    let out = Command::new(&python)
        .arg(&script)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("DAYTONA_API_URL", control.url())
        .env("DAYTONA_API_KEY", &key)
        .env("VEIL_TEST_VALUE", &value)
        .output()
        .expect("run python");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("SDK-OK"),
        "SDK script failed\nstdout:\n{stdout}\nstderr:\n{stderr}\ndaemon log:\n{}",
        control.log()
    );
    assert!(stdout.contains("ConflictException") || stdout.contains("DaytonaConflictError"));
    assert!(!stdout.contains(&value) && !stderr.contains(&value));
    assert!(!control.log().contains(&value), "value in the daemon log");
}
