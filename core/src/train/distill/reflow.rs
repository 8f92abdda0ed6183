//! Reward-filtered reflow: a few-step Euler student distilled from the teacher's ODE couplings
//! (rectified flow's "reflow", Liu et al. 2022; InstaFlow), tilted toward the reward by keeping
//! only the couplings whose image the Shapes detector marks correct.
//!
//! 1. **couplings** (once per run, stored in the run directory, or reused from other runs' drawn
//!    by the same teacher, pooled): for every training prompt and `pairs_per_prompt` seeds, the
//!    teacher (the base with CFG) integrates its ODE from the seed's noise z to x₀ with
//!    `teacher_steps` Euler steps, and GenEval's rule judges the decoded image;
//! 2. **student** (a LoRA on the base, no CFG): on the straight line x_σ = (1 − σ)·x₀ + σ·z it
//!    regresses the coupling's velocity z − x₀ at each of its own σ's (an equal share of every
//!    batch per σ), loss ‖v̂ − (z − x₀)‖²; sampling is then Euler on that σ list. Couplings are
//!    drawn with weight `correct_weight` when the teacher's image was correct and 1 otherwise
//!    (`keep = "correct"`: only correct ones); `keep = "all"` with weight 1 is plain reflow.
//!    The couplings are deterministic (z → the teacher's x₀(z)), so filtering only chooses which
//!    noises the teacher's map is learned on; `recouple_min_correct` changes the map itself.
//!
//! A run directory holds `config.toml`, `couplings/` (`index.json` + `x0.f32`), `metrics.jsonl`,
//! `eval.jsonl`, `checkpoint/` (adapter, its average with `ema_decay`, optimizer, iteration;
//! resumes exactly),
//! `snapshots/iter-N/` (with `snapshot_every`) and `student_final/` (a PEFT folder).

use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::module::Module;
use burn::optim::{GradientsParams, ModuleOptimizer};
use burn::tensor::{Device, Tensor, TensorData};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::{
    DistillError, RunState, StudentEval, adam, append_line, evaluate_student, mix, run_error,
    snapshot_dir, truncate_log, write_checkpoint,
};
use crate::lora::{self, LoraWeights};
use crate::model::vae::Vae;
use crate::pipeline::{
    GenerateOptions, Pipeline, PipelineDenoiser, PipelineError, Transformer, to_images,
};
use crate::sample::pipeline::{Conditioning, Denoiser, NoiseSource};
use crate::sample::step::StepKind;
use crate::train::ema::Ema;
use crate::train::grpo::clip_global_norm;
use crate::train::grpo::config::ModelSection;
use crate::world::geneval::evaluate_image;
use crate::world::prompt::PromptSpec;

/// The adapter that becomes the student.
pub const STUDENT: &str = "student";
/// The checkpoint folder of the student's average.
const EMA: &str = "ema";

/// Which teacher couplings the student learns from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Keep {
    /// Every coupling: plain reflow, the student approximates the teacher.
    All,
    /// Only couplings whose image GenEval's rule marks correct: reward-filtered reflow.
    Correct,
}

impl Keep {
    fn name(self) -> &'static str {
        match self {
            Keep::All => "all",
            Keep::Correct => "correct",
        }
    }
}

/// `portaflow distill reflow` settings (every field has a default; see `configs/reflow-*.toml`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReflowConfig {
    /// Base model (teacher) and the student's LoRA shape.
    pub model: ModelSection,
    /// Training prompts (GenEval JSONL); the repository's Shapes training prompts when absent.
    pub train_prompts: Option<PathBuf>,
    /// Held-out prompts for evaluation; the repository's Shapes test prompts when absent.
    pub test_prompts: Option<PathBuf>,
    /// LoRA adapters (PEFT folders, diffusers / kohya files) merged into the teacher only, in
    /// order: couplings drawn by a reward-tuned teacher (a Flow-GRPO adapter) and distilled into
    /// a student on the plain base, so the student ships as one adapter on the bundled model.
    /// One path or a list.
    #[serde(deserialize_with = "one_or_many")]
    pub teacher_adapters: Vec<PathBuf>,
    /// The teacher's Euler steps and CFG scale.
    pub teacher_steps: usize,
    pub teacher_guidance: f64,
    /// Couplings drawn per training prompt (before filtering).
    pub pairs_per_prompt: usize,
    /// Learn from these `couplings/` folders of other runs, pooled, instead of drawing: each
    /// must come from the same teacher (model, prompts, steps, CFG) and no noise seed may occur
    /// twice, so draws with different `seed` or `pairs_per_prompt` add up. One path or a list.
    #[serde(deserialize_with = "one_or_many")]
    pub couplings_from: Vec<PathBuf>,
    /// Rescue wrong couplings from these `couplings/` folders, in order: draws of the same
    /// noise seeds by the same model on the same prompts with other teacher settings (another
    /// CFG scale). A coupling whose image was wrong learns the first of them whose image from
    /// the same noise was correct, and counts as correct. This tilts the map itself toward the
    /// reward while staying on the teacher's own images of that noise. One path or a list.
    #[serde(deserialize_with = "one_or_many")]
    pub rescue_from: Vec<PathBuf>,
    pub keep: Keep,
    /// With `keep = "all"`: how much more often a coupling whose image was correct is drawn.
    pub correct_weight: f64,
    /// Re-coupling (0: off): a coupling whose image was wrong, of a prompt with at least this
    /// many correct ones, learns to carry its noise to the nearest correct image of its prompt
    /// (L2 between the latents) and is then drawn as a correct one. Filtering alone does not
    /// tilt a deterministic student: one that reproduces the teacher's map on the kept noises
    /// reproduces it on every noise, wrong images included. Re-coupling changes the map.
    pub recouple_min_correct: usize,
    /// Draw couplings tag by tag: every GenEval tag among the drawable couplings gets the same
    /// share of the updates (within a tag, `keep` / `correct_weight` apply as usual). The
    /// training prompts are two-thirds `color_attr`, so without it the kept couplings are mostly
    /// colour scenes and counting or two objects are a tenth of the updates or less.
    pub balance_tags: bool,
    /// Train each σ after the first at the state the student's own Euler steps reach from the
    /// coupling's noise (no gradient through them) instead of the straight line, with the
    /// velocity that carries that state straight to the teacher's x₀: (x̃_σ − x₀)/σ. Sampling
    /// then meets the states it was trained on (the straight line is where a perfect student
    /// would be; a real one drifts off it step by step).
    pub student_states: bool,
    /// Keep an exponential moving average of the student adapter (0: off) with Flow-GRPO's
    /// warm-up decay min((1 + n)/(10 + n), `ema_decay`) after update n; snapshots, the final
    /// student and evaluations then use the average. Late iterations of a run wander within a
    /// few points of held-out accuracy; the average smooths that walk (measured: it sat at the
    /// top of the raw adapter's range, README "The bundled 4-step student").
    pub ema_decay: f64,
    /// Weight of a decoded-image term on the student's last step, the one that draws the image
    /// (0: off): at the last σ, x̂₀ = x_σ − σ·v̂ goes through the autoencoder's decoder and
    /// w·mean((D(x̂₀) − D(x₀))²) is added to that σ's loss, with D(x₀) the teacher's image
    /// (decoder output, ≈[−1, 1]). InstaFlow distils its one-step output with a perceptual loss
    /// for the same reason: a latent L2 weighs every latent direction alike, the ones the decoder
    /// barely draws and the ones that make a shape's edges. Without an autoencoder, D is the
    /// identity. Each update decodes a quarter of the batch more (4 σ's).
    pub pixel_loss_weight: f64,
    /// The student's σ list (0 is appended by the sampler): its Euler steps.
    pub sigmas: Vec<f64>,
    pub learning_rate: f64,
    pub grad_clip: f64,
    /// Couplings per update, split evenly over `sigmas`.
    pub batch_size: usize,
    pub iterations: usize,
    pub seed: u64,
    /// Held-out evaluation every N iterations (and after the last); 0 never.
    pub eval_every: usize,
    pub eval_prompts: Option<usize>,
    pub eval_images_per_prompt: usize,
    /// Checkpoint every N iterations (and after the last).
    pub save_every: usize,
    /// Keep a copy of the student every N iterations in `snapshots/iter-N/` (a PEFT folder with
    /// its `sampling.json`, to pick an iteration by a held-out evaluation later); 0 never.
    pub snapshot_every: usize,
}

impl Default for ReflowConfig {
    fn default() -> Self {
        Self {
            model: ModelSection::default(),
            train_prompts: None,
            test_prompts: None,
            teacher_adapters: vec![],
            teacher_steps: 20,
            teacher_guidance: 4.5,
            pairs_per_prompt: 16,
            couplings_from: vec![],
            rescue_from: vec![],
            keep: Keep::Correct,
            correct_weight: 1.0,
            recouple_min_correct: 0,
            balance_tags: false,
            student_states: false,
            ema_decay: 0.0,
            pixel_loss_weight: 0.0,
            sigmas: vec![1.0, 0.75, 0.5, 0.25],
            learning_rate: 1e-4,
            grad_clip: 1.0,
            batch_size: 32,
            iterations: 1000,
            seed: 42,
            eval_every: 100,
            eval_prompts: None,
            eval_images_per_prompt: 4,
            save_every: 100,
            snapshot_every: 0,
        }
    }
}

impl ReflowConfig {
    pub fn from_file(path: &Path) -> Result<Self, String> {
        crate::train::read_toml_config(path, Self::validate)
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("serialisable config")
    }

    /// Checks every field; the message names the field and what it must be.
    pub fn validate(&self) -> Result<(), String> {
        crate::train::require_counts(&[
            ("teacher_steps", self.teacher_steps),
            ("pairs_per_prompt", self.pairs_per_prompt),
            ("batch_size", self.batch_size),
            ("iterations", self.iterations),
            ("save_every", self.save_every),
            ("eval_images_per_prompt", self.eval_images_per_prompt),
            ("model.lora_rank", self.model.lora_rank),
        ])?;
        crate::train::require_positive(&[
            ("learning_rate", self.learning_rate),
            ("grad_clip", self.grad_clip),
            ("correct_weight", self.correct_weight),
            ("model.lora_alpha", self.model.lora_alpha),
        ])?;
        crate::train::require_non_negative(&[("pixel_loss_weight", self.pixel_loss_weight)])?;
        if !(0.0..1.0).contains(&self.ema_decay) {
            return Err(format!(
                "ema_decay must be in [0, 1) (0: no average), got {}",
                self.ema_decay
            ));
        }
        if !(self.teacher_guidance.is_finite() && self.teacher_guidance >= 1.0) {
            return Err(format!(
                "teacher_guidance must be ≥ 1 (1: no CFG), got {}",
                self.teacher_guidance
            ));
        }
        let s = &self.sigmas;
        if s.is_empty()
            || s[0] != 1.0
            || s.iter().any(|v| !(v.is_finite() && *v > 0.0))
            || s.windows(2).any(|w| w[1] >= w[0])
        {
            return Err(format!(
                "sigmas must start at 1 and decrease strictly above 0 (e.g. [1.0, 0.75, 0.5, 0.25]), got {s:?}"
            ));
        }
        if self.batch_size < s.len() {
            return Err(format!(
                "batch_size {} must be at least the number of sigmas ({}): each update trains every σ",
                self.batch_size,
                s.len()
            ));
        }
        if self.model.lora_targets.is_empty() {
            return Err("model.lora_targets is empty".into());
        }
        if !self.model.merge_adapters.is_empty() || self.model.init_adapter.is_some() {
            return Err(
                "model.merge_adapters / model.init_adapter are GRPO settings; reflow trains a fresh adapter on the base (a tuned teacher: teacher_adapters)".into(),
            );
        }
        Ok(())
    }

    fn lora(&self) -> lora::LoraConfig {
        let targets: Vec<&str> = self.model.lora_targets.iter().map(String::as_str).collect();
        lora::LoraConfig::new(self.model.lora_rank, self.model.lora_alpha, &targets)
    }

    /// How the student samples: Euler on its σ list, no CFG.
    pub fn student_sampling(&self) -> GenerateOptions {
        let mut options = GenerateOptions::euler(self.sigmas.len(), 1.0, vec![]);
        options.sigmas = Some(self.sigmas.clone());
        options
    }
}

/// `couplings/index.json`: what `x0.f32` holds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CouplingIndex {
    /// One latent's shape `[c, h, w]`.
    pub shape: [usize; 3],
    /// Per coupling: its training prompt (index into the prompt file), noise seed, and whether
    /// GenEval's rule found the prompt in the teacher's image.
    pub prompts: Vec<usize>,
    pub seeds: Vec<u64>,
    pub correct: Vec<bool>,
    /// What drew them: a run may reuse them only with the same settings.
    pub draw: DrawSettings,
    pub seconds: f64,
}

/// The settings that determine the couplings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DrawSettings {
    pub model: Option<PathBuf>,
    /// Merged into the teacher (absent in couplings drawn before the field existed: none).
    #[serde(default)]
    pub teacher_adapters: Vec<PathBuf>,
    pub train_prompts: Option<PathBuf>,
    pub teacher_steps: usize,
    pub teacher_guidance: f64,
    pub pairs_per_prompt: usize,
    pub seed: u64,
    /// The training prompts' count, a guard against an edited prompt file.
    pub prompt_count: usize,
}

impl DrawSettings {
    /// Whether both were drawn by the same teacher on the same prompts (the draw's own seed and
    /// count may differ).
    fn same_teacher(&self, other: &Self) -> bool {
        let teacher = |d: &Self| {
            (
                d.model.clone(),
                d.teacher_adapters.clone(),
                d.train_prompts.clone(),
                d.teacher_steps,
                d.teacher_guidance,
                d.prompt_count,
            )
        };
        teacher(self) == teacher(other)
    }

    fn of(config: &ReflowConfig, prompt_count: usize) -> Self {
        Self {
            model: config.model.path.clone(),
            teacher_adapters: config.teacher_adapters.clone(),
            train_prompts: config.train_prompts.clone(),
            teacher_steps: config.teacher_steps,
            teacher_guidance: config.teacher_guidance,
            pairs_per_prompt: config.pairs_per_prompt,
            seed: config.seed,
            prompt_count,
        }
    }
}

/// Per tag: (correct, drawn).
pub type TagCounts = std::collections::BTreeMap<String, [usize; 2]>;

/// The teacher's couplings: z is regenerated from the seed, x₀ is stored.
struct Couplings {
    index: CouplingIndex,
    /// `[n·c·h·w]`, coupling-major.
    x0: Vec<f32>,
}

impl Couplings {
    fn len(&self) -> usize {
        self.index.seeds.len()
    }

    fn by_tag(&self, train: &[PromptSpec]) -> TagCounts {
        let mut counts = TagCounts::new();
        for (&p, &correct) in self.index.prompts.iter().zip(&self.index.correct) {
            let entry = counts.entry(train[p].tag.clone()).or_insert([0, 0]);
            entry[0] += correct as usize;
            entry[1] += 1;
        }
        counts
    }

    /// Per coupling, the coupling whose x₀ it learns: its own, or with `recouple_min_correct`
    /// the nearest correct one of its prompt when its own image was wrong.
    fn targets(&self, min_correct: usize) -> Vec<usize> {
        let per = self.index.shape.iter().product::<usize>();
        let latent = |i: usize| &self.x0[i * per..(i + 1) * per];
        let mut correct_of = std::collections::HashMap::<usize, Vec<usize>>::new();
        for (i, (&p, &ok)) in self
            .index
            .prompts
            .iter()
            .zip(&self.index.correct)
            .enumerate()
        {
            if ok {
                correct_of.entry(p).or_default().push(i);
            }
        }
        (0..self.len())
            .map(|i| {
                let candidates = correct_of
                    .get(&self.index.prompts[i])
                    .map_or(&[][..], Vec::as_slice);
                if self.index.correct[i] || min_correct == 0 || candidates.len() < min_correct {
                    return i;
                }
                let distance = |j: usize| -> f64 {
                    latent(i)
                        .iter()
                        .zip(latent(j))
                        .map(|(a, b)| ((a - b) as f64).powi(2))
                        .sum()
                };
                candidates
                    .iter()
                    .map(|&j| (distance(j), j))
                    .min_by(|a, b| a.0.total_cmp(&b.0))
                    .expect("at least min_correct ≥ 1 candidates")
                    .1
            })
            .collect()
    }

    /// Cumulative sampling weights under `keep` / `correct_weight` (and `balance_tags`, which
    /// needs the training prompts for the tags): a coupling counts as correct when its target's
    /// image was correct.
    fn cumulative_weights(
        &self,
        config: &ReflowConfig,
        targets: &[usize],
        train: &[PromptSpec],
    ) -> Vec<f64> {
        let weights: Vec<f64> = targets
            .iter()
            .map(|&t| match (config.keep, self.index.correct[t]) {
                (_, true) => config.correct_weight,
                (Keep::All, false) => 1.0,
                (Keep::Correct, false) => 0.0,
            })
            .collect();
        let tag = |i: usize| train[self.index.prompts[i]].tag.as_str();
        let mut per_tag = std::collections::HashMap::<&str, f64>::new();
        if config.balance_tags {
            for (i, w) in weights.iter().enumerate() {
                *per_tag.entry(tag(i)).or_default() += w;
            }
        }
        let mut total = 0.0;
        weights
            .iter()
            .enumerate()
            .map(|(i, &w)| {
                total += match per_tag.get(tag(i)) {
                    Some(&sum) if sum > 0.0 => w / sum,
                    _ => w,
                };
                total
            })
            .collect()
    }

    /// Replaces each wrong coupling's x₀ by `other`'s for the same noise seed and prompt when
    /// `other`'s image was correct; returns how many were replaced. `other` must come from
    /// the same model, prompts and step count (its CFG may differ) and share noise seeds.
    fn rescue_with(&mut self, other: &Couplings) -> Result<usize, String> {
        let (mine, theirs) = (&self.index.draw, &other.index.draw);
        let same_model = |d: &DrawSettings| {
            (
                d.model.clone(),
                d.train_prompts.clone(),
                d.teacher_steps,
                d.prompt_count,
            )
        };
        if same_model(mine) != same_model(theirs) || self.index.shape != other.index.shape {
            return Err(format!(
                "rescue couplings must come from the same model, prompts and steps (their CFG may differ): drawn with {theirs:?} and latents {:?}, this run's with {mine:?} and {:?}",
                other.index.shape, self.index.shape
            ));
        }
        let at: std::collections::HashMap<u64, usize> = other
            .index
            .seeds
            .iter()
            .enumerate()
            .map(|(j, &seed)| (seed, j))
            .collect();
        if !self.index.seeds.iter().any(|s| at.contains_key(s)) {
            return Err(format!(
                "no noise seed in common with this run's couplings (drawn with seed {}, these with {}): rescues must redraw the same noises",
                mine.seed, theirs.seed
            ));
        }
        let per = self.index.shape.iter().product::<usize>();
        let mut replaced = 0;
        for i in 0..self.len() {
            let Some(&j) = at.get(&self.index.seeds[i]) else {
                continue;
            };
            if self.index.correct[i]
                || !other.index.correct[j]
                || other.index.prompts[j] != self.index.prompts[i]
            {
                continue;
            }
            self.x0[i * per..(i + 1) * per].copy_from_slice(&other.x0[j * per..(j + 1) * per]);
            self.index.correct[i] = true;
            replaced += 1;
        }
        Ok(replaced)
    }

    /// The couplings of several stored draws by the run's teacher, pooled in order.
    fn pool(dirs: &[PathBuf], settings: &DrawSettings) -> Result<Self, DistillError> {
        let mut pooled: Option<Self> = None;
        let mut seen = std::collections::HashSet::new();
        for dir in dirs {
            let c = Self::read(dir)?;
            if !c.index.draw.same_teacher(settings) {
                return Err(run_error(
                    dir,
                    format!(
                        "these couplings were drawn with {:?}, this run's teacher is {settings:?}",
                        c.index.draw
                    ),
                ));
            }
            if let Some(&seed) = c.index.seeds.iter().find(|&&s| !seen.insert(s)) {
                return Err(run_error(
                    dir,
                    format!(
                        "noise seed {seed} occurs twice in couplings_from (the same folder listed twice, or two draws with the same seed)"
                    ),
                ));
            }
            pooled = Some(match pooled {
                None => c,
                Some(mut p) => {
                    if p.index.shape != c.index.shape {
                        return Err(run_error(
                            dir,
                            format!(
                                "latents of shape {:?}, the other couplings' are {:?}",
                                c.index.shape, p.index.shape
                            ),
                        ));
                    }
                    p.index.prompts.extend(c.index.prompts);
                    p.index.seeds.extend(c.index.seeds);
                    p.index.correct.extend(c.index.correct);
                    p.index.seconds += c.index.seconds;
                    p.x0.extend(c.x0);
                    p
                }
            });
        }
        Ok(pooled.expect("validated: couplings_from is not empty here"))
    }

    fn write(&self, dir: &Path) -> Result<(), DistillError> {
        let tmp = dir.with_extension("tmp");
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(|e| run_error(&tmp, e))?;
        let bytes: Vec<u8> = self.x0.iter().flat_map(|v| v.to_le_bytes()).collect();
        std::fs::write(tmp.join("x0.f32"), bytes).map_err(|e| run_error(&tmp, e))?;
        let json = serde_json::to_string_pretty(&self.index).expect("json");
        std::fs::write(tmp.join("index.json"), json).map_err(|e| run_error(&tmp, e))?;
        let _ = std::fs::remove_dir_all(dir);
        std::fs::rename(&tmp, dir).map_err(|e| run_error(dir, e))
    }

    fn read(dir: &Path) -> Result<Self, DistillError> {
        let index_path = dir.join("index.json");
        if !index_path.is_file() {
            return Err(run_error(dir, "no couplings here (index.json missing)"));
        }
        let text = std::fs::read_to_string(&index_path).map_err(|e| run_error(&index_path, e))?;
        let index: CouplingIndex =
            serde_json::from_str(&text).map_err(|e| run_error(&index_path, e))?;
        let data_path = dir.join("x0.f32");
        let bytes = std::fs::read(&data_path).map_err(|e| run_error(&data_path, e))?;
        let expected = index.seeds.len() * index.shape.iter().product::<usize>() * 4;
        if bytes.len() != expected
            || index.prompts.len() != index.seeds.len()
            || index.correct.len() != index.seeds.len()
        {
            return Err(run_error(
                &data_path,
                format!(
                    "holds {} bytes, index.json describes {} couplings of {:?} ({expected} bytes): truncated or mismatched; delete couplings/ to draw them again",
                    bytes.len(),
                    index.seeds.len(),
                    index.shape
                ),
            ));
        }
        let x0 = bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        Ok(Self { index, x0 })
    }
}

/// One iteration's line in `metrics.jsonl`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ReflowMetrics {
    pub iteration: usize,
    /// The objective, mean over the batch: ‖v̂ − (z − x₀)‖² plus `pixel_loss_weight` × the
    /// decoded-image term.
    pub loss: f64,
    /// The velocity regression per σ of the student's list.
    pub loss_by_sigma: Vec<f64>,
    /// mean((D(x̂₀) − D(x₀))²) at the last σ, unweighted (with `pixel_loss_weight`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pixel_loss: Option<f64>,
    pub grad_norm: f64,
    pub seconds: f64,
    pub peak_memory_mib: Option<f64>,
}

/// A reflow run in progress: call [`ReflowTrainer::iterate`] until [`ReflowTrainer::done`].
pub struct ReflowTrainer {
    pub config: ReflowConfig,
    /// Base + student adapter (trainable), autodiff device.
    student: Transformer,
    /// Text side and scheduler; its transformer is the teacher (the plain base).
    teacher: Pipeline,
    /// The frozen autoencoder on the autodiff device (`pixel_loss_weight` > 0 with a VAE):
    /// gradients flow through it to x̂₀, never into it.
    decoder: Option<Vae>,
    optimizer: ModuleOptimizer,
    /// The average of the student adapter (`ema_decay` > 0).
    ema: Option<Ema>,
    couplings: Couplings,
    /// How many wrong couplings `rescue_from` replaced by a correct image of the same noise.
    rescued: usize,
    /// Per coupling, whose x₀ it learns (see [`ReflowConfig::recouple_min_correct`]).
    targets: Vec<usize>,
    /// Cumulative sampling weights of the couplings.
    cumulative: Vec<f64>,
    train: Vec<PromptSpec>,
    test: Vec<PromptSpec>,
    run_dir: PathBuf,
    pub iteration: usize,
    device: Device,
    plain_device: Device,
}

impl ReflowTrainer {
    /// Starts a run in `run_dir` (drawing the teacher's couplings first, which reports
    /// `(done, total)` to `progress`), or resumes it when it holds a checkpoint. `pipeline` is
    /// the base model on an autodiff device, without adapters.
    pub fn new(
        config: ReflowConfig,
        pipeline: Pipeline,
        train: Vec<PromptSpec>,
        test: Vec<PromptSpec>,
        run_dir: &Path,
        device: &Device,
        progress: impl FnMut(usize, usize),
    ) -> Result<Self, DistillError> {
        config.validate().map_err(DistillError::Config)?;
        if train.is_empty() {
            return Err(DistillError::Config("no training prompts".into()));
        }
        std::fs::create_dir_all(run_dir).map_err(|e| run_error(run_dir, e))?;
        let config_path = run_dir.join("config.toml");
        let checkpoint = run_dir.join("checkpoint");
        let couplings_dir = run_dir.join("couplings");
        let started = checkpoint.join("state.json").is_file()
            || couplings_dir.is_dir()
            || run_dir.join("metrics.jsonl").is_file();
        if started && config_path.is_file() {
            let mut stored = ReflowConfig::from_file(&config_path).map_err(DistillError::Config)?;
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
        let decoder = (config.pixel_loss_weight > 0.0)
            .then(|| pipeline.vae.clone().map(Module::no_grad))
            .flatten();
        let mut teacher_transformer = pipeline.transformer.valid();
        for (k, path) in config.teacher_adapters.iter().enumerate() {
            lora::merge_file(
                &mut teacher_transformer,
                path,
                &format!("teacher{k}"),
                &plain_device,
            )
            .map_err(|e| run_error(path, format!("teacher_adapters: {e}")))?;
        }
        let teacher = Pipeline {
            text: pipeline.text.valid(),
            transformer: teacher_transformer,
            vae: pipeline.vae.map(|v| v.valid()),
            index: pipeline.index,
            scheduler: pipeline.scheduler,
        };
        let settings = DrawSettings::of(&config, train.len());
        let mut couplings = if !config.couplings_from.is_empty() {
            Couplings::pool(&config.couplings_from, &settings)?
        } else if couplings_dir.join("index.json").is_file() {
            let c = Couplings::read(&couplings_dir)?;
            if c.index.draw != settings {
                return Err(run_error(
                    &couplings_dir,
                    format!(
                        "these couplings were drawn with {:?}, this run draws with {settings:?}",
                        c.index.draw
                    ),
                ));
            }
            c
        } else {
            let c = draw_couplings(&config, settings, &teacher, &train, &plain_device, progress)?;
            c.write(&couplings_dir)?;
            c
        };
        let mut rescued = 0;
        for dir in &config.rescue_from {
            rescued += couplings
                .rescue_with(&Couplings::read(dir)?)
                .map_err(|e| run_error(dir, e))?;
        }
        let targets = couplings.targets(config.recouple_min_correct);
        let cumulative = couplings.cumulative_weights(&config, &targets, &train);
        if cumulative.last().is_none_or(|&w| w <= 0.0) {
            return Err(run_error(
                config.couplings_from.first().unwrap_or(&couplings_dir),
                format!(
                    "none of the {} couplings may be drawn under keep = \"{}\": the teacher drew no correct image; draw more per prompt or keep \"all\"",
                    couplings.len(),
                    config.keep.name()
                ),
            ));
        }

        let mut student = pipeline.transformer;
        let mut optimizer = adam();
        let mut iteration = 0;
        if checkpoint.join("state.json").is_file() {
            let adapter = LoraWeights::read(&checkpoint.join(STUDENT))?;
            lora::attach(
                &mut student,
                STUDENT,
                adapter.component("transformer"),
                1.0,
                device,
            )?;
            let path = checkpoint.join("optimizer.bin");
            optimizer = optimizer
                .load(&path)
                .map_err(|e| run_error(&path, format!("cannot resume the optimizer: {e}")))?;
            let state: RunState = crate::model::read_config(&checkpoint.join("state.json"))
                .map_err(PipelineError::from)?;
            iteration = state.iteration;
            truncate_log(&run_dir.join("metrics.jsonl"), iteration)?;
            truncate_log(&run_dir.join("eval.jsonl"), iteration)?;
        } else {
            lora::init_adapter(&mut student, STUDENT, &config.lora(), config.seed, device)?;
        }
        let ema = if config.ema_decay == 0.0 {
            None
        } else if iteration > 0 {
            let current = lora::extract(&student, STUDENT)?;
            Some(Ema::read(&checkpoint.join(EMA), &current)?)
        } else {
            Some(Ema::new(lora::extract(&student, STUDENT)?))
        };
        Ok(Self {
            student: lora::train_only(student, STUDENT),
            teacher,
            decoder,
            optimizer,
            ema,
            couplings,
            rescued,
            targets,
            cumulative,
            train,
            test,
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

    /// What the couplings hold.
    pub fn couplings(&self) -> &CouplingIndex {
        &self.couplings.index
    }

    /// How many wrong couplings were replaced by a correct image of the same noise
    /// (`rescue_from`).
    pub fn rescued(&self) -> usize {
        self.rescued
    }

    /// How many wrong couplings learn a correct image's x₀ (`recouple_min_correct`).
    pub fn recoupled(&self) -> usize {
        self.targets
            .iter()
            .enumerate()
            .filter(|(i, t)| i != *t)
            .count()
    }

    /// Per tag: the couplings whose teacher image was correct, and all of them.
    pub fn couplings_by_tag(&self) -> TagCounts {
        self.couplings.by_tag(&self.train)
    }

    /// A coupling drawn with the run's weights.
    fn pick(&self, rng: &mut ChaCha8Rng) -> usize {
        let total = *self.cumulative.last().expect("couplings");
        let u = rng.random::<f64>() * total;
        self.cumulative
            .partition_point(|&w| w <= u)
            .min(self.cumulative.len() - 1)
    }

    /// The student (base + adapter).
    pub fn student_transformer(&self) -> &Transformer {
        &self.student
    }

    /// One update: `batch_size` couplings drawn at random, an equal share at each σ.
    pub fn iterate(&mut self) -> Result<ReflowMetrics, DistillError> {
        let start = Instant::now();
        let c = self.config.clone();
        let mut rng = ChaCha8Rng::seed_from_u64(mix(c.seed, self.iteration as u64));
        let shape = self.couplings.index.shape;
        let per = shape.iter().product::<usize>();
        let denoiser = PipelineDenoiser {
            transformer: &self.student,
            prediction: self.teacher.index.prediction,
        };
        // The student without autodiff, for its own Euler steps (`student_states`).
        let plain_student = c.student_states.then(|| self.student.valid());
        let groups = c.sigmas.len();
        let mut losses = Vec::with_capacity(groups);
        let mut pixel_loss = None;
        let mut total: Option<Tensor<1>> = None;
        for (g, &sigma) in c.sigmas.iter().enumerate() {
            let n = (g + 1) * c.batch_size / groups - g * c.batch_size / groups;
            let picks: Vec<usize> = (0..n).map(|_| self.pick(&mut rng)).collect();
            let prompts: Vec<String> = picks
                .iter()
                .map(|&i| self.train[self.couplings.index.prompts[i]].prompt.clone())
                .collect();
            let seeds: Vec<u64> = picks
                .iter()
                .map(|&i| self.couplings.index.seeds[i])
                .collect();
            let x0: Vec<f32> = picks
                .iter()
                .map(|&i| self.targets[i])
                .flat_map(|t| self.couplings.x0[t * per..(t + 1) * per].iter().copied())
                .collect();
            let [ch, h, w] = shape;
            // [n, c, h, w]
            let x0 = Tensor::<4>::from_data(TensorData::new(x0, [n, ch, h, w]), &self.device);
            let z = NoiseSource::new(seeds).initial(shape, &self.device);
            let plain_cond = self.teacher.encode(&prompts, &self.plain_device)?;
            let (x_sigma, target) = match &plain_student {
                Some(student) if g > 0 => {
                    let plain = PipelineDenoiser {
                        transformer: student,
                        prediction: self.teacher.index.prediction,
                    };
                    let x = euler_to(&plain, z.inner(), &c.sigmas[..=g], &plain_cond).autodiff();
                    (x.clone(), (x - x0.clone()).div_scalar(sigma))
                }
                _ => {
                    let x = x0.clone().mul_scalar(1.0 - sigma) + z.clone().mul_scalar(sigma);
                    (x, z - x0.clone())
                }
            };
            let cond = plain_cond.autodiff();
            let v = denoiser.velocity(x_sigma.clone(), sigma, &cond);
            let mut loss = (v.clone() - target).powi_scalar(2).mean();
            losses.push(loss.clone().into_scalar::<f32>() as f64);
            if c.pixel_loss_weight > 0.0 && g + 1 == groups {
                let decode = |x: Tensor<4>| match &self.decoder {
                    Some(vae) => vae.decode(x),
                    None => x,
                };
                // x_σ = x₀ + σ·v for a flow, so the student's x̂₀ = x_σ − σ·v̂: [n, c, h, w]
                let x0_hat = x_sigma - v.mul_scalar(sigma);
                let drawn = decode(x0); // no graph: neither x₀ nor the decoder is tracked
                let pixel = (decode(x0_hat) - drawn).powi_scalar(2).mean();
                pixel_loss = Some(pixel.clone().into_scalar::<f32>() as f64);
                loss = loss + pixel.mul_scalar(c.pixel_loss_weight);
            }
            let share = loss.mul_scalar(n as f64 / c.batch_size as f64);
            total = Some(match total {
                Some(t) => t + share,
                None => share,
            });
        }
        let total = total.expect("at least one σ");
        let value = total.clone().into_scalar::<f32>() as f64;
        if !value.is_finite() {
            return Err(run_error(
                &self.run_dir,
                format!("iteration {}: loss {value}", self.iteration + 1),
            ));
        }
        let mut grads = GradientsParams::from_grads(total.backward(), &self.student);
        let norm = clip_global_norm(&self.student, &mut grads, c.grad_clip);
        if !norm.is_finite() {
            // A finite loss can still back-propagate a NaN (0·∞); it must not reach the weights.
            // Seen (traced 2026-12-05): a fresh autoencoder (zero biases) decoding the zero-init
            // transformer's exact x̂₀ = 0 has constant activations, where each GroupNorm scales the
            // gradient by 1/√ε = 1e3; after six resnets it overflows f32. PyTorch's GroupNorm
            // backward has the same factor; trained models never meet it.
            return Err(run_error(
                &self.run_dir,
                format!("iteration {}: gradient norm {norm}", self.iteration + 1),
            ));
        }
        self.student = self
            .optimizer
            .step(c.learning_rate, self.student.clone(), grads);
        self.iteration += 1;
        if let Some(ema) = &mut self.ema {
            let current = lora::extract(&self.student, STUDENT)?;
            ema.step(&current, self.iteration, c.ema_decay, 1);
        }
        let metrics = ReflowMetrics {
            iteration: self.iteration,
            loss: value,
            loss_by_sigma: losses,
            pixel_loss,
            grad_norm: norm,
            seconds: start.elapsed().as_secs_f64(),
            peak_memory_mib: crate::train::peak_memory_mib(),
        };
        append_line(&self.run_dir.join("metrics.jsonl"), &metrics)?;
        let last = self.done();
        if c.save_every > 0 && (self.iteration % c.save_every == 0 || last) {
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

    /// The student adapter as a PEFT folder's contents: its average with `ema_decay`.
    pub fn student(&self) -> LoraWeights {
        let modules = match &self.ema {
            Some(ema) => ema.modules.clone(),
            None => lora::extract(&self.student, STUDENT).expect("the student adapter"),
        };
        LoraWeights::from_component("transformer", modules, Some(self.config.lora()))
    }

    /// The student evaluations sample (base + [`Self::student`]), without autodiff.
    fn sampling_student(&self) -> Result<Transformer, DistillError> {
        let mut student = self.student.valid();
        if self.ema.is_some() {
            lora::replace(&mut student, STUDENT, &self.student(), &self.plain_device)?;
        }
        Ok(student)
    }

    /// Writes the student as it is now to `student_final/` (a PEFT folder).
    pub fn write_student(&self) -> Result<PathBuf, DistillError> {
        self.write_student_to(self.run_dir.join("student_final"))
    }

    /// Writes the student as it is now to `dir` (a PEFT folder with its `sampling.json`).
    fn write_student_to(&self, dir: PathBuf) -> Result<PathBuf, DistillError> {
        self.student().write_peft(&dir, "transformer")?;
        lora::AdapterSampling::new(StepKind::Euler, &self.config.sigmas, 1.0)
            .write(&dir)
            .map_err(|e| run_error(&dir, e))?;
        Ok(dir)
    }

    /// Whether this iteration calls for a held-out evaluation.
    pub fn eval_due(&self) -> bool {
        let every = self.config.eval_every;
        every > 0 && !self.test.is_empty() && (self.iteration % every == 0 || self.done())
    }

    /// Held-out accuracy of the student at its own Euler steps, no CFG; appended to `eval.jsonl`.
    pub fn evaluate(&mut self) -> Result<StudentEval, DistillError> {
        let student = self.sampling_student()?;
        let c = &self.config;
        let eval = evaluate_student(
            &mut self.teacher,
            student,
            &self.test,
            c.eval_prompts,
            c.eval_images_per_prompt,
            c.batch_size,
            c.seed,
            c.student_sampling(),
            self.iteration,
            &self.plain_device,
        )?;
        append_line(&self.run_dir.join("eval.jsonl"), &eval)?;
        Ok(eval)
    }

    /// Writes `checkpoint/` atomically: the adapter (PEFT), its average, the optimizer, the
    /// iteration.
    pub fn save_checkpoint(&self) -> Result<PathBuf, DistillError> {
        let lora = self.config.lora();
        write_checkpoint(
            &self.run_dir,
            &lora,
            &[(&self.student, STUDENT, STUDENT)],
            &[(&self.optimizer, "optimizer.bin")],
            self.iteration,
            |tmp| match &self.ema {
                Some(ema) => Ok(ema.write(&tmp.join(EMA), &lora)?),
                None => Ok(()),
            },
        )
    }
}

/// Where Euler steps of `denoiser` take `x` (`[n, c, h, w]`) from `sigmas[0]` to the last of
/// `sigmas`.
fn euler_to(
    denoiser: &impl Denoiser,
    x: Tensor<4>,
    sigmas: &[f64],
    cond: &Conditioning,
) -> Tensor<4> {
    sigmas.windows(2).fold(x, |x, step| {
        let v = denoiser.velocity(x.clone(), step[0], cond);
        x + v.mul_scalar(step[1] - step[0])
    })
}

/// A path or a list of paths.
fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<PathBuf>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(PathBuf),
        Many(Vec<PathBuf>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(p) => vec![p],
        OneOrMany::Many(v) => v,
    })
}

/// The teacher's ODE from each coupling's noise, judged by GenEval's rule.
fn draw_couplings(
    config: &ReflowConfig,
    settings: DrawSettings,
    teacher: &Pipeline,
    train: &[PromptSpec],
    device: &Device,
    mut progress: impl FnMut(usize, usize),
) -> Result<Couplings, DistillError> {
    let start = Instant::now();
    let side = teacher.resolution();
    let shape = teacher.latent_shape(side, side)?;
    let per = shape.iter().product::<usize>();
    let per_prompt = config.pairs_per_prompt;
    let jobs: Vec<(usize, u64)> = (0..train.len())
        .flat_map(|p| (0..per_prompt).map(move |k| (p, (p * per_prompt + k) as u64)))
        .map(|(p, j)| (p, mix(config.seed, 1 << 32 | j)))
        .collect();
    let mut index = CouplingIndex {
        shape,
        prompts: Vec::with_capacity(jobs.len()),
        seeds: Vec::with_capacity(jobs.len()),
        correct: Vec::with_capacity(jobs.len()),
        draw: settings,
        seconds: 0.0,
    };
    let mut x0 = Vec::with_capacity(jobs.len() * per);
    for chunk in jobs.chunks(16) {
        let prompts: Vec<String> = chunk
            .iter()
            .map(|&(p, _)| train[p].prompt.clone())
            .collect();
        let seeds: Vec<u64> = chunk.iter().map(|&(_, s)| s).collect();
        let options =
            GenerateOptions::euler(config.teacher_steps, config.teacher_guidance, seeds.clone());
        let latents = teacher.generate_latents(&prompts, &options, device, |_| {}, None)?;
        let images = to_images(teacher.decode(latents.clone()));
        let values = latents
            .into_data()
            .try_to_vec::<f32>()
            .map_err(|e| run_error(Path::new("couplings"), format!("teacher latents: {e:?}")))?;
        x0.extend_from_slice(&values);
        for (&(p, seed), image) in chunk.iter().zip(&images) {
            index.prompts.push(p);
            index.seeds.push(seed);
            index.correct.push(evaluate_image(&train[p], image).correct);
        }
        progress(index.seeds.len(), jobs.len());
    }
    index.seconds = start.elapsed().as_secs_f64();
    Ok(Couplings { index, x0 })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn couplings(correct: Vec<bool>) -> Couplings {
        let n = correct.len();
        Couplings {
            index: CouplingIndex {
                shape: [1, 1, 1],
                prompts: vec![0; n],
                seeds: (0..n as u64).collect(),
                correct,
                draw: DrawSettings::of(&ReflowConfig::default(), 1),
                seconds: 0.0,
            },
            x0: vec![0.0; n],
        }
    }

    /// Training prompts with these tags (only the tag matters to the sampling weights).
    fn prompts(tags: &[&str]) -> Vec<PromptSpec> {
        tags.iter()
            .map(|tag| PromptSpec {
                tag: tag.to_string(),
                include: vec![],
                exclude: vec![],
                prompt: format!("a {tag} prompt"),
            })
            .collect()
    }

    #[test]
    fn couplings_are_weighted_by_the_teachers_verdict() {
        let c = couplings(vec![true, false, true, false]);
        let mut config = ReflowConfig {
            keep: Keep::Correct,
            correct_weight: 3.0,
            ..Default::default()
        };
        let train = prompts(&["colors"]);
        let own = c.targets(0);
        assert_eq!(own, [0, 1, 2, 3]);
        assert_eq!(
            c.cumulative_weights(&config, &own, &train),
            [3.0, 3.0, 6.0, 6.0]
        );
        config.keep = Keep::All;
        assert_eq!(
            c.cumulative_weights(&config, &own, &train),
            [3.0, 4.0, 7.0, 8.0]
        );
        config.correct_weight = 1.0;
        assert_eq!(
            c.cumulative_weights(&config, &own, &train),
            [1.0, 2.0, 3.0, 4.0]
        );
    }

    /// A wrong coupling learns the nearest correct x₀ of its own prompt, and only when that
    /// prompt has enough correct ones.
    #[test]
    fn recoupling_targets_the_nearest_correct_image_of_the_same_prompt() {
        let mut c = couplings(vec![true, true, false, false, true, false]);
        c.index.prompts = vec![0, 0, 0, 1, 1, 1];
        c.x0 = vec![0.0, 10.0, 8.0, -1.0, 5.0, 0.0];
        // Prompt 0: coupling 2 (x₀ 8) is nearest to coupling 1 (10). Prompt 1 has one correct.
        assert_eq!(c.targets(2), [0, 1, 1, 3, 4, 5]);
        assert_eq!(c.targets(1), [0, 1, 1, 4, 4, 4]);
        assert_eq!(c.targets(3), [0, 1, 2, 3, 4, 5]);
        let config = ReflowConfig {
            keep: Keep::Correct,
            ..Default::default()
        };
        assert_eq!(
            c.cumulative_weights(&config, &c.targets(2), &prompts(&["counting", "colors"])),
            [1.0, 2.0, 3.0, 3.0, 4.0, 4.0]
        );
    }

    /// A wrong coupling takes the other draw's image of the same noise when that one was
    /// correct; correct couplings and wrong-in-both ones stay as they are.
    #[test]
    fn a_wrong_coupling_is_rescued_by_a_correct_image_of_the_same_noise() {
        let mut c = couplings(vec![true, false, false, false]);
        c.x0 = vec![1.0, 2.0, 3.0, 4.0];
        let mut other = couplings(vec![false, true, false, true]);
        other.index.draw.teacher_guidance = 7.0;
        other.x0 = vec![10.0, 20.0, 30.0, 40.0];
        // The other draw's order differs: seeds 3, 2, 1, 0.
        other.index.seeds.reverse();
        other.x0.reverse();
        other.index.correct.reverse();
        assert_eq!(c.rescue_with(&other), Ok(2));
        assert_eq!(c.index.correct, [true, true, false, true]);
        assert_eq!(c.x0, [1.0, 20.0, 3.0, 40.0]);

        let mut steps = couplings(vec![true]);
        steps.index.draw.teacher_steps = 40;
        let e = c.rescue_with(&steps).unwrap_err();
        assert!(e.contains("same model, prompts and steps"), "{e}");
        let mut unrelated = couplings(vec![true]);
        unrelated.index.seeds = vec![99];
        let e = c.rescue_with(&unrelated).unwrap_err();
        assert!(e.contains("no noise seed in common"), "{e}");
    }

    /// With `balance_tags` every tag that has a drawable coupling gets the same total weight,
    /// split within the tag by the verdict weights; a tag with none stays at zero.
    #[test]
    fn balanced_couplings_give_every_tag_the_same_share() {
        // Prompts 0 and 1 are colors (five couplings), prompt 2 counting (two), prompt 3
        // two_object (one, wrong).
        let mut c = couplings(vec![true, true, false, true, false, true, false, false]);
        c.index.prompts = vec![0, 0, 0, 1, 1, 2, 2, 3];
        let train = prompts(&["colors", "colors", "counting", "two_object"]);
        let mut config = ReflowConfig {
            keep: Keep::Correct,
            balance_tags: true,
            ..Default::default()
        };
        let own = c.targets(0);
        let round = |v: f64| (v * 1e9).round() / 1e9;
        let steps = |cumulative: Vec<f64>| -> Vec<f64> {
            let mut last = 0.0;
            cumulative
                .into_iter()
                .map(|w| {
                    let step = w - last;
                    last = w;
                    round(step)
                })
                .collect()
        };
        let third = round(1.0 / 3.0);
        assert_eq!(
            steps(c.cumulative_weights(&config, &own, &train)),
            [third, third, 0.0, third, 0.0, 1.0, 0.0, 0.0]
        );
        // keep = "all", correct × 2: colors 2 + 2 + 1 + 2 + 1 = 8, counting 2 + 1 = 3,
        // two_object 1.
        config.keep = Keep::All;
        config.correct_weight = 2.0;
        assert_eq!(
            steps(c.cumulative_weights(&config, &own, &train)),
            [
                0.25,
                0.25,
                0.125,
                0.25,
                0.125,
                round(2.0 / 3.0),
                round(1.0 / 3.0),
                1.0
            ]
        );
    }
}
