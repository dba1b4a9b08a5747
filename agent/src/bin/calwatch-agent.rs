//! `calwatch-agent`: run the agent, or simulate instruments.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use calwatch_agent::config::AgentConfig;
use calwatch_agent::profile::Profile;
use calwatch_agent::simulate::{self, Fleet};
use calwatch_protocol::node::process::{init_tracing, shutdown_signal};
use clap::{Parser, Subcommand};
use tokio::sync::watch;

#[derive(Parser)]
#[command(
    name = "calwatch-agent",
    version,
    about = "calwatch edge agent: polls Modbus instruments, publishes readings over MQTT"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Poll the configured devices and publish their readings.
    Run {
        #[arg(long)]
        config: PathBuf,
    },
    /// Check a configuration file (and the profiles it names), or profile files on
    /// their own, and exit: 0 when all load, 2 with `file:line: reason` otherwise.
    Check {
        #[arg(long, required_unless_present = "profile")]
        config: Option<PathBuf>,
        /// A profile file to check (repeatable).
        #[arg(long)]
        profile: Vec<PathBuf>,
    },
    /// Serve simulated instruments over Modbus: `count` of one profile (unit ids
    /// 1..=count), or a fleet file (groups, addresses, model options, faults).
    Simulate {
        /// Profile of the instruments.
        #[arg(long, required_unless_present = "fleet", conflicts_with = "fleet")]
        profile: Option<PathBuf>,
        /// Fleet file (see config/fleet/demo.toml).
        #[arg(long)]
        fleet: Option<PathBuf>,
        /// Address to serve on [default: 127.0.0.1:5020]; with --fleet, every group is
        /// served on this one address instead of its own.
        #[arg(long)]
        listen: Option<SocketAddr>,
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=247))]
        count: u8,
    },
}

/// Exit code for configuration errors (sysexits would say 78; CONTRACT asks for 2).
const CONFIG_ERROR: u8 = 2;

fn main() -> ExitCode {
    init_tracing("info");
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("calwatch-agent: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match cli.command {
        Command::Check { config, profile } => {
            let mut failed = false;
            if let Some(config) = config {
                match AgentConfig::load(&config) {
                    Ok(c) => println!("{}: ok ({} devices)", config.display(), c.devices.len()),
                    Err(e) => {
                        eprintln!("{e}");
                        failed = true;
                    }
                }
            }
            for path in profile {
                match Profile::load(&path) {
                    Ok(p) => println!("{}: ok ({} values)", path.display(), p.values.len()),
                    Err(e) => {
                        eprintln!("{e}");
                        failed = true;
                    }
                }
            }
            if failed {
                ExitCode::from(CONFIG_ERROR)
            } else {
                ExitCode::SUCCESS
            }
        }
        Command::Run { config } => {
            let cfg = match AgentConfig::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::from(CONFIG_ERROR);
                }
            };
            runtime.block_on(async {
                let (stop_tx, stop_rx) = watch::channel(false);
                tokio::spawn(async move {
                    shutdown_signal().await;
                    tracing::info!("shutting down");
                    let _ = stop_tx.send(true);
                });
                let (reload_tx, reload_rx) = tokio::sync::mpsc::channel(1);
                tokio::spawn(watch_config(config.clone(), reload_tx));
                match calwatch_agent::run(cfg, stop_rx, reload_rx, Arc::default()).await {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => {
                        eprintln!("calwatch-agent: {e}");
                        ExitCode::FAILURE
                    }
                }
            })
        }
        Command::Simulate {
            profile,
            fleet,
            listen,
            count,
        } => {
            let fleet = match (fleet, profile) {
                (Some(path), _) => Fleet::load(&path).and_then(|mut f| {
                    if let Some(addr) = listen {
                        f.listen_all_on(addr)?;
                    }
                    Ok(f)
                }),
                (None, Some(path)) => Profile::load(&path).map(|p| {
                    let addr = listen.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 5020)));
                    Fleet::single(p, addr, count)
                }),
                (None, None) => {
                    eprintln!("calwatch-agent simulate: give --profile FILE or --fleet FILE");
                    return ExitCode::from(CONFIG_ERROR);
                }
            };
            let fleet = match fleet {
                Ok(f) => f,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::from(CONFIG_ERROR);
                }
            };
            runtime.block_on(async move {
                let ports = match simulate::bind(&fleet).await {
                    Ok(p) => p,
                    Err(e) => {
                        eprintln!("calwatch-agent: {e}");
                        return ExitCode::FAILURE;
                    }
                };
                for p in &ports {
                    {
                        use std::io::Write;
                        // Whoever started us may have stopped reading stdout; that is no reason to die.
                        let mut out = std::io::stdout().lock();
                        let _ = writeln!(out, "{}", p.banner());
                        let _ = out.flush();
                    }
                }
                tokio::select! {
                    r = simulate::serve_all(ports) => match r {
                        Ok(()) => ExitCode::SUCCESS,
                        Err(e) => { eprintln!("calwatch-agent: simulator: {e}"); ExitCode::FAILURE }
                    },
                    _ = shutdown_signal() => ExitCode::SUCCESS,
                }
            })
        }
    }
}

/// Reloads the config on SIGHUP and when the file changes (checked every 2 s). A config
/// that does not load is logged and ignored: the agent keeps polling what it had.
async fn watch_config(path: PathBuf, reload: tokio::sync::mpsc::Sender<AgentConfig>) {
    let modified = |p: &PathBuf| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let mut last = modified(&path);
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(2));
    loop {
        let by_signal = tokio::select! {
            _ = async { match hup.as_mut() { Some(h) => { h.recv().await; } None => std::future::pending().await } } => true,
            _ = tick.tick() => false,
        };
        let now = modified(&path);
        if !by_signal && now == last {
            continue;
        }
        last = now;
        match AgentConfig::load(&path) {
            Ok(cfg) => {
                tracing::info!(config = %path.display(), by_signal, "reloading configuration");
                if reload.send(cfg).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "configuration not reloaded; keeping the running one")
            }
        }
    }
}
