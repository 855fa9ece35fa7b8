//! Optimizers and learning-rate schedules for pg2, with big_vision's semantics: clip the
//! global gradient norm, take Adam's direction, scale it by the base learning rate, add
//! decoupled weight decay (not scaled by the base rate), and scale the sum by the schedule.

use tch::{Kind, Tensor};

/// Adam's hyper-parameters (big_vision's defaults: b1 0.9, b2 0.999, eps 1e-8).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamConfig {
    pub lr: f64,
    pub b1: f64,
    pub b2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// How weight decay enters the update.
    pub decay: Decay,
    /// Update through libtorch's fused AdamW kernel (`_fused_adamw_`, one launch per
    /// parameter group) instead of a dozen element-wise ops per parameter; same math.
    pub fused: bool,
}

/// The two weight-decay conventions a recipe can name (`decoupled`, `lr_coupled`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decay {
    /// big_vision's `add_decayed_weights` after the learning rate:
    /// `param -= schedule * weight_decay * param`, not multiplied by the base rate (the
    /// paper's transfer configs assume this).
    #[default]
    Decoupled,
    /// AdamW's (torch.optim.AdamW): `param -= lr * schedule * weight_decay * param`.
    LrCoupled,
}

impl Default for AdamConfig {
    fn default() -> Self {
        Self { lr: 1e-3, b1: 0.9, b2: 0.999, eps: 1e-8, weight_decay: 0.0, decay: Decay::Decoupled, fused: true }
    }
}

/// Per-parameter settings: multipliers of the learning rate and of the weight decay (0: not
/// decayed).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ParamGroup {
    pub lr_mult: f64,
    pub decay_mult: f64,
}

/// Adam over named parameters, with f32 moments.
pub struct Adam {
    pub config: AdamConfig,
    params: Vec<(String, Tensor)>,
    groups: Vec<ParamGroup>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    /// f32 copies of low-precision (bf16/f16) parameters: updates accumulate here, and the
    /// parameter gets the rounded result, so small updates are not lost to bf16 rounding.
    master: Vec<Option<Tensor>>,
    /// Updates made by the op-by-op path.
    steps: i64,
    /// The fused path's update count: each parameter's f32 scalar on its device, as the
    /// kernel reads it, advanced by the shim on the device (a skipped step leaves it).
    step_counts: Vec<Tensor>,
}

// The C++ shim beside this file (compiled by build/link_libtorch.rs): tch's tensors are
// `at::Tensor *` behind the pointer.
extern "C" {
    fn pg2_fused_adamw(
        params: *const *const std::ffi::c_void,
        grads: *const *const std::ffi::c_void,
        exp_avgs: *const *const std::ffi::c_void,
        exp_avg_sqs: *const *const std::ffi::c_void,
        steps: *const *const std::ffi::c_void,
        n: std::ffi::c_long,
        lr: f64,
        beta1: f64,
        beta2: f64,
        weight_decay: f64,
        eps: f64,
        found_inf: *const std::ffi::c_void,
    ) -> std::ffi::c_int;
    fn pg2_fused_adamw_error() -> *const std::ffi::c_char;
}

impl Adam {
    /// Takes the parameters to update (they must require gradients), all at the base
    /// learning rate and all decayed; [`Adam::with_groups`] chooses per parameter.
    pub fn new(params: Vec<(String, Tensor)>, config: AdamConfig) -> Self {
        Self::with_groups(params, config, |_, _| ParamGroup { lr_mult: 1.0, decay_mult: 1.0 })
    }

    /// As [`Adam::new`], each parameter's settings chosen by `group(name, param)`.
    pub fn with_groups(
        params: Vec<(String, Tensor)>,
        config: AdamConfig,
        group: impl Fn(&str, &Tensor) -> ParamGroup,
    ) -> Self {
        let groups = params.iter().map(|(n, p)| group(n, p)).collect();
        Self::from_groups(params, groups, config)
    }

    /// As [`Adam::new`], with `groups[i]` the settings of `params[i]`.
    pub fn from_groups(params: Vec<(String, Tensor)>, groups: Vec<ParamGroup>, config: AdamConfig) -> Self {
        assert_eq!(params.len(), groups.len(), "one group per parameter");
        let zeros = |p: &Tensor| Tensor::zeros_like(p).to_kind(Kind::Float);
        let m = params.iter().map(|(_, p)| zeros(p)).collect();
        let v = params.iter().map(|(_, p)| zeros(p)).collect();
        let master =
            params.iter().map(|(_, p)| (p.kind() != Kind::Float).then(|| p.detach().to_kind(Kind::Float))).collect();
        let step_counts = params.iter().map(|(_, p)| Tensor::zeros([], (Kind::Float, p.device()))).collect();
        Self { config, params, groups, m, v, master, steps: 0, step_counts }
    }

    /// The parameters it updates, by name.
    pub fn params(&self) -> &[(String, Tensor)] {
        &self.params
    }

    /// Global L2 norm of the gradients (before clipping), as an f32 scalar on their device;
    /// scales them down to `max_norm` when larger. All on the device: reading the norm
    /// back is the caller's choice, so a step need not wait for the GPU.
    pub fn clip_grad_norm(&mut self, max_norm: Option<f64>) -> Tensor {
        let grads: Vec<Tensor> = self.params.iter().map(|(_, p)| p.grad()).filter(Tensor::defined).collect();
        if grads.is_empty() {
            return Tensor::zeros([], (Kind::Float, tch::Device::Cpu));
        }
        let norm = squared_norm(&grads).sqrt();
        if let Some(max) = max_norm {
            clip_to(&grads, &norm, max);
        }
        norm
    }

    /// A group's weight-decay rate: `param -= schedule * rate * param`.
    fn decay_rate(&self, group: ParamGroup) -> f64 {
        let rate = self.config.weight_decay * group.decay_mult;
        match self.config.decay {
            Decay::Decoupled => rate,
            Decay::LrCoupled => rate * self.config.lr * group.lr_mult,
        }
    }

    /// One update with the schedule's factor for this step; clears the gradients.
    pub fn step(&mut self, schedule: f64) {
        self.step_unless(schedule, None);
    }

    /// [`Adam::step`], unless `skip` (an f32 scalar on the parameters' device: 1 for a
    /// non-finite loss or gradient, else 0) is 1; then parameters, moments and the step
    /// count stay as they were. The fused kernel decides on the device, without waiting
    /// for it; the op-by-op update reads `skip` back. Clears the gradients either way.
    pub fn step_unless(&mut self, schedule: f64, skip: Option<&Tensor>) {
        let grads: Vec<Tensor> = self.params.iter().map(|(_, p)| p.grad()).collect();
        self.step_with(schedule, skip, &grads);
        self.zero_grad();
    }

    /// [`Adam::step_unless`] with `grads` (one per parameter, in order; an undefined one
    /// leaves its parameter alone) in place of the parameters' own gradients, which stay.
    pub fn step_with(&mut self, schedule: f64, skip: Option<&Tensor>, grads: &[Tensor]) {
        assert_eq!(grads.len(), self.params.len(), "one gradient per parameter");
        if self.config.fused {
            self.step_fused(schedule, skip, grads);
        } else if skip.is_none_or(|s| s.double_value(&[]) == 0.0) {
            self.step_unfused(schedule, grads);
        }
    }

    /// The fused update: parameters sharing learning-rate and decay multipliers go
    /// through one `_fused_adamw_` call, on their f32 master copies where they have them.
    fn step_fused(&mut self, schedule: f64, skip: Option<&Tensor>, grads: &[Tensor]) {
        let AdamConfig { lr, b1, b2, eps, .. } = self.config;
        let with_grads: Vec<usize> = (0..self.params.len()).filter(|&i| grads[i].defined()).collect();
        let mut calls: Vec<(ParamGroup, Vec<usize>)> = Vec::new();
        for i in with_grads {
            match calls.iter_mut().find(|(g, _)| *g == self.groups[i]) {
                Some((_, members)) => members.push(i),
                None => calls.push((self.groups[i], vec![i])),
            }
        }
        let found_inf = skip.map(|s| s.to_kind(Kind::Float));
        tch::no_grad(|| {
            for (group, members) in calls {
                let step_lr = lr * group.lr_mult * schedule;
                // AdamW decays by `lr * wd`; ours is `schedule * rate`.
                let wd = if step_lr > 0.0 { schedule * self.decay_rate(group) / step_lr } else { 0.0 };
                let targets: Vec<Tensor> = members
                    .iter()
                    .map(|&i| self.master[i].as_ref().unwrap_or(&self.params[i].1).shallow_clone())
                    .collect();
                let grads: Vec<Tensor> = members.iter().map(|&i| grads[i].to_kind(Kind::Float)).collect();
                let ptrs = |ts: &[Tensor]| -> Vec<*const std::ffi::c_void> {
                    ts.iter().map(|t| t.as_ptr() as *const std::ffi::c_void).collect()
                };
                let pick = |ts: &[Tensor]| -> Vec<Tensor> { members.iter().map(|&i| ts[i].shallow_clone()).collect() };
                let (m, v, counts) = (pick(&self.m), pick(&self.v), pick(&self.step_counts));
                // SAFETY: five arrays of `members.len()` live tensors, each list on one device
                // with f32 elements and matching shapes; the kernel updates them in place.
                let status = unsafe {
                    pg2_fused_adamw(
                        ptrs(&targets).as_ptr(),
                        ptrs(&grads).as_ptr(),
                        ptrs(&m).as_ptr(),
                        ptrs(&v).as_ptr(),
                        ptrs(&counts).as_ptr(),
                        members.len() as std::ffi::c_long,
                        step_lr,
                        b1,
                        b2,
                        wd,
                        eps,
                        found_inf.as_ref().map_or(std::ptr::null(), |f| f.as_ptr() as *const std::ffi::c_void),
                    )
                };
                if status != 0 {
                    // SAFETY: a NUL-terminated string owned by the shim's thread-local.
                    let message = unsafe { std::ffi::CStr::from_ptr(pg2_fused_adamw_error()) };
                    panic!("libtorch's fused AdamW failed: {}", message.to_string_lossy());
                }
                for (&i, target) in members.iter().zip(&targets) {
                    if self.master[i].is_some() {
                        self.params[i].1.shallow_clone().copy_(target);
                    }
                }
            }
        });
    }

    /// The reference update, op by op.
    fn step_unfused(&mut self, schedule: f64, grads: &[Tensor]) {
        let AdamConfig { lr, b1, b2, eps, .. } = self.config;
        self.steps += 1;
        let (c1, c2) = (1.0 - b1.powi(self.steps as i32), 1.0 - b2.powi(self.steps as i32));
        let rates: Vec<f64> = self.groups.iter().map(|&g| self.decay_rate(g)).collect();
        tch::no_grad(|| {
            for (i, (_, p)) in self.params.iter_mut().enumerate() {
                let g = &grads[i];
                if !g.defined() {
                    continue;
                }
                let g = g.to_kind(Kind::Float);
                self.m[i] = &self.m[i] * b1 + &g * (1.0 - b1);
                self.v[i] = &self.v[i] * b2 + g.square() * (1.0 - b2);
                let direction = (&self.m[i] / c1) / ((&self.v[i] / c2).sqrt() + eps);
                let p32 = self.master[i].as_ref().map_or_else(|| p.to_kind(Kind::Float), Tensor::shallow_clone);
                let group = self.groups[i];
                let update = (direction * (lr * group.lr_mult) + &p32 * rates[i]) * schedule;
                let next = p32 - update;
                p.copy_(&next);
                if let Some(master) = &mut self.master[i] {
                    *master = next;
                }
            }
        });
    }

    /// Zeroes the parameters' gradients (after an update, made or skipped).
    pub fn zero_grad(&mut self) {
        for (_, p) in self.params.iter_mut() {
            p.zero_grad();
        }
    }

    /// The moments and f32 master weights, named `m.<param>`, `v.<param>` and
    /// `master.<param>`, for checkpoints.
    pub fn state(&self) -> Vec<(String, Tensor)> {
        let named = |prefix: &str, ts: &[Tensor]| -> Vec<(String, Tensor)> {
            self.params.iter().zip(ts).map(|((n, _), t)| (format!("{prefix}.{n}"), t.shallow_clone())).collect()
        };
        let mut state = named("m", &self.m);
        state.extend(named("v", &self.v));
        let masters: Vec<(String, Tensor)> = self
            .params
            .iter()
            .zip(&self.master)
            .filter_map(|((n, _), m)| Some((format!("master.{n}"), m.as_ref()?.shallow_clone())))
            .collect();
        state.extend(masters);
        state
    }

    /// Restores moments and the step count saved with [`Adam::state`] (each tensor of its
    /// parameter's size, in any shape).
    pub fn load_state(
        &mut self,
        mut state: std::collections::BTreeMap<String, Tensor>,
        steps: i64,
    ) -> Result<(), String> {
        for (i, (name, p)) in self.params.iter().enumerate() {
            for (prefix, slot) in [("m", &mut self.m[i]), ("v", &mut self.v[i])] {
                *slot = take_state(&mut state, &format!("{prefix}.{name}"), p)?;
            }
            if let Some(master) = &mut self.master[i] {
                *master = take_state(&mut state, &format!("master.{name}"), p)?;
            }
        }
        self.steps = steps;
        for c in &mut self.step_counts {
            let _ = c.fill_(steps as f64);
        }
        Ok(())
    }
}

/// State `key` for parameter `p`, as f32 of its shape on its device.
fn take_state(state: &mut std::collections::BTreeMap<String, Tensor>, key: &str, p: &Tensor) -> Result<Tensor, String> {
    let t = state.remove(key).ok_or_else(|| format!("optimizer state lacks `{key}`"))?;
    if t.numel() != p.numel() {
        return Err(format!("optimizer state `{key}` has {} elements, the parameter {}", t.numel(), p.numel()));
    }
    Ok(t.reshape(p.size()).to_kind(Kind::Float).to_device(p.device()))
}

/// The sum of the squares of `grads` (f32, on their device): a global norm's square, or a
/// shard's part of it.
pub fn squared_norm(grads: &[Tensor]) -> Tensor {
    let squares: Vec<Tensor> = grads.iter().map(|g| g.to_kind(Kind::Float).square().sum(Kind::Float)).collect();
    Tensor::stack(&squares, 0).sum(Kind::Float)
}

/// Scales `grads` in place by `min(max / norm, 1)`: exactly 1 (no change) when `norm` is
/// within the limit.
pub fn clip_to(grads: &[Tensor], norm: &Tensor, max: f64) {
    let scale = (norm.reciprocal() * max).clamp_max(1.0);
    tch::no_grad(|| {
        for g in grads {
            let _ = g.shallow_clone().g_mul_(&scale.to_kind(g.kind()));
        }
    });
}

/// What follows the warmup (`cosine`, `linear`, `rsqrt`, `constant` in recipes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DecayShape {
    /// Half a cosine down to 0 (big_vision's transfer schedule).
    #[default]
    Cosine,
    /// A straight line down to 0.
    Linear,
    /// `sqrt(warmup / step)`, never reaching 0 (big_vision's pretraining `rsqrt`).
    Rsqrt,
    /// Stays at the base rate.
    Constant,
}

/// Learning-rate schedule: linear warmup from 0, then the decay shape, as a factor on the
/// base rate. The warmup is big_vision's `step / warmup_steps`: the first update (step 0)
/// is made at 0, the base rate is reached at step `warmup_steps`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    pub warmup_steps: u64,
    pub total_steps: u64,
    pub shape: DecayShape,
}

impl Schedule {
    /// The factor for 0-based `step`.
    pub fn factor(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return step as f64 / self.warmup_steps as f64;
        }
        let span = self.total_steps.saturating_sub(self.warmup_steps).max(1) as f64;
        let progress = ((step - self.warmup_steps) as f64 / span).min(1.0);
        match self.shape {
            DecayShape::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
            DecayShape::Linear => 1.0 - progress,
            DecayShape::Rsqrt => (self.warmup_steps.max(1) as f64 / (step + 1) as f64).sqrt().min(1.0),
            DecayShape::Constant => 1.0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pg2_model::ParamKind;
    use tch::Device;

    fn param(values: &[f32]) -> Tensor {
        Tensor::from_slice(values).set_requires_grad(true)
    }

    #[test]
    fn first_adam_step_moves_by_lr_against_the_gradient_sign() {
        let p = param(&[1.0, -2.0, 3.0]);
        (&p * Tensor::from_slice(&[0.5f32, -4.0, 0.0])).sum(Kind::Float).backward();
        let mut adam =
            Adam::new(vec![("w".into(), p.shallow_clone())], AdamConfig { lr: 0.1, ..AdamConfig::default() });
        adam.step(1.0);
        let got = Vec::<f32>::try_from(p.detach()).unwrap();
        // m_hat = g, v_hat = g^2: the direction is g / (|g| + eps) = sign(g); a zero gradient stays put.
        let want = [0.9f32, -1.9, 3.0];
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "{got:?}");
        }
        assert!(!p.grad().defined() || p.grad().abs().sum(Kind::Float).double_value(&[]) == 0.0);
    }

    #[test]
    fn weight_decay_is_not_scaled_by_the_learning_rate_and_spares_norms_biases_embeddings() {
        let w = Tensor::from_slice(&[2.0f32]).view([1, 1]).set_requires_grad(true);
        let bias = param(&[2.0]);
        let embed = Tensor::from_slice(&[2.0f32]).view([1, 1]).set_requires_grad(true);
        ((&w + &bias + &embed) * 0.0).sum(Kind::Float).backward();
        let params = vec![
            ("l.weight".into(), w.shallow_clone()),
            ("l.bias".into(), bias.shallow_clone()),
            ("embed_tokens.weight".into(), embed.shallow_clone()),
        ];
        // What each tensor is, as the layer that took it records it.
        let kinds = [
            ("l.weight", ParamKind::Kernel),
            ("l.bias", ParamKind::Bias),
            ("embed_tokens.weight", ParamKind::Embedding),
        ];
        let kind = |name: &str| kinds.iter().find(|(n, _)| *n == name).unwrap().1;
        let config = AdamConfig { lr: 1e-3, weight_decay: 0.1, ..AdamConfig::default() };
        let mut adam = Adam::with_groups(params, config, |name, _| ParamGroup {
            lr_mult: 1.0,
            decay_mult: if kind(name).decays_by_default() { 1.0 } else { 0.0 },
        });
        adam.step(0.5);
        // param -= schedule * wd * param = 0.5 * 0.1 * 2
        assert!((w.double_value(&[0, 0]) - 1.9).abs() < 1e-6);
        assert_eq!((bias.double_value(&[0]), embed.double_value(&[0, 0])), (2.0, 2.0));
    }

    #[test]
    fn clipping_scales_to_the_max_norm_and_reports_the_original() {
        let p = param(&[0.0, 0.0]);
        (&p * Tensor::from_slice(&[3.0f32, 4.0])).sum(Kind::Float).backward();
        let mut adam = Adam::new(vec![("w".into(), p.shallow_clone())], AdamConfig::default());
        assert!((adam.clip_grad_norm(Some(1.0)).double_value(&[]) - 5.0).abs() < 1e-6);
        let g = Vec::<f32>::try_from(p.grad()).unwrap();
        assert!((g[0] - 0.6).abs() < 1e-6 && (g[1] - 0.8).abs() < 1e-6, "{g:?}");
        assert!((adam.clip_grad_norm(None).double_value(&[]) - 1.0).abs() < 1e-6);
    }

    #[test]
    fn warmup_then_each_decay_shape() {
        let at = |shape, step| Schedule { warmup_steps: 10, total_steps: 110, shape }.factor(step);
        for shape in [DecayShape::Cosine, DecayShape::Linear, DecayShape::Rsqrt, DecayShape::Constant] {
            let warmup = [at(shape, 0), at(shape, 5), at(shape, 9)];
            assert!(warmup.iter().zip([0.0, 0.5, 0.9]).all(|(a, b)| (a - b).abs() < 1e-12), "{shape:?}: {warmup:?}");
        }
        assert_eq!(at(DecayShape::Cosine, 10), 1.0, "the base rate at step warmup_steps");
        assert!((at(DecayShape::Cosine, 60) - 0.5).abs() < 1e-12);
        assert!(at(DecayShape::Cosine, 110).abs() < 1e-12);
        assert!((at(DecayShape::Linear, 35) - 0.75).abs() < 1e-12);
        assert!((at(DecayShape::Rsqrt, 39) - 0.5).abs() < 1e-12, "sqrt(10 / 40)");
        assert_eq!(at(DecayShape::Constant, 100), 1.0);
    }

    #[test]
    fn lr_multipliers_and_coupled_decay() {
        let a = param(&[1.0]);
        let b = param(&[1.0]);
        ((&a + &b) * 1.0).sum(Kind::Float).backward();
        let params = vec![("slow.w".into(), a.shallow_clone()), ("fast.w".into(), b.shallow_clone())];
        let config = AdamConfig { lr: 0.1, weight_decay: 0.5, decay: Decay::LrCoupled, ..AdamConfig::default() };
        let mut adam = Adam::with_groups(params, config, |name, _| ParamGroup {
            lr_mult: if name.starts_with("slow") { 0.1 } else { 1.0 },
            decay_mult: 1.0,
        });
        adam.step(1.0);
        // p -= lr' * (sign(g) + wd * p) with lr' = 0.01 and 0.1.
        assert!((a.double_value(&[0]) - (1.0 - 0.01 * 1.5)).abs() < 1e-6);
        assert!((b.double_value(&[0]) - (1.0 - 0.1 * 1.5)).abs() < 1e-6);
    }

    /// One run of three steps from torch.optim's fixture (tests/fixtures/optim).
    fn torch_case(name: &str, config: AdamConfig) {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/optim/expected.json");
        let fixture: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let matrix = |v: &serde_json::Value| {
            let rows: Vec<Vec<f32>> = serde_json::from_value(v.clone()).unwrap();
            Tensor::from_slice(&rows.concat()).view([rows.len() as i64, -1])
        };
        let p = matrix(&fixture["start"]).set_requires_grad(true);
        let mut adam = Adam::with_groups(vec![("w".into(), p.shallow_clone())], config, |_, _| ParamGroup {
            lr_mult: 1.0,
            decay_mult: 1.0,
        });
        for g in fixture["grads"].as_array().unwrap() {
            (&p * matrix(g)).sum(Kind::Float).backward();
            adam.step(1.0);
        }
        let want = matrix(&fixture["cases"][name]["result"]);
        let diff = (p.detach() - &want).abs().max().double_value(&[]);
        assert!(diff < 1e-6, "{name}: max difference {diff} from torch.optim");
    }

    #[test]
    fn three_steps_equal_torch_optim_adam_and_adamw() {
        for fused in [true, false] {
            torch_case(
                "adam",
                AdamConfig {
                    lr: 1e-2,
                    b1: 0.9,
                    b2: 0.999,
                    eps: 1e-8,
                    weight_decay: 0.0,
                    decay: Decay::Decoupled,
                    fused,
                },
            );
            torch_case(
                "adamw",
                AdamConfig {
                    lr: 1e-2,
                    b1: 0.9,
                    b2: 0.95,
                    eps: 1e-8,
                    weight_decay: 0.1,
                    decay: Decay::LrCoupled,
                    fused,
                },
            );
        }
    }

    #[test]
    fn a_skipped_step_changes_nothing_and_the_next_one_counts_as_the_first() {
        for fused in [true, false] {
            let p = param(&[1.0, -2.0]);
            let mut adam = Adam::new(
                vec![("w".into(), p.shallow_clone())],
                AdamConfig { lr: 0.1, fused, ..AdamConfig::default() },
            );
            (&p * Tensor::from_slice(&[f32::NAN, 1.0])).sum(Kind::Float).backward();
            let norm = adam.clip_grad_norm(Some(1.0));
            let skip = norm.isfinite().logical_not().to_kind(Kind::Float);
            adam.step_unless(1.0, Some(&skip));
            assert_eq!(Vec::<f32>::try_from(&p).unwrap(), [1.0, -2.0], "fused {fused}: the weights are untouched");
            assert!(!p.grad().defined() || p.grad().abs().sum(Kind::Float).double_value(&[]) == 0.0);
            // The moments stayed at zero and the count at 0: the next step moves by lr.
            (&p * Tensor::from_slice(&[3.0f32, -1.0])).sum(Kind::Float).backward();
            let skip = Tensor::zeros([], (Kind::Float, Device::Cpu));
            adam.step_unless(1.0, Some(&skip));
            let got = Vec::<f32>::try_from(&p).unwrap();
            assert!((got[0] - 0.9).abs() < 1e-6 && (got[1] + 1.9).abs() < 1e-6, "fused {fused}: {got:?}");
        }
    }

    /// Five steps of both update paths from the same start, gradients and schedule (a zero
    /// factor among them), with learning-rate groups, a spared bias, a bf16 parameter with
    /// its master copy, and a restart through `state`/`load_state` after step three.
    #[test]
    fn fused_kernel_equals_the_unfused_update() {
        for decay in [Decay::Decoupled, Decay::LrCoupled] {
            let run = |fused: bool| -> Vec<Tensor> {
                tch::manual_seed(7);
                let named = [
                    ("slow.w", [4, 3], Kind::Float),
                    ("fast.bias", [3, 1], Kind::Float),
                    ("fast.w", [5, 2], Kind::BFloat16),
                ];
                let params: Vec<(String, Tensor)> = named
                    .iter()
                    .map(|(n, shape, kind)| {
                        (
                            n.to_string(),
                            Tensor::randn(*shape, (Kind::Float, Device::Cpu)).to_kind(*kind).set_requires_grad(true),
                        )
                    })
                    .collect();
                let config = AdamConfig { lr: 0.05, weight_decay: 0.1, decay, fused, ..AdamConfig::default() };
                let groups = |name: &str, p: &Tensor| ParamGroup {
                    lr_mult: if name.starts_with("slow") { 0.1 } else { 1.0 },
                    decay_mult: if p.dim() > 1 && !name.ends_with("bias") { 1.0 } else { 0.0 },
                };
                let handles = || params.iter().map(|(n, p)| (n.clone(), p.shallow_clone())).collect::<Vec<_>>();
                let mut adam = Adam::with_groups(handles(), config, groups);
                for (step, schedule) in [0.0, 0.5, 1.0, 0.8, 0.3].into_iter().enumerate() {
                    let loss: Tensor = params
                        .iter()
                        .map(|(_, p)| {
                            (p.to_kind(Kind::Float) * Tensor::randn(p.size(), (Kind::Float, Device::Cpu)))
                                .sum(Kind::Float)
                        })
                        .sum();
                    loss.backward();
                    adam.step(schedule);
                    if step == 2 {
                        let state = adam.state().into_iter().map(|(n, t)| (n, t.copy())).collect();
                        adam = Adam::with_groups(handles(), config, groups);
                        adam.load_state(state, 3).unwrap();
                    }
                }
                params.iter().map(|(_, p)| p.to_kind(Kind::Float)).collect()
            };
            for (fused, plain) in run(true).iter().zip(run(false)) {
                let diff = (fused - plain).abs().max().double_value(&[]);
                assert!(diff < 1e-6, "{decay:?}: fused and unfused differ by {diff}");
            }
        }
    }

    #[test]
    fn bf16_parameters_keep_f32_master_weights() {
        // An update of 1e-4 on 1.0 vanishes in bf16 (spacing 2^-7), but accumulates in the master copy.
        let p = Tensor::from_slice(&[1.0f32]).to_kind(Kind::BFloat16).set_requires_grad(true);
        let mut adam =
            Adam::new(vec![("w".into(), p.shallow_clone())], AdamConfig { lr: 1e-4, ..AdamConfig::default() });
        for _ in 0..100 {
            (&p * 1.0).sum(Kind::Float).backward();
            adam.step(1.0);
        }
        let master = adam.state().into_iter().find(|(n, _)| n == "master.w").unwrap().1;
        assert!((master.double_value(&[0]) - 0.99).abs() < 1e-5, "{}", master.double_value(&[0]));
        assert!((p.to_kind(Kind::Float).double_value(&[0]) - 0.99).abs() < 4e-3, "the parameter follows the master");
    }
}
