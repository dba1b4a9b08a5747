//! Sink benchmark (run by hand): points/s written to each target by one writer task, CPU per
//! point, and bytes per point on the wire with and without gzip.
//!
//!     tests/run --with-services cargo run --release -p calwatch-gateway --example sink_bench -- [POINTS]
//!
//! Points are `reading` lines of CONTRACT §4 (5 tags, 8 fields: a scale's values and seq),
//! over 10,000 series, appended to the target's durable queue first; the clock runs while
//! the writer drains the queue to the store (gzip, 5,000 lines per request).

use std::io::Write;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use calwatch_gateway::bench::{start_writers, LineBuffer, Queues};
use calwatch_gateway::config::{QueueConfig, Sink, SinkConfig};

fn cpu_s() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let f: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let t = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (t(11) + t(12)) / 100.0
}

fn lines(points: usize, t0: i64) -> String {
    let mut buf = LineBuffer::new();
    for i in 0..points {
        let device = format!("BENCH-SCL-{:05}", i % 10_000);
        let g = (i % 15_000) as f64 / 1000.0;
        buf.point("reading")
            .tag("device", &device)
            .tag("kind", "scale")
            .tag("owner", "market-3")
            .tag("site", "stall-12")
            .tag("vstate", "valid")
            .float("gross_kg", g)
            .float("net_kg", g)
            .float("tare_kg", 0.0)
            .bool("stable", i % 7 != 0)
            .bool("zero", g == 0.0)
            .bool("overload", false)
            .float("event_counter", 7.0)
            .int("seq", (i / 10_000 + 1) as i64)
            .finish(t0 + (i / 10_000) as i64 * 1000 + (i % 1000) as i64);
    }
    buf.take()
}

fn main() {
    let points: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(500_000);
    let influx =
        std::env::var("CALWATCH_INFLUX_V1_URL").expect("run under tests/run --with-services");
    let vm = std::env::var("CALWATCH_VM_URL").expect("run under tests/run --with-services");
    let t0 = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
        - 86_400_000;
    let text = lines(points, t0);
    let chunk: String = text.lines().take(5_000).map(|l| format!("{l}\n")).collect();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let _ = gz.write_all(chunk.as_bytes());
    let gz_len = gz.finish().map(|v| v.len()).unwrap_or(0);
    println!("sink benchmark: {points} reading points, 10,000 series, 8 fields each");
    println!(
        "  bytes per point, plain      {:>8.1}",
        text.len() as f64 / points as f64
    );
    println!(
        "  bytes per point, gzip fast  {:>8.1}  (5,000-line requests, as the writer sends them)",
        gz_len as f64 / 5_000.0
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    for (name, target) in [
        (
            "influx_v1 (InfluxDB 1.6 /write)",
            SinkConfig::InfluxV1 {
                url: influx.clone(),
                db: "calwatch".into(),
                rp: None,
                username: None,
                password: None,
            },
        ),
        (
            "influx_v2 (VictoriaMetrics /api/v2/write)",
            SinkConfig::InfluxV2 {
                url: vm.clone(),
                org: "bench".into(),
                bucket: "bench".into(),
                token: None,
            },
        ),
    ] {
        let dir = std::env::temp_dir().join(format!(
            "calwatch-sink-bench-{}-{}",
            std::process::id(),
            name.len()
        ));
        let sinks = vec![Sink {
            name: "bench".into(),
            target,
        }];
        let queues = Queues::open(
            &sinks,
            &QueueConfig {
                dir: dir.clone(),
                max_bytes: 4 << 30,
            },
        )
        .expect("queues");
        let stop_flag = AtomicBool::new(false);
        queues.append(&text, &stop_flag).expect("append");
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let (c0, w0) = (cpu_s(), Instant::now());
        rt.block_on(async {
            let writers = start_writers(&sinks, &queues, stop_rx);
            while queues.targets[0].unacked() > 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let _ = stop_tx.send(true);
            for w in writers {
                let _ = w.await;
            }
        });
        let (cpu, wall) = (cpu_s() - c0, w0.elapsed().as_secs_f64());
        println!(
            "  {name:<42} {:>9.0} points/s, writer CPU {:>5.2} µs/point ({:.0} % of one core), {} dead-lettered",
            points as f64 / wall,
            1e6 * cpu / points as f64,
            100.0 * cpu / wall,
            queues.targets[0].metrics.dead_lettered.load(std::sync::atomic::Ordering::Relaxed)
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
