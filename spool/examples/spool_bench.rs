//! Spool throughput: append with an fsync per record, append with a group commit every 64
//! records, then read and ack everything back.
//!
//! `cargo run --release -p calwatch-spool --example spool_bench -- --dir /tmp/x --records 20000 --size 16384`
//!
//! Writes under `<dir>/every_append` and `<dir>/manual`, which it empties first.

use std::error::Error;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use calwatch_spool::{Spool, SpoolConfig, SyncPolicy};

const GROUP_COMMIT: u64 = 64;

struct Args {
    dir: PathBuf,
    records: u64,
    size: usize,
}

fn parse_args() -> Result<Args, Box<dyn Error>> {
    let mut args = Args {
        dir: std::env::temp_dir().join("calwatch-spool-bench"),
        records: 20_000,
        size: 16 << 10,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--dir" => args.dir = value.into(),
            "--records" => args.records = value.parse()?,
            "--size" => args.size = value.parse()?,
            _ => return Err(format!("unknown flag {flag} (--dir, --records, --size)").into()),
        }
    }
    Ok(args)
}

fn config(dir: &Path, args: &Args, sync: SyncPolicy) -> Result<SpoolConfig, Box<dyn Error>> {
    if dir.exists() {
        std::fs::remove_dir_all(dir)?;
    }
    let needed = args.records * (args.size as u64 + 64);
    let mut cfg = SpoolConfig::new(dir);
    // Room for everything: the benchmark measures writing, not dropping.
    cfg.max_bytes = cfg.max_bytes.max(2 * needed);
    cfg.sync = sync;
    Ok(cfg)
}

fn report(what: &str, records: u64, size: usize, elapsed: Duration) {
    let secs = elapsed.as_secs_f64();
    println!(
        "{what:<32} {records} records of {size} B in {secs:>7.3} s: {:>9.0} records/s, {:>7.1} MB/s",
        records as f64 / secs,
        records as f64 * size as f64 / 1e6 / secs,
    );
}

fn main() -> Result<(), Box<dyn Error>> {
    let args = parse_args()?;
    let payload: Vec<u8> = (0..args.size).map(|i| (i * 131 % 251) as u8).collect();

    let (mut spool, _) = Spool::open(config(
        &args.dir.join("every_append"),
        &args,
        SyncPolicy::EveryAppend,
    )?)?;
    let start = Instant::now();
    for _ in 0..args.records {
        spool.append(&payload)?;
    }
    report(
        "append, fsync each",
        args.records,
        args.size,
        start.elapsed(),
    );
    drop(spool);

    let (mut spool, _) = Spool::open(config(&args.dir.join("manual"), &args, SyncPolicy::Manual)?)?;
    let start = Instant::now();
    for i in 1..=args.records {
        spool.append(&payload)?;
        if i % GROUP_COMMIT == 0 {
            spool.sync()?;
        }
    }
    spool.sync()?;
    report(
        &format!("append, sync every {GROUP_COMMIT}"),
        args.records,
        args.size,
        start.elapsed(),
    );

    let start = Instant::now();
    let mut read = 0;
    while let Some((id, record)) = spool.read_next()? {
        if record.len() != args.size {
            return Err(format!("record {id} has {} bytes", record.len()).into());
        }
        spool.ack(id)?;
        read += 1;
    }
    spool.sync()?;
    report(
        "read + ack (deletes segments)",
        read,
        args.size,
        start.elapsed(),
    );
    let stats = spool.stats();
    if read != args.records || !spool.is_empty() {
        return Err(format!("read {read} of {} records; {stats:?}", args.records).into());
    }
    Ok(())
}
