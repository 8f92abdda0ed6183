//! Rectified-flow pretraining of a text-to-image pipeline on the Shapes world (in pixel space, or
//! on the latents of a frozen autoencoder from `train::vae`), as SD3 trains:
//! x_σ = (1 − σ)·x₀ + σ·ε, loss ‖v̂ − v‖² with v = ε − x₀. A velocity model outputs v̂; a
//! sample-predicting (pixel-space) model outputs x̂₀ and v̂ = (x_σ − x̂₀)/max(σ, 0.05), JiT's
//! "x-prediction with v-loss". σ ~ logit-normal(`sigma_mean`, `sigma_std`): SD3 uses (0, 1);
//! JiT's pixel models favour noisier levels (0.8, 0.8 in σ terms).
//! The text encoder trains jointly (there is no pretrained one to borrow); captions are dropped
//! to "" with probability `caption_dropout` so classifier-free guidance works.
//!
//! Resumable: a run directory holds `checkpoint/` (the pipeline folder users load: the EMA of
//! the weights when `ema_decay` > 0, as diffusion models are sampled), `network.bpk` (the raw
//! weights in burn's format, which keeps parameter ids so the optimizer state matches them),
//! `ema.bpk` (the average), `optimizer.bin`, `state.json` (step) and `metrics.jsonl`; each step's data and noise come from an RNG seeded by
//! (seed, step), so a resumed run sees exactly the batches an uninterrupted one would.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::optim::{AdamWConfig, GradientsParams, ModuleOptimizer};
use burn::tensor::{Device, Tensor, TensorData};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use serde::{Deserialize, Serialize};

use crate::model::sd3::Sd3Transformer;
use crate::model::vae::Vae;
use crate::pipeline::text::Encoder;
use crate::pipeline::{
    MIN_SIGMA_DIVISOR, Pipeline, PipelineError, Prediction, TextStack, Transformer, from_images,
};
use crate::text::clip::ClipTextModel;
use crate::world::prompt::PromptSpec;
use crate::world::render::{Image, render};
use crate::world::{compose, digits};

/// Pretraining settings (stored in the run directory as `pretrain.json`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PretrainConfig {
    pub steps: usize,
    pub batch_size: usize,
    pub learning_rate: f64,
    pub warmup_steps: usize,
    pub weight_decay: f64,
    pub grad_clip: f64,
    /// Probability that a caption is replaced by "" (for CFG).
    pub caption_dropout: f64,
    /// Fraction of examples from the digits task (the rest are GenEval-style prompts).
    pub digits_fraction: f64,
    pub seed: u64,
    /// Noise-level distribution: σ = sigmoid(mean + std·u), u ~ N(0, 1).
    pub sigma_mean: f64,
    pub sigma_std: f64,
    pub log_every: usize,
    pub checkpoint_every: usize,
    /// The learning rate decays linearly to a tenth over the last `decay_steps` steps.
    #[serde(default)]
    pub decay_steps: usize,
    /// Sample-predicting models: the loss is ‖x̂₀ − x₀‖² / max(σ, floor)². At JiT's 0.05 it is the
    /// v-loss, whose weight (up to 400 at small σ) spends nearly all gradient on fine denoising; a
    /// larger floor moves it to the noisy levels where layout is decided.
    #[serde(default = "default_loss_sigma_floor")]
    pub loss_sigma_floor: f64,
    /// Decay of the weight average the checkpoint holds (0: the raw weights). The average warms
    /// up as min(decay, (1 + n)/(10 + n)) over the run's steps n.
    #[serde(default)]
    pub ema_decay: f64,
}

fn default_loss_sigma_floor() -> f64 {
    MIN_SIGMA_DIVISOR
}

impl Default for PretrainConfig {
    fn default() -> Self {
        Self {
            steps: 6000,
            batch_size: 32,
            learning_rate: 3e-4,
            warmup_steps: 200,
            weight_decay: 0.01,
            grad_clip: 1.0,
            caption_dropout: 0.1,
            digits_fraction: 0.15,
            seed: 0,
            sigma_mean: 0.8,
            sigma_std: 0.8,
            log_every: 10,
            checkpoint_every: 250,
            decay_steps: 0,
            loss_sigma_floor: MIN_SIGMA_DIVISOR,
            ema_decay: 0.999,
        }
    }
}

/// The trainable part of a pipeline.
#[derive(Module, Debug)]
pub struct Network {
    pub text_encoder: ClipTextModel,
    pub transformer: Sd3Transformer,
}

crate::linears!(Network: text_encoder, transformer);

/// Every float parameter of a module flattened, in visit order.
struct CollectParams(Vec<Tensor<1>>);

impl ModuleVisitor for CollectParams {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let value = param.val();
        let n = value.shape().num_elements();
        self.0.push(value.reshape([n]));
    }
}

/// θ_avg ← d·θ_avg + (1 − d)·θ, parameter by parameter in visit order.
struct AverageInto {
    current: std::vec::IntoIter<Tensor<1>>,
    decay: f32,
}

impl ModuleMapper for AverageInto {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let now = self.current.next().expect("same module structure");
        let decay = self.decay;
        param.map(|avg| {
            let shape = avg.shape();
            avg.mul_scalar(decay) + now.reshape(shape).mul_scalar(1.0 - decay)
        })
    }
}

/// Moves `average` (a module without autodiff) towards `network`'s weights.
fn update_average(average: Network, network: &Network, decay: f64) -> Network {
    let mut collect = CollectParams(Vec::new());
    network.valid().visit(&mut collect);
    average.map(&mut AverageInto {
        current: collect.0.into_iter(),
        decay: decay as f32,
    })
}

/// Float parameters by module path (`transformer_blocks.0.attn.to_q.weight`), as values and shape.
#[derive(Default)]
struct ByPath {
    path: Vec<String>,
    found: std::collections::HashMap<String, TensorData>,
}

impl ModuleVisitor for ByPath {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        self.found
            .insert(self.path.join("."), param.val().into_data());
    }
}

/// Replaces each parameter whose path and shape match one in `source`.
struct CopyMatching {
    path: Vec<String>,
    source: std::collections::HashMap<String, TensorData>,
    copied: usize,
    kept: Vec<String>,
}

impl ModuleMapper for CopyMatching {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let key = self.path.join(".");
        let fresh_shape = param.val().dims().to_vec();
        match self.source.get(&key) {
            Some(data) if data.shape().as_slice() == fresh_shape.as_slice() => {
                self.copied += 1;
                let data = data.clone();
                // A tensor made from data does not track gradients: without
                // `set_require_grad` every copied weight would be frozen in training.
                param.map(|fresh| {
                    Tensor::from_data(data, &fresh.device())
                        .set_require_grad(fresh.is_require_grad())
                })
            }
            _ => {
                self.kept.push(key);
                param
            }
        }
    }
}

/// What [`warm_start`] did.
#[derive(Debug)]
pub struct WarmStart {
    pub copied: usize,
    /// Parameters that kept their fresh initialisation (absent or shaped differently in the source).
    pub kept: Vec<String>,
}

/// A new model's text encoder and transformer take every weight whose path and shape match
/// `source`'s (a trained Shapes pipeline of the same width); the rest, e.g. a latent model's
/// patch embedding and output projection, keep their fresh initialisation. A latent model on an
/// 8×8 token grid so inherits a pixel model's text understanding and token-level layout instead
/// of learning them again. A deeper model starts as the same function ([`grow_depth`]).
pub fn warm_start(
    pipeline: Pipeline,
    source: &Pipeline,
) -> Result<(Pipeline, WarmStart), PipelineError> {
    let (
        TextStack::Clip(source_text),
        Transformer::Sd3(source_transformer),
        TextStack::Clip(_),
        Transformer::Sd3(_),
    ) = (
        &source.text,
        &source.transformer,
        &pipeline.text,
        &pipeline.transformer,
    )
    else {
        return Err(PipelineError::Folder {
            path: PathBuf::from("<warm start>"),
            message: "warm starts copy between Shapes pipelines (one CLIP and an SD3 transformer)"
                .into(),
        });
    };
    let mut collect = ByPath::default();
    source_text.model.visit(&mut collect);
    let text_weights = std::mem::take(&mut collect.found);
    source_transformer.visit(&mut collect);
    let mut transformer_weights = collect.found;
    if let Transformer::Sd3(fresh) = &pipeline.transformer {
        grow_depth(
            &mut transformer_weights,
            source_transformer.transformer_blocks.len(),
            fresh,
        );
    }
    let Pipeline {
        text: TextStack::Clip(Encoder { tokenizer, model }),
        transformer: Transformer::Sd3(transformer),
        vae,
        index,
        scheduler,
    } = pipeline
    else {
        unreachable!("matched above")
    };
    let mut report = WarmStart {
        copied: 0,
        kept: Vec::new(),
    };
    let copy = |source| CopyMatching {
        path: Vec::new(),
        source,
        copied: 0,
        kept: Vec::new(),
    };
    let mut text_copy = copy(text_weights);
    let model = model.map(&mut text_copy);
    let mut transformer_copy = copy(transformer_weights);
    let transformer = transformer.map(&mut transformer_copy);
    for (prefix, done) in [
        ("text_encoder", text_copy),
        ("transformer", transformer_copy),
    ] {
        report.copied += done.copied;
        report
            .kept
            .extend(done.kept.into_iter().map(|k| format!("{prefix}.{k}")));
    }
    Ok((
        Pipeline {
            text: TextStack::Clip(Encoder { tokenizer, model }),
            transformer: Transformer::Sd3(transformer),
            vae,
            index,
            scheduler,
        },
        report,
    ))
}

/// A deeper model of the same width keeps the source's blocks and adds identity blocks: source
/// blocks `0..n-1` stay where they are, the source's last block (SD3's `context_pre_only` one)
/// becomes the new last block, and each added block between them gets an all-zero AdaLN-Zero
/// modulation (`norm1`, `norm1_context`), so its gates are 0 and it passes both streams through
/// unchanged until training opens them. The model computes what the source computed at step 0.
fn grow_depth(
    weights: &mut std::collections::HashMap<String, TensorData>,
    source_blocks: usize,
    fresh: &crate::model::sd3::Sd3Transformer,
) {
    let blocks = fresh.transformer_blocks.len();
    if blocks <= source_blocks || source_blocks == 0 {
        return;
    }
    let (last, new_last) = (
        format!("transformer_blocks.{}.", source_blocks - 1),
        format!("transformer_blocks.{}.", blocks - 1),
    );
    let moved: Vec<String> = weights
        .keys()
        .filter(|k| k.starts_with(&last))
        .cloned()
        .collect();
    for key in moved {
        let data = weights.remove(&key).expect("listed above");
        weights.insert(key.replacen(&last, &new_last, 1), data);
    }
    let mut shapes = ByPath::default();
    fresh.visit(&mut shapes);
    for k in source_blocks - 1..blocks - 1 {
        for (key, data) in &shapes.found {
            let modulation = ["norm1.", "norm1_context."]
                .iter()
                .any(|m| key.starts_with(&format!("transformer_blocks.{k}.{m}")));
            if modulation {
                let zeros = vec![0f32; data.shape().iter().product()];
                weights.insert(key.clone(), TensorData::new(zeros, data.shape().clone()));
            }
        }
    }
}

/// One line of `metrics.jsonl`.
#[derive(Debug, Serialize, Deserialize)]
pub struct PretrainMetrics {
    pub step: usize,
    pub loss: f64,
    pub learning_rate: f64,
    pub seconds_per_step: f64,
}

#[derive(Debug, Serialize, Deserialize)]
struct RunState {
    step: usize,
    /// The step this run started from (non-zero when it continued another model's weights).
    #[serde(default)]
    first_step: usize,
    config: PretrainConfig,
}

/// Settings given again when a run resumes (rerunning the command that started it), each of
/// which must equal the stored one: a resumed run sees the batches, optimiser and noise levels an
/// uninterrupted one would.
#[derive(Clone, Debug, Default)]
pub struct ResumeFlags {
    pub batch_size: Option<usize>,
    pub learning_rate: Option<f64>,
    pub seed: Option<u64>,
    pub ema_decay: Option<f64>,
    pub sigma_mean: Option<f64>,
    pub sigma_std: Option<f64>,
}

impl PretrainConfig {
    /// One line per flag in `given` that differs from this stored configuration, naming both
    /// values (`--lr 0.0002 (the run has 0.0001)`); empty when the run can resume.
    pub fn resume_conflicts(&self, given: &ResumeFlags) -> Vec<String> {
        [
            (
                "--batch-size",
                given.batch_size.map(|v| v as f64),
                self.batch_size as f64,
            ),
            ("--lr", given.learning_rate, self.learning_rate),
            ("--seed", given.seed.map(|v| v as f64), self.seed as f64),
            ("--ema-decay", given.ema_decay, self.ema_decay),
            ("--sigma-mean", given.sigma_mean, self.sigma_mean),
            ("--sigma-std", given.sigma_std, self.sigma_std),
        ]
        .into_iter()
        .filter_map(|(flag, given, kept)| {
            given
                .filter(|v| *v != kept)
                .map(|v| format!("{flag} {v} (the run has {kept})"))
        })
        .collect()
    }
}

/// The settings of the run in `run_dir`, if it has a checkpoint to resume.
pub fn resumed_config(run_dir: &Path) -> Result<Option<PretrainConfig>, PipelineError> {
    Ok(crate::train::resumed_run_config(run_dir)?)
}

/// One step's data. It is drawn from an RNG seeded by (seed, step) in a fixed order (examples,
/// caption dropout, noise levels, noise), so a resumed run sees the batches a straight one would.
struct Batch {
    prompts: Vec<String>,
    /// [b, c, h, w]: images in [-1, 1], or the frozen autoencoder's latents of them
    x0: TensorData,
    sigmas: Vec<f64>,
    /// [b, c, h, w]
    noise: TensorData,
}

fn training_batch(
    step: usize,
    config: &PretrainConfig,
    train: &[PromptSpec],
    size: usize,
    vae: Option<&Vae>,
    device: &Device,
) -> Batch {
    let mut rng = ChaCha8Rng::seed_from_u64(config.seed.wrapping_mul(0x9E37_79B9) ^ step as u64);
    let (mut prompts, images): (Vec<String>, Vec<Image>) = (0..config.batch_size)
        .map(|_| example(&mut rng, train, size, config))
        .unzip();
    for prompt in prompts.iter_mut() {
        if rng.random_bool(config.caption_dropout) {
            prompt.clear();
        }
    }
    let pixels = from_images(&images, device);
    let x0 = match vae {
        None => pixels,
        Some(vae) => vae.encode(pixels),
    };
    let [b, c, h, w] = x0.dims();
    let sigmas: Vec<f64> = (0..b)
        .map(|_| {
            let u: f64 = StandardNormal.sample(&mut rng);
            1.0 / (1.0 + (-(config.sigma_mean + config.sigma_std * u)).exp())
        })
        .collect();
    let noise: Vec<f32> = (0..b * c * h * w)
        .map(|_| StandardNormal.sample(&mut rng))
        .collect();
    Batch {
        prompts,
        x0: x0.into_data(),
        sigmas,
        noise: TensorData::new(noise, [b, c, h, w]),
    }
}

/// One training example: caption and image.
pub fn example(
    rng: &mut ChaCha8Rng,
    train: &[PromptSpec],
    size: usize,
    config: &PretrainConfig,
) -> (String, Image) {
    if rng.random_bool(config.digits_fraction) {
        let number = digits::random_number(rng);
        let image = digits::render_number(rng, &number, size);
        return (digits::prompt_for(&number), image);
    }
    // Tags uniformly, then a prompt of that tag uniformly: counting's 6 prompts weigh as much as
    // color_attr's 80.
    let tags = crate::world::prompt::TAGS;
    loop {
        let tag = tags[rng.random_range(0..tags.len())];
        let of_tag: Vec<&PromptSpec> = train.iter().filter(|s| s.tag == tag).collect();
        if of_tag.is_empty() {
            continue;
        }
        let spec = of_tag[rng.random_range(0..of_tag.len())];
        if let Some(scene) = compose::scene_for(rng, spec) {
            return (spec.prompt.clone(), render(&scene, size));
        }
    }
}

/// Warm-up counts from the run's first step: a run continuing other weights starts with a fresh
/// optimizer, whose first moments are as noisy as at step 0.
fn learning_rate(config: &PretrainConfig, first_step: usize, step: usize) -> f64 {
    crate::train::warmup_decay_lr(
        config.learning_rate,
        config.warmup_steps,
        config.decay_steps,
        config.steps,
        first_step,
        step,
    )
}

/// Runs (or resumes) pretraining into `run_dir`; `pipeline` must live on an autodiff device.
/// Returns the raw trained weights (the checkpoint holds their EMA when `ema_decay` > 0).
/// A new run starts at `first_step` (0 from scratch; the step its weights reached when
/// `pipeline` continues another run's checkpoint, so it sees new batches).
pub fn pretrain(
    pipeline: Pipeline,
    config: &PretrainConfig,
    first_step: usize,
    train: &[PromptSpec],
    run_dir: &Path,
    device: &Device,
    on_log: impl FnMut(&PretrainMetrics),
) -> Result<Pipeline, PipelineError> {
    let never = AtomicBool::new(false);
    pretrain_until(
        pipeline, config, first_step, train, run_dir, device, on_log, &never,
    )
    .map(|(pipeline, _)| pipeline)
}

/// [`pretrain`] that also stops when `stop` is set (Ctrl-C): the running step finishes, a
/// checkpoint is written at that step, and the weights so far are returned with the step reached.
/// Rerunning resumes.
#[allow(clippy::too_many_arguments)]
pub fn pretrain_until(
    pipeline: Pipeline,
    config: &PretrainConfig,
    first_step: usize,
    train: &[PromptSpec],
    run_dir: &Path,
    device: &Device,
    mut on_log: impl FnMut(&PretrainMetrics),
    stop: &AtomicBool,
) -> Result<(Pipeline, usize), PipelineError> {
    let io = |path: PathBuf| move |source| crate::model::weights::LoadError::Io { path, source };
    std::fs::create_dir_all(run_dir).map_err(io(run_dir.to_path_buf()))?;
    let state_path = run_dir.join("state.json");
    let optimizer_path = run_dir.join("optimizer.bin");
    let checkpoint_dir = run_dir.join("checkpoint");
    let Pipeline {
        text:
            TextStack::Clip(Encoder {
                tokenizer,
                model: text_encoder,
            }),
        transformer: Transformer::Sd3(transformer),
        vae,
        index,
        scheduler,
    } = pipeline
    else {
        return Err(PipelineError::Folder {
            path: run_dir.to_path_buf(),
            message: "pretraining builds the bundled architecture (one CLIP and an SD3 transformer, in pixel space or on a frozen autoencoder's latents)".into(),
        });
    };
    // The autoencoder is frozen: it encodes each batch without a graph.
    let vae = vae.map(|v| v.valid());
    let plain_device = device.clone().inner();
    let mut network = Network {
        text_encoder,
        transformer,
    };
    let mut optimizer: ModuleOptimizer = AdamWConfig::new()
        .with_weight_decay(config.weight_decay as f32)
        .with_grad_clipping(Some(burn::grad_clipping::GradientClippingConfig::Norm(
            config.grad_clip as f32,
        )))
        .init();
    let network_path = run_dir.join("network.bpk");
    let average_path = run_dir.join("ema.bpk");
    let mut start = first_step;
    let mut first_step = first_step;
    if state_path.exists() {
        let state: RunState = crate::model::read_config(&state_path)?;
        start = state.step;
        first_step = state.first_step;
        network = network
            .try_load_file(&network_path)
            .map_err(|e| PipelineError::Folder {
                path: network_path.clone(),
                message: format!("cannot resume the weights: {e}"),
            })?;
        optimizer = optimizer
            .load(&optimizer_path)
            .map_err(|e| PipelineError::Folder {
                path: optimizer_path.clone(),
                message: format!("cannot resume the optimizer: {e}"),
            })?;
    }
    let use_average = config.ema_decay > 0.0;
    let mut average = network.valid();
    if use_average && state_path.exists() {
        average = average
            .try_load_file(&average_path)
            .map_err(|e| PipelineError::Folder {
                path: average_path.clone(),
                message: format!("cannot resume the weight average: {e}"),
            })?;
    }
    let mut metrics = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(run_dir.join("metrics.jsonl"))
        .map_err(io(run_dir.join("metrics.jsonl")))?;
    let vae_scale = vae.as_ref().map_or(1, |v| v.config.downscale());
    let size = index
        .pixel_resolution
        .unwrap_or(network.transformer.config.sample_size * vae_scale);
    let mut loss_sum = 0.0;
    let mut timer = Instant::now();
    let pipeline_parts = (tokenizer, index, scheduler);
    // The next step's batch (renders, and their latents: a third of a latent step's time) is
    // made on another thread while this one trains.
    let (network, reached) =
        std::thread::scope(|scope| -> Result<(Network, usize), PipelineError> {
            let (sender, batches) = std::sync::mpsc::sync_channel(1);
            let producer_vae = vae.as_ref();
            let producer_device = plain_device.clone();
            scope.spawn(move || {
                for step in start..config.steps {
                    let batch =
                        training_batch(step, config, train, size, producer_vae, &producer_device);
                    if sender.send(batch).is_err() {
                        break;
                    }
                }
            });
            for step in start..config.steps {
                let Ok(Batch {
                    prompts,
                    x0,
                    sigmas,
                    noise,
                }) = batches.recv()
                else {
                    // the producer panicked: the scope's join reports it
                    break;
                };
                let x0 = Tensor::<4>::from_data(x0, device);
                let [b, _, _, _] = x0.dims();
                let noise = Tensor::<4>::from_data(noise, device);
                let sigma = Tensor::<1>::from_data(
                    TensorData::new(sigmas.iter().map(|&s| s as f32).collect::<Vec<_>>(), [b]),
                    device,
                )
                .reshape([b, 1, 1, 1]);
                // x_σ = (1 − σ)·x₀ + σ·ε, target ε − x₀
                let x_sigma = x0.clone() * (sigma.clone().neg().add_scalar(1.0))
                    + noise.clone() * sigma.clone();
                let target = noise - x0.clone();

                let ids = pipeline_parts.0.encode(&prompts)?;
                let text = network.text_encoder.forward(&ids, device);
                let sequence = text.hidden_states[text.hidden_states.len() - 2].clone();
                let timesteps: Vec<f64> = sigmas.iter().map(|s| s * 1000.0).collect();
                let out = network
                    .transformer
                    .forward(x_sigma, &timesteps, sequence, text.pooled);
                let error = match pipeline_parts.1.prediction {
                    Prediction::Velocity => out - target,
                    // (x̂₀ − x₀) / max(σ, floor): the v-error (x_σ − x̂₀)/σ − (x_σ − x₀)/σ when floor ≤ σ
                    Prediction::Sample => (out - x0) / sigma.clamp_min(config.loss_sigma_floor),
                };
                let loss = error.square().mean();
                let loss_value = loss.clone().into_scalar::<f32>() as f64;
                if !loss_value.is_finite() {
                    return Err(PipelineError::Folder {
                        path: run_dir.to_path_buf(),
                        message: format!(
                            "loss is {loss_value} at step {step}; last checkpoint kept"
                        ),
                    });
                }
                let grads = GradientsParams::from_grads(loss.backward(), &network);
                let lr = learning_rate(config, first_step, step);
                network = optimizer.step(lr, network, grads);
                if use_average {
                    let decay =
                        crate::train::ema::Ema::decay(step + 1 - first_step, config.ema_decay);
                    average = update_average(average, &network, decay);
                }
                loss_sum += loss_value;

                let done = step + 1;
                let stopping = stop.load(Ordering::SeqCst);
                if done % config.log_every == 0 || done == config.steps {
                    let n = (done - start).min(config.log_every).max(1);
                    let m = PretrainMetrics {
                        step: done,
                        loss: loss_sum / n as f64,
                        learning_rate: lr,
                        seconds_per_step: timer.elapsed().as_secs_f64() / n as f64,
                    };
                    writeln!(metrics, "{}", serde_json::to_string(&m).expect("json"))
                        .map_err(io(run_dir.join("metrics.jsonl")))?;
                    on_log(&m);
                    loss_sum = 0.0;
                    timer = Instant::now();
                }
                if done % config.checkpoint_every == 0 || done == config.steps || stopping {
                    let weights = if use_average {
                        average.clone()
                    } else {
                        network.valid()
                    };
                    let snapshot = Pipeline {
                        text: TextStack::Clip(Encoder {
                            tokenizer: pipeline_parts.0.clone(),
                            model: weights.text_encoder,
                        }),
                        transformer: Transformer::Sd3(weights.transformer),
                        vae: vae.clone(),
                        index: pipeline_parts.1.clone(),
                        scheduler: pipeline_parts.2.clone(),
                    };
                    // Write to a temporary folder, then swap: a killed run never leaves half a checkpoint.
                    let tmp = run_dir.join("checkpoint.tmp");
                    let _ = std::fs::remove_dir_all(&tmp);
                    snapshot.save_dir(&tmp)?;
                    optimizer.save(run_dir.join("optimizer.tmp")).map_err(|e| {
                        PipelineError::Folder {
                            path: optimizer_path.clone(),
                            message: e.to_string(),
                        }
                    })?;
                    let save_module = |module: &Network, path: &Path| {
                        module
                            .clone()
                            .save_file(path.with_extension("tmp"))
                            .map_err(|e| PipelineError::Folder {
                                path: path.to_path_buf(),
                                message: e.to_string(),
                            })
                    };
                    save_module(&network, &network_path)?;
                    if use_average {
                        save_module(&average, &average_path)?;
                    }
                    let _ = std::fs::remove_dir_all(&checkpoint_dir);
                    std::fs::rename(&tmp, &checkpoint_dir).map_err(io(checkpoint_dir.clone()))?;
                    std::fs::rename(run_dir.join("optimizer.tmp"), &optimizer_path)
                        .map_err(io(optimizer_path.clone()))?;
                    std::fs::rename(network_path.with_extension("tmp"), &network_path)
                        .map_err(io(network_path.clone()))?;
                    if use_average {
                        std::fs::rename(average_path.with_extension("tmp"), &average_path)
                            .map_err(io(average_path.clone()))?;
                    }
                    let state = RunState {
                        step: done,
                        first_step,
                        config: config.clone(),
                    };
                    std::fs::write(
                        &state_path,
                        serde_json::to_string_pretty(&state).expect("json"),
                    )
                    .map_err(io(state_path.clone()))?;
                }
                if stopping {
                    return Ok((network, done));
                }
            }
            Ok((network, config.steps.max(start)))
        })?;
    let pipeline = Pipeline {
        text: TextStack::Clip(Encoder {
            tokenizer: pipeline_parts.0,
            model: network.text_encoder,
        }),
        transformer: Transformer::Sd3(network.transformer),
        vae,
        index: pipeline_parts.1,
        scheduler: pipeline_parts.2,
    };
    Ok((pipeline, reached))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_resumed_run_accepts_its_own_settings_and_names_changed_ones() {
        let stored = PretrainConfig {
            learning_rate: 1e-4,
            sigma_mean: 0.0,
            ..PretrainConfig::default()
        };
        assert!(stored.resume_conflicts(&ResumeFlags::default()).is_empty());
        let same = ResumeFlags {
            batch_size: Some(stored.batch_size),
            learning_rate: Some(1e-4),
            seed: Some(stored.seed),
            ema_decay: Some(stored.ema_decay),
            sigma_mean: Some(0.0),
            sigma_std: Some(stored.sigma_std),
        };
        assert!(stored.resume_conflicts(&same).is_empty());
        let changed = ResumeFlags {
            learning_rate: Some(2e-4),
            seed: Some(stored.seed + 1),
            ..same
        };
        let conflicts = stored.resume_conflicts(&changed);
        assert_eq!(conflicts.len(), 2, "{conflicts:?}");
        assert_eq!(conflicts[0], "--lr 0.0002 (the run has 0.0001)");
        assert!(conflicts[1].starts_with("--seed "), "{conflicts:?}");
    }
}
