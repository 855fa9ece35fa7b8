//! The parameters of ZeRO-3 (`train.sharding = "full"`). Each layer's trainable tensors form
//! one bucket of the [`ShardLayout`]; between uses a rank keeps only its share of the
//! bucket's weights (in the parameters' kind) and the parameter tensors hold nothing. The
//! model gathers a layer's weights (one all-gather) just before it runs the layer, and
//! again for the re-run in the backward pass, and releases them after each
//! ([`pg2_model::LayerParams`]); the next layer's gather starts as soon as this one's is
//! done, so that on NCCL it runs while the layer computes (the CPU ring's gathers block,
//! so there it only comes earlier). The tensors around the layers (embeddings, final norms,
//! the projector) stay whole on every rank, as FSDP's root unit.

use std::collections::BTreeMap;
use std::sync::Mutex;

use pg2_dist::{DistError, ParamGather, Pending, ShardLayout};
use pg2_model::{Layer, LayerParams};
use tch::{Kind, Tensor};

/// One sharded layer's bucket.
struct LayerBucket {
    /// Its parameters and their shapes, in flat order.
    members: Vec<(Tensor, Vec<i64>)>,
    /// This rank's share of the weights, in the parameters' kind: the f32 master share
    /// itself for f32 parameters, else a copy refreshed by each update.
    weights: Tensor,
    kind: Kind,
    /// Whether the parameters are whole now.
    gathered: bool,
    /// A gather started ahead of use: the flat bucket it fills, and the collective.
    prefetched: Option<(Tensor, Pending)>,
}

/// The sharded layers' buckets (by bucket index), and whether all are kept whole
/// (evaluation, checkpoints).
struct Buckets {
    by_index: BTreeMap<usize, LayerBucket>,
    pinned: bool,
}

/// The sharded layers of one rank; see the module docs.
pub struct LayerShards {
    gather: ParamGather,
    world: i64,
    /// The bucket of each sharded layer.
    of_layer: BTreeMap<Layer, usize>,
    /// Behind a lock: the backward pass may gather from the autograd engine's thread.
    buckets: Mutex<Buckets>,
}

impl LayerShards {
    /// Takes over the buckets of `layout` that hold one layer's tensors (of `params`, named
    /// `names`), whose weights start as `master` (this rank's f32 shares), and releases
    /// those layers' parameters.
    pub fn new(
        layout: &ShardLayout,
        names: &[String],
        params: &[Tensor],
        master: &[Tensor],
        gather: ParamGather,
    ) -> Self {
        let mut of_layer = BTreeMap::new();
        let mut by_index = BTreeMap::new();
        for (b, bucket) in layout.buckets.iter().enumerate() {
            let Some(layer) = Layer::of(&names[bucket.members[0]]) else { continue };
            if bucket.members.iter().any(|&i| Layer::of(&names[i]) != Some(layer)) {
                continue;
            }
            let members = bucket.members.iter().map(|&i| (params[i].shallow_clone(), params[i].size())).collect();
            let weights = match bucket.kind {
                Kind::Float => master[b].shallow_clone(),
                kind => master[b].to_kind(kind),
            };
            of_layer.insert(layer, b);
            by_index.insert(b, LayerBucket { members, weights, kind: bucket.kind, gathered: true, prefetched: None });
        }
        let mut buckets = Buckets { by_index, pinned: false };
        buckets.by_index.values_mut().for_each(release);
        LayerShards { gather, world: layout.world as i64, of_layer, buckets: Mutex::new(buckets) }
    }

    /// Whether bucket `b` is a sharded layer's (its weights are refreshed, not gathered,
    /// after an update).
    pub fn holds(&self, b: usize) -> bool {
        self.of_layer.values().any(|&i| i == b)
    }

    /// Bucket `b`'s weight share after an update moved its master share.
    pub fn refresh(&self, b: usize, master: &Tensor) {
        let buckets = self.buckets();
        let bucket = &buckets.by_index[&b];
        if bucket.kind != Kind::Float {
            tch::no_grad(|| bucket.weights.shallow_clone().copy_(master));
        }
    }

    /// Gathers every sharded layer and keeps them whole until the guard drops: a
    /// collective, as [`LayerParams::gather`].
    pub fn whole(&self) -> Result<WholeLayers<'_>, DistError> {
        let mut buckets = self.buckets();
        for bucket in buckets.by_index.values_mut() {
            self.gather_into(bucket)?;
        }
        buckets.pinned = true;
        Ok(WholeLayers { shards: self })
    }

    fn buckets(&self) -> std::sync::MutexGuard<'_, Buckets> {
        self.buckets.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn gather_into(&self, bucket: &mut LayerBucket) -> Result<(), DistError> {
        if bucket.gathered {
            return Ok(());
        }
        self.prefetch(bucket)?;
        let (whole, pending) = bucket.prefetched.take().expect("a gather was started");
        pending.wait()?;
        let mut start = 0;
        for (param, shape) in &bucket.members {
            let numel: i64 = shape.iter().product();
            // The parameter becomes a view of the gathered bucket (no copy), as FSDP's flat
            // parameter; autograd still sees the same leaf.
            param.shallow_clone().set_data(&whole.narrow(0, start, numel).view(shape.as_slice()));
            start += numel;
        }
        bucket.gathered = true;
        Ok(())
    }
}

impl LayerShards {
    /// Starts gathering `bucket` unless it is whole or on its way.
    fn prefetch(&self, bucket: &mut LayerBucket) -> Result<(), DistError> {
        if bucket.gathered || bucket.prefetched.is_some() {
            return Ok(());
        }
        let share = bucket.weights.numel() as i64;
        let whole = Tensor::empty([share * self.world], (bucket.kind, bucket.weights.device()));
        let pending = self.gather.start_all_gather(&whole, &bucket.weights)?;
        bucket.prefetched = Some((whole, pending));
        Ok(())
    }

    /// Gathers `layer` and starts gathering `next`.
    fn gather_and_prefetch(&self, layer: Layer, next: Option<Layer>) -> Result<(), DistError> {
        self.gather_layer(layer)?;
        let Some(b) = next.and_then(|next| self.of_layer.get(&next)) else { return Ok(()) };
        let mut buckets = self.buckets();
        self.prefetch(buckets.by_index.get_mut(b).expect("every layer's bucket is kept"))
    }
}

/// Lets a bucket's parameters go: each tensor keeps its identity (autograd's leaf, the
/// optimizer's and the hooks' handles) but holds no elements.
fn release(bucket: &mut LayerBucket) {
    if !bucket.gathered {
        return;
    }
    for (param, _) in &bucket.members {
        param.shallow_clone().set_data(&Tensor::empty([0], (bucket.kind, bucket.weights.device())));
    }
    bucket.gathered = false;
}

impl LayerShards {
    /// [`LayerParams::gather`], reporting a failure.
    pub fn gather_layer(&self, layer: Layer) -> Result<(), DistError> {
        let Some(b) = self.of_layer.get(&layer) else { return Ok(()) };
        let mut buckets = self.buckets();
        self.gather_into(buckets.by_index.get_mut(b).expect("every layer's bucket is kept"))
    }
}

impl LayerParams for LayerShards {
    fn gather(&self, layer: Layer, next: Option<Layer>) {
        if let Err(e) = self.gather_and_prefetch(layer, next) {
            panic!("gathering the sharded parameters of {layer:?}: {e}");
        }
    }

    fn release(&self, layer: Layer) {
        let Some(b) = self.of_layer.get(&layer) else { return };
        let mut buckets = self.buckets();
        if !buckets.pinned {
            release(buckets.by_index.get_mut(b).expect("every layer's bucket is kept"));
        }
    }
}

/// Every sharded layer whole, until this drops; see [`LayerShards::whole`].
pub struct WholeLayers<'a> {
    shards: &'a LayerShards,
}

impl Drop for WholeLayers<'_> {
    fn drop(&mut self) {
        let mut buckets = self.shards.buckets();
        buckets.pinned = false;
        buckets.by_index.values_mut().for_each(release);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use pg2_dist::{Group, WorkerEnv};
    use pg2_model::LayerParams;
    use pg2_model::{PaliGemma, PaliGemmaConfig, RunOptions, Weights};
    use pg2_optim::{AdamConfig, ParamGroup};
    use tch::Device;

    use super::*;
    use crate::recipe::Sharding;
    use crate::update::{Trainable, Update};

    #[test]
    fn each_rank_keeps_half_of_every_layer_and_gathers_them_whole_on_demand() {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        std::thread::scope(|s| {
            for rank in 0..2 {
                s.spawn(move || {
                    let env = WorkerEnv {
                        rank,
                        local_rank: rank,
                        world: 2,
                        local_world: 2,
                        master_addr: "127.0.0.1".into(),
                        master_port: port,
                        agent_store: false,
                    };
                    let mut group = Group::join(env, Device::Cpu, Duration::from_secs(60)).unwrap();
                    let config = PaliGemmaConfig::tiny(40, 39, 32).unwrap();
                    let opts = RunOptions { recompute: true, ..RunOptions::default() };
                    let mut model = PaliGemma::new(config, Weights::random(Device::Cpu, Kind::Float), opts).unwrap();
                    let params = model.parameters();
                    group
                        .broadcast_from_main(&params.iter().map(|(_, t)| t.shallow_clone()).collect::<Vec<_>>())
                        .unwrap();
                    let before: Vec<Tensor> = params.iter().map(|(_, t)| t.copy()).collect();
                    let groups = vec![ParamGroup { lr_mult: 1.0, decay_mult: 0.0 }; params.len()];
                    let trainable = Trainable { params: model.parameters(), groups };
                    let update =
                        Update::new(trainable, AdamConfig::default(), Sharding::Full, 1 << 20, false, &mut group)
                            .unwrap();
                    let shards = update.layer_shards().unwrap();
                    model.shard_layers(shards.clone());

                    let in_layers = |(name, _): &&(String, Tensor)| Layer::of(name).is_some();
                    let layer_elements: i64 =
                        before.iter().zip(&params).filter(|(_, p)| in_layers(p)).map(|(t, _)| t.numel() as i64).sum();
                    let held: i64 = params.iter().filter(in_layers).map(|(_, t)| t.numel() as i64).sum();
                    assert_eq!(held, 0, "the layers' parameter tensors hold nothing between uses");
                    let shares: i64 = shards.buckets().by_index.values().map(|b| b.weights.numel() as i64).sum();
                    let layers = 2 * 2; // the tiny model's vision and decoder layers
                    assert!(
                        shares * 2 >= layer_elements && shares * 2 < layer_elements + 2 * layers,
                        "{shares} of {layer_elements}"
                    );
                    for ((name, p), t) in params.iter().zip(&before) {
                        if Layer::of(name).is_none() {
                            assert!(p.equal(t), "{name} stays whole");
                        }
                    }
                    {
                        let _whole = shards.whole().unwrap();
                        for ((name, p), t) in params.iter().zip(&before) {
                            assert!(p.equal(t), "{name} gathered whole");
                        }
                        // Layers used while pinned stay whole.
                        shards.release(Layer::Text(0));
                        assert!(params.iter().all(|(_, p)| p.numel() > 0));
                    }
                    assert_eq!(params.iter().filter(in_layers).map(|(_, t)| t.numel() as i64).sum::<i64>(), 0);
                    shards.gather(Layer::Vision(0), None);
                    shards.release(Layer::Vision(0));
                    shards.gather(Layer::Vision(1), None);
                    let vision_1 = "vision_tower.vision_model.encoder.layers.1.";
                    for ((name, p), t) in params.iter().zip(&before) {
                        match name.starts_with(vision_1) {
                            true => assert!(p.equal(t), "{name} gathered alone"),
                            false if Layer::of(name).is_some() => assert_eq!(p.numel(), 0, "{name}"),
                            false => {}
                        }
                    }
                    shards.release(Layer::Vision(1));
                    // A gather that names the next layer starts that one's too; it becomes the
                    // parameters when that layer is asked for.
                    shards.gather(Layer::Text(0), Some(Layer::Text(1)));
                    shards.release(Layer::Text(0));
                    let text_1 = "language_model.model.layers.1.";
                    assert!(params.iter().filter(|(n, _)| n.starts_with(text_1)).all(|(_, p)| p.numel() == 0));
                    assert!(shards.buckets().by_index.values().filter(|b| b.prefetched.is_some()).count() == 1);
                    shards.gather(Layer::Text(1), None);
                    for ((name, p), t) in params.iter().zip(&before).filter(|((n, _), _)| n.starts_with(text_1)) {
                        assert!(p.equal(t), "{name} gathered ahead");
                    }
                    shards.release(Layer::Text(1));
                    group.barrier("end").unwrap();
                });
            }
        });
    }
}
