//! The Flow-GRPO training config (`portaflow train grpo --config FILE.toml`): every knob of
//! ALGORITHMS.md §1.10, with the defaults of this machine's Shapes preset. `configs/grpo-*.toml` are
//! the presets, including the paper's SD3.5-Medium GenEval setting.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::lora::LoraConfig;
use crate::reward::remote::RemoteConfig;
use crate::sample::schedule::Schedule;
use crate::sample::select::{OffSelection, StepSelection};
use crate::sample::step::StepKind;

/// The whole run (`Default`: every section's defaults, as an empty TOML file gives).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrpoConfig {
    #[serde(default)]
    pub model: ModelSection,
    #[serde(default)]
    pub data: DataSection,
    #[serde(default)]
    pub sample: SampleSection,
    #[serde(default)]
    pub train: TrainSection,
    #[serde(default)]
    pub run: RunSection,
}

/// What is trained.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelSection {
    /// Pipeline folder; the bundled Shapes model when absent.
    pub path: Option<PathBuf>,
    /// LoRA rank r.
    pub lora_rank: usize,
    /// LoRA α (scale α/r).
    pub lora_alpha: f64,
    /// PEFT `target_modules` (suffix match).
    pub lora_targets: Vec<String>,
    /// Adapters merged into the base weights, in order, before the trained adapter is created:
    /// RTDMD's LoRA stacking (the cold-start student, then RL on a fresh adapter). Inference
    /// stacks them the same way: `--lora FIRST --lora TRAINED`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub merge_adapters: Vec<PathBuf>,
    /// The trained adapter starts from this one instead of A random, B = 0: Flow-OPD's cold
    /// start from its teachers (`portaflow lora combine` of their adapters). Its modules must be
    /// the ones `lora_rank`, `lora_alpha` and `lora_targets` make (`portaflow lora combine` of n
    /// rank-r adapters writes rank n·r with α = n·r).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub init_adapter: Option<PathBuf>,
}

impl Default for ModelSection {
    fn default() -> Self {
        let flow_grpo = LoraConfig::flow_grpo_sd3();
        Self {
            path: None,
            lora_rank: flow_grpo.r,
            lora_alpha: flow_grpo.lora_alpha,
            lora_targets: flow_grpo.target_list(),
            merge_adapters: Vec::new(),
            init_adapter: None,
        }
    }
}

/// Which reward drives advantages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RewardKind {
    /// Flow-GRPO's GenEval partial-credit score on the Shapes detector.
    Geneval,
    /// The dense compositional score (`world::dense`): GenEval's clauses with soft shape, colour
    /// and relation likelihoods, for bases that rarely get a whole prompt right.
    GenevalDense,
    /// Flow-GRPO's OCR reward on the digits task.
    Ocr,
    /// A reward server (`[data.remote]`, protocol in `reward::remote`).
    Remote,
}

/// How several rewards make one advantage (see `advantage::combine`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RewardAggregate {
    /// Weighted sum of the rewards, then group-relative advantages (Flow-GRPO's `multi_score`).
    #[default]
    Sum,
    /// Group-relative advantages per reward, then their weighted sum (DanceGRPO, GDPO).
    Advantages,
    /// As `advantages`, then re-standardised over the epoch (RTDMD's `weight_advantages`).
    AdvantagesRestandardized,
}

/// One reward of a multi-reward objective (`[[data.rewards]]`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RewardTerm {
    pub reward: RewardKind,
    #[serde(default = "unit_weight")]
    pub weight: f64,
    /// The server of a `remote` term.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote: Option<RemoteConfig>,
}

fn unit_weight() -> f64 {
    1.0
}

/// Prompts and reward.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataSection {
    /// Training prompts (GenEval JSONL); default `assets/prompts/shapes_train.jsonl`.
    pub train_prompts: Option<PathBuf>,
    /// Held-out prompts for evaluation; default `assets/prompts/shapes_test.jsonl`.
    pub test_prompts: Option<PathBuf>,
    pub reward: RewardKind,
    /// The server when `reward = "remote"`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub remote: Option<RemoteConfig>,
    /// Several weighted rewards instead of `reward` (`[[data.rewards]]`); each prompt is scored by
    /// the rewards that judge its task.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub rewards: Vec<RewardTerm>,
    /// How `rewards` combine.
    pub aggregate: RewardAggregate,
    /// Draw each epoch's prompts tag by tag (GenEval tags, plus `digits`) instead of uniformly
    /// from the file, so that a tag with few prompts is trained as often as one with many, as
    /// GenEval's overall score (the mean of the tag accuracies) weighs them.
    pub balance_tags: bool,
}

impl RewardKind {
    pub fn name(self) -> &'static str {
        match self {
            RewardKind::Geneval => "geneval",
            RewardKind::GenevalDense => "geneval_dense",
            RewardKind::Ocr => "ocr",
            RewardKind::Remote => "remote",
        }
    }
}

impl DataSection {
    /// The reward terms in effect: `rewards`, or `reward` alone with weight 1.
    pub fn terms(&self) -> Vec<RewardTerm> {
        if !self.rewards.is_empty() {
            return self.rewards.clone();
        }
        vec![RewardTerm {
            reward: self.reward,
            weight: 1.0,
            remote: self.remote.clone(),
        }]
    }

    /// What the run optimises, e.g. `geneval` or `1×geneval + 0.5×ocr`.
    pub fn reward_name(&self) -> String {
        let terms = self.terms();
        if terms.len() == 1 {
            return terms[0].reward.name().into();
        }
        terms
            .iter()
            .map(|t| format!("{}×{}", t.weight, t.reward.name()))
            .collect::<Vec<_>>()
            .join(" + ")
    }
}

impl Default for DataSection {
    fn default() -> Self {
        Self {
            train_prompts: None,
            test_prompts: None,
            reward: RewardKind::Geneval,
            remote: None,
            rewards: Vec::new(),
            aggregate: RewardAggregate::Sum,
            balance_tags: false,
        }
    }
}

/// The SDE used for rollouts (`sde_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SdeType {
    /// Flow-GRPO's SDE, g = a·sqrt(σ/(1−σ)), full-Gaussian log-prob.
    Sde,
    /// Coefficients-preserving sampling, std = σ'·sin(aπ/2), log-prob −(x'−μ)².
    Cps,
    /// DanceGRPO's SDE: constant η (`noise_level`), std η·sqrt(|dt|) (ALGORITHMS.md §2.1).
    Dance,
}

/// Rollout settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SampleSection {
    /// Denoising steps of a training rollout (`sample.num_steps`).
    pub steps: usize,
    /// Denoising steps of held-out evaluation (`sample.eval_num_steps`).
    pub eval_steps: usize,
    /// CFG scale during rollouts (1 disables CFG).
    pub guidance_scale: f64,
    /// CFG scale during evaluation.
    pub eval_guidance_scale: f64,
    /// The SDE noise level a (η for CPS).
    pub noise_level: f64,
    pub sde_type: SdeType,
    /// Images per prompt, k (`num_image_per_prompt`).
    pub group_size: usize,
    /// Distinct prompts per epoch.
    pub groups_per_epoch: usize,
    /// Images per rollout forward, which is also the training micro-batch (Flow-GRPO insists on
    /// equal sizes so the first ratio is exactly 1).
    pub batch_size: usize,
    /// All members of a group start from the same x(σ = 1) (`same_latent`).
    pub same_initial_noise: bool,
    /// An explicit σ list for rollouts and evaluation instead of the scheduler's (a few-step
    /// student's, e.g. RTDMD's [1, 0.75, 0.5, 0.25] on the bundled model); `steps` and
    /// `eval_steps` must equal its length.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sigmas: Option<Vec<f64>>,
    /// Evaluate with the rollout's stochastic step (`sde_type`, `noise_level`) instead of the ODE:
    /// how a few-step CPS student (RTDMD) samples. Flow-GRPO evaluates with the ODE (false).
    pub eval_stochastic: bool,
    /// Image side in pixels for rollouts and evaluation (Flow-GRPO's `resolution`, 512 in its
    /// SD3.5 settings); the pipeline's default size when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resolution: Option<usize>,
}

impl Default for SampleSection {
    fn default() -> Self {
        Self {
            steps: 10,
            eval_steps: 20,
            guidance_scale: 1.0,
            eval_guidance_scale: 1.0,
            noise_level: 0.8,
            sde_type: SdeType::Cps,
            group_size: 8,
            groups_per_epoch: 4,
            batch_size: 8,
            same_initial_noise: false,
            eval_stochastic: false,
            sigmas: None,
            resolution: None,
        }
    }
}

impl SampleSection {
    /// The held-out evaluation's step rule: the rollout's with `eval_stochastic`, else the ODE.
    pub fn eval_kind(&self) -> StepKind {
        if self.eval_stochastic {
            self.step_kind()
        } else {
            StepKind::Euler
        }
    }

    pub fn step_kind(&self) -> StepKind {
        match self.sde_type {
            SdeType::Sde => StepKind::FlowSde {
                noise_level: self.noise_level,
            },
            SdeType::Cps => StepKind::Cps {
                eta: self.noise_level,
            },
            SdeType::Dance => StepKind::DanceSde {
                eta: self.noise_level,
            },
        }
    }
}

/// DenseGRPO's completions.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DenseReward {
    /// Euler steps of each ODE completion from σ_j to 0, evenly spaced in σ; 0 = the rest of the
    /// rollout schedule (the paper's n = t, costly but best).
    pub completion_steps: usize,
}

/// DRaFT-K / DRaFT-LV settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Draft {
    /// A Shapes CLIP folder (`portaflow train clip`): its image–prompt cosine is the reward.
    pub clip: PathBuf,
    /// Sampling steps at the end that keep their graph (DRaFT-K; K = 1 recommended, larger K
    /// tends to explode gradients).
    #[serde(default = "one")]
    pub k: usize,
    /// DRaFT-LV: re-noised copies of the last step's x̂₀, each denoised again with gradient and
    /// scored (n = 2 in the paper; 0 is plain DRaFT-K). Needs k = 1.
    #[serde(default)]
    pub lv_samples: usize,
    /// Hinge: the loss is mean(ReLU(margin − r)) (FlowBP's `ReLU(0.55 − r)`); absent: −mean(r).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub margin: Option<f64>,
}

/// RTDMD's `L_BP` on the rollout's last step.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RewardBackprop {
    /// A Shapes CLIP folder (`portaflow train clip`): its image–prompt cosine is the reward.
    pub clip: PathBuf,
    /// Hinge margin (RTDMD: 3.0 on the sum of three rewards; with the one cosine reward here,
    /// any margin above 1 keeps the hinge open and the loss is −scale·mean(r)).
    #[serde(default = "rtdmd_margin")]
    pub margin: f64,
    /// Gradient scale (RTDMD: 1e-4).
    #[serde(default = "rtdmd_bp_scale")]
    pub scale: f64,
}

/// RTDMD's final-step AC-DMD term. The teacher is the base model as given (before
/// `model.merge_adapters`); the fake score is the base plus `fake_lora` merged, plus a fresh
/// adapter of the policy's LoRA shape trained on every epoch's rollout images with AC-DMD's
/// fake-score loss at s = 0.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FinalStepDmd {
    /// Weight of the DMD loss (RTDMD: 0.001).
    #[serde(default = "rtdmd_dmd_weight")]
    pub weight: f64,
    /// The cold start's fake-score adapter (`distill acdmd` run: `checkpoint/fake_score`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fake_lora: Option<PathBuf>,
    /// Fake-score updates per epoch, each on a batch of the epoch's rollout images.
    #[serde(default = "one")]
    pub fake_updates: usize,
    /// The fake score's AdamW learning rate (absent: `train.learning_rate`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fake_learning_rate: Option<f64>,
    /// The teacher's CFG scale (RTDMD: 4.5).
    #[serde(default = "rtdmd_teacher_guidance")]
    pub teacher_guidance: f64,
    /// Re-noising timesteps τ ~ U[10, 1000] clamped to this range (RTDMD: [20, 980]).
    #[serde(default = "rtdmd_renoise_range")]
    pub renoise_range: [f64; 2],
}

fn rtdmd_dmd_weight() -> f64 {
    1e-3
}

fn rtdmd_teacher_guidance() -> f64 {
    4.5
}

fn rtdmd_renoise_range() -> [f64; 2] {
    [20.0, 980.0]
}

fn rtdmd_margin() -> f64 {
    3.0
}

fn rtdmd_bp_scale() -> f64 {
    1e-4
}

fn one() -> usize {
    1
}

/// Flow-OPD settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Opd {
    /// The task teachers (LoRA adapters of this base model, e.g. Flow-GRPO runs' `adapter_final`)
    /// and the prompts each one teaches: hard routing by the prompt's task.
    pub teachers: Vec<OpdTeacher>,
    /// A_j = kl_scale·(−KL_j) (Flow-OPD's code: `kl_scale = −1` on the positive KL).
    #[serde(default = "unit")]
    pub kl_scale: f64,
    /// Add the task reward's group advantage to every step's (Flow-OPD's `mixed` mode; off is
    /// its `kl_only`).
    #[serde(default)]
    pub with_task_advantage: bool,
    /// Standardise each step's −KL over the epoch's samples (mean 0, std 1) before scaling: the
    /// policy gradient then favours the samples that came closer to their teacher.
    #[serde(default)]
    pub normalize: bool,
    /// Also descend the KL itself, |kl_scale|·KL(π_θ ‖ teacher) per trained step, as Flow-OPD's
    /// code does by not detaching its reward. On by default: the paper's detached reward
    /// credits step j's action with KL_j, which depends on x_j only, so alone it carries no
    /// signal about the action (measured in `tests/tests/suite/grpo.rs`: the KL does not fall).
    #[serde(default = "yes")]
    pub direct_kl: bool,
    /// MAR: a task-agnostic teacher adapter that replaces the base model as the β·KL reference
    /// (needs train.beta > 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mar: Option<PathBuf>,
}

fn unit() -> f64 {
    1.0
}

fn yes() -> bool {
    true
}

/// One Flow-OPD teacher.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpdTeacher {
    /// `"digits"`, `"shapes"` (every GenEval-style prompt) or a GenEval tag (`"counting"`, …),
    /// which wins over `"shapes"` for its prompts.
    pub route: String,
    /// The teacher's adapter folder (PEFT, diffusers or kohya).
    pub lora: PathBuf,
}

impl Opd {
    /// The teacher of a prompt: its tag's, else its task's.
    pub fn route(&self, task: &crate::reward::Task) -> Option<usize> {
        use crate::reward::Task;
        let find = |name: &str| self.teachers.iter().position(|t| t.route == name);
        match task {
            Task::Shapes(spec) => find(&spec.tag).or_else(|| find("shapes")),
            Task::Digits { .. } => find("digits"),
        }
    }
}

/// Which KL estimate regularises the policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KlType {
    /// Flow-GRPO's `mean((μ_θ − μ_ref)²) / (2 g²)`, without |dt| (ALGORITHMS.md §1.6).
    X,
    /// Flow-Factory's velocity-space `mean((v_θ − v_ref)²)`.
    V,
}

/// How the advantage's denominator is taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StdScope {
    /// One std over every reward of the epoch (`global_std = True`, Flow-GRPO's default).
    Global,
    /// Each prompt's own std (DanceGRPO; Flow-GRPO issue #52).
    Group,
}

/// Policy-gradient settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainSection {
    /// Which steps are stochastic and trained.
    pub steps: StepSelection,
    /// What the other steps do; the method's own default when absent.
    pub off_steps: Option<OffSelection>,
    /// PPO clip range ε.
    pub clip_range: f64,
    /// Advantages are clamped to ±this.
    pub adv_clip_max: f64,
    /// KL weight β (0 disables the reference forward).
    pub beta: f64,
    pub kl_type: KlType,
    /// GRPO-Guard's RatioNorm (Flow-Factory `grpo-guard`, ALGORITHMS.md §2.3): the log-ratio
    /// becomes s·(log π − log π_old) + mse(μ_θ, μ_old)/(2s), zero-mean with a σ-independent scale.
    /// Gaussian log-probs only (`sde_type` "sde" or "dance").
    pub ratio_norm: bool,
    /// BoxFlow-GRPO's spatial training (ALGORITHMS.md §2.5): per-pixel reward maps from the
    /// reward's defect boxes, per-pixel advantages, ratios and clipping. Absent: off.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spatial: Option<crate::reward::boxes::MapSettings>,
    /// DenseGRPO's step-wise rewards (ALGORITHMS.md §2.4): each trained step j is credited with
    /// ΔR_j = R(x̂₀ from x_{j+1}) − R(x̂₀ from x_j), x̂₀ an ODE completion; advantages per step
    /// over the group. Absent: off.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dense_reward: Option<DenseReward>,
    /// DRaFT (ALGORITHMS.md §4): instead of a policy gradient, back-propagate a differentiable
    /// reward through the last steps of the ODE sampler. Absent: off.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub draft: Option<Draft>,
    /// Flow-OPD (ALGORITHMS.md §5): on-policy distillation from task teachers; each trained
    /// step's advantage is the negative KL of the policy's step to the routed teacher's. Absent:
    /// off.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub opd: Option<Opd>,
    /// RTDMD's final-step reward back-propagation (ALGORITHMS.md §3.3, `L_BP`): beside the policy
    /// gradient, x̂₀ = x_last − σ_last·v_θ of the rollout's last step is scored with a
    /// differentiable reward and scale·mean(ReLU(margin − r)) is descended. Absent: off.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reward_backprop: Option<RewardBackprop>,
    /// RTDMD's final-step AC-DMD term (ALGORITHMS.md §3.3, `0.001·L_AC-DMD`): the last step's
    /// x̂₀ is pulled toward the base model (teacher, with CFG) and away from a fake score that
    /// learns the policy's own images each epoch. Absent: off.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub final_step_dmd: Option<FinalStepDmd>,
    pub std_scope: StdScope,
    /// Apply CFG in the training forward too (`train.cfg`); needs guidance_scale ≠ 1, and a model
    /// that runs CFG at that scale needs it (the training forward must be the policy that
    /// sampled). A guidance-distilled FLUX embeds the scale in both forwards and runs no CFG.
    pub cfg: bool,
    pub learning_rate: f64,
    pub weight_decay: f64,
    /// Global gradient-norm clip (`max_grad_norm`).
    pub grad_clip: f64,
    /// Micro-batches per optimizer step (`gradient_accumulation_steps`).
    pub grad_accum: usize,
    /// Passes over each epoch's rollouts (`num_inner_epochs`, 1 in every Flow-GRPO config): pass
    /// k > 1 trains the same samples again in a new order, off-policy by then, so the PPO clip
    /// bounds how far they pull.
    pub inner_epochs: usize,
    /// Keep an EMA of the adapter (used for evaluation and the saved adapter).
    pub ema: bool,
    /// EMA decay cap (Flow-GRPO: min((1+n)/(10+n), 0.9)).
    pub ema_decay: f64,
    /// EMA update interval in optimizer steps.
    pub ema_every: usize,
}

impl Default for TrainSection {
    fn default() -> Self {
        Self {
            steps: StepSelection::RandomWindow {
                size: 3,
                lo: 0,
                hi: 5,
            },
            off_steps: None,
            clip_range: 1e-5,
            adv_clip_max: 5.0,
            beta: 0.0,
            kl_type: KlType::X,
            ratio_norm: false,
            spatial: None,
            dense_reward: None,
            draft: None,
            opd: None,
            reward_backprop: None,
            final_step_dmd: None,
            std_scope: StdScope::Global,
            cfg: false,
            learning_rate: 3e-4,
            weight_decay: 1e-4,
            grad_clip: 1.0,
            grad_accum: 2,
            inner_epochs: 1,
            ema: true,
            ema_decay: 0.9,
            ema_every: 8,
        }
    }
}

/// Length, seeds, and how often to evaluate, draw and save.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RunSection {
    pub epochs: usize,
    /// Also stop after the epoch at which training time (rollouts, rewards and updates; not
    /// evaluations, grids or checkpoints) reaches this many minutes: methods compared on the
    /// same wall-clock budget. Absent: `epochs` alone.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub budget_minutes: Option<f64>,
    pub seed: u64,
    /// Held-out evaluation every N epochs (and after the last); 0 never.
    pub eval_every: usize,
    /// Images per held-out prompt.
    pub eval_images_per_prompt: usize,
    /// Evaluate on the first N held-out prompts only (all when absent).
    pub eval_prompts: Option<usize>,
    /// A PNG grid of the epoch's first rollout batch every N epochs; 0 never.
    pub grid_every: usize,
    /// Checkpoint every N epochs (and after the last).
    pub save_every: usize,
    /// Also keep the adapter evaluation uses (the EMA when enabled) every N epochs in
    /// `snapshots/epoch-N/`, a PEFT folder each (the checkpoint keeps only the latest); 0 never.
    pub snapshot_every: usize,
}

impl Default for RunSection {
    fn default() -> Self {
        Self {
            epochs: 100,
            budget_minutes: None,
            seed: 42,
            eval_every: 10,
            eval_images_per_prompt: 1,
            eval_prompts: Some(96),
            grid_every: 10,
            save_every: 10,
            snapshot_every: 0,
        }
    }
}

impl GrpoConfig {
    pub fn from_file(path: &Path) -> Result<Self, String> {
        crate::train::read_toml_config(path, Self::validate)
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("serialisable config")
    }

    /// The step plan rule for steps outside the trained selection.
    pub fn off_steps(&self) -> OffSelection {
        self.train
            .off_steps
            .unwrap_or_else(|| self.train.steps.default_off_selection())
    }

    pub fn lora(&self) -> LoraConfig {
        let targets: Vec<&str> = self.model.lora_targets.iter().map(String::as_str).collect();
        LoraConfig::new(self.model.lora_rank, self.model.lora_alpha, &targets)
    }

    /// The rollout schedule for a model whose scheduler has static `shift`.
    pub fn schedule(&self, shift: f64) -> Result<Schedule, crate::sample::schedule::ScheduleError> {
        match &self.sample.sigmas {
            Some(sigmas) => Schedule::explicit(sigmas),
            None => Schedule::shifted(self.sample.steps, shift),
        }
    }

    /// Rollout images per epoch.
    pub fn samples_per_epoch(&self) -> usize {
        self.sample.group_size * self.sample.groups_per_epoch
    }

    /// Checks every field; the message names the field and what it must be.
    pub fn validate(&self) -> Result<(), String> {
        let s = &self.sample;
        let t = &self.train;
        let r = &self.run;
        let positive = [
            ("sample.steps", s.steps),
            ("sample.eval_steps", s.eval_steps),
            ("sample.group_size", s.group_size),
            ("sample.groups_per_epoch", s.groups_per_epoch),
            ("sample.batch_size", s.batch_size),
            ("train.grad_accum", t.grad_accum),
            ("train.inner_epochs", t.inner_epochs),
            ("train.ema_every", t.ema_every),
            ("run.epochs", r.epochs),
            ("run.save_every", r.save_every),
            ("run.eval_images_per_prompt", r.eval_images_per_prompt),
            ("model.lora_rank", self.model.lora_rank),
        ];
        crate::train::require_counts(&positive)?;
        if let Some(minutes) = r.budget_minutes
            && !(minutes.is_finite() && minutes > 0.0)
        {
            return Err(format!(
                "run.budget_minutes must be a positive number of minutes, got {minutes}"
            ));
        }
        for (k, term) in self.data.terms().iter().enumerate() {
            if !term.weight.is_finite() || term.weight == 0.0 {
                return Err(format!(
                    "data.rewards[{k}].weight must be finite and non-zero, got {}",
                    term.weight
                ));
            }
            match (&term.reward, &term.remote) {
                (RewardKind::Remote, Some(remote)) => remote.validate()?,
                (RewardKind::Remote, None) if self.data.rewards.is_empty() => {
                    return Err(
                        "data.remote.url is required with reward = \"remote\" ([data.remote] url = \"http://…\")".into(),
                    );
                }
                (RewardKind::Remote, None) => {
                    return Err(format!(
                        "data.rewards[{k}] is remote but has no [data.rewards.remote] url"
                    ));
                }
                (_, Some(_)) => {
                    let field = if self.data.rewards.is_empty() {
                        "data.remote".to_string()
                    } else {
                        format!("data.rewards[{k}].remote")
                    };
                    return Err(format!(
                        "{field}: server settings belong to reward = \"remote\" only"
                    ));
                }
                _ => {}
            }
        }
        if t.spatial.is_some() && self.data.aggregate != RewardAggregate::Sum {
            return Err(
                "train.spatial maps one scalar reward per image: data.aggregate must be \"sum\""
                    .into(),
            );
        }
        if t.dense_reward.is_some() && self.data.aggregate != RewardAggregate::Sum {
            return Err(
                "train.dense_reward differences one scalar reward: data.aggregate must be \"sum\""
                    .into(),
            );
        }
        if t.dense_reward.is_some() && t.spatial.is_some() {
            return Err("train.dense_reward and train.spatial do not combine (per-step or per-pixel credit, not both)".into());
        }
        if let Some(draft) = &t.draft {
            if draft.k == 0 || draft.k > s.steps {
                return Err(format!(
                    "train.draft.k must be in 1..={} (sample.steps), got {}",
                    s.steps, draft.k
                ));
            }
            if draft.lv_samples > 0 && draft.k != 1 {
                return Err(format!(
                    "train.draft.lv_samples (DRaFT-LV) re-noises the last step only: it needs k = 1, got k = {}",
                    draft.k
                ));
            }
            if let Some(m) = draft.margin
                && !m.is_finite()
            {
                return Err(format!("train.draft.margin must be finite, got {m}"));
            }
            let conflicts = [
                ("train.spatial", t.spatial.is_some()),
                ("train.dense_reward", t.dense_reward.is_some()),
                ("train.ratio_norm", t.ratio_norm),
                ("train.beta > 0", t.beta > 0.0),
            ];
            if let Some((name, _)) = conflicts.iter().find(|(_, on)| *on) {
                return Err(format!(
                    "train.draft back-propagates a reward; {name} belongs to the policy-gradient methods"
                ));
            }
        }
        if let Some(bp) = &t.reward_backprop {
            if !bp.margin.is_finite() {
                return Err(format!(
                    "train.reward_backprop.margin must be finite, got {}",
                    bp.margin
                ));
            }
            if !(bp.scale.is_finite() && bp.scale > 0.0) {
                return Err(format!(
                    "train.reward_backprop.scale must be positive, got {}",
                    bp.scale
                ));
            }
            if t.draft.is_some() {
                return Err("train.reward_backprop is the policy-gradient methods' final-step term; train.draft already back-propagates its reward".into());
            }
        }
        if let Some(dmd) = &t.final_step_dmd {
            if !(dmd.weight.is_finite() && dmd.weight > 0.0) {
                return Err(format!(
                    "train.final_step_dmd.weight must be positive, got {}",
                    dmd.weight
                ));
            }
            if dmd.fake_updates == 0 {
                return Err("train.final_step_dmd.fake_updates must be at least 1".into());
            }
            if let Some(lr) = dmd.fake_learning_rate
                && !(lr.is_finite() && lr > 0.0)
            {
                return Err(format!(
                    "train.final_step_dmd.fake_learning_rate must be positive, got {lr}"
                ));
            }
            if !(dmd.teacher_guidance.is_finite() && dmd.teacher_guidance >= 1.0) {
                return Err(format!(
                    "train.final_step_dmd.teacher_guidance must be ≥ 1, got {}",
                    dmd.teacher_guidance
                ));
            }
            let [lo, hi] = dmd.renoise_range;
            if !(1.0 <= lo && lo < hi && hi <= 999.0) {
                return Err(format!(
                    "train.final_step_dmd.renoise_range must be [lo, hi] with 1 ≤ lo < hi ≤ 999 (RTDMD: [20, 980]), got [{lo}, {hi}]"
                ));
            }
            if t.draft.is_some() {
                return Err("train.final_step_dmd is a policy-gradient run's final-step term; it does not combine with train.draft".into());
            }
        }
        if let Some(opd) = &t.opd {
            if opd.teachers.is_empty() {
                return Err(
                    "train.opd.teachers is empty: name at least one { route, lora }".into(),
                );
            }
            let routes = ["digits", "shapes"];
            for (k, teacher) in opd.teachers.iter().enumerate() {
                let known = routes.contains(&teacher.route.as_str())
                    || crate::world::prompt::TAGS.contains(&teacher.route.as_str());
                if !known {
                    return Err(format!(
                        "train.opd.teachers[{k}].route {:?} is not \"digits\", \"shapes\" or a GenEval tag ({})",
                        teacher.route,
                        crate::world::prompt::TAGS.join(", ")
                    ));
                }
                if opd.teachers[..k].iter().any(|t| t.route == teacher.route) {
                    return Err(format!(
                        "train.opd.teachers: two teachers for the route {:?}",
                        teacher.route
                    ));
                }
            }
            if !opd.kl_scale.is_finite() || opd.kl_scale == 0.0 {
                return Err(format!(
                    "train.opd.kl_scale must be finite and non-zero, got {}",
                    opd.kl_scale
                ));
            }
            if opd.mar.is_some() && t.beta == 0.0 {
                return Err("train.opd.mar is the β·KL reference: it needs train.beta > 0".into());
            }
            let conflicts = [
                ("train.spatial", t.spatial.is_some()),
                ("train.dense_reward", t.dense_reward.is_some()),
                ("train.draft", t.draft.is_some()),
            ];
            if let Some((name, _)) = conflicts.iter().find(|(_, on)| *on) {
                return Err(format!(
                    "train.opd sets each step's advantage from its teacher; it does not combine with {name}"
                ));
            }
        }
        if t.spatial.is_some() && t.ratio_norm {
            return Err("train.spatial and train.ratio_norm do not combine (per-pixel ratios have no RatioNorm)".into());
        }
        if t.ratio_norm && s.sde_type == SdeType::Cps {
            return Err("train.ratio_norm (GRPO-Guard) needs a Gaussian log-prob: sample.sde_type \"sde\" or \"dance\", not \"cps\"".into());
        }
        if self.samples_per_epoch() % s.batch_size != 0 {
            return Err(format!(
                "sample.group_size × sample.groups_per_epoch = {} must be a multiple of sample.batch_size = {}",
                self.samples_per_epoch(),
                s.batch_size
            ));
        }
        if let Some(sigmas) = &s.sigmas {
            Schedule::explicit(sigmas).map_err(|e| format!("sample.sigmas: {e}"))?;
            if s.steps != sigmas.len() || s.eval_steps != sigmas.len() {
                return Err(format!(
                    "sample.sigmas has {} steps: sample.steps and sample.eval_steps must both be {} (found {} and {})",
                    sigmas.len(),
                    sigmas.len(),
                    s.steps,
                    s.eval_steps
                ));
            }
        }
        if s.steps < 2 {
            return Err("sample.steps must be at least 2 (the last step is never trained)".into());
        }
        s.step_kind().validate()?;
        if s.noise_level == 0.0 && t.draft.is_none() {
            return Err("sample.noise_level is 0: every rollout step is deterministic and there is no policy to train (DRaFT alone samples with the ODE)".into());
        }
        t.steps.validate(s.steps)?;
        crate::train::require_positive(&[
            ("train.clip_range", t.clip_range),
            ("train.adv_clip_max", t.adv_clip_max),
            ("train.learning_rate", t.learning_rate),
            ("train.grad_clip", t.grad_clip),
        ])?;
        crate::train::require_non_negative(&[
            ("train.beta", t.beta),
            ("train.weight_decay", t.weight_decay),
            ("sample.guidance_scale", s.guidance_scale),
            ("sample.eval_guidance_scale", s.eval_guidance_scale),
        ])?;
        if !(0.0..1.0).contains(&t.ema_decay) {
            return Err(format!(
                "train.ema_decay must be in [0, 1), found {}",
                t.ema_decay
            ));
        }
        if t.cfg && s.guidance_scale == 1.0 {
            return Err("train.cfg = true needs sample.guidance_scale ≠ 1".into());
        }
        if self.model.lora_targets.is_empty() {
            return Err("model.lora_targets is empty".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_remote_reward_needs_a_valid_url() {
        let mut config: GrpoConfig = toml::from_str("[data]\nreward = \"remote\"").unwrap();
        let err = config.validate().unwrap_err();
        assert!(err.contains("data.remote.url"), "{err}");
        config.data.remote = Some(RemoteConfig {
            url: "https://scorer.example/".into(),
            ..Default::default()
        });
        assert!(
            config
                .validate()
                .unwrap_err()
                .contains("not an http:// URL")
        );
        let config: GrpoConfig = toml::from_str(
            "[data]\nreward = \"remote\"\n[data.remote]\nurl = \"http://127.0.0.1:8077/\"\ntimeout_seconds = 10\n",
        )
        .unwrap();
        config.validate().unwrap();
        assert_eq!(config.data.remote.unwrap().retries, 3);
    }

    #[test]
    fn defaults_validate_and_round_trip_through_toml() {
        let config = GrpoConfig {
            model: Default::default(),
            data: Default::default(),
            sample: Default::default(),
            train: Default::default(),
            run: Default::default(),
        };
        config.validate().unwrap();
        let back: GrpoConfig = toml::from_str(&config.to_toml()).unwrap();
        assert_eq!(back, config);
    }

    #[test]
    fn bad_fields_are_named() {
        let err = toml::from_str::<GrpoConfig>("[sample]\ngroup_sise = 4\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("group_sise"), "{err}");
        let config: GrpoConfig =
            toml::from_str("[sample]\ngroup_size = 3\nbatch_size = 8\n").unwrap();
        assert!(
            config
                .validate()
                .unwrap_err()
                .contains("multiple of sample.batch_size")
        );
        for budget in ["0.0", "-5.0", "nan"] {
            let config: GrpoConfig =
                toml::from_str(&format!("[run]\nbudget_minutes = {budget}\n")).unwrap();
            let err = config.validate().unwrap_err();
            assert!(err.contains("run.budget_minutes"), "{budget}: {err}");
        }
        let config: GrpoConfig = toml::from_str("[run]\nbudget_minutes = 12.5\n").unwrap();
        config.validate().unwrap();
    }
}
