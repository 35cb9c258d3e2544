//! `veil-control`: the daemon (`serve`), local administration (`apikey`, `rekey`) and REST
//! clients (`secret`, `run`).

use std::io::Read;
use std::net::SocketAddr;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, CommandFactory, Parser, Subcommand};
use serde_json::{Value, json};
use veil_client::Client;
use veil_client::veil_api::{CreateSecret, SecretValue, UpdateSecret};
use veil_control::admin::{self, Admin, Request};
use veil_control::auth::Permission;
use veil_control::config::Config;
use veil_control::crypto::Keyring;
use veil_control::daemon;
use veil_sys::LogFormat;
use zeroize::Zeroizing;

/// What the exit status means; shown under the root `--help` (`run --help` has its own).
const EXIT_STATUS: &str = "\
Exit status:
  0    done (serve: stopped by SIGTERM/SIGINT after a clean shutdown)
  1    the command failed: a bad config file, the daemon could not start, the store or the
       API refused, a secret did not decrypt (verify); one line on stderr names the problem
  2    bad command line (unknown subcommand or option, bad value); nothing was done
  run: the command's own status, 128+N when signal N killed it, 125 when veil-control run
       itself failed, 126 when the command could not be executed, 127 when it was not found";

#[derive(Parser, Debug)]
#[command(
    name = "veil-control",
    version,
    propagate_version = true,
    about = "veil's secret store and REST API",
    after_help = EXIT_STATUS
)]
struct Cli {
    /// Log format on stderr: `human` (text) or `json` (one object per line, for log shippers).
    #[arg(long, value_enum, default_value_t = LogFormat::Human, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the daemon.
    Serve {
        /// TOML config file (every key optional).
        #[arg(long)]
        config: Option<PathBuf>,
        /// REST listen address (overrides the file).
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Data directory (overrides the file).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Agent channel socket (overrides the file).
        #[arg(long)]
        agent_socket: Option<PathBuf>,
    },
    /// Manage API keys (local administration; works whether or not the daemon runs).
    Apikey {
        #[command(subcommand)]
        command: ApikeyCommand,
    },
    /// Move every secret to a new master key.
    Rekey {
        #[command(flatten)]
        local: LocalArgs,
    },
    /// Check that every secret decrypts and the store's indexes agree (prints no values).
    Verify {
        #[command(flatten)]
        local: LocalArgs,
    },
    /// Manage secrets through the REST API (VEIL_API_URL / VEIL_API_KEY).
    Secret {
        #[command(flatten)]
        api: ApiArgs,
        #[command(subcommand)]
        command: SecretCommand,
    },
    /// Enroll, list and revoke the sandbox hosts whose agents connect over mutual TLS
    /// (PostgreSQL store).
    Fleet {
        #[command(subcommand)]
        command: FleetCommand,
    },
    /// Run a command in a fresh sandbox with secrets as placeholders (VEIL_API_URL / VEIL_API_KEY).
    #[command(after_help = veil_run::EXIT_STATUS)]
    Run {
        #[command(flatten)]
        api: ApiArgs,
        #[command(flatten)]
        run: veil_run::RunArgs,
    },
}

#[derive(Subcommand, Debug)]
enum FleetCommand {
    /// Issue a host certificate (the previous one stops being accepted); writes DIR/host.pem,
    /// DIR/host.key (0600) and DIR/fleet-ca.pem; prints no key.
    Enroll {
        /// The host's name (a DNS name: a-z 0-9 - .).
        #[arg(long)]
        host: String,
        /// Output directory (created 0700 if missing).
        #[arg(long)]
        out: PathBuf,
        /// Certificate validity in seconds (default one year; tests use short ones).
        #[arg(long, hide = true)]
        validity_secs: Option<u64>,
        #[command(flatten)]
        local: LocalArgs,
    },
    /// List enrolled hosts: certificate, revocation, connected agents and replicas, last seen.
    Hosts {
        #[command(flatten)]
        local: LocalArgs,
    },
    /// Revoke a host: every replica drops its agents within 2 s and refuses it afterwards.
    Revoke {
        /// The host's name.
        #[arg(long)]
        host: String,
        #[command(flatten)]
        local: LocalArgs,
    },
}

#[derive(Args, Debug)]
struct LocalArgs {
    /// TOML config file (for data_dir).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Data directory of the daemon.
    #[arg(long)]
    data_dir: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
enum ApikeyCommand {
    /// Create a key; prints only the key.
    Create {
        /// Organization (created if new).
        #[arg(long)]
        org: String,
        /// Permission: manage:secrets, write:sandboxes, read:audit or admin (repeatable).
        #[arg(long = "permission", required = true)]
        permissions: Vec<Permission>,
        #[command(flatten)]
        local: LocalArgs,
    },
    /// List keys (id, org, permissions; never the key).
    List {
        #[command(flatten)]
        local: LocalArgs,
    },
    /// Revoke a key by id.
    Revoke {
        /// Key id (as shown by `apikey list`).
        id: String,
        #[command(flatten)]
        local: LocalArgs,
    },
}

#[derive(Args, Debug)]
struct ApiArgs {
    /// API URL including /api, like http://127.0.0.1:3900/api.
    #[arg(
        long,
        env = "VEIL_API_URL",
        default_value = "http://127.0.0.1:3900/api"
    )]
    api_url: String,
    /// API key (prefer the VEIL_API_KEY environment variable: argv is visible to all).
    #[arg(long, env = "VEIL_API_KEY", hide_env_values = true)]
    api_key: String,
}

#[derive(Subcommand, Debug)]
enum SecretCommand {
    /// Create a secret; the value is read from stdin or --value-file, never from argv.
    Create {
        /// Secret name.
        #[arg(long)]
        name: String,
        /// Description.
        #[arg(long)]
        description: Option<String>,
        /// Allowed host (repeatable); none = unrestricted.
        #[arg(long = "host")]
        hosts: Vec<String>,
        /// Read the value from this file instead of stdin.
        #[arg(long)]
        value_file: Option<PathBuf>,
    },
    /// List secrets.
    List {
        /// Partial name filter.
        #[arg(long)]
        name: Option<String>,
    },
    /// Show one secret (metadata only).
    Get {
        /// Secret id.
        id: String,
    },
    /// Update a secret; omitted options are unchanged.
    Update {
        /// Secret id.
        id: String,
        /// New description.
        #[arg(long)]
        description: Option<String>,
        /// Replace the allowed hosts (repeatable).
        #[arg(long = "host")]
        hosts: Vec<String>,
        /// Make the secret unrestricted (hosts = []).
        #[arg(long, conflicts_with = "hosts")]
        unrestricted: bool,
        /// Read a new value from this file.
        #[arg(long, conflicts_with = "value_stdin")]
        value_file: Option<PathBuf>,
        /// Read a new value from stdin.
        #[arg(long)]
        value_stdin: bool,
    },
    /// Delete a secret.
    Delete {
        /// Secret id.
        id: String,
    },
}

/// The configuration local administration uses: `--config` (its data dir and store), with
/// `--data-dir` overriding the data dir.
fn local_config(local: &LocalArgs) -> anyhow::Result<Config> {
    let mut config = Config::load(local.config.as_deref())?;
    if let Some(d) = &local.data_dir {
        config.data_dir = d.clone();
    }
    Ok(config)
}

/// Runs an admin request through the daemon's socket, or directly on the data dir when no
/// daemon runs. Retries briefly when the daemon is starting or stopping (store locked).
async fn local_admin(config: &Config, request: Request) -> anyhow::Result<Value> {
    let dir = &config.data_dir;
    let mut last_err = None;
    for _ in 0..50 {
        if let Some(v) = admin::request(dir, &request).await? {
            return Ok(v);
        }
        let (c, with_keys) = (
            config.clone(),
            matches!(request, Request::Rekey | Request::Verify),
        );
        match tokio::task::spawn_blocking(move || open_offline(&c, with_keys)).await? {
            Ok(admin) => {
                let request = serde_json::to_value(&request)?;
                let request: Request = serde_json::from_value(request)?;
                return Ok(tokio::task::spawn_blocking(move || admin.execute(request)).await??);
            }
            Err(e) => last_err = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(last_err.unwrap_or_else(|| anyhow::anyhow!("could not reach the data dir")))
}

fn open_offline(config: &Config, with_keys: bool) -> anyhow::Result<Admin> {
    let dir = &config.data_dir;
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("creating {}", dir.display()))?;
    }
    let keyring = with_keys
        .then(|| Keyring::open_or_create(dir))
        .transpose()?;
    let (store, _) = daemon::open_store(config, keyring.as_ref())?;
    Ok(Admin {
        store,
        keyring: keyring.map(|ring| Arc::new(RwLock::new(ring))),
    })
}
fn read_value(file: Option<&Path>) -> anyhow::Result<Zeroizing<String>> {
    let mut buf = Zeroizing::new(String::new());
    match file {
        Some(path) => {
            std::fs::File::open(path)
                .and_then(|mut f| f.read_to_string(&mut buf))
                .with_context(|| format!("reading {}", path.display()))?;
        }
        None => {
            std::io::stdin()
                .read_to_string(&mut buf)
                .context("reading the value from stdin")?;
        }
    }
    // A trailing newline from `echo` or an editor is not part of the value.
    if buf.ends_with('\n') {
        buf.pop();
        if buf.ends_with('\r') {
            buf.pop();
        }
    }
    if buf.is_empty() {
        bail!("the value is empty");
    }
    Ok(buf)
}

fn print(v: &Value) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// Prints an answer as the server sent it (keys sorted, as a JSON tree prints them).
fn print_answer(v: &impl serde::Serialize) -> anyhow::Result<()> {
    print(&serde_json::to_value(v)?)
}

async fn secret_command(api: ApiArgs, command: SecretCommand) -> anyhow::Result<()> {
    let client = Client::new(&api.api_url, Zeroizing::new(api.api_key))?;
    match command {
        SecretCommand::Create {
            name,
            description,
            hosts,
            value_file,
        } => {
            let req = CreateSecret {
                name,
                value: SecretValue::from(read_value(value_file.as_deref())?),
                description,
                hosts: (!hosts.is_empty()).then_some(hosts),
                body_substitution: None,
                wrong_host: None,
            };
            print_answer(&client.create_secret(&req).await?)
        }
        SecretCommand::List { name } => print_answer(&client.all_secrets(name.as_deref()).await?),
        SecretCommand::Get { id } => print_answer(&client.secret(&id).await?),
        SecretCommand::Update {
            id,
            description,
            hosts,
            unrestricted,
            value_file,
            value_stdin,
        } => {
            let value = if value_stdin || value_file.is_some() {
                Some(SecretValue::from(read_value(value_file.as_deref())?))
            } else {
                None
            };
            let hosts = if unrestricted {
                Some(Vec::new())
            } else {
                (!hosts.is_empty()).then_some(hosts)
            };
            let req = UpdateSecret {
                value,
                description,
                hosts,
                ..UpdateSecret::default()
            };
            print_answer(&client.update_secret(&id, &req, None).await?)
        }
        SecretCommand::Delete { id } => Ok(client.delete_secret(&id).await?),
    }
}

async fn fleet_command(command: FleetCommand) -> anyhow::Result<()> {
    use veil_control::fleet::enroll;
    match command {
        FleetCommand::Enroll {
            host,
            out,
            validity_secs,
            local,
        } => {
            let config = local_config(&local)?;
            let validity = validity_secs.map(Duration::from_secs);
            let done =
                tokio::task::spawn_blocking(move || enroll::enroll(&config, &host, &out, validity))
                    .await??;
            print_answer(&done)
        }
        FleetCommand::Hosts { local } => {
            let config = local_config(&local)?;
            print_answer(&tokio::task::spawn_blocking(move || enroll::hosts(&config)).await??)
        }
        FleetCommand::Revoke { host, local } => {
            let config = local_config(&local)?;
            tokio::task::spawn_blocking(move || enroll::revoke(&config, &host)).await??;
            Ok(())
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve {
            config,
            listen,
            data_dir,
            agent_socket,
        } => {
            let mut cfg = Config::load(config.as_deref())?;
            if let Some(l) = listen {
                cfg.listen = l;
            }
            if let Some(d) = data_dir {
                cfg.data_dir = d;
            }
            if let Some(a) = agent_socket {
                cfg.agent_socket = a;
            }
            daemon::serve(cfg).await
        }
        Command::Apikey { command } => match command {
            ApikeyCommand::Create {
                org,
                permissions,
                local,
            } => {
                let v = local_admin(
                    &local_config(&local)?,
                    Request::CreateKey { org, permissions },
                )
                .await?;
                let key = Zeroizing::new(
                    v["key"]
                        .as_str()
                        .context("daemon answered without a key")?
                        .to_owned(),
                );
                println!("{}", key.as_str());
                Ok(())
            }
            ApikeyCommand::List { local } => {
                print(&local_admin(&local_config(&local)?, Request::ListKeys).await?)
            }
            ApikeyCommand::Revoke { id, local } => {
                local_admin(&local_config(&local)?, Request::RevokeKey { id }).await?;
                Ok(())
            }
        },
        Command::Rekey { local } => {
            print(&local_admin(&local_config(&local)?, Request::Rekey).await?)
        }
        Command::Verify { local } => {
            let v = local_admin(&local_config(&local)?, Request::Verify).await?;
            print(&v)?;
            if v["ok"] != json!(true) {
                bail!("verification failed");
            }
            Ok(())
        }
        Command::Secret { api, command } => secret_command(api, command).await,
        Command::Fleet { command } => fleet_command(command).await,
        Command::Run { .. } => bail!("run is dispatched in main"),
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    veil_sys::logging::init(
        if matches!(cli.command, Command::Serve { .. }) {
            "info"
        } else {
            "warn"
        },
        cli.log_format,
    );
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("veil-control: starting the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    if let Command::Run { api, run } = cli.command {
        if let Err(msg) = run.check() {
            let mut cli = Cli::command();
            cli.build();
            let kind = clap::error::ErrorKind::ArgumentConflict;
            match cli.find_subcommand_mut("run") {
                Some(sub) => sub.error(kind, msg).exit(),
                None => cli.error(kind, msg).exit(),
            }
        }
        // A bad config is a bad argument (exit 2), as with clap's own errors.
        let settings = match Config::load(run.config_file()) {
            Ok(c) => veil_run::Settings {
                uids: c.run.uid_range(),
                cgroup2_mount: || Ok(veil_control::hostcheck::cgroup2_mount()?),
            },
            Err(e) => {
                eprintln!("veil-control run: {e}");
                return std::process::ExitCode::from(2);
            }
        };
        let code = runtime.block_on(veil_run::run(
            &api.api_url,
            Zeroizing::new(api.api_key),
            run,
            settings,
        ));
        return std::process::ExitCode::from(code);
    }
    match runtime.block_on(run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("veil-control: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
