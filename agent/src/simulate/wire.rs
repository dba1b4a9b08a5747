//! The simulator's Modbus server: framing (Modbus TCP, RTU over TCP), the read functions,
//! and the transport faults (silence, delay, malformed frames, exceptions).
//!
//! Written against the Modbus Application Protocol v1.1b3 and the Modbus Messaging on
//! TCP/IP guide rather than on a server library, because a fault must be able to break
//! exactly what a library would never let us break (byte counts, framing, silence per
//! unit on a shared connection).

use std::collections::HashMap;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

use crate::profile::Table;

use super::fleet::{GarbageMode, SimTransport};
use super::model::Instrument;
use super::SimClock;

/// Modbus exception codes the simulator sends itself.
const ILLEGAL_FUNCTION: u8 = 0x01;
const ILLEGAL_DATA_ADDRESS: u8 = 0x02;
const ILLEGAL_DATA_VALUE: u8 = 0x03;
const GATEWAY_TARGET_FAILED: u8 = 0x0B;

/// The instruments behind one listening socket.
#[derive(Debug)]
pub(crate) struct Port {
    pub(crate) transport: SimTransport,
    pub(crate) units: HashMap<u8, Arc<Instrument>>,
    pub(crate) clock: SimClock,
}

/// What to send back for one request.
#[derive(Debug, PartialEq)]
pub(crate) enum Reply {
    /// Nothing at all.
    Silence,
    /// A PDU, framed as the port frames.
    Pdu(Vec<u8>),
    /// Bytes sent as they are, without framing.
    Raw(Vec<u8>),
}

fn exception(function: u8, code: u8) -> Vec<u8> {
    vec![function | 0x80, code]
}

/// Answers a request PDU from the register image `read(table, start, count)`.
pub(crate) fn answer(pdu: &[u8], read: impl FnOnce(Table, u16, u16) -> Vec<u16>) -> Vec<u8> {
    let Some(&function) = pdu.first() else {
        return exception(0, ILLEGAL_FUNCTION);
    };
    let table = match function {
        0x01 => Table::Coil,
        0x02 => Table::Discrete,
        0x03 => Table::Holding,
        0x04 => Table::Input,
        // Writes (zero, tare commands) and diagnostics are not simulated.
        _ => return exception(function, ILLEGAL_FUNCTION),
    };
    if pdu.len() != 5 {
        return exception(function, ILLEGAL_DATA_VALUE);
    }
    let start = u16::from_be_bytes([pdu[1], pdu[2]]);
    let count = u16::from_be_bytes([pdu[3], pdu[4]]);
    let limit = if table.is_bits() { 2000 } else { 125 };
    if count == 0 || count > limit {
        return exception(function, ILLEGAL_DATA_VALUE);
    }
    if u32::from(start) + u32::from(count) > 65_536 {
        return exception(function, ILLEGAL_DATA_ADDRESS);
    }
    let words = read(table, start, count);
    if table.is_bits() {
        let mut bytes = vec![0u8; usize::from(count).div_ceil(8)];
        for (i, w) in words.iter().enumerate() {
            if *w != 0 {
                bytes[i / 8] |= 1 << (i % 8);
            }
        }
        let mut out = vec![function, bytes.len() as u8];
        out.extend(bytes);
        out
    } else {
        let mut out = vec![function, (words.len() * 2) as u8];
        out.extend(words.iter().flat_map(|w| w.to_be_bytes()));
        out
    }
}

/// Breaks a reply as a `garbage` fault says.
fn garble(pdu: Vec<u8>, mode: GarbageMode) -> Reply {
    match mode {
        // Claims one byte more than it carries: an odd count for registers, a short
        // frame for bits. Exceptions carry no count, so they become random.
        GarbageMode::ByteCount if pdu.len() >= 2 && pdu[0] & 0x80 == 0 => {
            let mut pdu = pdu;
            pdu[1] = pdu[1].wrapping_add(1);
            Reply::Pdu(pdu)
        }
        GarbageMode::ByteCount | GarbageMode::RandomPdu => {
            // 0x41..=0x48 are user-defined function codes: no client expects them here.
            let mut out = vec![fastrand::u8(0x41..=0x48)];
            out.extend((0..fastrand::usize(2..=12)).map(|_| fastrand::u8(..)));
            Reply::Pdu(out)
        }
        GarbageMode::Noise => {
            let mut out: Vec<u8> = (0..fastrand::usize(8..=24))
                .map(|_| fastrand::u8(..))
                .collect();
            // A non-zero protocol id, so a TCP client fails at once instead of waiting
            // for a length the noise happened to announce.
            out[2] = fastrand::u8(1..);
            Reply::Raw(out)
        }
    }
}

impl Port {
    /// The reply to `pdu` addressed to `unit`.
    pub(crate) fn respond(&self, unit: u8, pdu: &[u8]) -> (Option<Duration>, Reply) {
        let Some(inst) = self.units.get(&unit) else {
            // A TCP gateway says the device is not there; on an RTU line nobody answers.
            return match self.transport {
                SimTransport::Tcp => (
                    None,
                    Reply::Pdu(exception(
                        pdu.first().copied().unwrap_or(0),
                        GATEWAY_TARGET_FAILED,
                    )),
                ),
                SimTransport::RtuOverTcp => (None, Reply::Silence),
            };
        };
        let t = self.clock.now();
        let wire = inst.wire_faults(t);
        if wire.silent {
            return (None, Reply::Silence);
        }
        let pdu = match wire.exception {
            Some(code) => exception(pdu.first().copied().unwrap_or(0), code),
            None => answer(pdu, |table, start, count| inst.read(table, start, count, t)),
        };
        let reply = match wire.garbage {
            Some(mode) => garble(pdu, mode),
            None => Reply::Pdu(pdu),
        };
        (wire.delay, reply)
    }
}

/// CRC-16/MODBUS (polynomial 0xA001 reflected, initial 0xFFFF), sent low byte first.
pub(crate) fn crc16(bytes: &[u8]) -> u16 {
    let mut crc: u16 = 0xFFFF;
    for &b in bytes {
        crc ^= u16::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xA001
            } else {
                crc >> 1
            };
        }
    }
    crc
}

/// Serves `port` on `listener`; every connection on a task of its own, all of them
/// stopped when this future is dropped.
pub(crate) async fn serve(listener: TcpListener, port: Arc<Port>) -> io::Result<()> {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    let port = port.clone();
                    connections.spawn(async move {
                        if let Err(e) = connection(stream, port).await {
                            tracing::debug!(%peer, error = %e, "simulator connection ended");
                        }
                    });
                }
                // Out of file descriptors and the like: wait, do not spin or give up.
                Err(e) => {
                    tracing::warn!(error = %e, "simulator cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

async fn connection(stream: TcpStream, port: Arc<Port>) -> io::Result<()> {
    let (mut rd, mut wr) = stream.into_split();
    loop {
        let request = match port.transport {
            SimTransport::Tcp => read_tcp(&mut rd).await?,
            SimTransport::RtuOverTcp => read_rtu(&mut rd).await?,
        };
        let Some((header, unit, pdu)) = request else {
            return Ok(());
        };
        let (delay, reply) = port.respond(unit, &pdu);
        if let Some(d) = delay {
            tokio::time::sleep(d).await;
        }
        let frame = match reply {
            Reply::Silence => continue,
            Reply::Raw(bytes) => bytes,
            Reply::Pdu(pdu) => match port.transport {
                SimTransport::Tcp => {
                    let mut f = Vec::with_capacity(7 + pdu.len());
                    f.extend_from_slice(&header.to_be_bytes());
                    f.extend_from_slice(&0u16.to_be_bytes());
                    f.extend_from_slice(&(pdu.len() as u16 + 1).to_be_bytes());
                    f.push(unit);
                    f.extend(pdu);
                    f
                }
                SimTransport::RtuOverTcp => {
                    let mut f = Vec::with_capacity(3 + pdu.len());
                    f.push(unit);
                    f.extend(pdu);
                    let crc = crc16(&f);
                    f.extend_from_slice(&crc.to_le_bytes());
                    f
                }
            },
        };
        write_all(&mut wr, &frame).await?;
    }
}

async fn write_all(wr: &mut (impl AsyncWrite + Unpin), frame: &[u8]) -> io::Result<()> {
    wr.write_all(frame).await?;
    wr.flush().await
}

/// Reads exactly `buf.len()` bytes; `Ok(false)` on a clean end of stream before any.
async fn read_or_eof(rd: &mut (impl AsyncRead + Unpin), buf: &mut [u8]) -> io::Result<bool> {
    match rd.read_exact(buf).await {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(e),
    }
}

type Request = Option<(u16, u8, Vec<u8>)>;

/// One Modbus TCP request: (transaction id, unit id, PDU), or `None` at end of stream.
async fn read_tcp(rd: &mut (impl AsyncRead + Unpin)) -> io::Result<Request> {
    let mut header = [0u8; 7];
    if !read_or_eof(rd, &mut header).await? {
        return Ok(None);
    }
    let transaction = u16::from_be_bytes([header[0], header[1]]);
    let protocol = u16::from_be_bytes([header[2], header[3]]);
    let len = usize::from(u16::from_be_bytes([header[4], header[5]]));
    if protocol != 0 || !(2..=254).contains(&len) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("not a Modbus TCP request: protocol {protocol}, length {len}"),
        ));
    }
    let mut pdu = vec![0u8; len - 1];
    rd.read_exact(&mut pdu).await?;
    Ok(Some((transaction, header[6], pdu)))
}

/// One RTU request over a stream: (0, unit id, PDU), or `None` at end of stream. A frame
/// with a bad CRC is dropped, as a device on a serial line would.
async fn read_rtu(rd: &mut (impl AsyncRead + Unpin)) -> io::Result<Request> {
    loop {
        let mut head = [0u8; 2];
        if !read_or_eof(rd, &mut head).await? {
            return Ok(None);
        }
        let mut frame = head.to_vec();
        let body = match head[1] {
            0x01..=0x06 => 4,
            0x0F | 0x10 => {
                let mut fixed = [0u8; 5];
                rd.read_exact(&mut fixed).await?;
                frame.extend_from_slice(&fixed);
                usize::from(fixed[4])
            }
            _ => {
                // Unknown length: take what arrives with it and refuse the function.
                let mut rest = [0u8; 256];
                let _ = tokio::time::timeout(Duration::from_millis(20), rd.read(&mut rest)).await;
                return Ok(Some((0, head[0], vec![head[1]])));
            }
        };
        let mut rest = vec![0u8; body + 2];
        rd.read_exact(&mut rest).await?;
        frame.extend_from_slice(&rest);
        let (data, crc) = frame.split_at(frame.len() - 2);
        if crc16(data) != u16::from_le_bytes([crc[0], crc[1]]) {
            tracing::debug!("simulator: RTU frame with a bad CRC dropped");
            continue;
        }
        return Ok(Some((0, data[0], data[1..].to_vec())));
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn reads_registers_and_bits() {
        let regs = answer(&[0x03, 0x00, 0x10, 0x00, 0x02], |t, s, n| {
            assert_eq!((t, s, n), (Table::Holding, 16, 2));
            vec![0x1234, 0xABCD]
        });
        assert_eq!(regs, vec![0x03, 4, 0x12, 0x34, 0xAB, 0xCD]);
        let bits = answer(&[0x01, 0x00, 0x00, 0x00, 0x0A], |_, _, n| {
            (0..n).map(|i| u16::from(i % 3 == 0)).collect()
        });
        // bits 0, 3, 6, 9 set, LSB first.
        assert_eq!(bits, vec![0x01, 2, 0b0100_1001, 0b0000_0010]);
    }

    #[test]
    fn refuses_what_it_cannot_do() {
        let none = |_, _, _| Vec::new();
        assert_eq!(answer(&[0x06, 0, 1, 0, 1], none), vec![0x86, 1]);
        assert_eq!(answer(&[0x03, 0, 0, 0, 126], none), vec![0x83, 3]);
        assert_eq!(answer(&[0x04, 0xFF, 0xFF, 0, 2], none), vec![0x84, 2]);
        assert_eq!(answer(&[0x03, 0, 0], none), vec![0x83, 3]);
    }

    #[test]
    fn crc_matches_the_spec_example() {
        // Modbus over serial line v1.02, §6.2.2 example: 02 07 → CRC 0x1241 (sent 41 12).
        assert_eq!(crc16(&[0x02, 0x07]), 0x1241);
    }

    #[test]
    fn byte_count_garbage_breaks_the_count() {
        let Reply::Pdu(p) = garble(vec![0x03, 2, 0, 1], GarbageMode::ByteCount) else {
            panic!()
        };
        assert_eq!(p, vec![0x03, 3, 0, 1]);
        let Reply::Raw(r) = garble(vec![0x03, 2, 0, 1], GarbageMode::Noise) else {
            panic!()
        };
        assert!(r.len() >= 8 && r[2] != 0);
    }
}
