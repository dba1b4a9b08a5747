//! `calwatch-gateway`: run the gateway, import the registry, or run the demo.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use calwatch_gateway::admin::{self, Registry, Role};
use calwatch_gateway::config::GatewayConfig;
use calwatch_protocol::node::process::{init_tracing, shutdown_signal};
use clap::{Parser, Subcommand};
use tokio::sync::watch;

#[derive(Parser)]
#[command(
    name = "calwatch-gateway",
    version,
    about = "calwatch gateway: checks instrument readings against their verification certificates"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Ingest readings and write them to the configured sinks.
    Run {
        #[arg(long)]
        config: PathBuf,
    },
    /// Check a configuration file and exit.
    Check {
        #[arg(long)]
        config: PathBuf,
    },
    /// Import devices.csv (and optionally verifications.csv) into the registry.
    Import {
        #[arg(long)]
        config: PathBuf,
        devices: PathBuf,
        verifications: Option<PathBuf>,
    },
    /// Print the saved per-device state and the alerts, one JSON object a line.
    State {
        #[arg(long)]
        config: PathBuf,
    },
    /// Make an API token (printed once; only its hash is stored), or revoke one.
    Token {
        #[arg(long)]
        config: PathBuf,
        /// owner, verifier, supervisor or admin.
        #[arg(long, required_unless_present = "revoke")]
        role: Option<String>,
        /// The owner id an owner token is confined to.
        #[arg(long)]
        owner: Option<String>,
        /// A name for the token (the actor in the audit log; a verifier's name on its
        /// certificates).
        #[arg(long, required_unless_present = "revoke")]
        name: Option<String>,
        /// Revoke the token with this name instead.
        #[arg(long, conflicts_with_all = ["role", "owner", "name"])]
        revoke: Option<String>,
    },
    /// Print the newest audit-log entries, one JSON object a line, newest first.
    Audit {
        #[arg(long)]
        config: PathBuf,
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// Check the audit log's hash chain.
    Verify {
        #[arg(long)]
        config: PathBuf,
    },
    /// A small city on embedded defaults: broker, 101 simulated instruments with faults,
    /// agents, the gateway, the console. Prints the console URL and a token, then alerts.
    #[cfg(feature = "demo")]
    Demo {
        /// Working directory (default: a new temp dir).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Stop after this many seconds (default: until Ctrl-C).
        #[arg(long = "for")]
        for_s: Option<u64>,
        /// Simulated seconds per second: faults develop this much faster.
        #[arg(long, default_value_t = 10.0)]
        speed: f64,
        /// Console and API address (a free port when taken).
        #[arg(long, default_value = "127.0.0.1:8080")]
        http: String,
        /// Use this broker instead of the embedded one.
        #[arg(long)]
        mqtt_url: Option<String>,
        /// Also write to this InfluxDB / VictoriaMetrics (with --influx-db: the v1 /write
        /// API of InfluxDB 1.x; with --influx-bucket: the v2 API).
        #[arg(long)]
        influx_url: Option<String>,
        /// v1: database.
        #[arg(long, requires = "influx_url", conflicts_with = "influx_bucket")]
        influx_db: Option<String>,
        /// v2: organisation.
        #[arg(long, requires = "influx_bucket")]
        influx_org: Option<String>,
        /// v2: bucket.
        #[arg(long, requires = "influx_url")]
        influx_bucket: Option<String>,
        /// v2: file holding the API token.
        #[arg(long, requires = "influx_bucket")]
        influx_token_file: Option<PathBuf>,
    },
}

/// Exit code for configuration and input errors.
const CONFIG_ERROR: u8 = 2;
/// `run` did not stop within `[ingest] shutdown_timeout_s` of SIGTERM and exited anyway.
const SHUTDOWN_TIMEOUT: u8 = 3;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The demo's terminal is for its banner and alert lines: only warnings besides.
    init_tracing(match cli.command {
        #[cfg(feature = "demo")]
        Command::Demo { .. } => "warn,rumqttd=off",
        _ => "info,rumqttd=off",
    });
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("calwatch-gateway: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let load = |config: &PathBuf| GatewayConfig::load(config).map_err(|e| eprintln!("{e}"));
    let open_registry = |config: &PathBuf| -> Result<(GatewayConfig, Registry), ExitCode> {
        let cfg = load(config).map_err(|()| ExitCode::from(CONFIG_ERROR))?;
        let reg = Registry::open(&cfg.registry.path).map_err(|e| {
            eprintln!("calwatch-gateway: {e}");
            ExitCode::FAILURE
        })?;
        Ok((cfg, reg))
    };
    match cli.command {
        Command::Check { config } => match load(&config) {
            Ok(_) => {
                println!("{}: ok", config.display());
                ExitCode::SUCCESS
            }
            Err(()) => ExitCode::from(CONFIG_ERROR),
        },
        Command::Import {
            config,
            devices,
            verifications,
        } => {
            let (cfg, mut reg) = match open_registry(&config) {
                Ok(r) => r,
                Err(code) => return code,
            };
            for (file, is_devices) in
                std::iter::once((devices, true)).chain(verifications.map(|v| (v, false)))
            {
                let text = match std::fs::read_to_string(&file) {
                    Ok(t) => t,
                    Err(e) => {
                        eprintln!("{}: cannot read: {e}", file.display());
                        return ExitCode::from(CONFIG_ERROR);
                    }
                };
                let actor = format!(
                    "import:{}",
                    std::env::var("USER").unwrap_or_else(|_| "cli".into())
                );
                let result = if is_devices {
                    reg.import_devices(&file, &text, &actor)
                } else {
                    // date-only dates are days in `[checks] timezone` (DESIGN decision 18)
                    reg.import_verifications(&file, &text, &actor, &cfg.checks.timezone)
                };
                match result {
                    Ok(n) => println!("{}: imported {n} rows", file.display()),
                    Err(e) => {
                        eprintln!("{e}");
                        return ExitCode::from(CONFIG_ERROR);
                    }
                }
            }
            ExitCode::SUCCESS
        }
        Command::State { config } => {
            let Ok(cfg) = load(&config) else {
                return ExitCode::from(CONFIG_ERROR);
            };
            match admin::dump_state(&cfg, &mut std::io::stdout().lock()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("calwatch-gateway state: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Token {
            config,
            role,
            owner,
            name,
            revoke,
        } => {
            let mut reg = match open_registry(&config) {
                Ok((_, r)) => r,
                Err(code) => return code,
            };
            let actor = format!(
                "cli:{}",
                std::env::var("USER").unwrap_or_else(|_| "unknown".into())
            );
            if let Some(name) = revoke {
                return match admin::revoke_token(&mut reg, &name, &actor) {
                    Ok(true) => {
                        println!("token {name:?} revoked");
                        ExitCode::SUCCESS
                    }
                    Ok(false) => {
                        eprintln!("calwatch-gateway token: no active token named {name:?}");
                        ExitCode::from(CONFIG_ERROR)
                    }
                    Err(e) => {
                        eprintln!("calwatch-gateway token: {e}");
                        ExitCode::FAILURE
                    }
                };
            }
            let role_s = role.unwrap_or_default();
            let Some(role) = Role::parse(&role_s) else {
                eprintln!("calwatch-gateway token: --role {role_s:?}: owner, verifier, supervisor or admin");
                return ExitCode::from(CONFIG_ERROR);
            };
            match admin::create_token(
                &mut reg,
                &name.unwrap_or_default(),
                role,
                owner.as_deref(),
                &actor,
            ) {
                Ok(token) => {
                    println!("{token}");
                    ExitCode::SUCCESS
                }
                Err(admin::TokenError::Invalid(why)) => {
                    eprintln!("calwatch-gateway token: {why}");
                    ExitCode::from(CONFIG_ERROR)
                }
                Err(e) => {
                    eprintln!("calwatch-gateway token: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Audit { config, limit } => {
            let Ok(cfg) = load(&config) else {
                return ExitCode::from(CONFIG_ERROR);
            };
            let entries = Registry::open(&cfg.registry.path)
                .map_err(|e| e.to_string())
                .and_then(|r| r.audit_tail(limit).map_err(|e| e.to_string()));
            match entries {
                Ok(entries) => {
                    for e in entries {
                        println!(
                            "{}",
                            serde_json::json!({"ts": e.ts, "actor": e.actor, "action": e.action,
                                "subject": e.subject, "old": e.old, "new": e.new, "why": e.why})
                        );
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("calwatch-gateway audit: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Verify { config } => {
            let Ok(cfg) = load(&config) else {
                return ExitCode::from(CONFIG_ERROR);
            };
            let result = Registry::open(&cfg.registry.path)
                .map_err(|e| e.to_string())
                .and_then(|r| r.verify_audit().map_err(|e| e.to_string()));
            match result {
                Ok(n) => {
                    println!("audit log: {n} entries, chain intact");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("calwatch-gateway verify: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Run { config } => {
            let Ok(cfg) = load(&config) else {
                return ExitCode::from(CONFIG_ERROR);
            };
            let bound = cfg.ingest.shutdown_timeout;
            let code = runtime.block_on(async {
                let (stop_tx, stop_rx) = watch::channel(false);
                let mut stopping = stop_rx.clone();
                tokio::spawn(async move {
                    shutdown_signal().await;
                    tracing::info!("shutting down");
                    let _ = stop_tx.send(true);
                });
                let run = calwatch_gateway::run(cfg, stop_rx);
                // Bounded: whatever ingest is doing, the process ends `shutdown_timeout_s`
                // after the signal. Nothing acknowledged is lost by that: a message is acked
                // only after it is durable.
                let deadline = async {
                    let _ = stopping.wait_for(|s| *s).await;
                    tokio::time::sleep(bound).await;
                };
                tokio::select! {
                    r = run => match r {
                        Ok(()) => ExitCode::SUCCESS,
                        Err(e) => {
                            eprintln!("calwatch-gateway: {e}");
                            ExitCode::FAILURE
                        }
                    },
                    () = deadline => {
                        tracing::error!(
                            bound_s = bound.as_secs(),
                            "not stopped within ingest.shutdown_timeout_s; exiting (what was acknowledged is durable)"
                        );
                        ExitCode::from(SHUTDOWN_TIMEOUT)
                    }
                }
            });
            // Blocking work still running (a write to a disk that does not answer) must not
            // hold the process either.
            runtime.shutdown_timeout(Duration::from_millis(500));
            code
        }
        #[cfg(feature = "demo")]
        Command::Demo {
            dir,
            for_s,
            speed,
            http,
            mqtt_url,
            influx_url,
            influx_db,
            influx_org,
            influx_bucket,
            influx_token_file,
        } => {
            let dir = dir.unwrap_or_else(|| {
                std::env::temp_dir().join(format!("calwatch-demo-{}", std::process::id()))
            });
            if !(speed > 0.0 && speed.is_finite()) {
                eprintln!("calwatch-gateway demo: --speed must be a positive number");
                return ExitCode::from(CONFIG_ERROR);
            }
            let q = |s: &str| format!("{s:?}");
            let sinks = match (influx_url, influx_db, influx_bucket) {
                (Some(url), Some(db), _) => {
                    format!(
                        "[[sink]]\nkind = \"influx_v1\"\nurl = {}\ndb = {}\n",
                        q(&url),
                        q(&db)
                    )
                }
                (Some(url), None, Some(bucket)) => {
                    let mut t = format!(
                        "[[sink]]\nkind = \"influx_v2\"\nurl = {}\norg = {}\nbucket = {}\n",
                        q(&url),
                        q(&influx_org.unwrap_or_else(|| "calwatch".into())),
                        q(&bucket)
                    );
                    if let Some(f) = influx_token_file {
                        let abs = std::fs::canonicalize(&f).unwrap_or(f);
                        t.push_str(&format!("token_file = {}\n", q(&abs.display().to_string())));
                    }
                    t
                }
                (Some(_), None, None) => {
                    eprintln!("calwatch-gateway demo: --influx-url needs --influx-db (v1) or --influx-bucket (v2)");
                    return ExitCode::from(CONFIG_ERROR);
                }
                _ => String::new(),
            };
            eprintln!("demo: working directory {}", dir.display());
            let opts = calwatch_gateway::demo::DemoOptions {
                dir,
                speed,
                http,
                mqtt_url,
                sinks,
            };
            runtime.block_on(async {
                let (stop_tx, stop_rx) = watch::channel(false);
                tokio::spawn(async move {
                    match for_s {
                        Some(s) => tokio::select! {
                            _ = tokio::time::sleep(Duration::from_secs(s)) => {}
                            _ = shutdown_signal() => {}
                        },
                        None => shutdown_signal().await,
                    }
                    let _ = stop_tx.send(true);
                });
                match calwatch_gateway::demo::run(opts, stop_rx).await {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => {
                        eprintln!("calwatch-gateway demo: {e}");
                        ExitCode::FAILURE
                    }
                }
            })
        }
    }
}
