//! The bookkeeping of sharded data parallelism (ZeRO): the trainable tensors are bucketed in
//! reverse order (the order backward produces their gradients), each bucket flattened and
//! zero-padded to `world` equal shares, and rank `r` owns share `r` of every bucket: the
//! gradient elements it receives from a reduce-scatter and the optimizer state it keeps.

use tch::{Kind, Tensor};

/// One bucket: consecutive tensors of one kind, flattened in `members` order.
#[derive(Debug, Clone, PartialEq)]
pub struct Bucket {
    /// Indices of its tensors, in flat order.
    pub members: Vec<usize>,
    /// Elements of each member, in the same order.
    pub numels: Vec<i64>,
    /// Elements of each rank's share (the padded length over `world`).
    pub share: i64,
    pub kind: Kind,
}

/// A run of one tensor's elements that lies in this rank's share of its bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    /// The tensor's index.
    pub tensor: usize,
    /// Where the run starts in the flattened tensor.
    pub offset: i64,
    pub len: i64,
    pub bucket: usize,
    /// Where the run starts in this rank's share of the bucket.
    pub at: i64,
}

/// How a list of tensors is cut into shares over a group; see the module docs.
#[derive(Debug, Clone, PartialEq)]
pub struct ShardLayout {
    pub rank: usize,
    pub world: usize,
    pub buckets: Vec<Bucket>,
}

impl ShardLayout {
    /// Buckets of at most `bucket_bytes` (a larger tensor goes alone) over `tensors`, in
    /// reverse order, each split `world` ways; this rank is `rank`.
    pub fn new(tensors: &[Tensor], bucket_bytes: usize, rank: usize, world: usize) -> ShardLayout {
        let buckets = crate::bucket::buckets(tensors, (0..tensors.len()).rev(), bucket_bytes);
        ShardLayout::with_buckets(tensors, buckets, rank, world)
    }

    /// [`ShardLayout::new`], except that the tensors of one unit (`units[i]`, e.g. a
    /// model layer, gathered as one) form one bucket of their own, whatever its size.
    pub fn with_units(
        tensors: &[Tensor],
        units: &[Option<usize>],
        bucket_bytes: usize,
        rank: usize,
        world: usize,
    ) -> ShardLayout {
        let buckets = crate::bucket::buckets_of_units(tensors, (0..tensors.len()).rev(), bucket_bytes, |i| units[i]);
        ShardLayout::with_buckets(tensors, buckets, rank, world)
    }

    /// The given buckets (tensor indices in flat order, each of one kind) over `tensors`,
    /// each split `world` ways; this rank is `rank`.
    fn with_buckets(tensors: &[Tensor], buckets: Vec<Vec<usize>>, rank: usize, world: usize) -> ShardLayout {
        let buckets = buckets
            .into_iter()
            .map(|members| {
                let numels: Vec<i64> = members.iter().map(|&i| tensors[i].numel() as i64).collect();
                let total: i64 = numels.iter().sum();
                let share = (total + world as i64 - 1) / world as i64;
                Bucket { kind: tensors[members[0]].kind(), members, numels, share }
            })
            .collect();
        ShardLayout { rank, world, buckets }
    }

    /// This rank's pieces, bucket by bucket in flat order.
    pub fn pieces(&self) -> Vec<Piece> {
        let mut pieces = vec![];
        for (b, bucket) in self.buckets.iter().enumerate() {
            let (lo, hi) = (self.rank as i64 * bucket.share, (self.rank as i64 + 1) * bucket.share);
            let mut start = 0;
            for (&tensor, &numel) in bucket.members.iter().zip(&bucket.numels) {
                let (a, z) = (start.max(lo), (start + numel).min(hi));
                if a < z {
                    pieces.push(Piece { tensor, offset: a - start, len: z - a, bucket: b, at: a - lo });
                }
                start += numel;
            }
        }
        pieces
    }

    /// Bucket `b`'s tensors out of `tensors` (indexed as the layout was made), in flat order.
    pub fn select(&self, b: usize, tensors: &[Tensor]) -> Vec<Tensor> {
        self.buckets[b].members.iter().map(|&i| tensors[i].shallow_clone()).collect()
    }

    /// Bucket `b`'s `members` (or their gradients), in flat order, as one flat tensor of
    /// `world` shares, zeros past the end.
    pub fn flatten(&self, b: usize, members: &[Tensor]) -> Tensor {
        pad(crate::bucket::flatten(members), self.buckets[b].share * self.world as i64)
    }

    /// Copies a flat bucket (as [`ShardLayout::flatten`] lays it out) into its `members`.
    pub fn unflatten(&self, b: usize, flat: &Tensor, members: &[Tensor]) {
        let mut start = 0;
        tch::no_grad(|| {
            for (t, &numel) in members.iter().zip(&self.buckets[b].numels) {
                t.shallow_clone().copy_(&flat.narrow(0, start, numel).view_as(t));
                start += numel;
            }
        });
    }
}

/// `flat` with zeros appended up to `len` elements.
pub(crate) fn pad(flat: Tensor, len: i64) -> Tensor {
    let missing = len - flat.numel() as i64;
    match missing {
        0 => flat,
        _ => Tensor::cat(&[flat.shallow_clone(), Tensor::zeros([missing], (flat.kind(), flat.device()))], 0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn every_element_lies_in_exactly_one_ranks_share() {
        // 3, 5, 2 and 7 f32 elements in 32-byte buckets, reversed: [7], [2, 5], [3].
        let tensors: Vec<Tensor> = [3i64, 5, 2, 7]
            .iter()
            .enumerate()
            .map(|(i, &n)| Tensor::arange(n, (Kind::Float, Device::Cpu)) + 100.0 * i as f64)
            .collect();
        for world in [1, 2, 3, 4] {
            let layouts: Vec<ShardLayout> = (0..world).map(|r| ShardLayout::new(&tensors, 32, r, world)).collect();
            let members: Vec<&[usize]> = layouts[0].buckets.iter().map(|b| b.members.as_slice()).collect();
            assert_eq!(members, [&[3][..], &[2, 1], &[0]]);
            let mut seen = vec![vec![0; 7]; 4];
            for layout in &layouts {
                for p in layout.pieces() {
                    assert!(p.at + p.len <= layout.buckets[p.bucket].share, "world {world}: {p:?}");
                    for e in p.offset..p.offset + p.len {
                        seen[p.tensor][e as usize] += 1;
                    }
                }
            }
            for (t, counts) in seen.iter().enumerate() {
                assert!(counts[..tensors[t].numel()].iter().all(|&c| c == 1), "world {world}: {seen:?}");
            }
            // Flattening pads each bucket to whole shares; unflattening puts every value back.
            let layout = &layouts[0];
            let flat = layout.flatten(1, &layout.select(1, &tensors));
            assert_eq!(flat.numel() as i64, layout.buckets[1].share * world as i64);
            assert_eq!(flat.narrow(0, 7, flat.numel() as i64 - 7).abs().sum(Kind::Float).double_value(&[]), 0.0);
            let copies: Vec<Tensor> = tensors.iter().map(Tensor::zeros_like).collect();
            layout.unflatten(1, &flat, &layout.select(1, &copies));
            assert!(copies[1].equal(&tensors[1]) && copies[2].equal(&tensors[2]));
        }
    }
}
