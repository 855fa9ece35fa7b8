//! Layers whose parameters are not kept whole between uses (sharded data parallelism with
//! the parameters sharded, ZeRO-3): the model asks for a layer's parameters just before it
//! runs the layer and hands them back right after, and, when the layer's activations are
//! recomputed in the backward pass, asks again for the re-run and hands them back once the
//! backward pass through it is done. Each request names the layer that comes next in that
//! pass, so that its parameters can be on their way while this one computes.

use std::sync::Arc;

use tch::Tensor;

use crate::checkpoint::{TEXT, VISION};

/// A layer of [`crate::PaliGemma`]: the unit whose parameters are gathered together.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Layer {
    /// Encoder layer `i` of the vision tower.
    Vision(usize),
    /// Decoder layer `i`.
    Text(usize),
}

impl Layer {
    /// Layer `i` of a tower of `layers`, as `make` names it, if there is one.
    pub(crate) fn at(make: fn(usize) -> Layer, i: Option<usize>, layers: usize) -> Option<Layer> {
        i.filter(|&i| i < layers).map(make)
    }

    /// The layer parameter `name` (a checkpoint name) belongs to; `None` for the parameters
    /// around the layers (embeddings, final norms, the projector).
    pub fn of(name: &str) -> Option<Layer> {
        let index = |rest: &str| rest.split('.').next()?.parse().ok();
        if let Some(rest) = name.strip_prefix(&format!("{VISION}.encoder.layers.")) {
            return index(rest).map(Layer::Vision);
        }
        name.strip_prefix(&format!("{TEXT}.layers.")).and_then(index).map(Layer::Text)
    }
}

/// Where the parameters of layers that are not kept whole come from; see the module docs.
/// Both calls are collectives where the parameters are sharded: every rank makes them in
/// the same order. A failure panics with its message (a rank that cannot gather cannot
/// compute), which the launcher reports.
pub trait LayerParams: Send + Sync {
    /// Makes `layer`'s parameters whole (nothing if they are); `next` is the layer the
    /// same pass runs after it, if any (forward: the one above; backward: the one below).
    fn gather(&self, layer: Layer, next: Option<Layer>);
    /// Lets `layer`'s parameters go again.
    fn release(&self, layer: Layer);
}

/// `layer`'s parameters, whole while this lives (`next`: the layer the forward pass runs
/// after it).
pub(crate) struct Gathered<'a> {
    params: Option<&'a Arc<dyn LayerParams>>,
    layer: Layer,
}

impl<'a> Gathered<'a> {
    pub(crate) fn new(params: Option<&'a Arc<dyn LayerParams>>, layer: Layer, next: Option<Layer>) -> Self {
        if let Some(p) = params {
            p.gather(layer, next);
        }
        Gathered { params, layer }
    }
}

impl Drop for Gathered<'_> {
    fn drop(&mut self) {
        if let Some(p) = self.params {
            p.release(self.layer);
        }
    }
}

/// `run(input)` through [`crate::recompute`], whose re-run in the backward pass gathers
/// `layer`'s parameters again (`below`: the layer backward reaches next) and releases them
/// once the pass through it is done.
pub(crate) fn recompute_layer(
    input: &Tensor,
    params: Option<&Arc<dyn LayerParams>>,
    (layer, below): (Layer, Option<Layer>),
    run: impl Fn(&Tensor) -> Tensor + 'static,
) -> Tensor {
    let Some(params) = params else { return crate::recompute::recompute(input, run) };
    let (gather, release) = (params.clone(), params.clone());
    crate::recompute::recompute_then(
        input,
        move |x| {
            gather.gather(layer, below);
            run(x)
        },
        move || release.release(layer),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_belong_to_their_layers() {
        assert_eq!(Layer::of("vision_tower.vision_model.encoder.layers.12.mlp.fc1.weight"), Some(Layer::Vision(12)));
        assert_eq!(Layer::of("language_model.model.layers.3.self_attn.q_proj.weight"), Some(Layer::Text(3)));
        for outside in [
            "language_model.model.embed_tokens.weight",
            "language_model.model.norm.weight",
            "multi_modal_projector.linear.weight",
            "vision_tower.vision_model.post_layernorm.weight",
            "vision_tower.vision_model.embeddings.patch_embedding.weight",
        ] {
            assert_eq!(Layer::of(outside), None, "{outside}");
        }
    }
}
