//! Helpers for calwatch's end-to-end tests: the services `tests/run` started, the real
//! binaries, child processes that are killed when a test ends, and InfluxQL queries.
#![forbid(unsafe_code)]

pub mod broker;
pub mod webdriver;

use std::io::{BufRead, BufReader, Read as _};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Addresses of the services `tests/run` started.
#[derive(Clone, Debug)]
pub struct Services {
    pub mqtt_addr: String,
    pub influx_v1_url: String,
    pub influx_v1_db: String,
    pub vm_url: String,
    pub tmp: PathBuf,
}

impl Services {
    /// The services, or `None` (with a notice) when the test runs outside `tests/run`.
    /// Under `tests/run` (CALWATCH_SERVICES=1) a missing variable is a hard failure.
    pub fn get() -> Option<Services> {
        if std::env::var("CALWATCH_SERVICES").ok().as_deref() != Some("1") {
            eprintln!("SKIPPED: needs the services of tests/run (CALWATCH_SERVICES=1)");
            return None;
        }
        let var =
            |k: &str| std::env::var(k).unwrap_or_else(|_| panic!("tests/run did not export {k}"));
        Some(Services {
            mqtt_addr: var("CALWATCH_MQTT_ADDR"),
            influx_v1_url: var("CALWATCH_INFLUX_V1_URL"),
            influx_v1_db: var("CALWATCH_INFLUX_V1_DB"),
            vm_url: var("CALWATCH_VM_URL"),
            tmp: PathBuf::from(var("CALWATCH_TEST_TMP")),
        })
    }

    /// A fresh directory for one test.
    pub fn test_dir(&self, name: &str) -> PathBuf {
        let d = self.tmp.join(format!("{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("create test dir");
        d
    }
}

/// Whether `cmd probe...` runs and exits 0. Under `tests/run`, which installs `package`
/// (tests/tools.sh) and probes it before any test, a missing or broken tool fails the test,
/// naming the package; outside it the test is skipped with a notice.
pub fn tool(cmd: &str, probe: &[&str], package: &str) -> bool {
    let ok = Command::new(cmd)
        .args(probe)
        .stdin(Stdio::null())
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !ok {
        assert!(
            std::env::var("CALWATCH_SERVICES").is_err(),
            "{cmd} is missing or broken: install the Debian package {package} \
             (tests/run installs it; see tests/tools.sh)"
        );
        eprintln!("SKIPPED: {cmd} not installed (Debian package {package}; tests/run installs it)");
    }
    ok
}

/// The workspace root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// A binary of the workspace, built by `cargo build --workspace --bins` (tests/run does).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // A test runs from target/<profile>/deps/, a helper binary from target/<profile>/.
    let here = exe.parent().expect("exe dir");
    let p = [
        here.join(name),
        here.parent().map(|d| d.join(name)).unwrap_or_default(),
    ]
    .into_iter()
    .find(|p| p.exists())
    .unwrap_or_else(|| {
        panic!(
            "{name} not built next to {}: run cargo build --workspace --bins (tests/run does)",
            exe.display()
        )
    });
    p
}

/// A free loopback port (bound and released; good enough on a private test machine).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// `devices` simulated instruments of `profile` for the benchmarks: a fleet file in `dir`
/// (247 unit ids per port, on ports free now) and the `[[device]]` tables of an agent that
/// polls them at 1 Hz as `{prefix}{i}`.
pub fn bench_fleet(dir: &Path, profile: &Path, devices: usize, prefix: &str) -> (PathBuf, String) {
    use std::fmt::Write as _;
    const PER_PORT: usize = 247;
    // Hold every listener until all ports are chosen, so no port is handed out twice.
    let held: Vec<TcpListener> = (0..devices.div_ceil(PER_PORT))
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("port"))
        .collect();
    let ports: Vec<u16> = held
        .iter()
        .map(|l| l.local_addr().expect("addr").port())
        .collect();
    drop(held);
    let mut fleet = String::new();
    for (i, port) in ports.iter().enumerate() {
        let count = (devices - i * PER_PORT).min(PER_PORT);
        let _ = write!(
            fleet,
            "[[group]]\nprofile = \"{}\"\nlisten = \"127.0.0.1:{port}\"\ncount = {count}\n\n",
            profile.display()
        );
    }
    let file = dir.join(format!("fleet-{prefix}{devices}.toml"));
    std::fs::write(&file, fleet).expect("fleet file");
    let mut tables = String::new();
    for d in 0..devices {
        let (port, unit) = (ports[d / PER_PORT], d % PER_PORT + 1);
        let _ = write!(
            tables,
            "[[device]]\nid = \"{prefix}{d}\"\nprofile = \"{}\"\naddress = \"127.0.0.1:{port}\"\nunit = {unit}\ninterval_ms = 1000\ntimeout_ms = 2000\n",
            profile.display()
        );
    }
    (file, tables)
}

fn sh(dir: &Path, args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .current_dir(dir)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Test certificates made with openssl in `dir`: a CA (`ca.pem`, `ca.key`), a server
/// certificate for 127.0.0.1 signed by it (`server.pem`, `server.key`), an unrelated second CA
/// (`other-ca.pem`) and a client certificate for mutual TLS (`client.pem`, `client.key`).
pub fn make_test_certs(dir: &Path) {
    for ca in ["ca", "other-ca"] {
        sh(
            dir,
            &[
                "openssl",
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                &format!("{ca}.key"),
                "-out",
                &format!("{ca}.pem"),
                "-days",
                "2",
                "-subj",
                &format!("/CN=calwatch test {ca}"),
            ],
        );
    }
    issue_cert(
        dir,
        "server",
        "/CN=127.0.0.1",
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
    );
    // A client certificate for mutual TLS, signed by the same CA (v3, for client auth:
    // rustls refuses v1 certificates).
    issue_cert(
        dir,
        "client",
        "/CN=agent-a",
        "extendedKeyUsage=clientAuth\n",
    );
}

/// A key and a certificate signed by `ca.pem` in `dir`: `{name}.key`, `{name}.pem`, with
/// `subject` and the v3 extensions `ext`.
fn issue_cert(dir: &Path, name: &str, subject: &str, ext: &str) {
    let (key, csr, pem, ext_file) = (
        format!("{name}.key"),
        format!("{name}.csr"),
        format!("{name}.pem"),
        format!("{name}-ext"),
    );
    std::fs::write(dir.join(&ext_file), ext).expect("write openssl extension file");
    sh(
        dir,
        &[
            "openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", &key, "-out", &csr,
            "-subj", subject,
        ],
    );
    sh(
        dir,
        &[
            "openssl",
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            &pem,
            "-days",
            "2",
            "-extfile",
            &ext_file,
        ],
    );
}

/// CPU seconds (user + system) process `pid` has used so far, from /proc.
pub fn proc_cpu_s(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|x| x.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}

/// A `kB` line of /proc/`pid`/status (`VmRSS:`, `VmHWM:`), 0 when absent.
pub fn proc_kb(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

/// A child process killed when dropped; its stderr goes to a log file in the test dir.
pub struct Proc {
    pub name: String,
    child: Child,
    pub log: PathBuf,
}

impl Proc {
    /// Starts `bin` with `args`, stdout piped (for [`Proc::wait_stdout_line`]), stderr to a log.
    pub fn start(dir: &Path, name: &str, bin: &Path, args: &[&str]) -> Proc {
        Proc::start_env(dir, name, bin, args, &[])
    }

    /// Like [`Proc::start`], with extra environment variables.
    pub fn start_env(
        dir: &Path,
        name: &str,
        bin: &Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Proc {
        let log = dir.join(format!("{name}.log"));
        let err = std::fs::File::create(&log).expect("log file");
        let child = Command::new(bin)
            .args(args)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", bin.display()));
        Proc {
            name: name.into(),
            child,
            log,
        }
    }

    /// The HTTP address a gateway logged (`HTTP API and console listening addr=…`).
    pub fn http_addr(&self) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let log = self.log_text();
            if let Some(rest) = log
                .lines()
                .find(|l| l.contains("HTTP API and console listening"))
                .and_then(|l| l.split("addr=").nth(1))
            {
                return rest
                    .split_whitespace()
                    .next()
                    .unwrap_or_default()
                    .to_string();
            }
            assert!(
                Instant::now() < deadline,
                "{}: no HTTP address in the log:\n{log}",
                self.name
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Reads stdout until a line contains `needle` (or panics after `limit`).
    pub fn wait_stdout_line(&mut self, needle: &str, limit: Duration) -> String {
        let out = self.child.stdout.take().expect("stdout piped");
        let (tx, rx) = std::sync::mpsc::channel();
        let needle = needle.to_string();
        std::thread::spawn(move || {
            let mut sent = false;
            // Keep draining after the match: a closed pipe would fail the child's next write.
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if !sent && line.contains(&needle) {
                    let _ = tx.send(line);
                    sent = true;
                }
            }
        });
        rx.recv_timeout(limit).unwrap_or_else(|_| {
            panic!(
                "{}: no line with the expected text; log:\n{}",
                self.name,
                self.log_text()
            )
        })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The newest value of counter `key` in the agent's periodic stats line
    /// (`agent stats: readings_polled=N …`), 0 before the first one.
    pub fn last_stat(&self, key: &str) -> u64 {
        let needle = format!("{key}=");
        self.log_text()
            .lines()
            .rev()
            .filter_map(|l| l.split(needle.as_str()).nth(1))
            .find_map(|r| r.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok())
            .unwrap_or(0)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Asks the process to stop (SIGTERM) and waits up to `limit`; returns its exit code.
    pub fn terminate(&mut self, limit: Duration) -> Option<i32> {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        None
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs a binary to completion; returns (exit code, stdout, stderr).
pub fn run_to_end(bin: &Path, args: &[&str]) -> (i32, String, String) {
    run_to_end_within(bin, args, Duration::from_secs(60))
}

/// [`run_to_end`] with an explicit limit: a child still running after `limit` is killed and
/// the test fails, rather than hanging the whole suite.
pub fn run_to_end_within(bin: &Path, args: &[&str], limit: Duration) -> (i32, String, String) {
    let mut child = Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("run {}: {e}", bin.display()));
    let (mut out, mut err) = (
        child.stdout.take().expect("stdout piped"),
        child.stderr.take().expect("stderr piped"),
    );
    let out = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = out.read_to_end(&mut s);
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = err.read_to_end(&mut s);
        s
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for child") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            let err = String::from_utf8_lossy(&err.join().unwrap_or_default()).into_owned();
            panic!(
                "{} {args:?} still running after {limit:?}; killed\n{err}",
                bin.display()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (
        status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.join().unwrap_or_default()).into_owned(),
        String::from_utf8_lossy(&err.join().unwrap_or_default()).into_owned(),
    )
}

/// Runs an InfluxQL query against InfluxDB 1.x; returns the first series' columns and rows.
pub async fn influxql(url: &str, db: &str, q: &str) -> (Vec<String>, Vec<Vec<serde_json::Value>>) {
    let resp: serde_json::Value = reqwest::Client::new()
        .get(format!("{url}/query"))
        .query(&[("db", db), ("q", q), ("epoch", "ms")])
        .send()
        .await
        .expect("query influx")
        .json()
        .await
        .expect("influx json");
    let series = &resp["results"][0]["series"][0];
    let columns = series["columns"]
        .as_array()
        .map(|c| {
            c.iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    let rows = series["values"]
        .as_array()
        .map(|r| r.iter().filter_map(|row| row.as_array().cloned()).collect())
        .unwrap_or_default();
    (columns, rows)
}

/// Polls `f` every 250 ms until it returns `Some` or `limit` passes.
pub async fn eventually<T, F, Fut>(limit: Duration, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f().await {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
