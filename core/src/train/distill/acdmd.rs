//! RTDMD's AC-DMD cold start (ALGORITHMS.md §3.2): distils the base model (the teacher, with
//! CFG) into a 4-step CPS generator held in a LoRA adapter. One iteration:
//!
//! 1. **fake score** (`fake_update_ratio` times, TTUR): the generator simulates backward from
//!    noise and stops after a random number k of its steps, at the ambient latent x_s; x_s is
//!    re-noised to t' > s; the fake-score adapter regresses the sub-interval's target velocity
//!    (`objectives::fake_score_loss`), plus the consistency regulariser on two CPS paths;
//! 2. **generator**: the same backward simulation with the graph kept on its last step; teacher
//!    (CFG) and fake score (no CFG) predict at x_{t'}, both are mapped back to s by the same CPS
//!    transition with shared noise, and the normalised DMD gradient moves x_s from the fake
//!    score's prediction toward the teacher's (`objectives::dmd_loss`).
//!
//! The teacher is the untouched base; generator and fake score are two LoRA adapters on copies of
//! it, each with its own AdamW. A run directory holds `config.toml`, `metrics.jsonl`,
//! `eval.jsonl`, `checkpoint/` (both adapters, both optimizers, the iteration) that resumes
//! to float rounding, and `generator_final/` (a PEFT folder: the 4-step student).

use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::module::Module;
use burn::optim::{GradientsParams, ModuleOptimizer};
use burn::tensor::{Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

pub use super::DistillError;
pub(crate) use super::adam;
use super::objectives::{consistency, cps_transition, dmd_loss, fake_score_loss, renoise};
use super::{
    RunState, StudentEval, append_line, evaluate_student, mix, run_error, snapshot_dir,
    truncate_log, write_checkpoint,
};
use crate::lora::{self, LoraWeights};
use crate::pipeline::{GenerateOptions, Pipeline, PipelineDenoiser, PipelineError, Transformer};
use crate::sample::pipeline::{Conditioning, Denoiser, NoiseSource, guided_velocity};
use crate::sample::schedule::{
    NUM_TRAIN_TIMESTEPS, RTDMD_TIMESTEPS, static_shift, timestep_sigmas,
};
use crate::sample::step::StepKind;
use crate::train::grpo::clip_global_norm;
use crate::train::grpo::config::ModelSection;
use crate::world::prompt::PromptSpec;

/// The adapter that becomes the few-step student.
pub const GENERATOR: &str = "generator";
/// The adapter that tracks the generator's own distribution.
pub const FAKE_SCORE: &str = "fake_score";

/// `portaflow distill acdmd` settings (every field has a default; see `configs/acdmd-*.toml`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AcDmdConfig {
    /// Base model (teacher) and the LoRA shape of both adapters.
    pub model: ModelSection,
    /// Training prompts (GenEval JSONL); the repository's Shapes training prompts when absent.
    pub train_prompts: Option<PathBuf>,
    /// Held-out prompts for evaluation; the repository's Shapes test prompts when absent.
    pub test_prompts: Option<PathBuf>,
    /// The generator's timesteps (of 1000), mapped through the model's shift: RTDMD's
    /// `[1000, 750, 500, 250]` is σ = [1, 0.9, 0.75, 0.5] at SD3.5's shift 3.
    pub timesteps: Vec<f64>,
    /// CPS η of the generator's steps and of every transition.
    pub eta: f64,
    /// The teacher's CFG scale (RTDMD: 4.5).
    pub teacher_guidance: f64,
    /// Range of the re-noise timestep τ (of 1000).
    pub renoise_range: [f64; 2],
    /// Fake-score updates per generator update.
    pub fake_update_ratio: usize,
    /// Weight of the fake score's consistency regulariser (0 disables it).
    pub consistency_weight: f64,
    /// The consistency path's jump, at most this many timesteps below τ.
    pub consistency_max_jump: usize,
    pub learning_rate: f64,
    pub fake_learning_rate: f64,
    pub grad_clip: f64,
    /// Prompts per update (generator and fake score alike).
    pub batch_size: usize,
    /// Generator updates.
    pub iterations: usize,
    pub seed: u64,
    /// Held-out evaluation of the student every N iterations (and after the last); 0 never.
    pub eval_every: usize,
    pub eval_prompts: Option<usize>,
    pub eval_images_per_prompt: usize,
    /// Checkpoint every N iterations (and after the last).
    pub save_every: usize,
    /// Keep a copy of the student every N iterations in `snapshots/iter-N/` (a PEFT folder with
    /// its `sampling.json`, to pick an iteration by a held-out evaluation later); 0 never.
    pub snapshot_every: usize,
}

impl Default for AcDmdConfig {
    fn default() -> Self {
        Self {
            model: ModelSection::default(),
            train_prompts: None,
            test_prompts: None,
            timesteps: RTDMD_TIMESTEPS.to_vec(),
            eta: 0.9,
            teacher_guidance: 4.5,
            renoise_range: [20.0, 980.0],
            fake_update_ratio: 10,
            consistency_weight: 1e-2,
            consistency_max_jump: 200,
            learning_rate: 3e-5,
            fake_learning_rate: 3e-5,
            grad_clip: 1.0,
            batch_size: 8,
            iterations: 1000,
            seed: 42,
            eval_every: 100,
            eval_prompts: Some(96),
            eval_images_per_prompt: 1,
            save_every: 100,
            snapshot_every: 0,
        }
    }
}

impl AcDmdConfig {
    pub fn from_file(path: &Path) -> Result<Self, String> {
        crate::train::read_toml_config(path, Self::validate)
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("serialisable config")
    }

    /// Checks every field; the message names the field and what it must be.
    pub fn validate(&self) -> Result<(), String> {
        crate::train::require_counts(&[
            ("batch_size", self.batch_size),
            ("iterations", self.iterations),
            ("save_every", self.save_every),
            ("eval_images_per_prompt", self.eval_images_per_prompt),
            ("model.lora_rank", self.model.lora_rank),
        ])?;
        let t = &self.timesteps;
        let in_range = t.iter().all(|&x| x.is_finite() && x > 0.0 && x <= 1000.0);
        if t.is_empty() || !in_range || t.windows(2).any(|w| w[1] >= w[0]) {
            return Err(format!(
                "timesteps must be decreasing values in (0, 1000] (RTDMD: [1000, 750, 500, 250]), got {t:?}"
            ));
        }
        if !(0.0..=1.0).contains(&self.eta) {
            return Err(format!("eta must be in [0, 1], got {}", self.eta));
        }
        let [lo, hi] = self.renoise_range;
        if !(lo >= 1.0 && lo < hi && hi <= 999.0) {
            return Err(format!(
                "renoise_range must be [lo, hi] with 1 ≤ lo < hi ≤ 999 (RTDMD: [20, 980]), got [{lo}, {hi}]"
            ));
        }
        crate::train::require_positive(&[
            ("learning_rate", self.learning_rate),
            ("fake_learning_rate", self.fake_learning_rate),
            ("grad_clip", self.grad_clip),
        ])?;
        crate::train::require_non_negative(&[
            ("teacher_guidance", self.teacher_guidance),
            ("consistency_weight", self.consistency_weight),
        ])?;
        if self.consistency_weight > 0.0 && self.consistency_max_jump == 0 {
            return Err(
                "consistency_max_jump must be at least 1 when consistency_weight > 0".into(),
            );
        }
        if self.model.lora_targets.is_empty() {
            return Err("model.lora_targets is empty".into());
        }
        if !self.model.merge_adapters.is_empty() {
            return Err("model.merge_adapters is a GRPO setting (LoRA stacking for the RL stage); AC-DMD distils the base model as given".into());
        }
        if self.model.init_adapter.is_some() {
            return Err("model.init_adapter is a GRPO setting (the trained adapter's starting point); AC-DMD starts its generator and fake score fresh".into());
        }
        Ok(())
    }

    /// The generator's σ list for a model with static shift `shift`.
    pub fn sigmas(&self, shift: f64) -> Vec<f64> {
        timestep_sigmas(&self.timesteps, shift)
    }

    fn lora(&self) -> lora::LoraConfig {
        let targets: Vec<&str> = self.model.lora_targets.iter().map(String::as_str).collect();
        lora::LoraConfig::new(self.model.lora_rank, self.model.lora_alpha, &targets)
    }
}

/// One iteration's line in `metrics.jsonl`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AcDmdMetrics {
    pub iteration: usize,
    /// The generator's DMD loss (½·mean g², g the normalised score difference).
    pub dmd_loss: f64,
    /// The fake score's denoising loss, mean over this iteration's updates.
    pub fake_loss: f64,
    pub consistency: f64,
    /// Steps the backward simulation ran (1..=steps), and the ambient level s it stopped at.
    pub stop_step: usize,
    pub ambient_sigma: f64,
    pub generator_grad_norm: f64,
    pub seconds: f64,
    pub peak_memory_mib: Option<f64>,
}

/// The student's held-out accuracy, appended to `eval.jsonl`.
pub type AcDmdEval = StudentEval;

/// An AC-DMD run in progress: call [`AcDmdTrainer::iterate`] until [`AcDmdTrainer::done`].
pub struct AcDmdTrainer {
    pub config: AcDmdConfig,
    /// Base + generator adapter (trainable), autodiff device.
    generator: Transformer,
    /// Base + fake-score adapter (trainable), autodiff device.
    fake: Transformer,
    /// Tokenizer, text encoder, scheduler; its transformer is the teacher (the plain base).
    teacher: Pipeline,
    generator_optimizer: ModuleOptimizer,
    fake_optimizer: ModuleOptimizer,
    train: Vec<String>,
    test: Vec<PromptSpec>,
    sigmas: Vec<f64>,
    shift: f64,
    run_dir: PathBuf,
    pub iteration: usize,
    device: Device,
    plain_device: Device,
}

/// A backward simulation's stopping point.
struct Ambient {
    /// x_s, with the graph of the generator's last executed step when asked for.
    x: Tensor<4>,
    s: f64,
}

impl AcDmdTrainer {
    /// Starts a run in `run_dir`, or resumes it when it holds a checkpoint. `pipeline` is the
    /// base model (the teacher) on an autodiff device, without adapters.
    pub fn new(
        config: AcDmdConfig,
        pipeline: Pipeline,
        train: Vec<String>,
        test: Vec<PromptSpec>,
        run_dir: &Path,
        device: &Device,
    ) -> Result<Self, DistillError> {
        config.validate().map_err(DistillError::Config)?;
        if train.is_empty() {
            return Err(DistillError::Config("no training prompts".into()));
        }
        std::fs::create_dir_all(run_dir).map_err(|e| run_error(run_dir, e))?;
        let config_path = run_dir.join("config.toml");
        let checkpoint = run_dir.join("checkpoint");
        let resuming = checkpoint.join("state.json").is_file();
        if resuming {
            let mut stored = AcDmdConfig::from_file(&config_path).map_err(DistillError::Config)?;
            stored.iterations = config.iterations;
            if stored != config {
                return Err(run_error(
                    &config_path,
                    "the run was started with another config; only iterations may change on resume (start a new run directory otherwise)",
                ));
            }
        }
        std::fs::write(&config_path, config.to_toml()).map_err(|e| run_error(&config_path, e))?;

        let plain_device = device.clone().inner();
        let shift = pipeline.scheduler.shift;
        let sigmas = config.sigmas(shift);
        let lora_config = config.lora();
        let mut generator = pipeline.transformer.clone();
        let mut fake = pipeline.transformer.clone();
        let (mut generator_optimizer, mut fake_optimizer) = (adam(), adam());
        let mut iteration = 0;
        if resuming {
            for (model, name, dir) in [
                (&mut generator, GENERATOR, "generator"),
                (&mut fake, FAKE_SCORE, "fake_score"),
            ] {
                let adapter = LoraWeights::read(&checkpoint.join(dir))?;
                lora::attach(model, name, adapter.component("transformer"), 1.0, device)?;
            }
            let load = |optimizer: ModuleOptimizer, file: &str| {
                let path = checkpoint.join(file);
                optimizer
                    .load(&path)
                    .map_err(|e| run_error(&path, format!("cannot resume the optimizer: {e}")))
            };
            generator_optimizer = load(generator_optimizer, "generator_optimizer.bin")?;
            fake_optimizer = load(fake_optimizer, "fake_score_optimizer.bin")?;
            let state: RunState = crate::model::read_config(&checkpoint.join("state.json"))
                .map_err(PipelineError::from)?;
            iteration = state.iteration;
            truncate_log(&run_dir.join("metrics.jsonl"), iteration)?;
            truncate_log(&run_dir.join("eval.jsonl"), iteration)?;
        } else {
            lora::init_adapter(&mut generator, GENERATOR, &lora_config, config.seed, device)?;
            lora::init_adapter(
                &mut fake,
                FAKE_SCORE,
                &lora_config,
                config.seed.wrapping_add(1),
                device,
            )?;
        }
        let teacher = Pipeline {
            text: pipeline.text.valid(),
            transformer: pipeline.transformer.valid(),
            vae: pipeline.vae.map(|v| v.valid()),
            index: pipeline.index,
            scheduler: pipeline.scheduler,
        };
        Ok(Self {
            generator: lora::train_only(generator, GENERATOR),
            fake: lora::train_only(fake, FAKE_SCORE),
            teacher,
            generator_optimizer,
            fake_optimizer,
            train,
            test,
            sigmas,
            shift,
            run_dir: run_dir.to_path_buf(),
            iteration,
            device: device.clone(),
            plain_device,
            config,
        })
    }

    pub fn done(&self) -> bool {
        self.iteration >= self.config.iterations
    }

    /// The run directory.
    pub fn run_dir(&self) -> &Path {
        &self.run_dir
    }

    /// The student's σ list (0 appended by the sampler).
    pub fn sigmas(&self) -> &[f64] {
        &self.sigmas
    }

    /// The generator (base + student adapter).
    pub fn generator(&self) -> &Transformer {
        &self.generator
    }

    /// The fake score (base + its adapter).
    pub fn fake_score(&self) -> &Transformer {
        &self.fake
    }

    fn sigma_of(&self, timestep: f64) -> f64 {
        static_shift(timestep / NUM_TRAIN_TIMESTEPS as f64, self.shift)
    }

    fn conditioning(&self, prompts: &[String]) -> Result<Conditioning, DistillError> {
        Ok(self.teacher.encode(prompts, &self.plain_device)?)
    }

    /// Runs the generator's CPS steps from noise and stops after `stop_step` of them; the last
    /// executed step keeps its graph when `with_graph`.
    fn simulate(
        &self,
        cond: &Conditioning,
        seeds: &[u64],
        stop_step: usize,
        with_graph: bool,
    ) -> Result<Ambient, DistillError> {
        let size = self.teacher.resolution();
        let shape = self.teacher.latent_shape(size, size)?;
        let mut schedule = self.sigmas.clone();
        schedule.push(0.0);
        let snapshot = self.generator.valid();
        let plain = PipelineDenoiser {
            transformer: &snapshot,
            prediction: self.teacher.index.prediction,
        };
        let noise = |step: usize, device: &Device| {
            let step_seeds: Vec<u64> = seeds.iter().map(|s| mix(*s, 100 + step as u64)).collect();
            NoiseSource::new(step_seeds).initial(shape, device)
        };
        let mut x = NoiseSource::new(seeds.to_vec()).initial(shape, &self.plain_device);
        for j in 0..stop_step - 1 {
            let v = plain.velocity(x.clone(), schedule[j], cond);
            x = cps_transition(
                x,
                v,
                noise(j, &self.plain_device),
                schedule[j],
                schedule[j + 1],
                self.config.eta,
            );
        }
        let j = stop_step - 1;
        let (sigma, s) = (schedule[j], schedule[j + 1]);
        let x = if with_graph {
            let graph = PipelineDenoiser {
                transformer: &self.generator,
                prediction: self.teacher.index.prediction,
            };
            let x = x.autodiff();
            let v = graph.velocity(x.clone(), sigma, &cond.autodiff());
            cps_transition(x, v, noise(j, &self.device), sigma, s, self.config.eta)
        } else {
            let v = plain.velocity(x.clone(), sigma, cond);
            cps_transition(
                x,
                v,
                noise(j, &self.plain_device),
                sigma,
                s,
                self.config.eta,
            )
        };
        Ok(Ambient { x, s })
    }

    /// τ ~ U[1000·s + 10, 1000] clamped to `renoise_range`; returns (τ, t' = shift(τ)).
    fn renoise_level(&self, s: f64, rng: &mut ChaCha8Rng) -> (f64, f64) {
        let [lo, hi] = self.config.renoise_range;
        let start = (NUM_TRAIN_TIMESTEPS as f64 * s + 10.0).min(NUM_TRAIN_TIMESTEPS as f64);
        let tau: f64 = rng.random_range(start..=NUM_TRAIN_TIMESTEPS as f64);
        let tau = tau.clamp(lo, hi);
        (tau, self.sigma_of(tau))
    }

    fn prompts(&self, rng: &mut ChaCha8Rng) -> Vec<String> {
        (0..self.config.batch_size)
            .map(|_| self.train[rng.random_range(0..self.train.len())].clone())
            .collect()
    }

    /// One fake-score update; returns (fake loss, consistency).
    fn fake_step(
        &mut self,
        rng: &mut ChaCha8Rng,
        stop_step: usize,
    ) -> Result<(f64, f64), DistillError> {
        let c = self.config.clone();
        let prompts = self.prompts(rng);
        let seeds: Vec<u64> = (0..prompts.len()).map(|_| rng.random()).collect();
        let cond = self.conditioning(&prompts)?;
        let ambient = self.simulate(&cond, &seeds, stop_step, false)?;
        let s = ambient.s;
        let (tau, t) = self.renoise_level(s, rng);
        let shape = {
            let [_, ch, h, w] = ambient.x.dims();
            [ch, h, w]
        };
        let eps_seeds: Vec<u64> = seeds.iter().map(|s| mix(*s, 1)).collect();
        let eps = NoiseSource::new(eps_seeds).initial(shape, &self.device);
        let x_s = ambient.x.autodiff();
        let (x_t, sigma_ts) = renoise(x_s.clone(), eps.clone(), s, t);
        let cond = cond.autodiff();
        let fake = PipelineDenoiser {
            transformer: &self.fake,
            prediction: self.teacher.index.prediction,
        };
        let v_fake = fake.velocity(x_t.clone(), t, &cond);
        let mut loss = fake_score_loss(v_fake.clone(), x_s, eps, s, t, sigma_ts);
        let mut consistency_value = 0.0;
        if c.consistency_weight > 0.0 {
            // h = x_t − t·v(x_t); two CPS paths to t'' under stop-grad, h'_i = x''_i − t''·v(x''_i).
            let anchor = x_t.clone() - v_fake.clone().mul_scalar(t);
            let jump = rng.random_range(1..=c.consistency_max_jump) as f64;
            let t2 = self.sigma_of((tau - jump).max(1.0));
            let mut paths = Vec::new();
            for path in 0..2u64 {
                let seeds: Vec<u64> = seeds.iter().map(|s| mix(*s, 10 + path)).collect();
                let noise = NoiseSource::new(seeds).initial(shape, &self.device);
                let x2 = cps_transition(
                    x_t.clone().detach(),
                    v_fake.clone().detach(),
                    noise,
                    t,
                    t2,
                    c.eta,
                )
                .detach();
                let v2 = fake.velocity(x2.clone(), t2, &cond);
                paths.push(x2 - v2.mul_scalar(t2));
            }
            let estimate = consistency(anchor, paths[0].clone(), paths[1].clone());
            consistency_value = estimate.clone().into_scalar::<f32>() as f64;
            loss = loss + estimate.mul_scalar(c.consistency_weight);
        }
        let value = loss.clone().into_scalar::<f32>() as f64;
        if !value.is_finite() {
            return Err(run_error(
                &self.run_dir,
                format!("iteration {}: fake-score loss {value}", self.iteration + 1),
            ));
        }
        let mut grads = GradientsParams::from_grads(loss.backward(), &self.fake);
        clip_global_norm(&self.fake, &mut grads, c.grad_clip);
        self.fake = self
            .fake_optimizer
            .step(c.fake_learning_rate, self.fake.clone(), grads);
        Ok((value, consistency_value))
    }

    /// One generator update; returns (DMD loss, gradient norm before clipping, s).
    fn generator_step(
        &mut self,
        rng: &mut ChaCha8Rng,
        stop_step: usize,
    ) -> Result<(f64, f64, f64), DistillError> {
        let c = self.config.clone();
        let prompts = self.prompts(rng);
        let seeds: Vec<u64> = (0..prompts.len()).map(|_| rng.random()).collect();
        let cond = self.conditioning(&prompts)?;
        let uncond = (c.teacher_guidance != 1.0)
            .then(|| self.conditioning(&vec![String::new(); prompts.len()]))
            .transpose()?;
        let ambient = self.simulate(&cond, &seeds, stop_step, true)?;
        let s = ambient.s;
        let (_, t) = self.renoise_level(s, rng);
        let x_s_plain = ambient.x.clone().inner();
        let [_, ch, h, w] = x_s_plain.dims();
        let noise = |stream: u64| {
            let seeds: Vec<u64> = seeds.iter().map(|s| mix(*s, stream)).collect();
            NoiseSource::new(seeds).initial([ch, h, w], &self.plain_device)
        };
        let (x_t, _) = renoise(x_s_plain, noise(1), s, t);
        let teacher = PipelineDenoiser {
            transformer: &self.teacher.transformer,
            prediction: self.teacher.index.prediction,
        };
        let fake_snapshot = self.fake.valid();
        let fake = PipelineDenoiser {
            transformer: &fake_snapshot,
            prediction: self.teacher.index.prediction,
        };
        let v_real = guided_velocity(
            &teacher,
            x_t.clone(),
            t,
            &cond,
            uncond.as_ref(),
            c.teacher_guidance,
        );
        let v_fake = fake.velocity(x_t.clone(), t, &cond);
        // Both back to s by the same transition and the same noise.
        let shared = noise(2);
        let real = cps_transition(x_t.clone(), v_real, shared.clone(), t, s, c.eta);
        let fake_back = cps_transition(x_t, v_fake, shared, t, s, c.eta);
        let loss = dmd_loss(ambient.x, real.autodiff(), fake_back.autodiff());
        let value = loss.clone().into_scalar::<f32>() as f64;
        if !value.is_finite() {
            return Err(run_error(
                &self.run_dir,
                format!("iteration {}: DMD loss {value}", self.iteration + 1),
            ));
        }
        let mut grads = GradientsParams::from_grads(loss.backward(), &self.generator);
        let norm = clip_global_norm(&self.generator, &mut grads, c.grad_clip);
        self.generator =
            self.generator_optimizer
                .step(c.learning_rate, self.generator.clone(), grads);
        Ok((value, norm, s))
    }

    /// One iteration: `fake_update_ratio` fake-score updates, then one generator update.
    pub fn iterate(&mut self) -> Result<AcDmdMetrics, DistillError> {
        let start = Instant::now();
        let c = self.config.clone();
        let mut rng = ChaCha8Rng::seed_from_u64(mix(c.seed, self.iteration as u64));
        // One stop step per iteration, shared by its updates (RTDMD draws it once per iteration).
        let stop_step = rng.random_range(1..=self.sigmas.len());
        let (mut fake_loss, mut consistency_value) = (0.0, 0.0);
        for _ in 0..c.fake_update_ratio {
            let (l, k) = self.fake_step(&mut rng, stop_step)?;
            fake_loss += l / c.fake_update_ratio as f64;
            consistency_value += k / c.fake_update_ratio as f64;
        }
        let (dmd, norm, s) = self.generator_step(&mut rng, stop_step)?;
        self.iteration += 1;
        let metrics = AcDmdMetrics {
            iteration: self.iteration,
            dmd_loss: dmd,
            fake_loss,
            consistency: consistency_value,
            stop_step,
            ambient_sigma: s,
            generator_grad_norm: norm,
            seconds: start.elapsed().as_secs_f64(),
            peak_memory_mib: crate::train::peak_memory_mib(),
        };
        append_line(&self.run_dir.join("metrics.jsonl"), &metrics)?;
        let last = self.done();
        let due = |every: usize| every > 0 && (self.iteration % every == 0 || last);
        if due(c.save_every) {
            self.save_checkpoint()?;
        }
        if c.snapshot_every > 0 && self.iteration % c.snapshot_every == 0 {
            self.write_student_to(snapshot_dir(&self.run_dir, self.iteration))?;
        }
        if last {
            self.write_student()?;
        }
        Ok(metrics)
    }

    /// Writes the student as it is now to `generator_final/` (a PEFT folder).
    pub fn write_student(&self) -> Result<PathBuf, DistillError> {
        self.write_student_to(self.run_dir.join("generator_final"))
    }

    /// Writes the student as it is now to `dir` (a PEFT folder with its `sampling.json`).
    fn write_student_to(&self, dir: PathBuf) -> Result<PathBuf, DistillError> {
        self.student().write_peft(&dir, "transformer")?;
        lora::AdapterSampling::new(
            StepKind::Cps {
                eta: self.config.eta,
            },
            &self.sigmas,
            1.0,
        )
        .write(&dir)
        .map_err(|e| run_error(&dir, e))?;
        Ok(dir)
    }

    /// Whether this iteration's metrics call for a held-out evaluation.
    pub fn eval_due(&self) -> bool {
        let every = self.config.eval_every;
        every > 0 && !self.test.is_empty() && (self.iteration % every == 0 || self.done())
    }

    /// The student adapter as a PEFT folder's contents.
    pub fn student(&self) -> LoraWeights {
        let modules = lora::extract(&self.generator, GENERATOR).expect("the generator adapter");
        LoraWeights::from_component("transformer", modules, Some(self.config.lora()))
    }

    /// Held-out accuracy of the student: its own σ list, CPS η, no CFG; appended to `eval.jsonl`.
    pub fn evaluate(&mut self) -> Result<AcDmdEval, DistillError> {
        let c = &self.config;
        let mut sampling = GenerateOptions::euler(self.sigmas.len(), 1.0, vec![]);
        sampling.kind = StepKind::Cps { eta: c.eta };
        sampling.sigmas = Some(self.sigmas.clone());
        let eval = evaluate_student(
            &mut self.teacher,
            self.generator.valid(),
            &self.test,
            c.eval_prompts,
            c.eval_images_per_prompt,
            c.batch_size,
            c.seed,
            sampling,
            self.iteration,
            &self.plain_device,
        )?;
        append_line(&self.run_dir.join("eval.jsonl"), &eval)?;
        Ok(eval)
    }

    /// Writes `checkpoint/` atomically: both adapters (PEFT folders), both optimizers, iteration.
    pub fn save_checkpoint(&self) -> Result<PathBuf, DistillError> {
        write_checkpoint(
            &self.run_dir,
            &self.config.lora(),
            &[
                (&self.generator, GENERATOR, "generator"),
                (&self.fake, FAKE_SCORE, "fake_score"),
            ],
            &[
                (&self.generator_optimizer, "generator_optimizer.bin"),
                (&self.fake_optimizer, "fake_score_optimizer.bin"),
            ],
            self.iteration,
            |_| Ok(()),
        )
    }
}
