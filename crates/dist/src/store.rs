//! The rendezvous: libtorch's own `c10d::TCPStore` (through `c10d_store.cpp`), the store
//! torchrun's agent and torch.distributed host. Rank 0 hosts it (or torchrun's agent
//! does, and every worker joins as a client); workers publish their ring addresses and
//! meet at barriers through it, and a barrier that times out names the ranks that never
//! arrived.

use std::ffi::{c_char, c_void, CStr, CString};
use std::net::{IpAddr, ToSocketAddrs, UdpSocket};
use std::time::{Duration, Instant};

use crate::DistError;

extern "C" {
    fn pg2_c10d_error() -> *const c_char;
    fn pg2_store_new(host: *const c_char, port: u16, is_server: bool, timeout_ms: i64, out: *mut *mut c_void) -> i32;
    fn pg2_store_free(store: *mut c_void);
    fn pg2_store_port(store: *mut c_void) -> u16;
    fn pg2_store_set(store: *mut c_void, key: *const c_char, data: *const u8, len: usize) -> i32;
    fn pg2_store_get(
        store: *mut c_void,
        key: *const c_char,
        timeout_ms: i64,
        data: *mut *mut u8,
        len: *mut usize,
    ) -> i32;
    fn pg2_buffer_free(data: *mut u8);
    fn pg2_store_delete(store: *mut c_void, key: *const c_char) -> i32;
}

/// The shim's message for its last failure on this thread.
fn last_error() -> String {
    // SAFETY: the shim returns a NUL-terminated thread-local string that lives until its next call.
    unsafe { CStr::from_ptr(pg2_c10d_error()) }.to_string_lossy().into_owned()
}

fn c_string(s: &str) -> Result<CString, DistError> {
    CString::new(s).map_err(|_| DistError::Store(format!("{s:?} holds a NUL byte")))
}

/// A connection to the group's `TCPStore` (on rank 0, also the store itself).
pub struct Store {
    handle: *mut c_void,
    /// The interface other ranks reach this one on (the one that routes to the store).
    pub local_ip: IpAddr,
    addr: String,
}

// SAFETY: c10d::TCPStore serialises its client's requests with its own lock.
unsafe impl Send for Store {}

impl Drop for Store {
    fn drop(&mut self) {
        // SAFETY: `handle` came from pg2_store_new and is freed once.
        unsafe { pg2_store_free(self.handle) }
    }
}

impl Store {
    /// Hosts the store on `port` (0: a free one) and connects to it; `master_addr` is how the
    /// other ranks reach this machine.
    pub fn host(port: u16, master_addr: &str, timeout: Duration) -> Result<Store, DistError> {
        Self::open("127.0.0.1", port, true, timeout, master_addr).map_err(|e| match e {
            DistError::Store(msg) => DistError::Store(format!(
                "hosting the store on port {port} (in use? pass another --master-port): {msg}"
            )),
            other => other,
        })
    }

    /// Connects to the store at `host:port`, retrying until `timeout` (rank 0, or torchrun's
    /// agent, may start after this worker).
    pub fn connect(host: &str, port: u16, timeout: Duration) -> Result<Store, DistError> {
        Self::open(host, port, false, timeout, host)
    }

    fn open(host: &str, port: u16, is_server: bool, timeout: Duration, master_addr: &str) -> Result<Store, DistError> {
        let host_c = c_string(host)?;
        let mut handle = std::ptr::null_mut();
        // SAFETY: valid C string and out-pointer; the shim catches every C++ exception.
        let code = unsafe { pg2_store_new(host_c.as_ptr(), port, is_server, timeout.as_millis() as i64, &mut handle) };
        match code {
            0 => {}
            1 => {
                return Err(DistError::Timeout(format!(
                    "no store at {host}:{port} after {}s ({}): is rank 0 (or torchrun) running, and are MASTER_ADDR/MASTER_PORT right?",
                    timeout.as_secs(),
                    last_error()
                )))
            }
            _ => return Err(DistError::Store(last_error())),
        }
        // SAFETY: a live handle.
        let port = unsafe { pg2_store_port(handle) };
        Ok(Store { handle, local_ip: route_to(master_addr, port), addr: format!("{host}:{port}") })
    }

    /// The `c10::intrusive_ptr<c10d::TCPStore>*` behind this store, for the other shims.
    pub(crate) fn raw(&self) -> *mut c_void {
        self.handle
    }

    /// The port the store listens on (the one picked, when hosted on port 0).
    pub fn port(&self) -> u16 {
        // SAFETY: a live handle.
        unsafe { pg2_store_port(self.handle) }
    }

    fn check(&self, code: i32, what: &str) -> Result<(), DistError> {
        match code {
            0 => Ok(()),
            _ => Err(DistError::Store(format!("{what} at the store {} (rank 0 gone?): {}", self.addr, last_error()))),
        }
    }

    /// Sets `key` to `value`, waking everyone waiting for it.
    pub fn set(&mut self, key: &str, value: &[u8]) -> Result<(), DistError> {
        let key_c = c_string(key)?;
        // SAFETY: valid pointers for the call's duration.
        let code = unsafe { pg2_store_set(self.handle, key_c.as_ptr(), value.as_ptr(), value.len()) };
        self.check(code, &format!("setting `{key}`"))
    }

    /// Removes `key` (the store keeps no copy of a consumed value).
    pub fn delete(&mut self, key: &str) -> Result<(), DistError> {
        let key_c = c_string(key)?;
        // SAFETY: valid pointers for the call's duration.
        let code = unsafe { pg2_store_delete(self.handle, key_c.as_ptr()) };
        self.check(code, &format!("deleting `{key}`"))
    }

    /// The value of `key`, waiting up to `timeout` for some rank to set it.
    pub fn get(&mut self, key: &str, timeout: Duration) -> Result<Option<Vec<u8>>, DistError> {
        let key_c = c_string(key)?;
        let (mut data, mut len) = (std::ptr::null_mut(), 0usize);
        // SAFETY: valid pointers; on success the shim hands over a malloc'd buffer of `len` bytes.
        let code = unsafe {
            pg2_store_get(self.handle, key_c.as_ptr(), timeout.as_millis().max(1) as i64, &mut data, &mut len)
        };
        match code {
            0 => {
                // SAFETY: as above; copied out, then released by the shim's free.
                let value = unsafe { std::slice::from_raw_parts(data, len) }.to_vec();
                unsafe { pg2_buffer_free(data) };
                Ok(Some(value))
            }
            1 => Ok(None),
            _ => self.check(code, &format!("reading `{key}`")).map(|_| None),
        }
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

/// This machine's address on the route to `host:port` (a UDP socket's local address after
/// `connect`, which sends nothing); loopback when there is no route.
fn route_to(host: &str, port: u16) -> IpAddr {
    let local = || -> Option<IpAddr> {
        let target = (host, port).to_socket_addrs().ok()?.next()?;
        let socket = UdpSocket::bind(if target.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }).ok()?;
        socket.connect(target).ok()?;
        Some(socket.local_addr().ok()?.ip())
    };
    local().unwrap_or(IpAddr::from([127, 0, 0, 1]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_wait_for_their_writer_and_barriers_name_the_absent() {
        let mut a = Store::host(0, "127.0.0.1", Duration::from_secs(60)).unwrap();
        let port = a.port();
        let writer = std::thread::spawn({
            move || {
                let mut b = Store::connect("127.0.0.1", port, Duration::from_secs(60)).unwrap();
                std::thread::sleep(Duration::from_millis(100));
                b.set("id", b"\x00\x01secret").unwrap();
                b.barrier("start", 1, 2, Duration::from_secs(60)).unwrap();
            }
        });
        assert_eq!(a.get("id", Duration::from_secs(60)).unwrap().as_deref(), Some(&b"\x00\x01secret"[..]));
        assert_eq!(a.get("never", Duration::from_millis(50)).unwrap(), None);
        a.barrier("start", 0, 2, Duration::from_secs(60)).unwrap();
        writer.join().unwrap();
        let err = a.barrier("alone", 0, 3, Duration::from_millis(200)).unwrap_err().to_string();
        assert!(err.contains("rank(s) 1, 2 of 3 never arrived"), "{err}");
    }

    #[test]
    fn a_missing_store_times_out_with_advice() {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port(); // closed again
        let err = Store::connect("127.0.0.1", port, Duration::from_millis(300)).err().unwrap().to_string();
        assert!(err.contains("MASTER_ADDR"), "{err}");
    }
}
