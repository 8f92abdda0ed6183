//! `portaflow distill acdmd --config FILE.toml --out RUN_DIR`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};

use portaflow::device::{self, DeviceRequest};
use portaflow::pipeline::{self, Pipeline};
use portaflow::train::distill::acdmd::{AcDmdConfig, AcDmdEval, AcDmdTrainer};
use portaflow::world::prompt;

#[derive(clap::Subcommand)]
pub enum DistillCommand {
    /// RTDMD's AC-DMD cold start: distil the model (with CFG) into a few-step CPS student held
    /// in a LoRA adapter (presets: configs/acdmd-*.toml).
    Acdmd {
        /// The run config (TOML); every field has a default.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Run directory: metrics.jsonl, eval.jsonl, checkpoint/, generator_final/. A run
        /// directory with a checkpoint is resumed.
        #[arg(long)]
        out: PathBuf,
        /// Override `iterations` (the only setting a resumed run may change).
        #[arg(long)]
        iterations: Option<usize>,
        /// Print the effective config and exit.
        #[arg(long)]
        print_config: bool,
    },
}

pub fn run(request: DeviceRequest, command: DistillCommand) -> Result<()> {
    match command {
        DistillCommand::Acdmd {
            config,
            out,
            iterations,
            print_config,
        } => {
            let mut config = match &config {
                Some(path) => AcDmdConfig::from_file(path).map_err(anyhow::Error::msg)?,
                None => AcDmdConfig::default(),
            };
            if let Some(n) = iterations {
                config.iterations = n;
            }
            if print_config {
                print!("{}", config.to_toml());
                return Ok(());
            }
            acdmd(request, config, &out)
        }
    }
}

fn repo_file(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(relative)
}

fn print_eval(e: &AcDmdEval) {
    let tags: Vec<String> = e
        .accuracy_by_tag
        .iter()
        .map(|(t, a)| format!("{t} {a:.2}"))
        .collect();
    println!(
        "  student at {} NFE: held-out accuracy {:.3} ({}), artifacts/image {:.3}, {:.1} s",
        e.steps,
        e.accuracy,
        tags.join(", "),
        e.artifact_rate,
        e.seconds
    );
}

fn acdmd(request: DeviceRequest, config: AcDmdConfig, out: &Path) -> Result<()> {
    config.validate().map_err(anyhow::Error::msg)?;
    let chosen = device::select(request)?;
    let device = chosen.device.clone().autodiff();
    let model = config
        .model
        .path
        .clone()
        .unwrap_or_else(pipeline::bundled_dir);
    let train_path = config
        .train_prompts
        .clone()
        .unwrap_or_else(|| repo_file("assets/prompts/shapes_train.jsonl"));
    let test_path = config
        .test_prompts
        .clone()
        .unwrap_or_else(|| repo_file("assets/prompts/shapes_test.jsonl"));
    let train: Vec<String> = prompt::read_jsonl(&train_path)?
        .into_iter()
        .map(|s| s.prompt)
        .collect();
    let test = prompt::read_jsonl(&test_path)?;
    let base = Pipeline::from_dir(&model, &device)
        .with_context(|| format!("loading the teacher {}", model.display()))?;
    let mut trainer = AcDmdTrainer::new(config, base, train, test, out, &device)?;
    println!(
        "AC-DMD on {chosen}: teacher {}, student σ {:?} (CPS η {}), run dir {}",
        model.display(),
        trainer.sigmas(),
        trainer.config.eta,
        out.display()
    );
    if trainer.iteration == 0 && trainer.config.eval_every > 0 {
        // Where the curve starts: the teacher itself sampled with the student's few steps.
        print_eval(&trainer.evaluate()?);
    } else if trainer.iteration > 0 {
        println!("resumed at iteration {}", trainer.iteration);
    }
    let start = Instant::now();
    while !trainer.done() {
        let m = trainer.iterate()?;
        println!(
            "iter {:>5}  dmd {:.4}  fake {:.4}  consistency {:.2e}  stop {} (s {:.2})  |∇| {:.3}  {:.1} s  peak {:.0} MiB  ({:.0} s)",
            m.iteration,
            m.dmd_loss,
            m.fake_loss,
            m.consistency,
            m.stop_step,
            m.ambient_sigma,
            m.generator_grad_norm,
            m.seconds,
            m.peak_memory_mib.unwrap_or(0.0),
            start.elapsed().as_secs_f64()
        );
        if trainer.eval_due() {
            print_eval(&trainer.evaluate()?);
        }
    }
    println!(
        "done in {:.0} s: the student adapter is {} (generate with --lora it --sigmas {} --sampler cps)",
        start.elapsed().as_secs_f64(),
        out.join("generator_final").display(),
        trainer
            .sigmas()
            .iter()
            .map(|s| format!("{s:.4}"))
            .collect::<Vec<_>>()
            .join(",")
    );
    Ok(())
}
