//! Agent benchmark (run by hand, not in CI): one agent polling N simulated devices at 1 Hz
//! through real Modbus TCP and publishing to a real mosquitto.
//!
//!     tests/run --with-services cargo run --release -p calwatch-tests --bin bench_agent -- [DEVICES] [SECONDS] [OUTAGE_S]
//!
//! With OUTAGE_S, the broker is blackholed (a proxy drops its traffic) for that long after
//! the warm-up, then restored; the run reports how fast the spooled backlog drains while
//! live data keeps being polled behind it.
//!
//! Reports the agent's CPU per poll and per register value, polls/s sustained and peak RSS
//! (from /proc), next to the simulator's CPU for scale. Devices are FT-112 indicators:
//! one read of 16 holding registers, 7 values, per poll.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use calwatch_tests::{bin, proc_cpu_s, proc_kb, workspace, Proc};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let devices: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(10_000);
    let seconds: u64 = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(60);
    let outage: u64 = args.get(3).and_then(|a| a.parse().ok()).unwrap_or(0);
    let mqtt = std::env::var("CALWATCH_MQTT_ADDR").expect("run under tests/run --with-services");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let broker_port: u16 = mqtt
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("port");
    let proxy = rt.block_on(calwatch_tests::broker::Proxy::start(broker_port));
    let counter = rt.block_on(calwatch_tests::broker::Counter::subscribe(
        broker_port,
        "calwatch/v1/agents/bench-agent/readings",
        "bench-counter",
    ));
    let mqtt = format!("127.0.0.1:{}", proxy.port);
    let dir: PathBuf =
        std::env::temp_dir().join(format!("calwatch-bench-agent-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let profile = workspace().join("config/profiles/ft112.toml");
    let (fleet_file, tables) = calwatch_tests::bench_fleet(&dir, &profile, devices, "B-");
    let mut sim = Proc::start(
        &dir,
        "sim",
        &bin("calwatch-agent"),
        &["simulate", "--fleet", fleet_file.to_str().unwrap_or("")],
    );
    sim.wait_stdout_line("simulating", Duration::from_secs(30));
    std::thread::sleep(Duration::from_secs(1));
    let cfg = format!(
        "agent = \"bench-agent\"\n[mqtt]\nurl = \"mqtt://{mqtt}\"\n[spool]\ndir = \"spool\"\nfsync = \"interval\"\n[batch]\nlinger_ms = 1000\nmax_readings = 1000\n{tables}"
    );
    std::fs::write(dir.join("agent.toml"), cfg).expect("agent.toml");
    let mut agent = Proc::start(
        &dir,
        "agent",
        &bin("calwatch-agent"),
        &[
            "run",
            "--config",
            dir.join("agent.toml").to_str().unwrap_or(""),
        ],
    );
    let agent_pid = agent.pid();
    let sim_pid = sim.pid();
    // Warm up (connections, first polls spread over the first interval).
    std::thread::sleep(Duration::from_secs(12));
    let (c0, s0, p0, t0) = (
        proc_cpu_s(agent_pid),
        proc_cpu_s(sim_pid),
        agent.last_stat("readings_polled"),
        Instant::now(),
    );
    std::thread::sleep(Duration::from_secs(seconds));
    let (c1, s1, p1, t1) = (
        proc_cpu_s(agent_pid),
        proc_cpu_s(sim_pid),
        agent.last_stat("readings_polled"),
        Instant::now(),
    );
    let wall = (t1 - t0).as_secs_f64();
    let polls = p1.saturating_sub(p0) as f64;
    let mut catchup = String::new();
    if outage > 0 {
        let received = || {
            counter
                .seqs
                .lock()
                .map(|s| s.values().map(Vec::len).sum::<usize>())
                .unwrap_or(0)
        };
        let newest = || *counter.newest_ts.lock().expect("lock");
        let now_ms = || {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as i64)
                .unwrap_or(0)
        };
        proxy
            .blackhole
            .store(true, std::sync::atomic::Ordering::Relaxed);
        std::thread::sleep(Duration::from_secs(outage));
        let before = received();
        proxy
            .blackhole
            .store(false, std::sync::atomic::Ordering::Relaxed);
        let restored = Instant::now();
        // Drained when the newest reading received is live again (under 3 s old).
        while now_ms() - newest() > 3_000 && restored.elapsed() < Duration::from_secs(outage * 10) {
            std::thread::sleep(Duration::from_millis(100));
        }
        let drain = restored.elapsed().as_secs_f64();
        let backlog = (received() - before) as f64;
        let _ = writeln!(
            catchup,
            "  outage                     {outage:>10} s blackholed\n  drained                    {backlog:>10.0} readings in {drain:.1} s = {:.0} readings/s = {:.1} x the live rate",
            backlog / drain,
            backlog / drain / devices as f64
        );
    }
    let hwm = proc_kb(agent_pid, "VmHWM:");
    let rss = proc_kb(agent_pid, "VmRSS:");
    let _ = agent.terminate(Duration::from_secs(20));
    println!("agent benchmark: {devices} devices (FT-112 profile: 1 read of 16 registers, 7 values per poll), 1 s interval, {seconds} s measured");
    println!(
        "  polls/s sustained          {:>10.0}  (target {devices})",
        polls / wall
    );
    println!(
        "  agent CPU                  {:>10.1} % of one core",
        100.0 * (c1 - c0) / wall
    );
    println!(
        "  agent CPU per poll         {:>10.1} µs",
        1e6 * (c1 - c0) / polls.max(1.0)
    );
    println!(
        "  agent CPU per value        {:>10.2} µs (7 values per poll)",
        1e6 * (c1 - c0) / (polls * 7.0).max(1.0)
    );
    println!("  agent RSS now / peak       {:>7} KB / {} KB", rss, hwm);
    println!(
        "  simulator CPU              {:>10.1} % of one core",
        100.0 * (s1 - s0) / wall
    );
    print!("{catchup}");
    println!("  (stats sample granularity: the agent logs readings_polled every 10 s)");
}
