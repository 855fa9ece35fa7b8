//! The rendezvous: a small TCP key-value store hosted by rank 0 (the role of PyTorch's
//! TCPStore). Workers publish their ring addresses and the NCCL id through it and meet at
//! barriers; a barrier that times out names the ranks that never arrived.
//!
//! Wire format, both ways: a one-byte code, then length-prefixed (u32, little-endian) byte
//! strings. Requests: `SET key value`, `GET key timeout_ms` (waits until the key exists).
//! Replies: `OK value` or `TIMEOUT`.

use std::collections::HashMap;
use std::io::{BufReader, BufWriter, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::DistError;

const SET: u8 = 1;
const GET: u8 = 2;
const OK: u8 = 0;
const TIMEOUT: u8 = 1;

type Shared = Arc<(Mutex<HashMap<Vec<u8>, Vec<u8>>>, Condvar)>;

/// Serves the store from a background thread for as long as the process lives.
pub fn host(port: u16) -> Result<SocketAddr, DistError> {
    let listener = TcpListener::bind(("0.0.0.0", port)).map_err(|e| {
        DistError::io(format!("hosting the store on port {port} (in use? pass another --master-port)"), e)
    })?;
    let addr = listener.local_addr().map_err(|e| DistError::io("the store's address", e))?;
    let shared: Shared = Arc::default();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let shared = shared.clone();
            std::thread::spawn(move || serve(conn, shared));
        }
    });
    Ok(addr)
}

/// Answers one client until it hangs up.
fn serve(conn: TcpStream, shared: Shared) {
    let _ = conn.set_nodelay(true);
    let Ok(writer) = conn.try_clone() else { return };
    let (mut reader, mut writer) = (BufReader::new(conn), BufWriter::new(writer));
    let (map, changed) = &*shared;
    loop {
        let Ok(code) = read_u8(&mut reader) else { return };
        let (Ok(key), Ok(value)) = (read_bytes(&mut reader), read_bytes(&mut reader)) else { return };
        let reply = match code {
            SET => {
                map.lock().unwrap().insert(key, value);
                changed.notify_all();
                Some(Vec::new())
            }
            GET => {
                let ms = u64::from_le_bytes(value.try_into().unwrap_or_default());
                let deadline = Instant::now() + Duration::from_millis(ms);
                let mut guard = map.lock().unwrap();
                loop {
                    if let Some(v) = guard.get(&key) {
                        break Some(v.clone());
                    }
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        break None;
                    }
                    guard = changed.wait_timeout(guard, left).unwrap().0;
                }
            }
            _ => return,
        };
        let sent = match reply {
            Some(v) => write_u8(&mut writer, OK).and_then(|_| write_bytes(&mut writer, &v)),
            None => write_u8(&mut writer, TIMEOUT),
        };
        if sent.and_then(|_| writer.flush()).is_err() {
            return;
        }
    }
}

/// A connection to the store.
pub struct StoreClient {
    reader: BufReader<TcpStream>,
    writer: BufWriter<TcpStream>,
    /// This end's address, as the store sees it: the interface other ranks reach us on.
    pub local_ip: std::net::IpAddr,
    addr: String,
}

impl StoreClient {
    /// Connects to `addr`, retrying until `timeout` (rank 0 may start after the others).
    pub fn connect(addr: &str, timeout: Duration) -> Result<StoreClient, DistError> {
        let deadline = Instant::now() + timeout;
        let conn = loop {
            let attempt = addr.to_socket_addrs().and_then(|mut addrs| {
                let target =
                    addrs.next().ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "no address"))?;
                TcpStream::connect_timeout(&target, Duration::from_secs(2))
            });
            match attempt {
                Ok(conn) => break conn,
                Err(e) if Instant::now() >= deadline => {
                    return Err(DistError::Timeout(format!(
                        "no store at {addr} after {}s ({e}): is rank 0 running, and are MASTER_ADDR/MASTER_PORT right?",
                        timeout.as_secs()
                    )))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        };
        let _ = conn.set_nodelay(true);
        let local_ip = conn.local_addr().map_err(|e| DistError::io("the store connection", e))?.ip();
        let writer = conn.try_clone().map_err(|e| DistError::io("the store connection", e))?;
        Ok(StoreClient { reader: BufReader::new(conn), writer: BufWriter::new(writer), local_ip, addr: addr.into() })
    }

    fn request(&mut self, code: u8, key: &str, value: &[u8]) -> Result<Option<Vec<u8>>, DistError> {
        let lost = |e| DistError::io(format!("the store at {} (rank 0 gone?)", self.addr), e);
        let sent = write_u8(&mut self.writer, code)
            .and_then(|_| write_bytes(&mut self.writer, key.as_bytes()))
            .and_then(|_| write_bytes(&mut self.writer, value))
            .and_then(|_| self.writer.flush());
        sent.map_err(lost)?;
        match read_u8(&mut self.reader).map_err(lost)? {
            OK => Ok(Some(read_bytes(&mut self.reader).map_err(lost)?)),
            _ => Ok(None),
        }
    }

    /// Sets `key` to `value`, waking everyone waiting for it.
    pub fn set(&mut self, key: &str, value: &[u8]) -> Result<(), DistError> {
        self.request(SET, key, value).map(|_| ())
    }

    /// The value of `key`, waiting up to `timeout` for some rank to set it.
    pub fn get(&mut self, key: &str, timeout: Duration) -> Result<Option<Vec<u8>>, DistError> {
        self.request(GET, key, &(timeout.as_millis() as u64).to_le_bytes())
    }

    /// Waits until all `world` ranks reach the barrier `name`; on timeout the error names
    /// the ranks that never came.
    pub fn barrier(&mut self, name: &str, rank: usize, world: usize, timeout: Duration) -> Result<(), DistError> {
        self.set(&format!("barrier/{name}/{rank}"), b"")?;
        let deadline = Instant::now() + timeout;
        let mut missing = Vec::new();
        for r in 0..world {
            let left = deadline.saturating_duration_since(Instant::now());
            if self.get(&format!("barrier/{name}/{r}"), left)?.is_none() {
                missing.push(r.to_string());
            }
        }
        if missing.is_empty() {
            Ok(())
        } else {
            Err(DistError::Timeout(format!(
                "barrier `{name}`: rank(s) {} of {world} never arrived within {}s",
                missing.join(", "),
                timeout.as_secs()
            )))
        }
    }
}

fn read_u8(r: &mut impl Read) -> std::io::Result<u8> {
    let mut b = [0u8; 1];
    r.read_exact(&mut b)?;
    Ok(b[0])
}

fn read_bytes(r: &mut impl Read) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len)?;
    let mut v = vec![0u8; u32::from_le_bytes(len) as usize];
    r.read_exact(&mut v)?;
    Ok(v)
}

fn write_u8(w: &mut impl Write, b: u8) -> std::io::Result<()> {
    w.write_all(&[b])
}

fn write_bytes(w: &mut impl Write, v: &[u8]) -> std::io::Result<()> {
    w.write_all(&(v.len() as u32).to_le_bytes())?;
    w.write_all(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_wait_for_their_writer_and_barriers_name_the_absent() {
        let port = host(0).unwrap().port();
        let addr = format!("127.0.0.1:{port}");
        let mut a = StoreClient::connect(&addr, Duration::from_secs(5)).unwrap();
        let writer = std::thread::spawn({
            let addr = addr.clone();
            move || {
                let mut b = StoreClient::connect(&addr, Duration::from_secs(5)).unwrap();
                std::thread::sleep(Duration::from_millis(100));
                b.set("id", b"\x00\x01secret").unwrap();
                b.barrier("start", 1, 2, Duration::from_secs(5)).unwrap();
            }
        });
        assert_eq!(a.get("id", Duration::from_secs(5)).unwrap().as_deref(), Some(&b"\x00\x01secret"[..]));
        assert_eq!(a.get("never", Duration::from_millis(50)).unwrap(), None);
        a.barrier("start", 0, 2, Duration::from_secs(5)).unwrap();
        writer.join().unwrap();
        let err = a.barrier("alone", 0, 3, Duration::from_millis(200)).unwrap_err().to_string();
        assert!(err.contains("rank(s) 1, 2 of 3 never arrived"), "{err}");
    }

    #[test]
    fn a_missing_store_times_out_with_advice() {
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port(); // closed again
        let err =
            StoreClient::connect(&format!("127.0.0.1:{port}"), Duration::from_millis(300)).err().unwrap().to_string();
        assert!(err.contains("MASTER_ADDR"), "{err}");
    }
}
