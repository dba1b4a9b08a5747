//! Per-device reading sequence numbers that survive restarts (CONTRACT §1: `seq` starts at
//! 1, +1 per reading, never reused).
//!
//! Writing the counter on every reading would cost an fsync per reading per device, so the
//! counter reserves blocks: the file holds the highest seq that may have been handed out.
//! After a crash the agent resumes above it, leaving at most one block of unused numbers
//! (a gap the gateway counts, never an error); a clean shutdown records the exact value.

use std::io::Write;
use std::path::{Path, PathBuf};

use calwatch_protocol::Id;

/// Numbers reserved per write.
pub const BLOCK: u64 = 1000;

/// The sequence counter of one device.
#[derive(Debug)]
pub struct SeqCounter {
    path: PathBuf,
    next: u64,
    reserved: u64,
}

impl SeqCounter {
    /// Opens (or creates) the counter of `device` under `dir`.
    pub fn open(dir: &Path, device: &Id) -> std::io::Result<SeqCounter> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join(format!("{device}.seq"));
        let used = match std::fs::read_to_string(&path) {
            Ok(text) => text.trim().parse::<u64>().map_err(|e| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("{}: not a sequence number: {e}", path.display()),
                )
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => return Err(e),
        };
        Ok(SeqCounter {
            path,
            next: used + 1,
            reserved: used,
        })
    }

    /// The next sequence number.
    pub fn take(&mut self) -> std::io::Result<u64> {
        if self.next > self.reserved {
            self.store(self.next + BLOCK - 1)?;
            self.reserved = self.next + BLOCK - 1;
        }
        let seq = self.next;
        self.next += 1;
        Ok(seq)
    }

    /// Records exactly what was handed out, so a clean restart leaves no gap.
    pub fn close(mut self) -> std::io::Result<()> {
        let used = self.next - 1;
        self.store(used)?;
        self.reserved = used;
        Ok(())
    }

    fn store(&mut self, value: u64) -> std::io::Result<()> {
        let tmp = self.path.with_extension("seq.tmp");
        let mut f = std::fs::File::create(&tmp)?;
        writeln!(f, "{value}")?;
        f.sync_all()?;
        std::fs::rename(&tmp, &self.path)?;
        if let Some(dir) = self.path.parent() {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn survives_clean_and_unclean_restarts() {
        let dir = std::env::temp_dir().join(format!("calwatch-seq-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let id = Id::new("S-1").unwrap();
        let mut c = SeqCounter::open(&dir, &id).unwrap();
        assert_eq!((c.take().unwrap(), c.take().unwrap()), (1, 2));
        c.close().unwrap();
        let mut c = SeqCounter::open(&dir, &id).unwrap();
        assert_eq!(c.take().unwrap(), 3);
        drop(c); // a crash: the reservation stands, numbers are never reused
        let mut c = SeqCounter::open(&dir, &id).unwrap();
        let after_crash = c.take().unwrap();
        assert!(after_crash > 3 && after_crash <= 3 + BLOCK, "{after_crash}");
        for _ in 0..(2 * BLOCK) {
            c.take().unwrap();
        }
        assert_eq!(c.take().unwrap(), after_crash + 2 * BLOCK + 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
