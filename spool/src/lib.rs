//! The crash-safe disk queue that sits between a producer and a slow or absent consumer: the
//! agent spools every batch before publishing it over MQTT, the gateway spools line protocol
//! before writing it to a store. Whatever happens to the process or the power, a record that
//! was made durable is delivered until the consumer acknowledges it, and a record that was
//! acknowledged is deleted (DESIGN.md, "Delivery and state").
//!
//! The design follows vector's `disk_v2` buffer: size-capped segment files written
//! append-only, a checksum per record, a small ledger of acknowledgements, and a segment file
//! deleted only once every record in it is acknowledged.
//!
//! # On disk
//!
//! A spool is one directory:
//!
//! - `NNNNNNNNNNNNNNNNNNNN.seg` — a segment, named by the [`RecordId`] of its first record,
//!   zero-padded to 20 digits so that name order is id order. A segment holds records with
//!   consecutive ids and is at most `segment_bytes` long. Each record is
//!   `len: u32 LE | crc: u32 LE | id: u64 LE | payload[len]`, where `crc` is the CRC32C of
//!   `len | id | payload` — covering the id and length too, so a zero-filled tail or a record
//!   from another position never passes as valid.
//! - `ledger` — what was acknowledged, in 52 bytes plus 16 per run of out-of-order acks:
//!   `magic "CWSPLEDG" | version: u32 | runs: u32 | next_id: u64 | acked_below: u64 |
//!   dropped: u64 | full_rejections: u64 | (start: u64, end: u64) × runs | crc32c: u32`,
//!   all little-endian. It is replaced atomically (write `ledger.tmp`, fsync, rename, fsync the
//!   directory).
//!
//! # Crash guarantee
//!
//! A record is durable when [`Spool::append`] returns under [`SyncPolicy::EveryAppend`], or when
//! the next [`Spool::sync`] returns under [`SyncPolicy::Manual`]; a durable, unacknowledged
//! record is yielded again by [`Spool::read_next`] after any crash, byte for byte, in append
//! order — unless [`FullPolicy::DropOldest`] dropped it, which is counted. A crash loses at
//! most the records appended since the last sync (a torn tail is found by its checksum and cut
//! off at the next open, never replayed). Acknowledgements are written to the ledger lazily, so
//! after a crash at most [`LEDGER_ACK_INTERVAL`]` - 1` acknowledged records are yielded again
//! (only ones acknowledged since the last [`Spool::sync`]); the consumer must tolerate that
//! redelivery, which calwatch's does by dedup on (device, seq). Record ids are never reused,
//! even for records lost in a crash.
//!
//! One process, one writer and one reader: the caller serialises access (a `Mutex`). Two
//! processes must not open the same directory.
#![forbid(unsafe_code)]

mod config;
mod error;
mod ledger;
mod record;
mod segment;
mod spool;

pub use config::{FullPolicy, SpoolConfig, SyncPolicy};
pub use error::{Result, SpoolError};
pub use spool::{Recovery, Spool, SpoolStats};

/// Identifies one record: strictly increasing in append order, never reused, also across
/// restarts and after every segment was deleted (the ledger keeps the floor; were the ledger
/// lost as well, ids would continue after the highest one still on disk).
pub type RecordId = u64;

/// Acknowledgements are written to the ledger after this many, besides on [`Spool::sync`], before
/// a segment is deleted and on drop; it bounds how many acknowledged records a crash makes the
/// spool yield again (at most this minus one) while keeping the ledger's fsync off most acks.
pub const LEDGER_ACK_INTERVAL: u32 = 256;

#[cfg(test)]
mod tests;
