//! From gradients to an update, as `train.sharding` says: replicated (every rank averages
//! the whole gradient and keeps the whole optimizer state, as DDP) or sharded (ZeRO): the
//! gradients are reduce-scattered so that each rank holds its share of their mean (see
//! [`pg2_dist::shard`]), each rank updates the f32 master weights and Adam moments of its
//! share alone, and the new weights are all-gathered into every rank's parameters; with
//! the parameters sharded too (`full`), each layer's stay as shares and are gathered only
//! when the model runs the layer (see [`crate::layer_shards`]).
//!
//! In checkpoints the replicated state is `optimizer.safetensors` (`m.<param>`,
//! `v.<param>`, `master.<param>`), the sharded one a file per rank,
//! `optimizer-rank-RRRRR-of-WWWWW.safetensors`, whose tensors are runs of those
//! (`m.<param>@<offset>`: elements from `offset` on of the flattened state). Either is read
//! back into either layout, at any number of workers.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use pg2_dist::shard::Piece;
use pg2_dist::{Group, OverlappedReduction, ShardLayout};
use pg2_model::{checkpoint, Layer};
use pg2_optim::{Adam, AdamConfig, ParamGroup};
use tch::{Kind, Tensor};

use crate::layer_shards::{LayerShards, WholeLayers};
use crate::recipe::Sharding;

/// The parameters a run trains, with their optimizer settings.
pub struct Trainable {
    pub params: Vec<(String, Tensor)>,
    pub groups: Vec<ParamGroup>,
}

impl Trainable {
    /// The parameters by name (sharing their tensors).
    fn named(&self) -> Vec<(String, Tensor)> {
        self.params.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect()
    }
}

/// How this rank turns its gradients into an update; see the module docs.
pub enum Update {
    Replicated {
        optimizer: Adam,
        /// Averaging during backward (several workers, `train.overlap_reduction`).
        overlap: Option<OverlappedReduction>,
        bucket_bytes: usize,
    },
    Sharded(Sharded),
}

impl Update {
    /// Sets up `sharding` of `trainable` over `group`, in buckets of `bucket_bytes`, with
    /// reductions overlapped with backward where `overlap` and the backend allow.
    pub fn new(
        trainable: Trainable,
        config: AdamConfig,
        sharding: Sharding,
        bucket_bytes: usize,
        overlap: bool,
        group: &mut Group,
    ) -> Result<Update> {
        if sharding == Sharding::None {
            let overlap = match overlap {
                true => group.overlapped_reduction(trainable.named(), bucket_bytes)?,
                false => None,
            };
            let optimizer = Adam::from_groups(trainable.params, trainable.groups, config);
            return Ok(Update::Replicated { optimizer, overlap, bucket_bytes });
        }
        Ok(Update::Sharded(Sharded::new(trainable, config, sharding, bucket_bytes, overlap, group)?))
    }

    /// Call before each micro-batch's backward pass (`last`: the update's last one).
    pub fn before_backward(&self, last: bool) {
        match self {
            Update::Replicated { overlap: Some(overlap), .. } if last => overlap.arm(),
            Update::Sharded(s) => s.before_backward(last),
            _ => {}
        }
    }

    /// Call after each micro-batch's backward pass: the reductions due by then.
    pub fn after_backward(&mut self, last: bool, group: &mut Group) -> Result<()> {
        match self {
            Update::Replicated { overlap: Some(overlap), .. } if last => Ok(overlap.finish()?),
            Update::Replicated { optimizer, overlap: None, bucket_bytes } if last && group.world() > 1 => {
                let grads = optimizer
                    .params()
                    .iter()
                    .map(|(name, p)| Some(p.grad()).filter(Tensor::defined).with_context(|| no_gradient(name)))
                    .collect::<Result<Vec<_>>>()?;
                Ok(group.all_reduce_mean(&grads, *bucket_bytes)?)
            }
            Update::Replicated { .. } => Ok(()),
            Update::Sharded(s) => s.after_backward(last, group),
        }
    }

    /// The global norm of the averaged gradient (f32, on the device), after scaling the
    /// gradients down to `max_norm` when it is larger.
    pub fn clip(&mut self, max_norm: Option<f64>, group: &mut Group) -> Result<Tensor> {
        match self {
            Update::Replicated { optimizer, .. } => Ok(optimizer.clip_grad_norm(max_norm)),
            Update::Sharded(s) => s.clip(max_norm, group),
        }
    }

    /// Steps the optimizer with the schedule's `factor` unless `skip` (1 on the device) says
    /// the step is non-finite; every rank's parameters end alike.
    pub fn step(&mut self, factor: f64, skip: &Tensor, group: &mut Group) -> Result<()> {
        match self {
            Update::Replicated { optimizer, .. } => {
                optimizer.step_unless(factor, Some(skip));
                Ok(())
            }
            Update::Sharded(s) => s.step(factor, skip, group),
        }
    }

    /// The optimizer state this rank saves: its file's name within a checkpoint and its
    /// tensors. Replicated state is the same on every rank and saved by rank 0 alone.
    pub fn state(&self) -> (String, Vec<(String, Tensor)>) {
        match self {
            Update::Replicated { optimizer, .. } => (REPLICATED_FILE.into(), optimizer.state()),
            Update::Sharded(s) => (shard_file(s.layout.rank, s.layout.world), s.state()),
        }
    }

    /// Whether every rank saves a state file of its own.
    pub fn sharded(&self) -> bool {
        matches!(self, Update::Sharded(_))
    }

    /// The layers' parameters, where they are sharded (`full`): for the model to gather.
    pub fn layer_shards(&self) -> Option<Arc<LayerShards>> {
        match self {
            Update::Sharded(s) => s.layers.clone(),
            Update::Replicated { .. } => None,
        }
    }

    /// Every layer's parameters whole until the guard drops (a collective where they are
    /// sharded: every rank calls it together); `None` where they always are.
    pub fn whole_layers(&self) -> Result<Option<WholeLayers<'_>>> {
        match self {
            Update::Sharded(Sharded { layers: Some(layers), .. }) => Ok(Some(layers.whole()?)),
            _ => Ok(None),
        }
    }

    /// Restores the optimizer state of `checkpoint` (saved in either layout, by any number
    /// of workers) after `steps` updates.
    pub fn load_state(&mut self, checkpoint: &Path, steps: u64) -> Result<()> {
        match self {
            Update::Replicated { optimizer, .. } => {
                let wanted: Vec<Wanted> = optimizer
                    .params()
                    .iter()
                    .flat_map(|(name, p)| {
                        let prefixes: &[&'static str] = match p.kind() {
                            Kind::Float => &["m", "v"],
                            _ => &["m", "v", "master"],
                        };
                        prefixes.iter().map(move |&prefix| Wanted {
                            key: format!("{prefix}.{name}"),
                            prefix,
                            param: name.clone(),
                            offset: 0,
                            len: p.numel() as i64,
                        })
                    })
                    .collect();
                let state = read_state(checkpoint, &wanted)?;
                optimizer.load_state(state, steps as i64).map_err(|e| anyhow::anyhow!("{}: {e}", checkpoint.display()))
            }
            Update::Sharded(s) => s.load_state(checkpoint, steps),
        }
    }
}

/// The replicated optimizer state's file.
const REPLICATED_FILE: &str = "optimizer.safetensors";

/// Rank `rank`'s optimizer state file among `world`.
pub(crate) fn shard_file(rank: usize, world: usize) -> String {
    format!("optimizer-rank-{rank:05}-of-{world:05}.safetensors")
}

fn no_gradient(name: &str) -> String {
    format!("`{name}` got no gradient; every trainable parameter needs one with several workers")
}

/// The sharded update of one rank (ZeRO-1, 2 and 3).
pub struct Sharded {
    /// ZeRO-2 and 3 (`gradients`, `full`) reduce every micro-batch and keep no whole
    /// gradient between them; ZeRO-1 (`optimizer`) accumulates whole gradients and reduces
    /// once.
    every_micro_batch: bool,
    layout: ShardLayout,
    names: Vec<String>,
    params: Vec<Tensor>,
    /// This rank's f32 share of each bucket: the master weights its pieces update.
    master: Vec<Tensor>,
    /// This rank's share of each bucket's gradient summed over the ranks (f32; over the
    /// micro-batches too), then its mean.
    grads: Vec<Tensor>,
    pieces: Vec<Piece>,
    /// Adam over the pieces (views of `master`), named `<param>@<offset>`.
    optimizer: Adam,
    /// Reduce-scatter during backward (several workers, `train.overlap_reduction`).
    overlap: Option<OverlappedReduction>,
    /// The layers whose parameters are kept as shares (`full`).
    layers: Option<Arc<LayerShards>>,
}

impl Sharded {
    fn new(
        trainable: Trainable,
        config: AdamConfig,
        sharding: Sharding,
        bucket_bytes: usize,
        overlap: bool,
        group: &mut Group,
    ) -> Result<Sharded> {
        let (names, params): (Vec<String>, Vec<Tensor>) = trainable.named().into_iter().unzip();
        let layout = match sharding {
            Sharding::Full => {
                // Each layer's tensors are gathered as one.
                let layers: Vec<Option<Layer>> = names.iter().map(|n| Layer::of(n)).collect();
                let units: Vec<Option<usize>> =
                    layers.iter().map(|l| l.map(|l| layers.iter().position(|m| *m == Some(l)).unwrap())).collect();
                ShardLayout::with_units(&params, &units, bucket_bytes, group.rank(), group.world())
            }
            _ => ShardLayout::new(&params, bucket_bytes, group.rank(), group.world()),
        };
        let (master, grads): (Vec<Tensor>, Vec<Tensor>) = (0..layout.buckets.len())
            .map(|b| {
                let share = layout.buckets[b].share;
                let flat = tch::no_grad(|| layout.flatten(b, &layout.select(b, &params)));
                let mine = flat.narrow(0, layout.rank as i64 * share, share).to_kind(Kind::Float).copy();
                (mine, Tensor::zeros([share], (Kind::Float, flat.device())))
            })
            .unzip();
        let pieces = layout.pieces();
        let named_pieces = pieces
            .iter()
            .map(|p| (format!("{}@{}", names[p.tensor], p.offset), master[p.bucket].narrow(0, p.at, p.len)))
            .collect();
        let groups = pieces.iter().map(|p| trainable.groups[p.tensor]).collect();
        let optimizer = Adam::from_groups(named_pieces, groups, config);
        let overlap = match overlap {
            true => group.sharded_reduction(trainable.named(), &layout)?,
            false => None,
        };
        let every_micro_batch = matches!(sharding, Sharding::Gradients | Sharding::Full);
        let layers = (sharding == Sharding::Full)
            .then(|| Arc::new(LayerShards::new(&layout, &names, &params, &master, group.param_gather())));
        Ok(Sharded { every_micro_batch, layout, names, params, master, grads, pieces, optimizer, overlap, layers })
    }

    fn reduces(&self, last: bool) -> bool {
        last || self.every_micro_batch
    }

    fn before_backward(&self, last: bool) {
        if let Some(overlap) = self.overlap.as_ref().filter(|_| self.reduces(last)) {
            overlap.arm();
        }
    }

    /// Adds this rank's share of the gradients' sum over the ranks into `grads`, and frees
    /// the whole gradients.
    fn after_backward(&mut self, last: bool, group: &mut Group) -> Result<()> {
        if !self.reduces(last) {
            return Ok(());
        }
        match &mut self.overlap {
            Some(overlap) => {
                for (b, share) in overlap.finish_shares()? {
                    self.grads[b] += share.to_kind(Kind::Float);
                }
            }
            None => {
                for b in 0..self.layout.buckets.len() {
                    let members = self.layout.select(b, &self.params);
                    let grads = members
                        .iter()
                        .zip(&self.layout.buckets[b].members)
                        .map(|(p, &i)| {
                            Some(p.grad()).filter(Tensor::defined).with_context(|| no_gradient(&self.names[i]))
                        })
                        .collect::<Result<Vec<_>>>()?;
                    let flat = self.layout.flatten(b, &grads);
                    let share = Tensor::zeros([self.layout.buckets[b].share], (flat.kind(), flat.device()));
                    group.reduce_scatter_sum(&share, &flat)?;
                    self.grads[b] += share.to_kind(Kind::Float);
                    members.iter().for_each(pg2_dist::release_grad);
                }
            }
        }
        Ok(())
    }

    fn clip(&mut self, max_norm: Option<f64>, group: &mut Group) -> Result<Tensor> {
        let world = self.layout.world as f64;
        for g in &mut self.grads {
            *g /= world;
        }
        // The shares are disjoint and padded with zeros: their squares add up to the whole's.
        let norm = pg2_optim::squared_norm(&self.grads);
        group.all_reduce_sum(&norm)?;
        let norm = norm.sqrt();
        if let Some(max) = max_norm {
            pg2_optim::clip_to(&self.grads, &norm, max);
        }
        Ok(norm)
    }

    fn step(&mut self, factor: f64, skip: &Tensor, group: &mut Group) -> Result<()> {
        let grads: Vec<Tensor> = self.pieces.iter().map(|p| self.grads[p.bucket].narrow(0, p.at, p.len)).collect();
        self.optimizer.step_with(factor, Some(skip), &grads);
        for g in &mut self.grads {
            let _ = g.zero_();
        }
        tch::no_grad(|| -> Result<()> {
            for (b, master) in self.master.iter().enumerate() {
                if let Some(layers) = self.layers.as_ref().filter(|l| l.holds(b)) {
                    layers.refresh(b, master);
                    continue;
                }
                let bucket = &self.layout.buckets[b];
                let whole = Tensor::zeros([bucket.share * self.layout.world as i64], (bucket.kind, master.device()));
                group.all_gather(&whole, &master.to_kind(bucket.kind))?;
                self.layout.unflatten(b, &whole, &self.layout.select(b, &self.params));
            }
            Ok(())
        })
    }

    /// Adam's moments of the pieces, and their master weights where the parameters are
    /// stored in a lower precision.
    fn state(&self) -> Vec<(String, Tensor)> {
        let mut state = self.optimizer.state();
        for ((name, piece), p) in self.optimizer.params().iter().zip(&self.pieces) {
            if self.params[p.tensor].kind() != Kind::Float {
                state.push((format!("master.{name}"), piece.shallow_clone()));
            }
        }
        state
    }

    fn load_state(&mut self, checkpoint: &Path, steps: u64) -> Result<()> {
        let lower_precision = |p: &Piece| self.params[p.tensor].kind() != Kind::Float;
        let mut wanted = vec![];
        for p in &self.pieces {
            let prefixes: &[&'static str] = if lower_precision(p) { &["m", "v", "master"] } else { &["m", "v"] };
            for &prefix in prefixes {
                let param = self.names[p.tensor].clone();
                let key = format!("{prefix}.{param}@{}", p.offset);
                wanted.push(Wanted { key, prefix, param, offset: p.offset, len: p.len });
            }
        }
        let mut state = read_state(checkpoint, &wanted)?;
        tch::no_grad(|| {
            for p in self.pieces.iter().filter(|p| lower_precision(p)) {
                let key = format!("master.{}@{}", self.names[p.tensor], p.offset);
                let saved = state.remove(&key).expect("read_state returns every wanted tensor");
                self.master[p.bucket].narrow(0, p.at, p.len).copy_(&saved);
            }
        });
        self.optimizer.load_state(state, steps as i64).map_err(|e| anyhow::anyhow!("{}: {e}", checkpoint.display()))
    }
}

/// A run of one optimizer state tensor wanted from a checkpoint: `len` elements of state
/// `prefix` (`m`, `v`, `master`) of parameter `param` from flat element `offset` on, to be
/// returned under `key`.
struct Wanted {
    key: String,
    prefix: &'static str,
    param: String,
    offset: i64,
    len: i64,
}

/// The optimizer state files of `checkpoint`: `optimizer.safetensors`, or every rank's file.
fn state_files(checkpoint: &Path) -> Result<Vec<PathBuf>> {
    let replicated = checkpoint.join(REPLICATED_FILE);
    if replicated.is_file() {
        return Ok(vec![replicated]);
    }
    let mut world = None;
    let listing = std::fs::read_dir(checkpoint).with_context(|| format!("listing {}", checkpoint.display()))?;
    for entry in listing {
        let name = entry.with_context(|| format!("listing {}", checkpoint.display()))?.file_name();
        let name = name.to_string_lossy();
        if let Some(of) = name.strip_prefix("optimizer-rank-").and_then(|rest| rest.split("-of-").nth(1)) {
            world = of.trim_end_matches(".safetensors").parse::<usize>().ok();
        }
    }
    let Some(world) = world else {
        bail!(
            "{}: no optimizer state ({REPLICATED_FILE} or optimizer-rank-*.safetensors); resume from another checkpoint",
            checkpoint.display()
        )
    };
    let files: Vec<PathBuf> = (0..world).map(|r| checkpoint.join(shard_file(r, world))).collect();
    if let Some(missing) = files.iter().find(|f| !f.is_file()) {
        bail!("{}: missing; the checkpoint's optimizer state is incomplete", missing.display());
    }
    Ok(files)
}

/// Reads `wanted` out of `checkpoint`'s optimizer state, whichever layout saved it: each
/// saved run that overlaps a wanted one is copied, straight from the file's memory map, so
/// a rank reads from disk only the bytes of its own share. Returns f32 tensors by `key`,
/// flat.
fn read_state(checkpoint: &Path, wanted: &[Wanted]) -> Result<BTreeMap<String, Tensor>> {
    let mut by_param: BTreeMap<(&str, &str), Vec<usize>> = BTreeMap::new();
    for (i, w) in wanted.iter().enumerate() {
        by_param.entry((w.prefix, w.param.as_str())).or_default().push(i);
    }
    let values: Vec<Tensor> = wanted.iter().map(|w| Tensor::zeros([w.len], (Kind::Float, tch::Device::Cpu))).collect();
    let mut covered = vec![0i64; wanted.len()];
    for file in state_files(checkpoint)? {
        checkpoint::visit_file(&file, |key, kind, data| {
            let Some((prefix, rest)) = key.split_once('.') else { return Ok(()) };
            let (param, offset) = match rest.rsplit_once('@').and_then(|(p, o)| Some((p, o.parse::<i64>().ok()?))) {
                Some(split) => split,
                None => (rest, 0),
            };
            let Some(indices) = by_param.get(&(prefix, param)) else { return Ok(()) };
            if kind != Kind::Float {
                return Err(pg2_model::ModelError::Checkpoint(format!(
                    "{}: `{key}` is {kind:?}; pg2 saves optimizer state in f32",
                    file.display()
                )));
            }
            let end = offset + (data.len() / 4) as i64;
            for &i in indices {
                let w = &wanted[i];
                let (from, to) = (offset.max(w.offset), end.min(w.offset + w.len));
                if from < to {
                    let bytes = &data[(from - offset) as usize * 4..(to - offset) as usize * 4];
                    let run = Tensor::f_from_data_size(bytes, &[to - from], Kind::Float)
                        .map_err(|e| pg2_model::ModelError::Checkpoint(format!("{}: `{key}`: {e}", file.display())))?;
                    values[i].narrow(0, from - w.offset, to - from).copy_(&run);
                    covered[i] += to - from;
                }
            }
            Ok(())
        })?;
    }
    if let Some(i) = (0..wanted.len()).find(|&i| covered[i] != wanted[i].len) {
        let w = &wanted[i];
        bail!(
            "{}: the optimizer state holds {} of the {} elements of `{}.{}` from {} on; was it saved for another model?",
            checkpoint.display(),
            covered[i],
            w.len,
            w.prefix,
            w.param,
            w.offset
        );
    }
    Ok(wanted.iter().map(|w| w.key.clone()).zip(values).collect())
}
