//! The CPU backend: ring all-reduce between the worker processes over TCP, so data
//! parallelism runs (and is tested) on machines without GPUs.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

use tch::{Device, Kind, Tensor};

use crate::store::Store;
use crate::{Collective, DistError};

/// Each rank sends to the next rank and receives from the previous one.
pub struct Ring {
    rank: usize,
    world: usize,
    next: TcpStream,
    prev: TcpStream,
}

impl Ring {
    /// Joins the ring `name`: publishes this rank's listening address in the store, connects
    /// to the next rank and accepts the previous one. Needs `world >= 2`.
    pub fn connect(
        store: &mut Store,
        name: &str,
        rank: usize,
        world: usize,
        timeout: Duration,
    ) -> Result<Ring, DistError> {
        assert!(world >= 2, "a ring needs two ranks");
        let listener =
            TcpListener::bind((store.local_ip, 0)).map_err(|e| DistError::io("opening this rank's ring port", e))?;
        let addr = listener.local_addr().map_err(|e| DistError::io("this rank's ring port", e))?;
        store.set(&format!("{name}/{rank}"), addr.to_string().as_bytes())?;
        let next_rank = (rank + 1) % world;
        let next_addr = store.get(&format!("{name}/{next_rank}"), timeout)?.ok_or_else(|| {
            DistError::Timeout(format!(
                "rank {next_rank} never published its ring address within {}s",
                timeout.as_secs()
            ))
        })?;
        let next_addr = String::from_utf8_lossy(&next_addr).into_owned();
        let mut next = TcpStream::connect(&next_addr)
            .map_err(|e| DistError::io(format!("connecting to rank {next_rank} at {next_addr}"), e))?;
        next.write_all(&(rank as u32).to_le_bytes())
            .map_err(|e| DistError::io(format!("greeting rank {next_rank}"), e))?;
        let (mut prev, _) = listener.accept().map_err(|e| DistError::io("accepting the previous rank", e))?;
        let mut greeting = [0u8; 4];
        prev.read_exact(&mut greeting).map_err(|e| DistError::io("reading the previous rank's greeting", e))?;
        let prev_rank = (rank + world - 1) % world;
        if u32::from_le_bytes(greeting) as usize != prev_rank {
            return Err(DistError::Protocol(format!(
                "rank {rank} expected rank {prev_rank} in the ring, got {}",
                u32::from_le_bytes(greeting)
            )));
        }
        for s in [&next, &prev] {
            let _ = s.set_nodelay(true);
        }
        Ok(Ring { rank, world, next, prev })
    }

    /// Sends `send` to the next rank while receiving `recv` from the previous one.
    fn exchange(&mut self, send: &[u8], recv: &mut [u8]) -> Result<(), DistError> {
        let (next, prev) = (&mut self.next, &mut self.prev);
        let (sent, received) = std::thread::scope(|s| {
            let sender = s.spawn(move || next.write_all(send));
            let received = prev.read_exact(recv);
            (sender.join().expect("ring sender thread"), received)
        });
        let rank = self.rank;
        sent.map_err(|e| {
            DistError::io(format!("sending to rank {} (has it failed? see its message)", (rank + 1) % self.world), e)
        })?;
        received.map_err(|e| {
            DistError::io(
                format!(
                    "receiving from rank {} (has it failed? see its message)",
                    (rank + self.world - 1) % self.world
                ),
                e,
            )
        })
    }

    /// Sums `data` over the ranks: a reduce-scatter then an all-gather, `world - 1` steps
    /// each, every chunk summed once, so all ranks end with bit-identical values.
    pub fn all_reduce_f32(&mut self, data: &mut [f32]) -> Result<(), DistError> {
        self.reduce_scatter_f32(data)?;
        self.all_gather_f32(data)
    }

    /// The bounds of chunk `i` of `len` values cut into `world` nearly equal chunks.
    fn chunk(&self, len: usize, i: usize) -> (usize, usize) {
        (len * i / self.world, len * (i + 1) / self.world)
    }

    /// Sums `data` over the ranks into this rank's chunk (chunk `rank` of `world`); the
    /// other chunks are left partly summed.
    pub fn reduce_scatter_f32(&mut self, data: &mut [f32]) -> Result<(), DistError> {
        // After step s, chunk (rank - s - 2) holds s + 2 ranks' sum; the last step ends with
        // chunk `rank` whole.
        self.ring_steps(data, |rank, n, s| ((rank + 2 * n - s - 1) % n, (rank + 2 * n - s - 2) % n), |x, y| *x += y)
    }

    /// Fills every chunk of `data` with its owner's (rank `i` owns chunk `i`): an all-gather.
    pub fn all_gather_f32(&mut self, data: &mut [f32]) -> Result<(), DistError> {
        self.ring_steps(data, |rank, n, s| ((rank + n - s) % n, (rank + 2 * n - s - 1) % n), |x, y| *x = y)
    }

    /// `world - 1` ring steps: at step s this rank sends chunk `send_recv(rank, world, s).0`
    /// to the next rank and merges the previous rank's into chunk `.1`.
    fn ring_steps(
        &mut self,
        data: &mut [f32],
        send_recv: impl Fn(usize, usize, usize) -> (usize, usize),
        merge: impl Fn(&mut f32, f32),
    ) -> Result<(), DistError> {
        let mut recv = Vec::new();
        for s in 0..self.world - 1 {
            let (send_chunk, recv_chunk) = send_recv(self.rank, self.world, s);
            let (a, b) = self.chunk(data.len(), send_chunk);
            let send: Vec<u8> = data[a..b].iter().flat_map(|x| x.to_le_bytes()).collect();
            let (c, d) = self.chunk(data.len(), recv_chunk);
            recv.resize((d - c) * 4, 0);
            self.exchange(&send, &mut recv)?;
            for (x, bytes) in data[c..d].iter_mut().zip(recv.chunks_exact(4)) {
                merge(x, f32::from_le_bytes(bytes.try_into().unwrap()));
            }
        }
        Ok(())
    }

    /// Passes rank `root`'s bytes around the ring.
    fn broadcast_bytes(&mut self, data: &mut [u8], root: usize) -> Result<(), DistError> {
        let n = self.world;
        let rank = self.rank;
        let lost = |what: &str, peer: usize, e| DistError::io(format!("{what} rank {peer} during a broadcast"), e);
        if rank != root {
            self.prev.read_exact(data).map_err(|e| lost("receiving from", (rank + n - 1) % n, e))?;
        }
        if (rank + 1) % n != root {
            self.next.write_all(data).map_err(|e| lost("sending to", (rank + 1) % n, e))?;
        }
        Ok(())
    }
}

/// A tensor's values as f32 on the host (exact for bf16, f16 and f32).
fn host_values(tensor: &Tensor) -> Result<Vec<f32>, DistError> {
    let flat = tensor.to_device(Device::Cpu).to_kind(Kind::Float).contiguous().view(-1);
    Ok(Vec::<f32>::try_from(&flat)?)
}

/// Writes host values back into `tensor`, in its own kind and device.
fn store_values(tensor: &Tensor, values: &[f32]) {
    tensor.shallow_clone().copy_(&Tensor::from_slice(values).view(tensor.size().as_slice()));
}

impl Collective for Ring {
    fn all_reduce_sum(&mut self, tensor: &Tensor) -> Result<(), DistError> {
        let mut values = host_values(tensor)?;
        self.all_reduce_f32(&mut values)?;
        store_values(tensor, &values);
        Ok(())
    }

    fn reduce_scatter_sum(&mut self, output: &Tensor, input: &Tensor) -> Result<(), DistError> {
        crate::check_shares("reduce-scatter", output, input, self.world)?;
        let mut values = host_values(input)?;
        self.reduce_scatter_f32(&mut values)?;
        let (a, b) = self.chunk(values.len(), self.rank);
        store_values(output, &values[a..b]);
        Ok(())
    }

    fn all_gather(&mut self, output: &Tensor, input: &Tensor) -> Result<(), DistError> {
        crate::check_shares("all-gather", input, output, self.world)?;
        let mut values = vec![0.0; output.numel()];
        let (a, b) = self.chunk(values.len(), self.rank);
        values[a..b].copy_from_slice(&host_values(input)?);
        self.all_gather_f32(&mut values)?;
        store_values(output, &values);
        Ok(())
    }

    fn broadcast(&mut self, tensor: &Tensor, root: usize) -> Result<(), DistError> {
        let values = host_values(tensor)?;
        let mut bytes: Vec<u8> = values.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.broadcast_bytes(&mut bytes, root)?;
        let values: Vec<f32> = bytes.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
        store_values(tensor, &values);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `world` rings in threads of this process, each given its rank. The timeouts are
    /// generous: libtorch's store looks up the name of each client it accepts, and a slow
    /// resolver (seen here: seconds on loopback) stalls it.
    fn with_ring<T: Send>(world: usize, f: impl Fn(usize, &mut Ring) -> T + Sync) -> Vec<T> {
        let host = Store::host(0, "127.0.0.1", Duration::from_secs(60)).unwrap();
        let port = host.port();
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..world)
                .map(|rank| {
                    let f = &f;
                    s.spawn(move || {
                        let mut client = Store::connect("127.0.0.1", port, Duration::from_secs(60)).unwrap();
                        let mut ring =
                            Ring::connect(&mut client, "ring", rank, world, Duration::from_secs(60)).unwrap();
                        f(rank, &mut ring)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    #[test]
    fn ring_all_reduce_sums_every_rank_and_agrees_bit_for_bit() {
        for world in [2, 3, 5] {
            // 7 values: chunks of unequal (and, for 5 ranks, some of one) length.
            let results = with_ring(world, |rank, ring| {
                let mut data: Vec<f32> = (0..7).map(|i| (rank * 10 + i) as f32 * 0.1).collect();
                ring.all_reduce_f32(&mut data).unwrap();
                data
            });
            assert_eq!(results[0].len(), 7);
            for (i, got) in results[0].iter().enumerate() {
                let want: f32 = (0..world).map(|r| (r * 10 + i) as f32 * 0.1).sum();
                assert!((got - want).abs() < 1e-5, "world {world}: {got} vs {want}");
            }
            assert!(results.iter().all(|r| r == &results[0]), "ranks disagree: {results:?}");
        }
    }

    #[test]
    fn reduce_scatter_leaves_each_rank_its_share_and_all_gather_joins_them() {
        for world in [2, 3, 4] {
            let results = with_ring(world, |rank, ring| {
                let input = Tensor::arange(2 * world as i64, (Kind::Float, Device::Cpu)) * (rank as f64 + 1.0);
                let share = Tensor::zeros([2], (Kind::BFloat16, Device::Cpu));
                ring.reduce_scatter_sum(&share, &input.to_kind(Kind::BFloat16)).unwrap();
                let gathered = Tensor::zeros([2 * world as i64], (Kind::Float, Device::Cpu));
                ring.all_gather(&gathered, &(share.to_kind(Kind::Float) + rank as f64 * 100.0)).unwrap();
                (Vec::<f32>::try_from(share.to_kind(Kind::Float)).unwrap(), Vec::<f32>::try_from(&gathered).unwrap())
            });
            // Every rank's input is its (rank + 1) times 0, 1, 2, ...: the sum is w(w+1)/2 times that.
            let factor = (world * (world + 1) / 2) as f32;
            let mut all = vec![];
            for (rank, (share, _)) in results.iter().enumerate() {
                assert_eq!(share, &[(2 * rank) as f32 * factor, (2 * rank + 1) as f32 * factor], "world {world}");
                all.extend(share.iter().map(|x| x + rank as f32 * 100.0));
            }
            assert!(results.iter().all(|(_, gathered)| gathered == &all), "world {world}: {results:?}");
        }
        let (share, whole) =
            (Tensor::zeros([3], (Kind::Float, Device::Cpu)), Tensor::zeros([5], (Kind::Float, Device::Cpu)));
        let refused = crate::check_shares("reduce-scatter", &share, &whole, 2).unwrap_err().to_string();
        assert!(refused.contains("reduce-scatter of 5 elements over 2 ranks needs shares of 2.5, got 3"), "{refused}");
    }

    #[test]
    fn tensors_reduce_and_broadcast_in_their_own_kind() {
        let results = with_ring(3, |rank, ring| {
            let t = Tensor::full([2, 3], rank as f64 + 1.0, (Kind::BFloat16, Device::Cpu));
            ring.all_reduce_sum(&t).unwrap();
            let b = Tensor::full([4], rank as f64, (Kind::Float, Device::Cpu));
            ring.broadcast(&b, 1).unwrap();
            (t.kind(), t.double_value(&[1, 2]), Vec::<f32>::try_from(&b).unwrap())
        });
        for (kind, sum, broadcast) in results {
            assert_eq!((kind, sum, broadcast), (Kind::BFloat16, 6.0, vec![1.0; 4]));
        }
    }
}
