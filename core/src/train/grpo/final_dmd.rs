//! RTDMD's final-step AC-DMD term on the GRPO trainer (ALGORITHMS.md §3.3): at the rollout's
//! last, deterministic step the policy's x̂₀ = x_last − σ_last·v_θ gets `weight·L_DMD` with
//! s = 0: x̂₀ is re-noised to t', the teacher (the base as given, with CFG, or with the scale
//! embedded on a guidance-distilled model) and a fake score (no CFG) each map x_{t'} back to
//! s = 0, and the normalised difference of their predictions pulls x̂₀ toward the teacher's
//! distribution. The fake score follows the policy: every epoch it is trained on the rollout's
//! images with AC-DMD's fake-score loss (at s = 0 the flow-matching loss).

use std::path::Path;

use burn::module::Module;
use burn::optim::{GradientsParams, ModuleOptimizer};
use burn::tensor::{Device, Tensor};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use super::config::FinalStepDmd;
use super::{GrpoError, clip_global_norm, run_error};
use crate::lora::{self, LoraConfig, LoraWeights};
use crate::pipeline::{PipelineDenoiser, Prediction, Transformer};
use crate::sample::pipeline::{Conditioning, Denoiser, NoiseSource, guided_velocity};
use crate::sample::schedule::{NUM_TRAIN_TIMESTEPS, static_shift};
use crate::train::distill::acdmd::adam;
use crate::train::distill::objectives::{dmd_loss, fake_score_loss, renoise};

/// The fake score's trained adapter.
const FAKE_SCORE: &str = "fake_score";
/// Its folder and optimizer file in a checkpoint.
const FAKE_DIR: &str = "fake_score";
const FAKE_OPTIMIZER: &str = "fake_score_optimizer.bin";

pub(super) struct FinalDmd {
    settings: FinalStepDmd,
    /// The base as given (plain device).
    teacher: Transformer,
    /// Base (+ the cold start's fake adapter, merged) + the trained fake adapter (autodiff).
    fake: Transformer,
    optimizer: ModuleOptimizer,
    prediction: Prediction,
    shift: f64,
}

impl FinalDmd {
    /// `base` is the transformer before any adapter stacking, on the autodiff device. Resumes
    /// the fake score from `checkpoint` when given.
    pub(super) fn new(
        settings: FinalStepDmd,
        base: &Transformer,
        lora_config: &LoraConfig,
        seed: u64,
        checkpoint: Option<&Path>,
        prediction: Prediction,
        shift: f64,
        device: &Device,
    ) -> Result<Self, GrpoError> {
        let teacher = base.valid();
        let mut fake = base.clone();
        if let Some(path) = &settings.fake_lora {
            lora::merge_file(&mut fake, path, "fake_cold_start", device)?;
        }
        let mut optimizer = adam();
        match checkpoint {
            Some(dir) => {
                let adapter = LoraWeights::read(&dir.join(FAKE_DIR))?;
                lora::attach(
                    &mut fake,
                    FAKE_SCORE,
                    adapter.component("transformer"),
                    1.0,
                    device,
                )?;
                let path = dir.join(FAKE_OPTIMIZER);
                optimizer = optimizer.load(&path).map_err(|e| {
                    run_error(
                        &path,
                        format!("cannot resume the fake score's optimizer: {e}"),
                    )
                })?;
            }
            None => {
                lora::init_adapter(
                    &mut fake,
                    FAKE_SCORE,
                    lora_config,
                    seed.wrapping_add(1),
                    device,
                )?;
            }
        }
        Ok(Self {
            settings,
            teacher,
            fake: lora::train_only(fake, FAKE_SCORE),
            optimizer,
            prediction,
            shift,
        })
    }

    /// τ ~ U[10, 1000] clamped to `renoise_range` (RTDMD's draw at s = 0); returns t' = shift(τ).
    fn renoise_level(&self, rng: &mut ChaCha8Rng) -> f64 {
        let [lo, hi] = self.settings.renoise_range;
        let tau: f64 = rng.random_range(10.0..=NUM_TRAIN_TIMESTEPS as f64);
        static_shift(tau.clamp(lo, hi) / NUM_TRAIN_TIMESTEPS as f64, self.shift)
    }

    fn noise(rng: &mut ChaCha8Rng, dims: [usize; 4], device: &Device) -> Tensor<4> {
        let [b, c, h, w] = dims;
        let seeds: Vec<u64> = (0..b).map(|_| rng.random()).collect();
        NoiseSource::new(seeds).initial([c, h, w], device)
    }

    /// One fake-score update on rollout images `x0` (plain device) with their prompts' `cond`;
    /// returns the loss.
    pub(super) fn train_fake(
        &mut self,
        x0: Tensor<4>,
        cond: &Conditioning,
        rng: &mut ChaCha8Rng,
        learning_rate: f64,
        grad_clip: f64,
    ) -> Result<f64, GrpoError> {
        let t = self.renoise_level(rng);
        let device = x0.device();
        let eps = Self::noise(rng, x0.dims(), &device);
        // s = 0: x_{t'} = (1 − t')·x₀ + t'·ε, σ_ts = t'.
        let (x_t, sigma_ts) = renoise(x0.clone(), eps.clone(), 0.0, t);
        let fake = PipelineDenoiser {
            transformer: &self.fake,
            prediction: self.prediction,
        };
        let v = fake.velocity(x_t.autodiff(), t, &cond.autodiff());
        let loss = fake_score_loss(v, x0.autodiff(), eps.autodiff(), 0.0, t, sigma_ts);
        let value = loss.clone().into_scalar::<f32>() as f64;
        if !value.is_finite() {
            tracing::warn!("fake-score loss {value}; this update is skipped");
            return Ok(value);
        }
        let mut grads = GradientsParams::from_grads(loss.backward(), &self.fake);
        clip_global_norm(&self.fake, &mut grads, grad_clip);
        self.fake = self.optimizer.step(learning_rate, self.fake.clone(), grads);
        Ok(value)
    }

    /// `weight·L_DMD(x̂₀)` for the policy's final-step prediction `x0` (autodiff device);
    /// `cond` / `uncond` on the plain device (`uncond` when the teacher runs CFG; a
    /// guidance-distilled teacher gets `teacher_guidance` embedded instead).
    pub(super) fn generator_loss(
        &self,
        x0: Tensor<4>,
        cond: &Conditioning,
        uncond: Option<&Conditioning>,
        rng: &mut ChaCha8Rng,
    ) -> Tensor<1> {
        let t = self.renoise_level(rng);
        let x0_plain = x0.clone().inner();
        let eps = Self::noise(rng, x0_plain.dims(), &x0_plain.device());
        let (x_t, _) = renoise(x0_plain, eps, 0.0, t);
        let teacher = PipelineDenoiser {
            transformer: &self.teacher,
            prediction: self.prediction,
        };
        let v_real = guided_velocity(
            &teacher,
            x_t.clone(),
            t,
            &self
                .teacher
                .with_embedded_guidance(cond.clone(), self.settings.teacher_guidance),
            uncond,
            self.settings.teacher_guidance,
        );
        let snapshot = self.fake.valid();
        let fake = PipelineDenoiser {
            transformer: &snapshot,
            prediction: self.prediction,
        };
        let v_fake = fake.velocity(x_t.clone(), t, cond);
        // Each back to s = 0: the deterministic CPS step to σ' = 0 is x_{t'} − t'·v.
        let real = x_t.clone() - v_real.mul_scalar(t);
        let fake_back = x_t - v_fake.mul_scalar(t);
        dmd_loss(x0, real.autodiff(), fake_back.autodiff()).mul_scalar(self.settings.weight)
    }

    /// Writes the fake adapter and its optimizer into the checkpoint being written at `dir`.
    pub(super) fn save(&self, dir: &Path, lora_config: &LoraConfig) -> Result<(), GrpoError> {
        LoraWeights::from_component(
            "transformer",
            lora::extract(&self.fake, FAKE_SCORE)?,
            Some(lora_config.clone()),
        )
        .write_peft(&dir.join(FAKE_DIR), "transformer")?;
        let path = dir.join(FAKE_OPTIMIZER);
        self.optimizer.save(&path).map_err(|e| run_error(&path, e))
    }
}
