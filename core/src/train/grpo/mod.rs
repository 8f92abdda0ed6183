//! Flow-GRPO: online RL of a flow-matching model's LoRA adapter (yifan123/flow_grpo,
//! `scripts/train_sd3.py`; ALGORITHMS.md §1). One epoch, top to bottom:
//!
//! 1. **prompts**: `groups_per_epoch` distinct prompts, each repeated `group_size` times, shuffled
//!    (an RNG seeded with `seed + epoch`, as `DistributedKRepeatSampler`);
//! 2. **rollout**: the current policy samples with the SDE on the stochastic steps of the step
//!    plan, storing x_j, x_{j+1} and log π_old for the trained steps; rewards are scored on other
//!    threads while the next batch samples;
//! 3. **advantages**: per-prompt mean, global or group std + 1e-4; zero-advantage samples dropped;
//! 4. **training**: per micro-batch and trained step, the PPO clipped loss on the recomputed
//!    log-prob, plus β·KL to the same transformer with the adapter off; AdamW on the adapter only,
//!    global-norm clipping, one optimizer step per `grad_accum` micro-batches; EMA;
//! 5. **bookkeeping**: `metrics.jsonl`, held-out ODE evaluation with the EMA adapter, sample grids,
//!    checkpoints (adapter and EMA as PEFT folders, optimizer state, epoch) that resume exactly.

pub mod advantage;
pub mod config;
mod draft;
mod final_dmd;
pub mod held_out;
pub mod loss;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::module::Module;
use burn::optim::{AdamWConfig, GradientsAccumulator, GradientsParams, ModuleOptimizer};
use burn::tensor::{Device, Int, Tensor, TensorData};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::lora::{self, LoraWeights};
use crate::pipeline::eval::{EvalOptions, evaluate_pipeline_with};
use crate::pipeline::{
    GenerateOptions, Pipeline, PipelineDenoiser, PipelineError, Transformer, to_images,
};
use crate::reward::boxes::{DefectBox, map_advantages, reward_map};
use crate::reward::remote::RemoteReward;
use crate::reward::{DenseShapesReward, OcrReward, Reward, Score, Scored, ShapesReward, Task};
use crate::sample::pipeline::{Conditioning, NoiseSource, SampleOptions, guided_velocity, sample};
use crate::sample::schedule::{self, Schedule};
use crate::sample::select::TrainingClock;
use crate::sample::step::{self, StepKind};
use crate::train::distill::objectives::opd_kl_reward;
use crate::train::ema::Ema;
use crate::world::digits;
use crate::world::prompt::PromptSpec;
use crate::world::render::Image;
use advantage::{combine, keep_informative};
use config::{GrpoConfig, KlType, RewardKind};
use loss::{
    StepStats, clipped_surrogate, clipped_surrogate_of_log_ratio, ratio_norm_log_ratio,
    spatial_clipped_surrogate, v_space_kl, x_space_kl,
};

/// The adapter GRPO trains.
pub const POLICY: &str = "policy";

/// One epoch's log line in `metrics.jsonl`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EpochMetrics {
    pub epoch: usize,
    /// Optimizer steps so far.
    pub global_step: usize,
    pub reward_mean: f64,
    pub reward_std: f64,
    /// Mean of each reward over the samples it judged (multi-reward runs), by reward name.
    #[serde(default)]
    pub reward_means: BTreeMap<String, f64>,
    /// Fraction of strictly correct rollout images (GenEval correctness / exact OCR).
    pub train_accuracy: f64,
    pub train_accuracy_by_tag: BTreeMap<String, f64>,
    /// Mean reward of the rollout images by tag.
    #[serde(default)]
    pub reward_by_tag: BTreeMap<String, f64>,
    /// Groups whose images all got the same reward: they have no advantage and teach nothing
    /// (e.g. a prompt the model never or always gets right).
    #[serde(default)]
    pub flat_groups: usize,
    /// Samples kept after zero-advantage filtering.
    pub kept: usize,
    pub trained_steps: Vec<usize>,
    pub approx_kl: f64,
    pub kl: f64,
    pub clip_fraction: f64,
    pub ratio_mean: f64,
    pub ratio_min: f64,
    pub ratio_max: f64,
    pub policy_loss: f64,
    /// max |ρ − 1| over the epoch's first micro-batch, before any update: on-policy it must be 0.
    pub first_ratio_error: f64,
    /// Micro-batches dropped because a loss was NaN / infinite (they never reach the weights).
    pub skipped_micro_batches: usize,
    /// Flow-OPD: mean KL of the rollout's trained steps to their routed teachers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub teacher_kl: Option<f64>,
    /// `train.reward_backprop`: mean differentiable reward of the kept samples' final-step x̂₀.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub final_step_reward: Option<f64>,
    /// `train.final_step_dmd`: mean weighted DMD loss of the final-step x̂₀.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub final_step_dmd: Option<f64>,
    /// `train.final_step_dmd`: mean fake-score loss of the epoch's updates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fake_score_loss: Option<f64>,
    /// Rollout images whose reward was NaN / infinite (left out of advantages and training).
    pub nonfinite_rewards: usize,
    pub learning_rate: f64,
    /// Peak resident memory of the process so far (Linux `VmHWM`), MiB.
    pub peak_memory_mib: Option<f64>,
    pub seconds_rollout: f64,
    pub seconds_reward_wait: f64,
    pub seconds_train: f64,
}

/// A held-out evaluation, appended to `eval.jsonl`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EvalMetrics {
    pub epoch: usize,
    /// GenEval overall: the mean of the tag accuracies.
    pub accuracy: f64,
    pub accuracy_by_tag: BTreeMap<String, f64>,
    /// Mean detector artifacts (stray or unnamed blobs) per image: the cleanliness guard.
    pub artifact_rate: f64,
    /// Mean Flow-GRPO partial-credit score and mean dense score ([`crate::world::dense`]).
    #[serde(default)]
    pub score_mean: f64,
    #[serde(default)]
    pub dense_mean: f64,
    /// The run's own rewards on the same images, by name: on a real model (a reward server's
    /// GenEval) these are the held-out curve; the fields above judge the Shapes world only.
    #[serde(default)]
    pub rewards: BTreeMap<String, held_out::HeldOutReward>,
    /// Why `rewards` is empty although the run has rewards (a reward server that failed during
    /// the evaluation; the run goes on, the detector's numbers stand).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rewards_error: Option<String>,
    pub images: usize,
    pub seconds: f64,
}

/// What the trainer reports as it goes (the CLI prints it; the app plots it).
pub enum GrpoEvent<'a> {
    Epoch(&'a EpochMetrics),
    Eval(&'a EvalMetrics),
    Grid(&'a Path),
    Checkpoint(&'a Path),
}

#[derive(Debug, Serialize, Deserialize)]
struct RunState {
    epoch: usize,
    global_step: usize,
    /// Rollout, reward and update time so far (`run.budget_minutes`); 0 in older checkpoints.
    #[serde(default)]
    trained_seconds: f64,
}

/// Errors of a GRPO run.
#[derive(Debug, thiserror::Error)]
pub enum GrpoError {
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
    #[error(transparent)]
    Lora(#[from] lora::LoraError),
    #[error("config: {0}")]
    Config(String),
    /// The reward could not score a rollout batch; the epoch is abandoned before any update.
    #[error("epoch abandoned, no update made: {0}")]
    Reward(#[from] crate::reward::RewardError),
    #[error("{path}: {message}")]
    Run { path: PathBuf, message: String },
    /// A prompt file that cannot be read (its error names the file and line).
    #[error(transparent)]
    Prompts(#[from] crate::world::prompt::PromptError),
}

fn run_error(path: &Path, message: impl std::fmt::Display) -> GrpoError {
    GrpoError::Run {
        path: path.to_path_buf(),
        message: message.to_string(),
    }
}

/// A GRPO run in progress: call [`GrpoTrainer::epoch`] until [`GrpoTrainer::done`].
pub struct GrpoTrainer {
    pub config: GrpoConfig,
    /// The transformer with the trainable adapter, on the autodiff device.
    policy: Transformer,
    /// Tokenizer, frozen text encoder, scheduler; its transformer slot holds the latest plain
    /// snapshot of the policy (rollouts and evaluation run there, without autodiff).
    plain: Pipeline,
    /// The base transformer (adapter off), plain device; only when β > 0.
    reference: Option<Transformer>,
    optimizer: ModuleOptimizer,
    ema: Option<Ema>,
    /// The rewards and their weights (one, unless `data.rewards` lists several).
    rewards: Vec<(Box<dyn Reward>, f64)>,
    /// The differentiable reward of `train.draft` or `train.reward_backprop`.
    differentiable: Option<draft::DifferentiableReward>,
    /// RTDMD's final-step DMD term: teacher and fake score (only with `train.final_step_dmd`).
    final_dmd: Option<final_dmd::FinalDmd>,
    /// Flow-OPD's teachers (base + each teacher adapter), plain device, in `train.opd` order.
    teachers: Vec<Transformer>,
    train: Vec<Task>,
    /// Held-out tasks: GenEval lines (the detector's report and the run's rewards) and
    /// text-rendering prompts (the run's rewards).
    test: Vec<Task>,
    run_dir: PathBuf,
    pub epoch: usize,
    pub global_step: usize,
    /// Rollout, reward and update time so far, summed over epochs and resumes.
    pub trained_seconds: f64,
    device: Device,
    plain_device: Device,
}

/// What an epoch's training pass reports.
struct TrainOutcome {
    stats: StepStats,
    /// max |ρ − 1| over the first micro-batch, before any update.
    first_ratio_error: f64,
    skipped_micro_batches: usize,
    /// `train.reward_backprop`: mean reward of the final-step x̂₀ over the trained micro-batches.
    final_step_reward: Option<f64>,
    /// `train.final_step_dmd`: mean weighted DMD loss over the trained micro-batches.
    final_step_dmd: Option<f64>,
}

impl TrainOutcome {
    /// One epoch's outcome from its passes (`train.inner_epochs`): statistics averaged over
    /// them, the on-policy check from the first, skipped micro-batches summed.
    fn over_passes(passes: Vec<TrainOutcome>) -> Self {
        let values = |f: fn(&TrainOutcome) -> Option<f64>| -> Vec<f64> {
            passes.iter().filter_map(f).collect()
        };
        let (rewards, dmd) = (
            values(|p| p.final_step_reward),
            values(|p| p.final_step_dmd),
        );
        let stats: Vec<StepStats> = passes.iter().map(|p| p.stats).collect();
        Self {
            stats: StepStats::mean(&stats),
            first_ratio_error: passes.first().map_or(0.0, |p| p.first_ratio_error),
            skipped_micro_batches: passes.iter().map(|p| p.skipped_micro_batches).sum(),
            final_step_reward: mean_of(&rewards),
            final_step_dmd: mean_of(&dmd),
        }
    }
}

fn mean_of(values: &[f64]) -> Option<f64> {
    (!values.is_empty()).then(|| values.iter().sum::<f64>() / values.len() as f64)
}

/// `model.init_adapter` must be the adapter the config would create: the same modules, ranks
/// and scale α/r (`fresh` is that adapter, `given` the file's transformer modules).
fn check_init_adapter(
    path: &Path,
    fresh: &[(String, lora::LoraModule)],
    given: &[(&str, &lora::LoraModule)],
) -> Result<(), GrpoError> {
    let given: BTreeMap<&str, &lora::LoraModule> = given.iter().copied().collect();
    let mut problems: Vec<String> = fresh
        .iter()
        .filter_map(|(p, m)| match given.get(p.as_str()) {
            None => Some(format!("has no module {p}")),
            Some(g) if (g.rank, g.d_in, g.d_out) != (m.rank, m.d_in, m.d_out) => Some(format!(
                "{p} is rank {} ({} → {}) but model.lora_rank / lora_targets make rank {} ({} → {})",
                g.rank, g.d_in, g.d_out, m.rank, m.d_in, m.d_out
            )),
            Some(g) if (g.scaling - m.scaling).abs() > 1e-9 * m.scaling.abs() => Some(format!(
                "{p} has scale α/r = {} but model.lora_alpha / lora_rank make {} (`lora combine` writes α = r)",
                g.scaling, m.scaling
            )),
            Some(_) => None,
        })
        .collect();
    if given.len() > fresh.len() {
        problems.push(format!(
            "has {} modules, model.lora_targets make {}",
            given.len(),
            fresh.len()
        ));
    }
    match problems.as_slice() {
        [] => Ok(()),
        [one] => Err(run_error(path, format!("model.init_adapter {one}"))),
        [first, rest @ ..] => Err(run_error(
            path,
            format!("model.init_adapter {first} (and {} more)", rest.len()),
        )),
    }
}

/// DenseGRPO's ODE completions of a batch: images by the step index they start from.
type Completions = BTreeMap<usize, Vec<Image>>;

/// Everything a rollout batch leaves for training, concatenated over the epoch (plain device).
struct EpochData {
    /// x_j for every step j that training reads (trained steps and their successors).
    latents: BTreeMap<usize, Tensor<4>>,
    /// log π_old of each trained step, `[n]`.
    old_log_probs: BTreeMap<usize, Tensor<1>>,
    /// μ_old of each trained step (GRPO-Guard's RatioNorm only).
    old_means: BTreeMap<usize, Tensor<4>>,
    /// Flow-OPD: −KL(π_old ‖ routed teacher) of each trained step, per sample.
    teacher_rewards: BTreeMap<usize, Vec<f64>>,
    /// Flow-OPD's `direct_kl`: the routed teacher's step mean of each trained step.
    teacher_means: BTreeMap<usize, Tensor<4>>,
    cond: Conditioning,
    uncond: Option<Conditioning>,
}

impl GrpoTrainer {
    /// Starts a run in `run_dir`, or resumes it when it holds a checkpoint. `pipeline` is the base
    /// model on an autodiff device, without adapters.
    pub fn new(
        config: GrpoConfig,
        pipeline: Pipeline,
        train: Vec<Task>,
        test: impl IntoIterator<Item = impl Into<Task>>,
        run_dir: &Path,
        device: &Device,
    ) -> Result<Self, GrpoError> {
        config.validate().map_err(GrpoError::Config)?;
        let test: Vec<Task> = test.into_iter().map(Into::into).collect();
        if train.is_empty() {
            return Err(GrpoError::Config("no training prompts".into()));
        }
        if train.len() < config.sample.groups_per_epoch {
            return Err(GrpoError::Config(format!(
                "sample.groups_per_epoch = {} but only {} training prompts",
                config.sample.groups_per_epoch,
                train.len()
            )));
        }
        let side = config
            .sample
            .resolution
            .unwrap_or_else(|| pipeline.resolution());
        let g = config.sample.guidance_scale;
        if pipeline.runs_cfg(g) && !config.train.cfg {
            return Err(GrpoError::Config(format!(
                "sample.guidance_scale = {g} with train.cfg = false: this model runs CFG, so the training forward would not be the policy that sampled; set train.cfg = true or guidance 1"
            )));
        }
        pipeline
            .latent_shape(side, side)
            .map_err(|e| GrpoError::Config(format!("sample.resolution = {side}: {e}")))?;
        std::fs::create_dir_all(run_dir).map_err(|e| run_error(run_dir, e))?;
        let config_path = run_dir.join("config.toml");
        let checkpoint = run_dir.join("checkpoint");
        let resuming = checkpoint.join("state.json").is_file();
        if resuming {
            let stored = GrpoConfig::from_file(&config_path).map_err(GrpoError::Config)?;
            let mut comparable = config.clone();
            comparable.run.epochs = stored.run.epochs;
            comparable.run.budget_minutes = stored.run.budget_minutes;
            if comparable != stored {
                return Err(run_error(
                    &config_path,
                    "the run was started with another config; only run.epochs and run.budget_minutes may change on resume (start a new run directory otherwise)",
                ));
            }
        }
        std::fs::write(&config_path, config.to_toml()).map_err(|e| run_error(&config_path, e))?;

        let plain_device = device.clone().inner();
        let Pipeline {
            text,
            transformer,
            vae,
            index,
            scheduler,
        } = pipeline;
        if let Ok(schedule) = config.schedule(scheduler.shift)
            && let Some(warning) = x_kl_spread_warning(&config, &schedule)
        {
            tracing::warn!("{warning}");
        }
        let mut policy = transformer;
        // Flow-OPD's teachers are adapters of the base as given, before any stacking.
        let unmerged = config.train.opd.as_ref().map(|_| policy.valid());
        let final_dmd = match &config.train.final_step_dmd {
            Some(settings) => Some(final_dmd::FinalDmd::new(
                settings.clone(),
                &policy,
                &config.lora(),
                config.run.seed,
                resuming.then_some(checkpoint.as_path()),
                index.prediction,
                scheduler.shift,
                device,
            )?),
            None => None,
        };
        for (k, path) in config.model.merge_adapters.iter().enumerate() {
            lora::merge_file(&mut policy, path, &format!("merged{k}"), device)?;
        }
        let mut reference = (config.train.beta > 0.0).then(|| policy.valid());
        let mut teachers = Vec::new();
        if let Some(opd) = &config.train.opd {
            for (k, task) in train.iter().enumerate() {
                if opd.route(task).is_none() {
                    return Err(GrpoError::Config(format!(
                        "train.opd: no teacher for training prompt {k} {:?} (task {})",
                        task.prompt(),
                        task.tag()
                    )));
                }
            }
            let with_adapter = |path: &Path, name: &str| -> Result<Transformer, GrpoError> {
                let mut model = unmerged.clone().expect("kept for Flow-OPD");
                let adapter = LoraWeights::read(path)?;
                lora::attach(
                    &mut model,
                    name,
                    adapter.component("transformer"),
                    1.0,
                    &plain_device,
                )?;
                Ok(model)
            };
            for teacher in &opd.teachers {
                teachers.push(with_adapter(&teacher.lora, "teacher")?);
            }
            if let Some(mar) = &opd.mar {
                reference = Some(with_adapter(mar, "mar")?);
            }
        }
        let (mut epoch, mut global_step, mut trained_seconds) = (0, 0, 0.0);
        let mut optimizer: ModuleOptimizer = AdamWConfig::new()
            .with_weight_decay(config.train.weight_decay as f32)
            .with_beta_1(0.9)
            .with_beta_2(0.999)
            .with_epsilon(1e-8)
            .init();
        let mut ema = None;
        if resuming {
            let adapter = LoraWeights::read(&checkpoint.join("adapter"))?;
            lora::attach(
                &mut policy,
                POLICY,
                adapter.component("transformer"),
                1.0,
                device,
            )?;
            let optimizer_path = checkpoint.join("optimizer.bin");
            optimizer = optimizer.load(&optimizer_path).map_err(|e| {
                run_error(&optimizer_path, format!("cannot resume the optimizer: {e}"))
            })?;
            if config.train.ema {
                ema = Some(Ema::read(
                    &checkpoint.join("ema"),
                    &lora::extract(&policy, POLICY)?,
                )?);
            }
            let state: RunState = crate::model::read_config(&checkpoint.join("state.json"))
                .map_err(PipelineError::from)?;
            (epoch, global_step, trained_seconds) =
                (state.epoch, state.global_step, state.trained_seconds);
            truncate_log(&run_dir.join("metrics.jsonl"), epoch)?;
            truncate_log(&run_dir.join("eval.jsonl"), epoch)?;
        } else {
            lora::init_adapter(&mut policy, POLICY, &config.lora(), config.run.seed, device)?;
            if let Some(path) = &config.model.init_adapter {
                let start = LoraWeights::read(path)?;
                let given = start.component("transformer");
                check_init_adapter(path, &lora::extract(&policy, POLICY)?, &given)?;
                lora::remove(&mut policy, POLICY);
                lora::attach(&mut policy, POLICY, given, 1.0, device)?;
            }
            if config.train.ema {
                ema = Some(Ema::new(lora::extract(&policy, POLICY)?));
            }
        }
        let policy = lora::train_only(policy, POLICY);
        let needs_graph = config.train.draft.is_some() || config.train.reward_backprop.is_some();
        let vae_with_graph = needs_graph.then(|| vae.clone()).flatten();
        let plain = Pipeline {
            text: text.valid(),
            transformer: policy.valid(),
            vae: vae.map(|v| v.valid()),
            index,
            scheduler,
        };
        let rewards = config
            .data
            .terms()
            .into_iter()
            .map(|term| -> Result<(Box<dyn Reward>, f64), GrpoError> {
                let reward: Box<dyn Reward> = match term.reward {
                    RewardKind::Geneval => Box::new(ShapesReward),
                    RewardKind::GenevalDense => Box::new(DenseShapesReward),
                    RewardKind::Ocr => Box::new(OcrReward),
                    RewardKind::Remote => {
                        Box::new(RemoteReward::new(term.remote.clone().unwrap_or_default())?)
                    }
                };
                Ok((reward, term.weight))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let clip = match (&config.train.draft, &config.train.reward_backprop) {
            (Some(d), _) => Some((&d.clip, "train.draft.clip")),
            (None, Some(bp)) => Some((&bp.clip, "train.reward_backprop.clip")),
            (None, None) => None,
        };
        let differentiable = clip
            .map(|(dir, field)| {
                draft::DifferentiableReward::load(dir, field, side, vae_with_graph, device)
            })
            .transpose()?;
        Ok(Self {
            config,
            policy,
            plain,
            reference,
            optimizer,
            ema,
            rewards,
            differentiable,
            final_dmd,
            teachers,
            train,
            test,
            run_dir: run_dir.to_path_buf(),
            epoch,
            global_step,
            trained_seconds,
            device: device.clone(),
            plain_device,
        })
    }

    /// Opens the run `config` describes in `run_dir` (resumed when it holds a checkpoint): loads
    /// its model (the bundled one unless `model.path`) onto `device` (an autodiff device) and its
    /// prompts (the repository's Shapes prompt files unless `data.*_prompts`). The CLI and the
    /// desktop app both start runs here.
    pub fn open(config: GrpoConfig, run_dir: &Path, device: &Device) -> Result<Self, GrpoError> {
        config.validate().map_err(GrpoError::Config)?;
        let (train, test) = run_prompts(&config)?;
        let model = config
            .model
            .path
            .clone()
            .unwrap_or_else(crate::pipeline::bundled_dir);
        let pipeline = Pipeline::from_dir(&model, device)?;
        Self::new(config, pipeline, train, test, run_dir, device)
    }

    /// The number of training tasks and held-out prompts.
    pub fn prompt_counts(&self) -> (usize, usize) {
        (self.train.len(), self.test.len())
    }

    /// The image side of rollouts and evaluation: `sample.resolution`, else the pipeline's.
    pub fn resolution(&self) -> usize {
        self.config
            .sample
            .resolution
            .unwrap_or_else(|| self.plain.resolution())
    }

    /// The run directory.
    pub fn run_dir(&self) -> &Path {
        &self.run_dir
    }

    /// Writes the adapter as it would be saved at the end (the EMA when kept) as a PEFT folder.
    /// A run at a few-step σ list (RTDMD's RL stage on a student) also writes `sampling.json`:
    /// the held-out evaluation's sampler, σ list and CFG, so `generate` / `eval` / the web page
    /// sample the adapter as the run measured it.
    pub fn save_adapter(&self, dir: &Path) -> Result<(), GrpoError> {
        self.final_adapter().write_peft(dir, "transformer")?;
        let s = &self.config.sample;
        if let Some(sigmas) = &s.sigmas {
            lora::AdapterSampling::new(s.eval_kind(), sigmas, s.eval_guidance_scale)
                .write(dir)
                .map_err(|e| run_error(dir, e))?;
        }
        Ok(())
    }

    /// Replaces the rewards the config names by one (custom rewards, remote scorers, tests).
    pub fn with_reward(mut self, reward: Box<dyn Reward>) -> Self {
        self.rewards = vec![(reward, 1.0)];
        self
    }

    /// Whether `run.epochs` are done or `run.budget_minutes` of training time are spent.
    pub fn done(&self) -> bool {
        let spent = self
            .config
            .run
            .budget_minutes
            .is_some_and(|minutes| self.trained_seconds >= minutes * 60.0);
        self.epoch >= self.config.run.epochs || spent
    }

    /// The trained transformer (adapter attached).
    pub fn policy(&self) -> &Transformer {
        &self.policy
    }

    /// One epoch: rollout, rewards, advantages, training; then evaluation, grids and checkpoints
    /// when due.
    pub fn epoch(
        &mut self,
        mut on_event: impl FnMut(GrpoEvent),
    ) -> Result<EpochMetrics, GrpoError> {
        let c = self.config.clone();
        let epoch = self.epoch;
        if epoch == 0 && c.run.eval_every > 0 && !self.test.is_empty() {
            // The base model's score: where the curve starts.
            let eval = self.evaluate()?;
            append_line(&self.run_dir.join("eval.jsonl"), &eval)?;
            on_event(GrpoEvent::Eval(&eval));
        }
        let epoch_start = Instant::now();
        let (metrics, grid_images) = if self.config.train.draft.is_some() {
            self.draft_epoch()?
        } else {
            self.policy_gradient_epoch()?
        };
        self.epoch += 1;
        self.trained_seconds += epoch_start.elapsed().as_secs_f64();
        append_line(&self.run_dir.join("metrics.jsonl"), &metrics)?;
        on_event(GrpoEvent::Epoch(&metrics));

        // 5. bookkeeping.
        let (done_epochs, last) = (self.epoch, self.done());
        let due = |every: usize| every > 0 && (done_epochs % every == 0 || last);
        if due(c.run.grid_every) {
            let path = self
                .run_dir
                .join("grids")
                .join(format!("epoch{:05}.png", self.epoch));
            save_grid(&grid_images, &path)?;
            on_event(GrpoEvent::Grid(&path));
        }
        if due(c.run.eval_every) && !self.test.is_empty() {
            let eval = self.evaluate()?;
            append_line(&self.run_dir.join("eval.jsonl"), &eval)?;
            on_event(GrpoEvent::Eval(&eval));
        }
        if due(c.run.save_every) {
            let path = self.save_checkpoint()?;
            on_event(GrpoEvent::Checkpoint(&path));
        }
        if c.run.snapshot_every > 0 && done_epochs % c.run.snapshot_every == 0 {
            let path = self
                .run_dir
                .join("snapshots")
                .join(format!("epoch-{done_epochs}"));
            self.save_adapter(&path)?;
        }
        if self.done() {
            let path = self.run_dir.join("adapter_final");
            self.save_adapter(&path)?;
            on_event(GrpoEvent::Checkpoint(&path));
        }
        Ok(metrics)
    }

    /// Steps 1–4 of a policy-gradient epoch; returns its metrics and the grid of its first batch.
    fn policy_gradient_epoch(&mut self) -> Result<(EpochMetrics, Vec<(Image, String)>), GrpoError> {
        let c = self.config.clone();
        let epoch = self.epoch;
        let schedule = c
            .schedule(self.plain.scheduler.shift)
            .map_err(PipelineError::from)?;
        let clock = TrainingClock {
            seed: c.run.seed,
            epoch: epoch as u64,
            iteration: self.global_step as u64,
        };
        let plan = c.train.steps.plan(c.sample.steps, clock, c.off_steps());
        let trained = plan.trained_steps();
        let kind = c.sample.step_kind();

        // 1. prompts: k copies of m distinct prompts, shuffled.
        let mut rng = ChaCha8Rng::seed_from_u64(c.run.seed.wrapping_add(epoch as u64));
        let chosen = if c.data.balance_tags {
            choose_balanced(&self.train, c.sample.groups_per_epoch, &mut rng)
        } else {
            let mut chosen: Vec<usize> = (0..self.train.len()).collect();
            chosen.shuffle(&mut rng);
            chosen.truncate(c.sample.groups_per_epoch);
            chosen
        };
        let mut samples: Vec<usize> = (0..chosen.len())
            .flat_map(|g| std::iter::repeat_n(g, c.sample.group_size))
            .collect();
        samples.shuffle(&mut rng);
        let tasks: Vec<Task> = samples
            .iter()
            .map(|&g| self.train[chosen[g]].clone())
            .collect();
        // Flow-OPD: each sample's teacher (every training prompt has one, checked at start).
        let routes: Vec<usize> = match &c.train.opd {
            Some(opd) => tasks
                .iter()
                .map(|t| opd.route(t).expect("routes checked in new"))
                .collect(),
            None => vec![0; tasks.len()],
        };

        // 2. rollout, rewards overlapped on other threads.
        let start = Instant::now();
        self.plain.transformer = self.policy.valid();
        let mut batches = Vec::new();
        let mut grid_images: Vec<(Image, String)> = Vec::new();
        let mut reward_wait = 0.0;
        // scores[k][i]: reward k on sample i; boxes[i]: every reward's defect boxes of sample i.
        let spatial = c.train.spatial.clone();
        let mut boxes: Vec<Vec<DefectBox>> = Vec::new();
        // dense_scores[k][reward][sample]: DenseGRPO's completions from step k.
        let mut dense_scores: BTreeMap<usize, Vec<Vec<Option<Score>>>> = BTreeMap::new();
        let scores: Vec<Vec<Option<Score>>> =
            std::thread::scope(|scope| -> Result<_, GrpoError> {
                let mut pending = Vec::new();
                for (b, chunk) in samples.chunks(c.sample.batch_size).enumerate() {
                    let offset = b * c.sample.batch_size;
                    let batch_tasks: Vec<Task> = tasks[offset..offset + chunk.len()].to_vec();
                    let prompts: Vec<String> =
                        batch_tasks.iter().map(|t| t.prompt().to_string()).collect();
                    let init_seeds: Vec<u64> = (0..chunk.len())
                        .map(|i| {
                            let id = if c.sample.same_initial_noise {
                                chunk[i] as u64
                            } else {
                                (offset + i) as u64 + 1_000_000
                            };
                            mix(c.run.seed, epoch as u64, id, 0)
                        })
                        .collect();
                    let step_seeds: Vec<u64> = (0..chunk.len())
                        .map(|i| mix(c.run.seed, epoch as u64, (offset + i) as u64, 1))
                        .collect();
                    let prompt_seeds: Vec<u64> = chunk
                        .iter()
                        .map(|&g| mix(c.run.seed, epoch as u64, g as u64, 2))
                        .collect();
                    let (images, data, completions) = self.rollout(
                        &prompts,
                        &init_seeds,
                        &step_seeds,
                        &prompt_seeds,
                        &schedule,
                        kind,
                        &plan,
                        &trained,
                        &routes[offset..offset + chunk.len()],
                    )?;
                    if b == 0 {
                        grid_images = images.iter().cloned().zip(prompts.clone()).collect();
                    }
                    batches.push(data);
                    let rewards = &self.rewards;
                    let with_boxes = spatial.is_some();
                    pending.push(scope.spawn(move || {
                        let scored = rewards
                            .iter()
                            .map(|(reward, _)| {
                                if with_boxes {
                                    reward.score_with_boxes(&images, &batch_tasks)
                                } else {
                                    let n = images.len();
                                    reward.score(&images, &batch_tasks).map(|scores| Scored {
                                        scores,
                                        boxes: vec![Vec::new(); n],
                                    })
                                }
                            })
                            .collect::<Result<Vec<_>, _>>()?;
                        // completion scores[k][reward][sample]
                        let dense = completions
                            .iter()
                            .map(|(&k, images)| {
                                rewards
                                    .iter()
                                    .map(|(reward, _)| reward.score(images, &batch_tasks))
                                    .collect::<Result<Vec<_>, _>>()
                                    .map(|s| (k, s))
                            })
                            .collect::<Result<BTreeMap<_, _>, _>>()?;
                        Ok::<_, crate::reward::RewardError>((scored, dense))
                    }));
                }
                let wait = Instant::now();
                let mut scores = vec![Vec::new(); self.rewards.len()];
                for handle in pending {
                    let (batch, dense) = handle.join().expect("the reward thread panicked")?;
                    for (k, per_reward) in dense {
                        let all = dense_scores
                            .entry(k)
                            .or_insert_with(|| vec![Vec::new(); per_reward.len()]);
                        for (all, part) in all.iter_mut().zip(per_reward) {
                            all.extend(part);
                        }
                    }
                    let first = boxes.len();
                    for (k, part) in batch.into_iter().enumerate() {
                        if k == 0 {
                            boxes.extend(part.boxes);
                        } else {
                            for (i, b) in part.boxes.into_iter().enumerate() {
                                boxes[first + i].extend(b);
                            }
                        }
                        scores[k].extend(part.scores);
                    }
                }
                reward_wait = wait.elapsed().as_secs_f64();
                Ok(scores)
            })?;
        let seconds_rollout = start.elapsed().as_secs_f64() - reward_wait;
        let data = EpochData::concat(batches);

        // 3. advantages; images whose reward is not finite are left out (logged, never trained).
        let weights: Vec<f64> = self.rewards.iter().map(|(_, w)| *w).collect();
        let combined = combine(
            &scores,
            &weights,
            &samples,
            c.train.std_scope,
            c.data.aggregate,
        )
        .map_err(|i| {
            let names: Vec<&str> = self.rewards.iter().map(|(r, _)| r.name()).collect();
            GrpoError::Config(format!(
                "no reward ({}) judges the prompt {:?}",
                names.join(", "),
                tasks[i].prompt()
            ))
        })?;
        for i in (0..samples.len()).filter(|i| !combined.valid.contains(i)) {
            tracing::warn!(
                "epoch {}: a non-finite reward for {:?}; the image is left out",
                epoch + 1,
                tasks[i].prompt()
            );
        }
        if combined.valid.is_empty() {
            return Err(run_error(
                &self.run_dir,
                format!("epoch {}: no finite reward", epoch + 1),
            ));
        }
        // per tag: successes, images, reward sum
        let mut by_tag: BTreeMap<String, (usize, usize, f64)> = BTreeMap::new();
        // per group: the lowest and highest reward
        let mut group_range: BTreeMap<usize, (f64, f64)> = BTreeMap::new();
        for ((&i, &success), &reward) in combined
            .valid
            .iter()
            .zip(&combined.success)
            .zip(&combined.rewards)
        {
            let entry = by_tag.entry(tasks[i].tag().to_string()).or_default();
            entry.0 += success as usize;
            entry.1 += 1;
            entry.2 += reward;
            let range = group_range.entry(samples[i]).or_insert((reward, reward));
            *range = (range.0.min(reward), range.1.max(reward));
        }
        let flat_groups = group_range.values().filter(|(lo, hi)| lo == hi).count();
        let reward_means: BTreeMap<String, f64> = self
            .rewards
            .iter()
            .zip(&scores)
            .filter_map(|((reward, _), per_sample)| {
                let values: Vec<f64> = per_sample
                    .iter()
                    .flatten()
                    .map(|s| s.reward as f64)
                    .filter(|r| r.is_finite())
                    .collect();
                (!values.is_empty()).then(|| {
                    let mean = values.iter().sum::<f64>() / values.len() as f64;
                    (reward.name().to_string(), mean)
                })
            })
            .collect();
        let (valid, rewards, valid_advantage) =
            (combined.valid, combined.rewards, combined.advantages);
        let mut advantage = vec![0.0; samples.len()];
        for (&i, &a) in valid.iter().zip(&valid_advantage) {
            advantage[i] = a;
        }
        // BoxFlow: per-pixel advantages on the latent grid; a sample whose map is all zero
        // teaches nothing (its scalar stand-in for filtering is 0).
        let advantage_maps: Option<Vec<Vec<f32>>> = spatial.as_ref().map(|settings| {
            let [_, rows, cols] = data.latent_dims();
            let groups: Vec<usize> = valid.iter().map(|&i| samples[i]).collect();
            let group_std = |g: usize| {
                let members: Vec<f64> = (0..valid.len())
                    .filter(|&v| groups[v] == g)
                    .map(|v| rewards[v])
                    .collect();
                let n = members.len() as f64;
                let mean = members.iter().sum::<f64>() / n;
                (members.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / n).sqrt()
            };
            let maps: Vec<Vec<f32>> = valid
                .iter()
                .zip(&rewards)
                .zip(&groups)
                .map(|((&i, &r), &g)| reward_map(r, &boxes[i], rows, cols, group_std(g), settings))
                .collect();
            let valid_maps = map_advantages(&maps, &groups, settings.std_floor);
            let mut all = vec![vec![0f32; rows * cols]; samples.len()];
            for (&i, map) in valid.iter().zip(valid_maps) {
                advantage[i] = map.iter().map(|a| a.abs() as f64).sum::<f64>();
                all[i] = map;
            }
            all
        });
        // DenseGRPO: ΔR_j = R_{j+1} − R_j from the completions (R_N = the image's own reward),
        // group-relative per step; a sample with a non-finite completion reward trains nothing.
        let step_advantages: Option<BTreeMap<usize, Vec<f64>>> =
            c.train.dense_reward.as_ref().map(|_| {
                let n = schedule.steps();
                let at = |k: usize| -> Vec<f64> {
                    if k == n {
                        let mut full = vec![f64::NAN; samples.len()];
                        for (&i, &r) in valid.iter().zip(&rewards) {
                            full[i] = r;
                        }
                        return full;
                    }
                    (0..samples.len())
                        .map(|i| {
                            self.rewards
                                .iter()
                                .zip(&dense_scores[&k])
                                .filter_map(|((_, w), s)| s[i].map(|s| w * s.reward as f64))
                                .sum::<f64>()
                        })
                        .collect()
                };
                let returns: BTreeMap<usize, Vec<f64>> = trained
                    .iter()
                    .flat_map(|&j| [j, j + 1])
                    .map(|k| (k, at(k)))
                    .collect();
                let by_step =
                    advantage::step_advantages(&returns, &trained, &samples, c.train.std_scope);
                for i in 0..samples.len() {
                    advantage[i] = by_step.values().map(|a: &Vec<f64>| a[i].abs()).sum();
                }
                by_step
            });
        // Flow-OPD: A_ij = kl_scale·(−KL_ij), plus the task advantage in `mixed` mode; images
        // whose task reward is not finite stay out, as everywhere.
        let teacher_kl = c.train.opd.as_ref().map(|_| {
            let values: Vec<f64> = data
                .teacher_rewards
                .values()
                .flatten()
                .map(|r| -r)
                .collect();
            values.iter().sum::<f64>() / values.len().max(1) as f64
        });
        let step_advantages = match &c.train.opd {
            Some(opd) => {
                let mut by_step = BTreeMap::new();
                for (&j, rewards) in &data.teacher_rewards {
                    let (shift, scale) = if opd.normalize {
                        let n = valid.len() as f64;
                        let mean = valid.iter().map(|&i| rewards[i]).sum::<f64>() / n;
                        let var = valid
                            .iter()
                            .map(|&i| (rewards[i] - mean).powi(2))
                            .sum::<f64>()
                            / n;
                        (mean, var.sqrt() + 1e-4)
                    } else {
                        (0.0, 1.0)
                    };
                    let mut a = vec![0.0; samples.len()];
                    for &i in &valid {
                        let task = if opd.with_task_advantage {
                            advantage[i]
                        } else {
                            0.0
                        };
                        a[i] = opd.kl_scale * (rewards[i] - shift) / scale + task;
                    }
                    by_step.insert(j, a);
                }
                for i in 0..samples.len() {
                    advantage[i] = by_step.values().map(|a: &Vec<f64>| a[i].abs()).sum();
                }
                Some(by_step)
            }
            None => step_advantages,
        };
        let valid_advantage: Vec<f64> = valid.iter().map(|&i| advantage[i]).collect();
        let kept_valid = keep_informative(&valid_advantage, c.sample.batch_size, &mut rng);
        let mut kept: Vec<usize> = kept_valid.iter().map(|&k| valid[k]).collect();
        kept.shuffle(&mut rng);

        // 4. training (RTDMD's fake score first learns this epoch's images).
        let train_start = Instant::now();
        let fake_score_loss = self.train_fake_score(&data, &schedule)?;
        let prompts: Vec<String> = tasks.iter().map(|t| t.prompt().to_string()).collect();
        let mut passes = Vec::with_capacity(c.train.inner_epochs);
        for pass in 0..c.train.inner_epochs {
            if pass > 0 {
                kept.shuffle(&mut rng);
            }
            passes.push(self.train_on(
                &data,
                &prompts,
                &kept,
                &advantage,
                advantage_maps.as_deref(),
                step_advantages.as_ref(),
                &schedule,
                kind,
                &trained,
            )?);
        }
        let TrainOutcome {
            stats,
            first_ratio_error,
            skipped_micro_batches,
            final_step_reward,
            final_step_dmd,
        } = TrainOutcome::over_passes(passes);
        let seconds_train = train_start.elapsed().as_secs_f64();

        let n = rewards.len() as f64;
        let mean = rewards.iter().sum::<f64>() / n;
        let successes: usize = by_tag.values().map(|(s, _, _)| s).sum();
        let metrics = EpochMetrics {
            epoch: epoch + 1,
            global_step: self.global_step,
            reward_mean: mean,
            reward_std: (rewards.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / n).sqrt(),
            reward_means,
            train_accuracy: successes as f64 / n,
            train_accuracy_by_tag: by_tag
                .iter()
                .map(|(t, &(s, total, _))| (t.clone(), s as f64 / total as f64))
                .collect(),
            reward_by_tag: by_tag
                .into_iter()
                .map(|(t, (_, total, sum))| (t, sum / total as f64))
                .collect(),
            flat_groups,
            kept: kept.len(),
            trained_steps: trained.clone(),
            approx_kl: stats.approx_kl,
            kl: stats.kl,
            clip_fraction: stats.clip_fraction,
            ratio_mean: stats.ratio_mean,
            ratio_min: stats.ratio_min,
            ratio_max: stats.ratio_max,
            policy_loss: stats.policy_loss,
            first_ratio_error,
            skipped_micro_batches,
            teacher_kl,
            final_step_reward,
            final_step_dmd,
            fake_score_loss,
            nonfinite_rewards: samples.len() - valid.len(),
            learning_rate: c.train.learning_rate,
            peak_memory_mib: crate::train::peak_memory_mib(),
            seconds_rollout,
            seconds_reward_wait: reward_wait,
            seconds_train,
        };
        Ok((metrics, grid_images))
    }

    /// One rollout micro-batch with the plain policy snapshot; returns the images and what
    /// training reads.
    #[allow(clippy::too_many_arguments)]
    fn rollout(
        &self,
        prompts: &[String],
        init_seeds: &[u64],
        step_seeds: &[u64],
        prompt_seeds: &[u64],
        schedule: &Schedule,
        kind: StepKind,
        plan: &crate::sample::select::StepPlan,
        trained: &[usize],
        routes: &[usize],
    ) -> Result<(Vec<Image>, EpochData, Completions), GrpoError> {
        let c = &self.config;
        let device = &self.plain_device;
        let (cond, uncond) =
            self.plain
                .guided_conditioning(prompts, c.sample.guidance_scale, device)?;
        // CFG's scale; 1 for a model that takes guidance as an input (already in `cond`).
        let cfg_scale = if uncond.is_some() {
            c.sample.guidance_scale
        } else {
            1.0
        };
        let size = self.resolution();
        let shape = self.plain.latent_shape(size, size)?;
        let x = NoiseSource::new(init_seeds.to_vec()).initial(shape, device);
        let options = SampleOptions {
            guidance_interval: None,
            schedule,
            kind,
            plan: plan.clone(),
            guidance_scale: cfg_scale,
            shared_seeds: Some(prompt_seeds.to_vec()),
            record: true,
        };
        let denoiser = PipelineDenoiser {
            transformer: &self.plain.transformer,
            prediction: self.plain.index.prediction,
        };
        let (x0, rollout) = sample(
            &denoiser,
            x,
            &cond,
            uncond.as_ref(),
            &NoiseSource::new(step_seeds.to_vec()),
            &options,
            |_| {},
            None,
        )
        .map_err(PipelineError::from)?;
        let rollout = rollout.expect("record = true");
        let mut latents = BTreeMap::new();
        let mut old_log_probs = BTreeMap::new();
        let mut old_means = BTreeMap::new();
        for &j in trained {
            if c.train.ratio_norm || c.train.spatial.is_some() {
                old_means.insert(j, rollout.means[j].clone());
            }
            latents.insert(j, rollout.latents[j].clone());
            latents.insert(j + 1, rollout.latents[j + 1].clone());
            let log_prob = rollout.log_probs[j]
                .clone()
                .expect("trained steps are stochastic");
            old_log_probs.insert(j, log_prob);
        }
        if c.train.reward_backprop.is_some() || c.train.final_step_dmd.is_some() {
            let last = schedule.steps() - 1;
            latents.insert(last, rollout.latents[last].clone());
        }
        if c.train.final_step_dmd.is_some() {
            let n = schedule.steps();
            latents.insert(n, rollout.latents[n].clone());
        }
        // Flow-OPD: each trained step's −KL to the sample's teacher, every teacher on the batch.
        let mut teacher_rewards = BTreeMap::new();
        let mut teacher_means = BTreeMap::new();
        let direct_kl = c.train.opd.as_ref().is_some_and(|o| o.direct_kl);
        if !self.teachers.is_empty() {
            let sigma_max = schedule.sigma_max();
            for &j in trained {
                let (sigma, sigma_next) = (schedule.sigmas[j], schedule.sigmas[j + 1]);
                let g = kl_std(kind, sigma, sigma_next, sigma_max);
                let (by_teacher, means): (Vec<Vec<f32>>, Vec<Tensor<4>>) = self
                    .teachers
                    .iter()
                    .map(|teacher| {
                        let denoiser = PipelineDenoiser {
                            transformer: teacher,
                            prediction: self.plain.index.prediction,
                        };
                        let x = rollout.latents[j].clone();
                        let v = guided_velocity(
                            &denoiser,
                            x.clone(),
                            sigma,
                            &cond,
                            uncond.as_ref(),
                            c.sample.guidance_scale,
                        );
                        let (mean, _) = step::policy_mean(kind, x, v, sigma, sigma_next, sigma_max);
                        let reward = opd_kl_reward(rollout.means[j].clone(), mean.clone(), g)
                            .into_data()
                            .convert::<f32>()
                            .try_to_vec::<f32>()
                            .expect("f32");
                        (reward, mean)
                    })
                    .unzip();
                if direct_kl {
                    // Row i from its own teacher: [b, c, h, w] → [1, c, h, w] each → [b, c, h, w]
                    let rows: Vec<Tensor<4>> = routes
                        .iter()
                        .enumerate()
                        .map(|(i, &k)| means[k].clone().narrow(0, i, 1))
                        .collect();
                    teacher_means.insert(j, Tensor::cat(rows, 0));
                }
                let values: Vec<f64> = routes
                    .iter()
                    .enumerate()
                    .map(|(i, &k)| by_teacher[k][i] as f64)
                    .collect();
                teacher_rewards.insert(j, values);
            }
        }
        // DenseGRPO: an ODE completion from every latent a trained step starts or ends at
        // (the last latent is the rollout's own image).
        let mut completions = Completions::new();
        if let Some(dense) = &c.train.dense_reward {
            let n = schedule.steps();
            let starts: std::collections::BTreeSet<usize> = trained
                .iter()
                .flat_map(|&j| [j, j + 1])
                .filter(|&k| k < n)
                .collect();
            for k in starts {
                let sigma = schedule.sigmas[k];
                let rest = match dense.completion_steps {
                    0 => Schedule {
                        sigmas: schedule.sigmas[k..].to_vec(),
                    },
                    steps => Schedule {
                        sigmas: (0..=steps)
                            .map(|i| sigma * (1.0 - i as f64 / steps as f64))
                            .collect(),
                    },
                };
                let options = SampleOptions {
                    guidance_interval: None,
                    schedule: &rest,
                    kind: StepKind::Euler,
                    plan: crate::sample::select::StepPlan::ode(rest.steps()),
                    guidance_scale: cfg_scale,
                    shared_seeds: None,
                    record: false,
                };
                let (completed, _) = sample(
                    &denoiser,
                    rollout.latents[k].clone(),
                    &cond,
                    uncond.as_ref(),
                    &NoiseSource::new(step_seeds.to_vec()),
                    &options,
                    |_| {},
                    None,
                )
                .map_err(PipelineError::from)?;
                completions.insert(k, to_images(self.plain.decode(completed)));
            }
        }
        Ok((
            to_images(self.plain.decode(x0)),
            EpochData {
                latents,
                old_log_probs,
                old_means,
                teacher_rewards,
                teacher_means,
                cond,
                uncond,
            },
            completions,
        ))
    }

    /// Step 4: the clipped policy loss (+ β·KL) on every kept sample and trained step, and
    /// RTDMD's final-step reward back-propagation when configured. `prompts[i]` is sample i's.
    fn train_on(
        &mut self,
        data: &EpochData,
        prompts: &[String],
        kept: &[usize],
        advantage: &[f64],
        advantage_maps: Option<&[Vec<f32>]>,
        step_advantages: Option<&BTreeMap<usize, Vec<f64>>>,
        schedule: &Schedule,
        kind: StepKind,
        trained: &[usize],
    ) -> Result<TrainOutcome, GrpoError> {
        let c = self.config.clone();
        let t = &c.train;
        let batch = c.sample.batch_size;
        let micro_batches = kept.len() / batch;
        let scale = 1.0 / (t.grad_accum * trained.len()) as f64;
        let w_train = if t.cfg { c.sample.guidance_scale } else { 1.0 };
        let sigma_max = schedule.sigma_max();
        let mut accumulator = GradientsAccumulator::<Transformer>::new();
        let mut all_stats = Vec::new();
        let mut first_ratio_error: f64 = 0.0;
        let mut pending = 0;
        let mut skipped = 0;
        let mut final_step_rewards = Vec::new();
        let mut final_step_dmd = Vec::new();
        // The DMD teacher's unconditional branch (the rollout may have had no CFG); none for a
        // model that embeds the scale instead.
        let dmd_uncond = match &t.final_step_dmd {
            Some(d) if self.plain.runs_cfg(d.teacher_guidance) => Some(
                self.plain
                    .encode(&vec![String::new(); batch], &self.plain_device)
                    .map_err(PipelineError::from)?,
            ),
            _ => None,
        };
        for (m, rows) in kept.chunks(batch).enumerate().take(micro_batches) {
            // This micro-batch's gradients join the optimizer's only if every loss was finite.
            let mut local = GradientsAccumulator::<Transformer>::new();
            let mut finite = true;
            let mut local_stats = Vec::new();
            let index = Tensor::<1, Int>::from_data(
                TensorData::new(rows.iter().map(|&r| r as i64).collect(), [rows.len()]),
                &self.plain_device,
            );
            let pick4 = |x: &Tensor<4>| x.clone().select(0, index.clone());
            let cond_plain = data.cond.select(&index);
            let uncond_plain = data.uncond.as_ref().map(|u| u.select(&index));
            let cond = cond_plain.autodiff();
            let uncond = uncond_plain.as_ref().map(Conditioning::autodiff);
            let adv: Vec<f32> = rows
                .iter()
                .map(|&r| advantage[r].clamp(-t.adv_clip_max, t.adv_clip_max) as f32)
                .collect();
            let adv = Tensor::<1>::from_data(TensorData::new(adv, [rows.len()]), &self.device);
            // DenseGRPO: each step's own advantages.
            let step_adv = |j: usize| -> Tensor<1> {
                match step_advantages {
                    Some(by_step) => {
                        let values: Vec<f32> = rows
                            .iter()
                            .map(|&r| by_step[&j][r].clamp(-t.adv_clip_max, t.adv_clip_max) as f32)
                            .collect();
                        Tensor::from_data(TensorData::new(values, [rows.len()]), &self.device)
                    }
                    None => adv.clone(),
                }
            };
            // BoxFlow: [rows, h, w], not clipped.
            let adv_map = advantage_maps.map(|maps| {
                let [_, h, w] = data.latent_dims();
                let values: Vec<f32> = rows.iter().flat_map(|&r| maps[r].clone()).collect();
                Tensor::<3>::from_data(TensorData::new(values, [rows.len(), h, w]), &self.device)
            });
            for &j in trained {
                let (sigma, sigma_next) = (schedule.sigmas[j], schedule.sigmas[j + 1]);
                let x_plain = pick4(&data.latents[&j]);
                let x = x_plain.clone().autodiff();
                let x_next = pick4(&data.latents[&(j + 1)]).autodiff();
                let old = data.old_log_probs[&j]
                    .clone()
                    .select(0, index.clone())
                    .autodiff();
                let denoiser = PipelineDenoiser {
                    transformer: &self.policy,
                    prediction: self.plain.index.prediction,
                };
                let v =
                    guided_velocity(&denoiser, x.clone(), sigma, &cond, uncond.as_ref(), w_train);
                let (mean, std) =
                    step::policy_mean(kind, x, v.clone(), sigma, sigma_next, sigma_max);
                let log_prob = step::log_prob(kind, x_next, mean.clone(), std);
                let (policy_loss, ratio) = match data.old_means.get(&j) {
                    Some(old_mean) if adv_map.is_some() => {
                        let old_mean = pick4(old_mean).autodiff();
                        let x_next = pick4(&data.latents[&(j + 1)]).autodiff();
                        let log_prob = step::log_prob_map(kind, x_next.clone(), mean.clone(), std);
                        let old = step::log_prob_map(kind, x_next, old_mean, std);
                        let adv_map = adv_map.clone().expect("checked");
                        let (loss, ratio) =
                            spatial_clipped_surrogate(log_prob, old, adv_map, t.clip_range);
                        let [b, h, w] = ratio.dims();
                        (loss, ratio.reshape([b * h * w]))
                    }
                    Some(old_mean) => {
                        let old_mean = pick4(old_mean).autodiff();
                        let log_ratio =
                            ratio_norm_log_ratio(log_prob, old, mean.clone(), old_mean, std);
                        clipped_surrogate_of_log_ratio(log_ratio, step_adv(j), t.clip_range)
                    }
                    None => clipped_surrogate(log_prob, old, step_adv(j), t.clip_range),
                };
                let mut loss = policy_loss.clone();
                if let Some(teacher_mean) = data.teacher_means.get(&j) {
                    let g = kl_std(kind, sigma, sigma_next, sigma_max);
                    let scale = c.train.opd.as_ref().map_or(1.0, |o| o.kl_scale.abs());
                    let teacher_mean = pick4(teacher_mean).autodiff();
                    let kl = opd_kl_reward(mean.clone(), teacher_mean, g).mean().neg();
                    loss = loss + kl.mul_scalar(scale);
                }
                let mut kl_value = 0.0;
                if let Some(reference) = &self.reference {
                    let base = PipelineDenoiser {
                        transformer: reference,
                        prediction: self.plain.index.prediction,
                    };
                    let v_ref = guided_velocity(
                        &base,
                        x_plain.clone(),
                        sigma,
                        &cond_plain,
                        uncond_plain.as_ref(),
                        w_train,
                    );
                    let kl = match t.kl_type {
                        KlType::X => {
                            let (mean_ref, _) = step::policy_mean(
                                kind, x_plain, v_ref, sigma, sigma_next, sigma_max,
                            );
                            // A deterministic step (std 0, e.g. CPS landing on σ = 0) has no
                            // Gaussian to compare; it adds nothing.
                            match kl_std(kind, sigma, sigma_next, sigma_max) {
                                g if g > 0.0 => x_space_kl(mean, mean_ref.autodiff(), g),
                                _ => Tensor::zeros([1], &self.device),
                            }
                        }
                        KlType::V => v_space_kl(v, v_ref.autodiff()),
                    };
                    kl_value = kl.clone().into_scalar::<f32>() as f64;
                    loss = loss + kl.mul_scalar(t.beta);
                }
                let loss_value = loss.clone().into_scalar::<f32>() as f64;
                if !loss_value.is_finite() {
                    tracing::warn!(
                        "epoch {}: loss {loss_value} at step {j} of micro-batch {m}; the micro-batch is skipped",
                        self.epoch + 1
                    );
                    finite = false;
                    break;
                }
                let grads = loss.mul_scalar(scale).backward();
                local.accumulate(
                    &self.policy,
                    GradientsParams::from_grads(grads, &self.policy),
                );
                let ratios: Vec<f32> = ratio
                    .into_data()
                    .convert::<f32>()
                    .try_to_vec()
                    .expect("f32");
                if m == 0 {
                    let worst = ratios
                        .iter()
                        .map(|&r| (r as f64 - 1.0).abs())
                        .fold(0.0, f64::max);
                    first_ratio_error = first_ratio_error.max(worst);
                }
                let pg = policy_loss.into_scalar::<f32>() as f64;
                local_stats.push(StepStats::from_values(&ratios, pg, kl_value, t.clip_range));
            }
            // RTDMD's final-step terms on x̂₀ = x_last − σ_last·v_θ of the last (deterministic)
            // step, where PPO has no gradient: L_BP and weight·L_DMD.
            if finite && (t.reward_backprop.is_some() || self.final_dmd.is_some()) {
                let last = schedule.steps() - 1;
                let sigma = schedule.sigmas[last];
                let x = pick4(&data.latents[&last]).autodiff();
                let denoiser = PipelineDenoiser {
                    transformer: &self.policy,
                    prediction: self.plain.index.prediction,
                };
                let v =
                    guided_velocity(&denoiser, x.clone(), sigma, &cond, uncond.as_ref(), w_train);
                let x0 = x - v.mul_scalar(sigma);
                let mut loss = Tensor::<1>::zeros([1], &self.device);
                let mut reward_mean = None;
                if let Some(bp) = &t.reward_backprop {
                    let row_prompts: Vec<String> =
                        rows.iter().map(|&r| prompts[r].clone()).collect();
                    let reward = self
                        .differentiable
                        .as_ref()
                        .expect("train.reward_backprop loaded its reward")
                        .score(x0.clone(), &row_prompts)?;
                    reward_mean = Some(reward.clone().mean().into_scalar::<f32>() as f64);
                    loss = loss
                        + draft::draft_loss(reward, Some(bp.margin))
                            .mean()
                            .mul_scalar(bp.scale);
                }
                let mut dmd_value = None;
                if let Some(dmd) = &self.final_dmd {
                    let mut rng =
                        ChaCha8Rng::seed_from_u64(mix(c.run.seed, self.epoch as u64, m as u64, 8));
                    let dmd_loss =
                        dmd.generator_loss(x0, &cond_plain, dmd_uncond.as_ref(), &mut rng);
                    dmd_value = Some(dmd_loss.clone().into_scalar::<f32>() as f64);
                    loss = loss + dmd_loss;
                }
                let loss = loss.div_scalar(t.grad_accum as f64);
                let loss_value = loss.clone().into_scalar::<f32>() as f64;
                if loss_value.is_finite() {
                    local.accumulate(
                        &self.policy,
                        GradientsParams::from_grads(loss.backward(), &self.policy),
                    );
                    final_step_rewards.extend(reward_mean);
                    final_step_dmd.extend(dmd_value);
                } else {
                    tracing::warn!(
                        "epoch {}: final-step loss {loss_value} in micro-batch {m}; the micro-batch is skipped",
                        self.epoch + 1
                    );
                    finite = false;
                }
            }
            if finite {
                accumulator.accumulate(&self.policy, local.grads());
                all_stats.extend(local_stats);
            } else {
                skipped += 1;
            }
            pending += 1;
            if pending == t.grad_accum || m + 1 == micro_batches {
                let grads = accumulator.grads();
                if !grads.is_empty() {
                    self.optimizer_step(grads);
                }
                pending = 0;
            }
        }
        Ok(TrainOutcome {
            stats: StepStats::mean(&all_stats),
            first_ratio_error,
            skipped_micro_batches: skipped,
            final_step_reward: mean_of(&final_step_rewards),
            final_step_dmd: mean_of(&final_step_dmd),
        })
    }

    /// RTDMD: the fake score's updates on the epoch's rollout images (each on `batch_size`
    /// samples drawn with a (seed, epoch) RNG); returns their mean loss.
    fn train_fake_score(
        &mut self,
        data: &EpochData,
        schedule: &Schedule,
    ) -> Result<Option<f64>, GrpoError> {
        let c = self.config.clone();
        let (Some(dmd), Some(settings)) = (&mut self.final_dmd, &c.train.final_step_dmd) else {
            return Ok(None);
        };
        let images = &data.latents[&schedule.steps()];
        let total = images.dims()[0];
        let mut rng = ChaCha8Rng::seed_from_u64(mix(c.run.seed, self.epoch as u64, 0, 7));
        let mut losses = Vec::new();
        for _ in 0..settings.fake_updates {
            let mut rows: Vec<usize> = (0..total).collect();
            rows.shuffle(&mut rng);
            rows.truncate(c.sample.batch_size);
            let index = Tensor::<1, Int>::from_data(
                TensorData::new(rows.iter().map(|&r| r as i64).collect(), [rows.len()]),
                &self.plain_device,
            );
            let loss = dmd.train_fake(
                images.clone().select(0, index.clone()),
                &data.cond.select(&index),
                &mut rng,
                settings.fake_learning_rate.unwrap_or(c.train.learning_rate),
                c.train.grad_clip,
            )?;
            losses.push(loss);
        }
        Ok(mean_of(&losses))
    }

    fn optimizer_step(&mut self, mut grads: GradientsParams) {
        clip_global_norm(&self.policy, &mut grads, self.config.train.grad_clip);
        self.policy =
            self.optimizer
                .step(self.config.train.learning_rate, self.policy.clone(), grads);
        self.global_step += 1;
        if let Some(ema) = &mut self.ema {
            let current = lora::extract(&self.policy, POLICY).expect("the policy adapter");
            ema.step(
                &current,
                self.global_step,
                self.config.train.ema_decay,
                self.config.train.ema_every,
            );
        }
    }

    /// The adapter evaluation and the final save use: the EMA when enabled.
    fn final_adapter(&self) -> LoraWeights {
        let modules = match &self.ema {
            Some(ema) => ema.modules.clone(),
            None => lora::extract(&self.policy, POLICY).expect("the policy adapter"),
        };
        LoraWeights::from_component("transformer", modules, Some(self.config.lora()))
    }

    /// Held-out GenEval-style accuracy with ODE sampling and the EMA adapter.
    pub fn evaluate(&mut self) -> Result<EvalMetrics, GrpoError> {
        let start = Instant::now();
        let c = &self.config;
        let mut snapshot = self.policy.valid();
        lora::replace(
            &mut snapshot,
            POLICY,
            &self.final_adapter(),
            &self.plain_device,
        )?;
        self.plain.transformer = snapshot;
        let tasks: &[Task] = match c.run.eval_prompts {
            Some(n) => &self.test[..n.min(self.test.len())],
            None => &self.test,
        };
        let specs: Vec<PromptSpec> = tasks
            .iter()
            .filter_map(|t| match t {
                Task::Shapes(spec) => Some(spec.clone()),
                Task::Digits { .. } => None,
            })
            .collect();
        let texts: Vec<&Task> = tasks
            .iter()
            .filter(|t| matches!(t, Task::Digits { .. }))
            .collect();
        let options = EvalOptions {
            images_per_prompt: c.run.eval_images_per_prompt,
            batch_size: c.sample.batch_size,
            generate: GenerateOptions {
                guidance_interval: None,
                steps: c.sample.eval_steps,
                guidance_scale: c.sample.eval_guidance_scale,
                kind: c.sample.eval_kind(),
                seeds: vec![],
                negative_prompt: String::new(),
                size: Some((self.resolution(), self.resolution())),
                initial_noise: None,
                sigmas: c.sample.sigmas.clone(),
            },
            seed: c.run.seed,
        };
        let mut scorer = held_out::HeldOutScorer::new(self.rewards.iter().map(|(r, _)| &**r));
        let report = evaluate_pipeline_with(
            &self.plain,
            &specs,
            &options,
            &self.plain_device,
            None,
            |_, _| {},
            |indices, images| {
                let batch: Vec<Task> = indices.iter().map(|&i| specs[i].clone().into()).collect();
                scorer.score(&batch, images);
            },
        )?;
        // Text-rendering prompts, which the detector cannot judge: the run's rewards alone,
        // image k of text prompt i seeded after the GenEval lines' images.
        let k = options.images_per_prompt;
        let jobs: Vec<(usize, usize)> = (0..texts.len())
            .flat_map(|i| (0..k).map(move |s| (i, s)))
            .collect();
        for chunk in jobs.chunks(options.batch_size.max(1)) {
            let prompts: Vec<String> = chunk
                .iter()
                .map(|&(i, _)| texts[i].prompt().to_string())
                .collect();
            let mut generate = options.generate.clone();
            generate.seeds = chunk
                .iter()
                .map(|&(i, s)| options.seed_of(specs.len() + i, s))
                .collect();
            let images =
                self.plain
                    .generate(&prompts, &generate, &self.plain_device, |_| {}, None)?;
            let batch: Vec<Task> = chunk.iter().map(|&(i, _)| texts[i].clone()).collect();
            scorer.score(&batch, &images);
        }
        let (rewards, rewards_error) = match scorer.finish() {
            Ok(rewards) => (rewards, None),
            Err(e) => {
                tracing::warn!("held-out evaluation at epoch {}: {e}", self.epoch);
                (BTreeMap::new(), Some(e.to_string()))
            }
        };
        Ok(EvalMetrics {
            epoch: self.epoch,
            accuracy: report.overall as f64,
            accuracy_by_tag: report
                .tags
                .iter()
                .map(|(t, a)| (t.clone(), *a as f64))
                .collect(),
            artifact_rate: report.artifact_rate(),
            score_mean: report.score_mean(),
            dense_mean: report.dense_mean(),
            rewards,
            rewards_error,
            images: report.images.len() + jobs.len(),
            seconds: start.elapsed().as_secs_f64(),
        })
    }

    /// Writes `checkpoint/` atomically: adapter and EMA (PEFT folders), optimizer, epoch.
    pub fn save_checkpoint(&self) -> Result<PathBuf, GrpoError> {
        let final_dir = self.run_dir.join("checkpoint");
        let tmp = self.run_dir.join("checkpoint.tmp");
        let _ = std::fs::remove_dir_all(&tmp);
        let current = lora::extract(&self.policy, POLICY)?;
        LoraWeights::from_component("transformer", current, Some(self.config.lora()))
            .write_peft(&tmp.join("adapter"), "transformer")?;
        if let Some(ema) = &self.ema {
            ema.write(&tmp.join("ema"), &self.config.lora())?;
        }
        let optimizer_path = tmp.join("optimizer.bin");
        self.optimizer
            .save(&optimizer_path)
            .map_err(|e| run_error(&optimizer_path, e))?;
        if let Some(dmd) = &self.final_dmd {
            dmd.save(&tmp, &self.config.lora())?;
        }
        let state = RunState {
            epoch: self.epoch,
            global_step: self.global_step,
            trained_seconds: self.trained_seconds,
        };
        let state_path = tmp.join("state.json");
        std::fs::write(
            &state_path,
            serde_json::to_string_pretty(&state).expect("json"),
        )
        .map_err(|e| run_error(&state_path, e))?;
        let _ = std::fs::remove_dir_all(&final_dir);
        std::fs::rename(&tmp, &final_dir).map_err(|e| run_error(&final_dir, e))?;
        Ok(final_dir)
    }
}

impl EpochData {
    /// `[c, h, w]` of the stored latents.
    fn latent_dims(&self) -> [usize; 3] {
        let [_, c, h, w] = self
            .latents
            .values()
            .next()
            .expect("trained steps store latents")
            .dims();
        [c, h, w]
    }

    fn concat(batches: Vec<EpochData>) -> Self {
        let first = &batches[0];
        let keys: Vec<usize> = first.latents.keys().copied().collect();
        let steps: Vec<usize> = first.old_log_probs.keys().copied().collect();
        let mean_steps: Vec<usize> = first.old_means.keys().copied().collect();
        let teacher_steps: Vec<usize> = first.teacher_means.keys().copied().collect();
        let cat4 =
            |f: &dyn Fn(&EpochData) -> Tensor<4>| Tensor::cat(batches.iter().map(f).collect(), 0);
        let latents = keys
            .iter()
            .map(|&k| (k, cat4(&|b| b.latents[&k].clone())))
            .collect();
        let old_log_probs = steps
            .iter()
            .map(|&k| {
                (
                    k,
                    Tensor::cat(
                        batches
                            .iter()
                            .map(|b| b.old_log_probs[&k].clone())
                            .collect(),
                        0,
                    ),
                )
            })
            .collect();
        let old_means = mean_steps
            .iter()
            .map(|&k| (k, cat4(&|b| b.old_means[&k].clone())))
            .collect();
        let teacher_means = teacher_steps
            .iter()
            .map(|&k| (k, cat4(&|b| b.teacher_means[&k].clone())))
            .collect();
        let mut teacher_rewards: BTreeMap<usize, Vec<f64>> = BTreeMap::new();
        for batch in &batches {
            for (&j, values) in &batch.teacher_rewards {
                teacher_rewards.entry(j).or_default().extend(values);
            }
        }
        let cond = Conditioning::cat(&batches.iter().map(|b| b.cond.clone()).collect::<Vec<_>>());
        let uncond = first.uncond.as_ref().map(|_| {
            Conditioning::cat(
                &batches
                    .iter()
                    .map(|b| b.uncond.clone().expect("every batch has one"))
                    .collect::<Vec<_>>(),
            )
        });
        Self {
            latents,
            old_log_probs,
            old_means,
            teacher_rewards,
            teacher_means,
            cond,
            uncond,
        }
    }
}

/// `m` distinct training prompts drawn tag by tag: the tags in a random order, repeated as often as
/// needed, each taking a random prompt of its own not yet chosen (a tag whose prompts are used up
/// is skipped).
fn choose_balanced(train: &[Task], m: usize, rng: &mut impl Rng) -> Vec<usize> {
    let mut by_tag: Vec<(&str, Vec<usize>)> = Vec::new();
    for (i, task) in train.iter().enumerate() {
        match by_tag.iter_mut().find(|(tag, _)| *tag == task.tag()) {
            Some((_, members)) => members.push(i),
            None => by_tag.push((task.tag(), vec![i])),
        }
    }
    by_tag.shuffle(rng);
    for (_, members) in by_tag.iter_mut() {
        members.shuffle(rng);
    }
    let mut chosen = Vec::with_capacity(m);
    let mut round = 0;
    while chosen.len() < m.min(train.len()) {
        for (_, members) in &by_tag {
            if chosen.len() < m
                && let Some(&i) = members.get(round)
            {
                chosen.push(i);
            }
        }
        round += 1;
    }
    chosen
}

/// The repository's prompt files, where a config names none.
fn repo_file(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(relative)
}

/// Training tasks and held-out tasks of a config. A prompt file is GenEval JSONL, or with a `.txt`
/// extension one text-rendering prompt per line (flow_grpo's `dataset/ocr`: the target is the
/// text between the first double quotes). Without a training file, the OCR reward trains on the
/// numbers 0–999 but one in 25 ([`digits::is_held_out`]); without a test file those numbers are
/// the held-out text prompts (beside `shapes_test.jsonl` where a reward judges Shapes). GenEval
/// lines are held to the Shapes world's vocabulary only when a built-in reward judges them; a
/// reward server may judge GenEval's own COCO classes.
pub fn run_prompts(config: &GrpoConfig) -> Result<(Vec<Task>, Vec<Task>), GrpoError> {
    let kinds: Vec<RewardKind> = config.data.terms().iter().map(|t| t.reward).collect();
    let shapes_world = kinds
        .iter()
        .any(|k| matches!(k, RewardKind::Geneval | RewardKind::GenevalDense));
    let read = |path: &Path| read_tasks(path, shapes_world);
    let reads_digits = kinds.contains(&RewardKind::Ocr);
    let judges_shapes = kinds.iter().any(|k| *k != RewardKind::Ocr);
    let held_out_numbers = || -> Vec<Task> {
        digits::held_out_prompts()
            .into_iter()
            .map(|prompt| Task::Digits { prompt })
            .collect()
    };
    if let Some(train_path) = &config.data.train_prompts
        && is_text_prompt_file(train_path)
    {
        if !kinds
            .iter()
            .any(|k| matches!(k, RewardKind::Ocr | RewardKind::Remote))
        {
            return Err(run_error(
                train_path,
                "text-rendering prompts need a reward that reads text: data.reward = \"ocr\" or \"remote\"",
            ));
        }
        let test = match &config.data.test_prompts {
            Some(path) => read(path)?,
            None => held_out_numbers(),
        };
        return Ok((read(train_path)?, test));
    }
    let train_path = config
        .data
        .train_prompts
        .clone()
        .unwrap_or_else(|| repo_file("assets/prompts/shapes_train.jsonl"));
    // A remote reward judges the training prompt file's GenEval metadata.
    let shapes: Vec<Task> = if judges_shapes {
        read(&train_path)?
    } else {
        Vec::new()
    };
    // The numbers 0–999 but the held-out ones alone; beside Shapes prompts, as many evenly
    // spaced numbers as there are Shapes prompts, so that both tasks are drawn equally often.
    let digits: Vec<Task> = if reads_digits {
        let stride = if shapes.is_empty() {
            1
        } else {
            1000usize.div_ceil(shapes.len())
        };
        (0..1000usize)
            .filter(|&n| !digits::is_held_out(n))
            .step_by(stride)
            .map(|n| Task::Digits {
                prompt: digits::prompt_for(&n.to_string()),
            })
            .collect()
    } else {
        Vec::new()
    };
    let train = shapes.into_iter().chain(digits).collect();
    // Held out without a test file: the Shapes test prompts where a reward judges them, and the
    // held-out numbers where OCR reads them, alternating (so `run.eval_prompts` keeps both).
    let test = match &config.data.test_prompts {
        Some(path) => read(path)?,
        None => {
            let shapes = if judges_shapes {
                read(&repo_file("assets/prompts/shapes_test.jsonl"))?
            } else {
                Vec::new()
            };
            let numbers = if reads_digits {
                held_out_numbers()
            } else {
                Vec::new()
            };
            interleave(shapes, numbers)
        }
    };
    Ok((train, test))
}

/// `a` and `b` alternating, the longer one's rest at the end.
fn interleave<T>(a: Vec<T>, b: Vec<T>) -> Vec<T> {
    let mut out = Vec::with_capacity(a.len() + b.len());
    let (mut a, mut b) = (a.into_iter(), b.into_iter());
    loop {
        match (a.next(), b.next()) {
            (None, None) => return out,
            (x, y) => out.extend(x.into_iter().chain(y)),
        }
    }
}

fn is_text_prompt_file(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "txt")
}

/// The tasks of one prompt file (see [`run_prompts`]).
fn read_tasks(path: &Path, shapes_world: bool) -> Result<Vec<Task>, GrpoError> {
    use crate::world::prompt::{read_geneval_jsonl, read_jsonl};
    if !is_text_prompt_file(path) {
        let specs = if shapes_world {
            read_jsonl(path)
        } else {
            read_geneval_jsonl(path)
        };
        return Ok(specs?.into_iter().map(Task::Shapes).collect());
    }
    let text = std::fs::read_to_string(path).map_err(|e| run_error(path, e))?;
    let mut tasks = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let prompt = line.trim();
        if prompt.is_empty() {
            continue;
        }
        if digits::quoted(prompt).is_none_or(str::is_empty) {
            return Err(run_error(
                path,
                format!(
                    "line {}: a text-rendering prompt needs its text between double quotes, got `{prompt}`",
                    index + 1
                ),
            ));
        }
        tasks.push(Task::Digits {
            prompt: prompt.to_string(),
        });
    }
    if tasks.is_empty() {
        return Err(run_error(path, "no prompts"));
    }
    Ok(tasks)
}

/// The Gaussian's un-scaled std g that Flow-GRPO's KL divides by (§1.6).
fn kl_std(kind: StepKind, sigma: f64, sigma_next: f64, sigma_max: f64) -> f64 {
    match kind {
        StepKind::FlowSde { noise_level } => schedule::flow_sde_g(sigma, sigma_max, noise_level),
        StepKind::Cps { eta } => schedule::cps_std(sigma_next, eta),
        StepKind::DanceSde { eta } => eta,
        StepKind::Euler => 1.0,
    }
}

/// Above this ratio of the largest to the smallest KL std over the trainable steps, the x-space
/// KL's 1/(2g²) weights differ by more than 100×.
const X_KL_STD_SPREAD: f64 = 10.0;

/// A warning when Flow-GRPO's x-space KL (β > 0) can be trained on steps whose policy std is far
/// below the others': there 1/(2g²) swamps the policy gradient (CPS reaching σ ≈ 0.01 made the KL
/// 2.4–163 per epoch in session 13). flow_grpo's window stays in the first half, where it cannot.
fn x_kl_spread_warning(config: &GrpoConfig, schedule: &Schedule) -> Option<String> {
    let t = &config.train;
    if t.beta <= 0.0 || t.kl_type != KlType::X || t.draft.is_some() {
        return None;
    }
    let kind = config.sample.step_kind();
    let sigma_max = schedule.sigma_max();
    let stds: Vec<(usize, f64)> = t
        .steps
        .reachable(schedule.steps())
        .into_iter()
        .map(|j| {
            let g = kl_std(kind, schedule.sigmas[j], schedule.sigmas[j + 1], sigma_max);
            (j, g)
        })
        .filter(|&(_, g)| g > 0.0)
        .collect();
    let (hi_step, hi) = stds.iter().copied().max_by(|a, b| a.1.total_cmp(&b.1))?;
    let (lo_step, lo) = stds.iter().copied().min_by(|a, b| a.1.total_cmp(&b.1))?;
    (hi / lo > X_KL_STD_SPREAD).then(|| {
        format!(
            "train.kl_type = \"x\" divides by the step std g: it is {hi:.3e} at step {hi_step} but {lo:.3e} at step {lo_step}, so the KL there weighs {:.0}× more and can swamp the policy gradient; keep train.steps in the high-noise steps (flow_grpo's window is [0, steps/2)) or use kl_type = \"v\"",
            (hi / lo).powi(2)
        )
    })
}

/// Scales every gradient so their joint L2 norm is at most `max_norm` (torch's
/// `clip_grad_norm_`; burn's own clipping is per tensor). Returns the norm before clipping.
pub fn clip_global_norm(module: &impl Module, grads: &mut GradientsParams, max_norm: f64) -> f64 {
    let ids = parameter_ids(module);
    let mut total = 0.0f64;
    for &(id, rank) in &ids {
        total += match rank {
            1 => grads
                .get::<1>(id)
                .map(|g| g.square().sum().into_scalar::<f32>() as f64),
            2 => grads
                .get::<2>(id)
                .map(|g| g.square().sum().into_scalar::<f32>() as f64),
            3 => grads
                .get::<3>(id)
                .map(|g| g.square().sum().into_scalar::<f32>() as f64),
            _ => None,
        }
        .unwrap_or(0.0);
    }
    let norm = total.sqrt();
    if norm > max_norm {
        let factor = max_norm / (norm + 1e-6);
        for &(id, rank) in &ids {
            match rank {
                1 => rescale::<1>(grads, id, factor),
                2 => rescale::<2>(grads, id, factor),
                3 => rescale::<3>(grads, id, factor),
                _ => {}
            }
        }
    }
    norm
}

fn rescale<const D: usize>(grads: &mut GradientsParams, id: burn::module::ParamId, factor: f64) {
    if let Some(g) = grads.remove::<D>(id) {
        grads.register(id, g.mul_scalar(factor));
    }
}

fn parameter_ids(module: &impl Module) -> Vec<(burn::module::ParamId, usize)> {
    struct Ids(Vec<(burn::module::ParamId, usize)>);
    impl burn::module::ModuleVisitor for Ids {
        fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<Tensor<D>>) {
            self.0.push((param.id, D));
        }
    }
    let mut ids = Ids(Vec::new());
    module.visit(&mut ids);
    ids.0
}

/// A per-sample seed from (run seed, epoch, sample, stream): splitmix64 over the mixed words.
fn mix(seed: u64, epoch: u64, id: u64, stream: u64) -> u64 {
    let mut z = seed
        ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ id.wrapping_mul(0xC2B2_AE3D_27D4_EB4F)
        ^ stream.wrapping_mul(0x1656_67B1_9E37_79F9);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn append_line(path: &Path, value: &impl Serialize) -> Result<(), GrpoError> {
    crate::train::append_jsonl(path, value).map_err(|e| run_error(path, e))
}

fn truncate_log(path: &Path, epoch: usize) -> Result<(), GrpoError> {
    crate::train::truncate_jsonl(path, "epoch", epoch).map_err(|e| run_error(path, e))
}

/// A grid of the epoch's first rollout images (8 per row), with the prompts in the PNG's text.
fn save_grid(images: &[(Image, String)], path: &Path) -> Result<(), GrpoError> {
    if images.is_empty() {
        return Ok(());
    }
    let (w, h) = (images[0].0.width, images[0].0.height);
    let columns = images.len().min(8);
    let rows = images.len().div_ceil(columns);
    let gap = 2;
    let (gw, gh) = (columns * (w + gap) - gap, rows * (h + gap) - gap);
    let mut grid = Image {
        width: gw,
        height: gh,
        pixels: vec![[255, 255, 255]; gw * gh],
    };
    for (k, (image, _)) in images.iter().enumerate() {
        let (ox, oy) = ((k % columns) * (w + gap), (k / columns) * (h + gap));
        for y in 0..h {
            for x in 0..w {
                grid.pixels[(oy + y) * gw + ox + x] = image.get(x, y);
            }
        }
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| run_error(dir, e))?;
    }
    let prompts = images
        .iter()
        .map(|(_, p)| p.as_str())
        .collect::<Vec<_>>()
        .join(" | ");
    crate::image_io::save_png(&grid, path, &[("prompts", prompts)]).map_err(|e| run_error(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sample::select::StepSelection;
    use crate::world::prompt::random_spec;

    #[test]
    fn x_space_kl_warns_only_when_its_window_reaches_low_noise_steps() {
        let mut config = GrpoConfig::default();
        config.sample.steps = 10;
        config.sample.sde_type = config::SdeType::Cps;
        config.sample.noise_level = 0.8;
        config.train.beta = 0.04;
        let schedule = Schedule::shifted(10, 3.0).unwrap();
        let window = |hi| StepSelection::RandomWindow { size: 3, lo: 0, hi };
        config.train.steps = window(5);
        assert_eq!(
            x_kl_spread_warning(&config, &schedule),
            None,
            "flow_grpo's window"
        );
        config.train.steps = window(9);
        let warning = x_kl_spread_warning(&config, &schedule).expect("window to step 8");
        assert!(
            warning.contains("step 8") && warning.contains("kl_type"),
            "{warning}"
        );
        config.train.kl_type = KlType::V;
        assert_eq!(x_kl_spread_warning(&config, &schedule), None, "velocity KL");
        config.train.kl_type = KlType::X;
        config.train.beta = 0.0;
        assert_eq!(x_kl_spread_warning(&config, &schedule), None, "no KL");
    }

    #[test]
    fn balanced_choice_takes_every_tag_before_repeating_one() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        // 1 single_object prompt, 2 counting, 20 color_attr, as lopsided as the Shapes files.
        let mut train: Vec<Task> = Vec::new();
        for (tag, n) in [("single_object", 1), ("counting", 2), ("color_attr", 20)] {
            for _ in 0..n {
                train.push(Task::Shapes(random_spec(&mut rng, tag)));
            }
        }
        let tags = |chosen: &[usize]| -> Vec<String> {
            let mut t: Vec<String> = chosen.iter().map(|&i| train[i].tag().to_string()).collect();
            t.sort();
            t
        };
        let three = choose_balanced(&train, 3, &mut rng);
        assert_eq!(tags(&three), ["color_attr", "counting", "single_object"]);
        // Past the single_object prompt, the others keep alternating; all distinct.
        let six = choose_balanced(&train, 6, &mut rng);
        assert_eq!(
            tags(&six),
            [
                "color_attr",
                "color_attr",
                "color_attr",
                "counting",
                "counting",
                "single_object"
            ]
        );
        let mut distinct = six.clone();
        distinct.sort();
        distinct.dedup();
        assert_eq!(distinct.len(), 6);
        assert_eq!(choose_balanced(&train, 50, &mut rng).len(), train.len());
    }
}
