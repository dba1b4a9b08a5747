//! The deploy example for production brokers, tested: deploy/mosquitto/calwatch.conf (TLS,
//! no anonymous access) and calwatch.acl (agent X may publish only under
//! calwatch/v1/agents/X/) on a real mosquitto with generated test certificates. The agent
//! connects over mqtts:// with a password from a file; a wrong password or a certificate
//! from the wrong CA gives a clear error while the agent keeps retrying and spooling.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use calwatch_tests::broker::{stay_root, Counter, Mosquitto};
use calwatch_tests::{bin, free_port, make_test_certs as make_certs, workspace, Proc, Services};

struct SecureBroker {
    broker: Mosquitto,
    plain_port: u16,
    /// A listener that requires a client certificate signed by the CA (mutual TLS).
    mtls_port: u16,
}

/// mosquitto with the deploy config (paths and ports made private), plus a plain loopback
/// listener for the test's subscriber (same users and ACL apply to it).
fn secure_broker(dir: &Path) -> SecureBroker {
    make_certs(dir);
    let passwd = dir.join("passwd");
    for (user, pass) in [
        ("agent-a", "secret-a"),
        ("agent-b", "secret-b"),
        ("calwatch-gateway", "gw-secret"),
    ] {
        let mut args = vec!["-b"];
        if !passwd.exists() {
            args.push("-c");
        }
        let p = passwd.to_str().unwrap().to_string();
        let out = Command::new("mosquitto_passwd")
            .args(&args)
            .arg(&p)
            .arg(user)
            .arg(pass)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let tls_port = free_port();
    let plain_port = free_port();
    let deploy = workspace().join("deploy/mosquitto");
    std::fs::copy(deploy.join("calwatch.acl"), dir.join("calwatch.acl")).unwrap();
    std::fs::create_dir_all(dir.join("data")).unwrap();
    let conf = std::fs::read_to_string(deploy.join("calwatch.conf"))
        .unwrap()
        .replace("/etc/mosquitto/calwatch.passwd", passwd.to_str().unwrap())
        .replace(
            "/etc/mosquitto/calwatch.acl",
            dir.join("calwatch.acl").to_str().unwrap(),
        )
        .replace(
            "/var/lib/mosquitto/",
            &format!("{}/", dir.join("data").display()),
        )
        .replace("/etc/mosquitto/certs/", &format!("{}/", dir.display()))
        .replace("listener 8883", &format!("listener {tls_port} 127.0.0.1"));
    assert!(
        conf.contains(&format!("listener {tls_port}")),
        "deploy config changed shape:\n{conf}"
    );
    let mtls_port = free_port();
    let conf = format!(
        "{}{conf}\nlistener {plain_port} 127.0.0.1\n\
         listener {mtls_port} 127.0.0.1\ncafile {d}/ca.pem\ncertfile {d}/server.pem\nkeyfile {d}/server.key\nrequire_certificate true\n\
         log_dest stderr\n",
        stay_root(),
        d = dir.display()
    );
    let conf_path = dir.join("mosquitto.conf");
    std::fs::write(&conf_path, conf).unwrap();
    let broker = Mosquitto::with_conf(conf_path, tls_port, dir.join("mosquitto.log"));
    SecureBroker {
        broker,
        plain_port,
        mtls_port,
    }
}

fn agent_config(
    dir: &Path,
    name: &str,
    agent: &str,
    port: u16,
    ca: &str,
    password: &str,
    sim_port: u16,
) -> std::path::PathBuf {
    std::fs::write(dir.join(format!("{name}.pass")), format!("{password}\n")).unwrap();
    let profile = workspace().join("config/profiles/ft112.toml");
    let text = format!(
        "agent = \"{agent}\"\n[mqtt]\nurl = \"mqtts://127.0.0.1:{port}\"\nusername = \"{agent}\"\npassword_file = \"{name}.pass\"\nca_file = \"{ca}\"\nkeep_alive_s = 5\n\
         [spool]\ndir = \"spool-{name}\"\n[batch]\nlinger_ms = 100\n\
         [[device]]\nid = \"{name}-S1\"\nprofile = \"{}\"\naddress = \"127.0.0.1:{sim_port}\"\ninterval_ms = 100\n",
        profile.display()
    );
    let p = dir.join(format!("{name}.toml"));
    std::fs::write(&p, text).unwrap();
    p
}

fn simulator(dir: &Path) -> (Proc, u16) {
    let port = free_port();
    let profile = workspace().join("config/profiles/ft112.toml");
    let mut sim = Proc::start(
        dir,
        "sim",
        &bin("calwatch-agent"),
        &[
            "simulate",
            "--profile",
            profile.to_str().unwrap(),
            "--listen",
            &format!("127.0.0.1:{port}"),
        ],
    );
    sim.wait_stdout_line("simulating", Duration::from_secs(10));
    (sim, port)
}

async fn wait_log(p: &Proc, needle: &str, secs: u64) -> bool {
    for _ in 0..secs * 4 {
        if p.log_text().contains(needle) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_over_tls_with_password_and_acl() {
    let Some(svc) = Services::get() else { return };
    let dir = svc.test_dir("delivery-tls");
    let secure = secure_broker(&dir);
    let (_sim, sim_port) = simulator(&dir);
    let counter = Counter::subscribe_as(
        secure.plain_port,
        "calwatch/v1/agents/#",
        "tls-counter",
        Some(("calwatch-gateway", "gw-secret")),
    )
    .await;

    // The right CA and password: readings arrive.
    let good = agent_config(
        &dir,
        "good",
        "agent-a",
        secure.broker.port,
        "ca.pem",
        "secret-a",
        sim_port,
    );
    let mut agent = Proc::start(
        &dir,
        "agent-good",
        &bin("calwatch-agent"),
        &["run", "--config", good.to_str().unwrap()],
    );
    assert!(
        wait_log(&agent, "connected to broker", 20).await,
        "{}",
        agent.log_text()
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        counter
            .summary()
            .get("good-S1")
            .is_some_and(|(s, _)| s.len() >= 5),
        "{:?}\n{}",
        counter.summary(),
        agent.log_text()
    );
    assert_eq!(agent.terminate(Duration::from_secs(10)), Some(0));

    // The ACL: agent-a may not publish as agent-b; the broker drops it.
    let impostor = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &secure.plain_port.to_string(), "-u", "agent-a", "-P", "secret-a", "-q", "1"])
        .args(["-t", "calwatch/v1/agents/agent-b/readings", "-m"])
        .arg(r#"{"v":1,"agent":"agent-b","sent":1,"readings":[{"device":"forged-S1","seq":1,"ts":1,"values":{"gross_kg":1}}]}"#)
        .output()
        .unwrap();
    assert!(
        impostor.status.success(),
        "{}",
        String::from_utf8_lossy(&impostor.stderr)
    );
    let own = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &secure.plain_port.to_string(), "-u", "agent-b", "-P", "secret-b", "-q", "1"])
        .args(["-t", "calwatch/v1/agents/agent-b/readings", "-m"])
        .arg(r#"{"v":1,"agent":"agent-b","sent":1,"readings":[{"device":"own-S1","seq":1,"ts":1,"values":{"gross_kg":1}}]}"#)
        .output()
        .unwrap();
    assert!(own.status.success());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let seen = counter.summary();
    assert!(
        seen.contains_key("own-S1"),
        "agent-b publishing its own topic arrives: {seen:?}"
    );
    assert!(
        !seen.contains_key("forged-S1"),
        "agent-a publishing under agent-b was refused by the ACL"
    );
    // Anonymous clients are refused.
    let anon = Command::new("mosquitto_pub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &secure.plain_port.to_string(),
            "-t",
            "x",
            "-m",
            "x",
        ])
        .output()
        .unwrap();
    assert!(!anon.status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_wrong_password_and_wrong_ca_are_explained_and_retried() {
    let Some(svc) = Services::get() else { return };
    let dir = svc.test_dir("delivery-badauth");
    let secure = secure_broker(&dir);
    let (_sim, sim_port) = simulator(&dir);
    let bad_pass = agent_config(
        &dir,
        "badpass",
        "agent-a",
        secure.broker.port,
        "ca.pem",
        "not-the-password",
        sim_port,
    );
    let bad_ca = agent_config(
        &dir,
        "badca",
        "agent-b",
        secure.broker.port,
        "other-ca.pem",
        "secret-b",
        sim_port,
    );
    let a = Proc::start(
        &dir,
        "agent-badpass",
        &bin("calwatch-agent"),
        &["run", "--config", bad_pass.to_str().unwrap()],
    );
    let b = Proc::start(
        &dir,
        "agent-badca",
        &bin("calwatch-agent"),
        &["run", "--config", bad_ca.to_str().unwrap()],
    );
    assert!(
        wait_log(&a, "broker refused the", 20).await,
        "{}",
        a.log_text()
    );
    assert!(wait_log(&b, "TLS:", 20).await, "{}", b.log_text());
    // Both keep retrying and keep spooling what they poll.
    assert!(wait_log(&a, "agent stats:", 15).await);
    for p in [&a, &b] {
        let log = p.log_text();
        assert!(
            log.matches("cannot connect to broker").count() >= 2,
            "retries: {log}"
        );
        assert!(
            !log.contains("not-the-password") && !log.contains("secret-b"),
            "a password leaked into the log"
        );
        let spooled = p.last_stat("batches_spooled");
        assert!(spooled > 10, "still spooling: {spooled}\n{log}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_with_a_client_certificate_mutual_tls() {
    let Some(svc) = Services::get() else { return };
    let dir = svc.test_dir("delivery-mtls");
    let secure = secure_broker(&dir);
    let (_sim, sim_port) = simulator(&dir);
    let counter = Counter::subscribe_as(
        secure.plain_port,
        "calwatch/v1/agents/#",
        "mtls-counter",
        Some(("calwatch-gateway", "gw-secret")),
    )
    .await;
    // With the client certificate: accepted, readings arrive.
    let with_cert = agent_config(
        &dir,
        "mtls",
        "agent-a",
        secure.mtls_port,
        "ca.pem",
        "secret-a",
        sim_port,
    );
    let text = std::fs::read_to_string(&with_cert).unwrap().replace(
        "keep_alive_s = 5\n",
        "keep_alive_s = 5\ncert_file = \"client.pem\"\nkey_file = \"client.key\"\n",
    );
    std::fs::write(&with_cert, text).unwrap();
    let mut agent = Proc::start(
        &dir,
        "agent-mtls",
        &bin("calwatch-agent"),
        &["run", "--config", with_cert.to_str().unwrap()],
    );
    assert!(
        wait_log(&agent, "connected to broker", 20).await,
        "{}",
        agent.log_text()
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        counter
            .summary()
            .get("mtls-S1")
            .is_some_and(|(s, _)| s.len() >= 5),
        "{:?}",
        counter.summary()
    );
    assert_eq!(agent.terminate(Duration::from_secs(10)), Some(0));
    // Without it: the broker refuses the handshake; the agent explains and retries.
    let without = agent_config(
        &dir,
        "nocert",
        "agent-b",
        secure.mtls_port,
        "ca.pem",
        "secret-b",
        sim_port,
    );
    let agent = Proc::start(
        &dir,
        "agent-nocert",
        &bin("calwatch-agent"),
        &["run", "--config", without.to_str().unwrap()],
    );
    assert!(
        wait_log(&agent, "cannot connect to broker", 20).await,
        "{}",
        agent.log_text()
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        !agent.log_text().contains("connected to broker"),
        "{}",
        agent.log_text()
    );
    assert!(
        agent.log_text().matches("cannot connect to broker").count() >= 2,
        "{}",
        agent.log_text()
    );
}
