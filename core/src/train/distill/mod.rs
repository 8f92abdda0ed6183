//! Few-step generators (issue 10): RTDMD's AC-DMD cold start, reward-filtered reflow, and
//! Flow-OPD's on-policy distillation. `objectives` holds their exact per-step objectives
//! (ALGORITHMS.md §3.2, §5), each tested against the formula; the training loops build on them
//! and share the run helpers below.

pub mod acdmd;
pub mod objectives;
pub mod reflow;

use std::path::{Path, PathBuf};

use burn::optim::{AdamWConfig, ModuleOptimizer};
use serde::{Deserialize, Serialize};

use crate::lora;
use crate::pipeline::eval::{EvalOptions, evaluate_pipeline};
use crate::pipeline::{GenerateOptions, Pipeline, PipelineError, Transformer};
use crate::world::prompt::PromptSpec;

/// A run's position, `checkpoint/state.json`.
#[derive(Debug, Serialize, Deserialize)]
struct RunState {
    iteration: usize,
}

/// Errors of a distillation run.
#[derive(Debug, thiserror::Error)]
pub enum DistillError {
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
    #[error(transparent)]
    Lora(#[from] lora::LoraError),
    #[error("config: {0}")]
    Config(String),
    #[error("{path}: {message}")]
    Run { path: PathBuf, message: String },
}

fn run_error(path: &Path, message: impl std::fmt::Display) -> DistillError {
    DistillError::Run {
        path: path.to_path_buf(),
        message: message.to_string(),
    }
}

/// Writes `run_dir/checkpoint/` atomically (through `checkpoint.tmp`): each `(model, adapter
/// name, folder)` as a PEFT folder, each `(optimizer, file)`, what `extra` writes into the
/// folder, and `state.json` with `iteration`.
fn write_checkpoint(
    run_dir: &Path,
    lora_config: &lora::LoraConfig,
    adapters: &[(&Transformer, &str, &str)],
    optimizers: &[(&ModuleOptimizer, &str)],
    iteration: usize,
    extra: impl FnOnce(&Path) -> Result<(), DistillError>,
) -> Result<PathBuf, DistillError> {
    let final_dir = run_dir.join("checkpoint");
    let tmp = run_dir.join("checkpoint.tmp");
    let _ = std::fs::remove_dir_all(&tmp);
    for (model, name, dir) in adapters {
        let modules = lora::extract(*model, name)?;
        lora::LoraWeights::from_component("transformer", modules, Some(lora_config.clone()))
            .write_peft(&tmp.join(dir), "transformer")?;
    }
    for (optimizer, file) in optimizers {
        let path = tmp.join(file);
        optimizer.save(&path).map_err(|e| run_error(&path, e))?;
    }
    extra(&tmp)?;
    let state_path = tmp.join("state.json");
    let state = serde_json::to_string_pretty(&RunState { iteration }).expect("json");
    std::fs::write(&state_path, state).map_err(|e| run_error(&state_path, e))?;
    let _ = std::fs::remove_dir_all(&final_dir);
    std::fs::rename(&tmp, &final_dir).map_err(|e| run_error(&final_dir, e))?;
    Ok(final_dir)
}

/// Where the student of iteration `iteration` is kept with `snapshot_every`.
pub fn snapshot_dir(run_dir: &Path, iteration: usize) -> PathBuf {
    run_dir.join("snapshots").join(format!("iter-{iteration}"))
}

/// AdamW as RTDMD configures its generator and fake score: betas (0.9, 0.999), no weight decay.
pub(crate) fn adam() -> ModuleOptimizer {
    AdamWConfig::new()
        .with_beta_1(0.9)
        .with_beta_2(0.999)
        .with_epsilon(1e-8)
        .with_weight_decay(0.0)
        .init()
}

/// splitmix64 of (seed, stream): independent per-purpose seeds.
fn mix(seed: u64, stream: u64) -> u64 {
    let mut z = seed ^ stream.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn append_line(path: &Path, value: &impl Serialize) -> Result<(), DistillError> {
    crate::train::append_jsonl(path, value).map_err(|e| run_error(path, e))
}

fn truncate_log(path: &Path, iteration: usize) -> Result<(), DistillError> {
    crate::train::truncate_jsonl(path, "iteration", iteration).map_err(|e| run_error(path, e))
}

/// A student's held-out accuracy, a line of `eval.jsonl`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StudentEval {
    pub iteration: usize,
    pub accuracy: f64,
    pub accuracy_by_tag: std::collections::BTreeMap<String, f64>,
    pub artifact_rate: f64,
    /// The student's steps (its NFE: no CFG).
    pub steps: usize,
    pub seconds: f64,
}

/// Scores `student` sampled with `sampling` on the first `prompts` of `test` (all when `None`):
/// image k of prompt i gets seed `seed + i·images_per_prompt + k`. The pipeline holds the student
/// while it samples and its own transformer again after.
#[allow(clippy::too_many_arguments)]
fn evaluate_student(
    pipeline: &mut Pipeline,
    student: Transformer,
    test: &[PromptSpec],
    prompts: Option<usize>,
    images_per_prompt: usize,
    batch_size: usize,
    seed: u64,
    sampling: GenerateOptions,
    iteration: usize,
    device: &burn::tensor::Device,
) -> Result<StudentEval, DistillError> {
    let start = std::time::Instant::now();
    let specs = &test[..prompts.unwrap_or(test.len()).min(test.len())];
    let steps = sampling.sigmas.as_ref().map_or(sampling.steps, Vec::len);
    let options = EvalOptions {
        images_per_prompt,
        batch_size,
        generate: sampling,
        seed,
    };
    let own = std::mem::replace(&mut pipeline.transformer, student);
    let report = evaluate_pipeline(pipeline, specs, &options, device, None, |_, _| {});
    pipeline.transformer = own;
    let report = report?;
    Ok(StudentEval {
        iteration,
        accuracy: report.overall as f64,
        accuracy_by_tag: report
            .tags
            .iter()
            .map(|(t, a)| (t.clone(), *a as f64))
            .collect(),
        artifact_rate: report.artifact_rate(),
        steps,
        seconds: start.elapsed().as_secs_f64(),
    })
}
