//! Training the Shapes autoencoder (`portaflow train vae`): a tiny diffusers `AutoencoderKL`
//! fitted to Shapes-world renders, so the bundled transformer can work on a 16×16×4 latent
//! (patch 2, 16 numbers per token) instead of 8×8×3 pixel patches (192 numbers per token),
//! leaving sub-patch edges to the convolutional decoder. As SD's autoencoders train, without the
//! adversarial and perceptual terms (flat colours on a plain background need neither):
//! loss = ‖D(z) − x‖² + `kl_weight`·KL(q(z|x) ‖ N(0, I)), z ~ q(z|x), both as means over
//! values. The latent statistics of a fixed calibration batch become the config's
//! `shift_factor` and `scaling_factor` (1/std), as SD3's are.
//!
//! Resumable like pretraining: `network.bpk`, `optimizer.bin`, `state.json`, `metrics.jsonl`,
//! and the loadable `vae/` folder, written at each checkpoint; step `s` draws its scenes and
//! noise from an RNG seeded by (seed, s).

use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::module::Module;
use burn::optim::{AdamWConfig, GradientsParams, ModuleOptimizer};
use burn::tensor::{Device, Tensor, TensorData};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use serde::{Deserialize, Serialize};

use crate::model::vae::{Vae, VaeConfig};
use crate::pipeline::{PipelineError, from_images};
use crate::train::pretrain::{PretrainConfig, example};
use crate::world::prompt::PromptSpec;
use crate::world::render::Image;

/// Autoencoder training settings (stored in the run's `state.json`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VaeTrainConfig {
    pub steps: usize,
    pub batch_size: usize,
    pub learning_rate: f64,
    pub warmup_steps: usize,
    /// The learning rate decays linearly to a tenth over the last `decay_steps` steps.
    pub decay_steps: usize,
    /// Weight of the KL term (mean over latent values) against the reconstruction error (mean
    /// over pixels in [−1, 1]).
    pub kl_weight: f64,
    /// Fraction of digit renders among the training images (as in pretraining).
    pub digits_fraction: f64,
    pub seed: u64,
    pub log_every: usize,
    pub checkpoint_every: usize,
}

impl Default for VaeTrainConfig {
    fn default() -> Self {
        Self {
            steps: 2000,
            batch_size: 8,
            learning_rate: 1e-3,
            warmup_steps: 100,
            decay_steps: 500,
            kl_weight: 1e-5,
            digits_fraction: 0.15,
            seed: 0,
            log_every: 10,
            checkpoint_every: 250,
        }
    }
}

impl VaeTrainConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.steps == 0 || self.batch_size == 0 {
            return Err(format!(
                "steps and batch_size must be ≥ 1, got {} and {}",
                self.steps, self.batch_size
            ));
        }
        if !(self.learning_rate > 0.0 && self.learning_rate.is_finite()) {
            return Err(format!(
                "learning_rate must be > 0, got {}",
                self.learning_rate
            ));
        }
        if !(self.kl_weight >= 0.0 && self.kl_weight.is_finite()) {
            return Err(format!("kl_weight must be ≥ 0, got {}", self.kl_weight));
        }
        if !(0.0..=1.0).contains(&self.digits_fraction) {
            return Err(format!(
                "digits_fraction must be in [0, 1], got {}",
                self.digits_fraction
            ));
        }
        Ok(())
    }
}

/// The Shapes autoencoder: 64×64 RGB ↔ 16×16×4 (two stride-2 levels), widths 16/32/32, one
/// resnet per encoder level (two per decoder level), GroupNorm in groups of 8, single-head
/// attention in the 16×16 mid block; 0.24 M parameters (242,327).
pub fn shapes_vae_config() -> VaeConfig {
    VaeConfig {
        class_name: "AutoencoderKL".into(),
        in_channels: 3,
        out_channels: 3,
        latent_channels: 4,
        block_out_channels: vec![16, 32, 32],
        layers_per_block: 1,
        norm_num_groups: 8,
        mid_block_add_attention: true,
        use_quant_conv: true,
        use_post_quant_conv: true,
        scaling_factor: Some(1.0),
        shift_factor: Some(0.0),
        batch_norm_eps: None,
        down_block_types: None,
        up_block_types: None,
    }
    .with_block_types()
}

/// One line of `metrics.jsonl`.
#[derive(Debug, Serialize, Deserialize)]
pub struct VaeMetrics {
    pub step: usize,
    pub loss: f64,
    /// Mean squared reconstruction error in [−1, 1] units.
    pub reconstruction_mse: f64,
    /// PSNR of the reconstruction on [0, 1] pixels: 10·log10(4 / mse).
    pub psnr_db: f64,
    pub kl: f64,
    pub learning_rate: f64,
    pub seconds_per_step: f64,
}

#[derive(Debug, Serialize, Deserialize)]
struct RunState {
    step: usize,
    config: VaeTrainConfig,
}

/// The settings of the run in `run_dir`, if it has a checkpoint to resume.
pub fn resumed_config(run_dir: &Path) -> Result<Option<VaeTrainConfig>, PipelineError> {
    Ok(crate::train::resumed_run_config(run_dir)?)
}

/// `count` training renders drawn from the RNG seeded by (seed, `stream`).
pub fn renders(
    train: &[PromptSpec],
    config: &VaeTrainConfig,
    stream: u64,
    count: usize,
    size: usize,
) -> Vec<Image> {
    let mut rng = ChaCha8Rng::seed_from_u64(config.seed.wrapping_mul(0x9E37_79B9) ^ stream);
    let data = PretrainConfig {
        digits_fraction: config.digits_fraction,
        ..PretrainConfig::default()
    };
    (0..count)
        .map(|_| example(&mut rng, train, size, &data).1)
        .collect()
}

/// Sets `shift_factor` to the mean and `scaling_factor` to 1/std of the posterior means of
/// `images` (on a device without autodiff).
pub fn calibrate(vae: &mut Vae, images: &[Image], device: &Device) {
    let mean = vae.encode_mean(from_images(images, device));
    let values: Vec<f32> = mean
        .into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .expect("f32 latents");
    let n = values.len() as f64;
    let mu = values.iter().map(|&v| v as f64).sum::<f64>() / n;
    let var = values.iter().map(|&v| (v as f64 - mu).powi(2)).sum::<f64>() / n;
    vae.config.shift_factor = Some(mu);
    vae.config.scaling_factor = Some(1.0 / var.sqrt().max(1e-6));
}

const CALIBRATION_STREAM: u64 = u64::MAX;
const CALIBRATION_IMAGES: usize = 64;

/// Trains (or resumes training of) `vae` into `run_dir`; `vae` must live on `device`, an
/// autodiff device. Returns the trained, calibrated autoencoder.
pub fn train_vae(
    vae: Vae,
    config: &VaeTrainConfig,
    train: &[PromptSpec],
    run_dir: &Path,
    device: &Device,
    mut on_log: impl FnMut(&VaeMetrics),
) -> Result<Vae, PipelineError> {
    let folder_error = |path: &Path, message: String| PipelineError::Folder {
        path: path.to_path_buf(),
        message,
    };
    config
        .validate()
        .map_err(|message| folder_error(run_dir, message))?;
    let io = |path: PathBuf| move |source| crate::model::weights::LoadError::Io { path, source };
    std::fs::create_dir_all(run_dir).map_err(io(run_dir.to_path_buf()))?;
    let state_path = run_dir.join("state.json");
    let network_path = run_dir.join("network.bpk");
    let optimizer_path = run_dir.join("optimizer.bin");
    let mut vae = vae;
    let mut optimizer: ModuleOptimizer = AdamWConfig::new()
        .with_weight_decay(0.0)
        .with_grad_clipping(Some(burn::grad_clipping::GradientClippingConfig::Norm(1.0)))
        .init();
    let mut start = 0;
    if state_path.exists() {
        let state: RunState = crate::model::read_config(&state_path)?;
        start = state.step;
        vae = vae
            .try_load_file(&network_path)
            .map_err(|e| folder_error(&network_path, format!("cannot resume the weights: {e}")))?;
        optimizer = optimizer.load(&optimizer_path).map_err(|e| {
            folder_error(&optimizer_path, format!("cannot resume the optimizer: {e}"))
        })?;
    }
    let size = crate::pipeline::SHAPES_RESOLUTION;
    let calibration = renders(train, config, CALIBRATION_STREAM, CALIBRATION_IMAGES, size);
    let plain_device = device.clone().inner();
    let metrics_path = run_dir.join("metrics.jsonl");
    let mut sums = [0.0f64; 3];
    let mut timer = Instant::now();
    for step in start..config.steps {
        let images = renders(train, config, step as u64, config.batch_size, size);
        let x = from_images(&images, device);
        let (mean, logvar) = vae.encode_moments(x.clone());
        let logvar = logvar.clamp(-30.0, 20.0);
        let dims = mean.dims();
        let mut rng = ChaCha8Rng::seed_from_u64(config.seed ^ (step as u64).rotate_left(32));
        let eps: Vec<f32> = (0..dims.iter().product::<usize>())
            .map(|_| StandardNormal.sample(&mut rng))
            .collect();
        let eps = Tensor::<4>::from_data(TensorData::new(eps, dims), device);
        // z = μ + σ·ε
        let z = mean.clone() + logvar.clone().mul_scalar(0.5).exp() * eps;
        let reconstruction = (vae.decode_raw(z) - x).square().mean();
        // KL(N(μ, σ²) ‖ N(0, 1)) = ½(μ² + σ² − 1 − log σ²), per latent value
        let kl = (mean.square() + logvar.clone().exp() - logvar)
            .sub_scalar(1.0)
            .mul_scalar(0.5)
            .mean();
        let loss = reconstruction.clone() + kl.clone().mul_scalar(config.kl_weight);
        let values = [
            loss.clone().into_scalar::<f32>() as f64,
            reconstruction.into_scalar::<f32>() as f64,
            kl.into_scalar::<f32>() as f64,
        ];
        if !values[0].is_finite() {
            return Err(folder_error(
                run_dir,
                format!("loss is {} at step {step}; last checkpoint kept", values[0]),
            ));
        }
        let grads = GradientsParams::from_grads(loss.backward(), &vae);
        let lr = crate::train::warmup_decay_lr(
            config.learning_rate,
            config.warmup_steps,
            config.decay_steps,
            config.steps,
            0,
            step,
        );
        vae = optimizer.step(lr, vae, grads);
        for (sum, v) in sums.iter_mut().zip(values) {
            *sum += v;
        }

        let done = step + 1;
        if done % config.log_every == 0 || done == config.steps {
            let n = (done - start).min(config.log_every).max(1) as f64;
            let mse = sums[1] / n;
            let m = VaeMetrics {
                step: done,
                loss: sums[0] / n,
                reconstruction_mse: mse,
                psnr_db: 10.0 * (4.0 / mse.max(1e-12)).log10(),
                kl: sums[2] / n,
                learning_rate: lr,
                seconds_per_step: timer.elapsed().as_secs_f64() / n,
            };
            crate::train::append_jsonl(&metrics_path, &m).map_err(io(metrics_path.clone()))?;
            on_log(&m);
            sums = [0.0; 3];
            timer = Instant::now();
        }
        if done % config.checkpoint_every == 0 || done == config.steps {
            let mut snapshot = vae.valid();
            calibrate(&mut snapshot, &calibration, &plain_device);
            // Write beside, then swap: a killed run never leaves half a checkpoint.
            let tmp = run_dir.join("vae.tmp");
            let _ = std::fs::remove_dir_all(&tmp);
            snapshot.save_dir(&tmp)?;
            optimizer
                .save(run_dir.join("optimizer.tmp"))
                .map_err(|e| folder_error(&optimizer_path, e.to_string()))?;
            vae.clone()
                .save_file(network_path.with_extension("tmp"))
                .map_err(|e| folder_error(&network_path, e.to_string()))?;
            let vae_dir = run_dir.join("vae");
            let _ = std::fs::remove_dir_all(&vae_dir);
            std::fs::rename(&tmp, &vae_dir).map_err(io(vae_dir.clone()))?;
            std::fs::rename(run_dir.join("optimizer.tmp"), &optimizer_path)
                .map_err(io(optimizer_path.clone()))?;
            std::fs::rename(network_path.with_extension("tmp"), &network_path)
                .map_err(io(network_path.clone()))?;
            let state = RunState {
                step: done,
                config: config.clone(),
            };
            std::fs::write(
                &state_path,
                serde_json::to_string_pretty(&state).expect("json"),
            )
            .map_err(io(state_path.clone()))?;
        }
    }
    let mut trained = vae.valid();
    calibrate(&mut trained, &calibration, &plain_device);
    Ok(trained)
}
