//! `portaflow train grpo --config FILE.toml --out RUN_DIR`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};

use portaflow::device::{self, DeviceRequest};
use portaflow::pipeline;
use portaflow::train::grpo::config::GrpoConfig;
use portaflow::train::grpo::{GrpoEvent, GrpoTrainer};

#[derive(clap::Subcommand)]
pub enum TrainCommand {
    /// Flow-GRPO on a LoRA adapter (presets: configs/grpo-*.toml).
    Grpo {
        /// The run config (TOML); every field has a default, see configs/grpo-*.toml.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Run directory: metrics.jsonl, eval.jsonl, grids/, checkpoint/, adapter_final/. A run
        /// directory with a checkpoint is resumed.
        #[arg(long)]
        out: PathBuf,
        /// Override run.epochs (the only setting a resumed run may change).
        #[arg(long)]
        epochs: Option<usize>,
        /// Print the effective config and exit.
        #[arg(long)]
        print_config: bool,
    },
}

pub fn run(request: DeviceRequest, command: TrainCommand) -> Result<()> {
    match command {
        TrainCommand::Grpo {
            config,
            out,
            epochs,
            print_config,
        } => {
            let mut config = match &config {
                Some(path) => GrpoConfig::from_file(path).map_err(anyhow::Error::msg)?,
                None => GrpoConfig::default(),
            };
            if let Some(e) = epochs {
                config.run.epochs = e;
            }
            if print_config {
                print!("{}", config.to_toml());
                return Ok(());
            }
            grpo(request, config, &out)
        }
    }
}

fn grpo(request: DeviceRequest, config: GrpoConfig, out: &Path) -> Result<()> {
    let chosen = device::select(request)?;
    let device = chosen.device.clone().autodiff();
    let model = config
        .model
        .path
        .clone()
        .unwrap_or_else(pipeline::bundled_dir);
    let reward = config.data.reward_name();
    let mut trainer = GrpoTrainer::open(config, out, &device)
        .with_context(|| format!("starting the run with the model {}", model.display()))?;
    let (train, test) = trainer.prompt_counts();
    println!(
        "flow-grpo on {chosen}: {reward} from {}, {train} training prompts, {test} held-out, run dir {}",
        model.display(),
        out.display()
    );
    if trainer.epoch > 0 {
        println!("resumed at epoch {}", trainer.epoch);
    }
    // Ctrl-C: finish the running epoch, save a checkpoint, stop; a second Ctrl-C exits at once.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = stop.clone();
    ctrlc::set_handler(move || {
        if flag.swap(true, std::sync::atomic::Ordering::SeqCst) {
            eprintln!("\nsecond Ctrl-C: exiting without saving");
            std::process::exit(130);
        }
        eprintln!(
            "\nCtrl-C: finishing this epoch, then saving a checkpoint (Ctrl-C again to quit now)"
        );
    })
    .context("installing the Ctrl-C handler")?;
    let start = Instant::now();
    while !trainer.done() {
        if stop.load(std::sync::atomic::Ordering::SeqCst) {
            let path = trainer.save_checkpoint()?;
            println!(
                "stopped after epoch {}; checkpoint {} (rerun the same command to resume)",
                trainer.epoch,
                path.display()
            );
            return Ok(());
        }
        trainer.epoch(|event| match event {
            GrpoEvent::Epoch(m) => println!(
                "epoch {:>4}  reward {:.3} ± {:.3}  train acc {:.3}  kl {:.2e}  clip {:.3}  ratio [{:.4}, {:.4}]  |ρ₀−1| {:.1e}  {:.1} s rollout + {:.1} s train  peak {:.0} MiB  ({:.0} s)",
                m.epoch,
                m.reward_mean,
                m.reward_std,
                m.train_accuracy,
                m.kl,
                m.clip_fraction,
                m.ratio_min,
                m.ratio_max,
                m.first_ratio_error,
                m.seconds_rollout + m.seconds_reward_wait,
                m.seconds_train,
                m.peak_memory_mib.unwrap_or(0.0),
                start.elapsed().as_secs_f64()
            ),
            GrpoEvent::Eval(e) => {
                let memory = e.artifact_rate;
                let tags: Vec<String> = e
                    .accuracy_by_tag
                    .iter()
                    .map(|(t, a)| format!("{t} {a:.2}"))
                    .collect();
                println!(
                    "  held-out accuracy {:.3} ({}) on {} images, artifacts/image {memory:.3}, {:.1} s",
                    e.accuracy,
                    tags.join(", "),
                    e.images,
                    e.seconds
                )
            }
            GrpoEvent::Grid(p) => println!("  grid {}", p.display()),
            GrpoEvent::Checkpoint(p) => println!("  saved {}", p.display()),
        })?;
    }
    println!(
        "done in {:.0} s: the adapter is {} (load it with --lora)",
        start.elapsed().as_secs_f64(),
        out.join("adapter_final").display()
    );
    Ok(())
}
