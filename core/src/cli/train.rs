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
    /// A small CLIP-style image/text model trained contrastively on Shapes scenes and their
    /// captions: the differentiable CLIP-score reward.
    Clip {
        /// Output folder: config.json, model.bpk, tokenizer.json, metrics.jsonl.
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 2000)]
        steps: usize,
        #[arg(long, default_value_t = 32)]
        batch_size: usize,
        #[arg(long, default_value_t = 1e-3)]
        lr: f64,
        /// Width of both towers (heads of 32).
        #[arg(long, default_value_t = 128)]
        width: usize,
        #[arg(long, default_value_t = 2)]
        layers: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// The Shapes autoencoder (64×64 RGB ↔ 16×16×4) that a latent bundled model is pretrained
    /// on (`portaflow pretrain --vae RUN/vae`).
    Vae {
        /// Run directory: vae/ (the diffusers folder), metrics.jsonl and the resumable state.
        /// A run directory with a checkpoint is resumed.
        #[arg(long)]
        out: PathBuf,
        #[arg(long)]
        steps: Option<usize>,
        #[arg(long)]
        batch_size: Option<usize>,
        #[arg(long)]
        lr: Option<f64>,
        /// Weight of the KL term against the reconstruction error (both means over values).
        #[arg(long)]
        kl_weight: Option<f64>,
        #[arg(long)]
        seed: Option<u64>,
    },
    /// Flow-GRPO on a LoRA adapter (presets: configs/grpo-*.toml).
    Grpo(GrpoRunArgs),
}

/// A run of the GRPO trainer: `train grpo`, `distill rtdmd`, `distill opd`.
#[derive(clap::Args)]
pub struct GrpoRunArgs {
    /// The run config (TOML); every field has a default, see configs/*.toml.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Run directory: metrics.jsonl, eval.jsonl, grids/, checkpoint/, adapter_final/. A run
    /// directory with a checkpoint is resumed.
    #[arg(long)]
    pub out: PathBuf,
    /// Override run.epochs (the only setting a resumed run may change).
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Print the effective config and exit.
    #[arg(long)]
    pub print_config: bool,
}

pub fn run(request: DeviceRequest, command: TrainCommand) -> Result<()> {
    match command {
        TrainCommand::Clip {
            out,
            steps,
            batch_size,
            lr,
            width,
            layers,
            seed,
        } => clip(request, &out, steps, batch_size, lr, width, layers, seed),
        TrainCommand::Vae {
            out,
            steps,
            batch_size,
            lr,
            kl_weight,
            seed,
        } => vae(request, &out, steps, batch_size, lr, kl_weight, seed),
        TrainCommand::Grpo(args) => {
            let config = match &args.config {
                Some(path) => GrpoConfig::from_file(path).map_err(anyhow::Error::msg)?,
                None => GrpoConfig::default(),
            };
            run_grpo_config(request, config, &args)
        }
    }
}

/// Applies `--epochs`, then prints the config (`--print-config`) or runs it.
pub(crate) fn run_grpo_config(
    request: DeviceRequest,
    mut config: GrpoConfig,
    args: &GrpoRunArgs,
) -> Result<()> {
    if let Some(e) = args.epochs {
        config.run.epochs = e;
    }
    if args.print_config {
        print!("{}", config.to_toml());
        return Ok(());
    }
    grpo(request, config, &args.out)
}

fn grpo(request: DeviceRequest, config: GrpoConfig, out: &Path) -> Result<()> {
    let chosen = device::select(request)?;
    let device = chosen.device.clone().autodiff();
    let model = config
        .model
        .path
        .clone()
        .unwrap_or_else(pipeline::bundled_dir);
    let reward = match &config.train.draft {
        Some(d) => format!("the CLIP score of {}", d.clip.display()),
        None => config.data.reward_name(),
    };
    let method = match (&config.train.draft, &config.train.opd) {
        (Some(d), _) if d.lv_samples > 0 => "draft-lv",
        (Some(_), _) => "draft-k",
        (None, Some(_)) => "flow-opd",
        // RL on a few-step student at its own σ list: RTDMD's RL stage.
        (None, None) if config.sample.sigmas.is_some() => "rtdmd",
        (None, None) => "flow-grpo",
    };
    let mut trainer = GrpoTrainer::open(config, out, &device)
        .with_context(|| format!("starting the run with the model {}", model.display()))?;
    let (train, test) = trainer.prompt_counts();
    println!(
        "{method} on {chosen}: {reward} from {}, {train} training prompts, {test} held-out, run dir {}",
        model.display(),
        out.display()
    );
    if trainer.epoch > 0 {
        println!("resumed at epoch {}", trainer.epoch);
    }
    let stop = super::stop_on_ctrl_c("epoch")?;
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
                "epoch {:>4}  reward {:.3} ± {:.3}  train acc {:.3}  flat groups {}  kl {:.2e}  clip {:.3}  ratio [{:.4}, {:.4}]  |ρ₀−1| {:.1e}  {:.1} s rollout + {:.1} s train  peak {:.0} MiB  ({:.0} s)",
                m.epoch,
                m.reward_mean,
                m.reward_std,
                m.train_accuracy,
                m.flat_groups,
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
                let tags: Vec<String> = e
                    .accuracy_by_tag
                    .iter()
                    .map(|(t, a)| format!("{t} {a:.2}"))
                    .collect();
                if tags.is_empty() {
                    // Text prompts only: the run's rewards below are the whole verdict.
                    println!("  held-out: {} images, {:.1} s", e.images, e.seconds);
                } else {
                    println!(
                        "  held-out accuracy {:.3} ({}) on {} images, artifacts/image {:.3}, {:.1} s",
                        e.accuracy,
                        tags.join(", "),
                        e.images,
                        e.artifact_rate,
                        e.seconds
                    );
                }
                let rewards: Vec<String> = e
                    .rewards
                    .iter()
                    .map(|(name, r)| format!("{name} {:.3} (success {:.3})", r.mean, r.success))
                    .collect();
                if !rewards.is_empty() {
                    println!("  held-out rewards: {}", rewards.join(", "));
                }
                if let Some(error) = &e.rewards_error {
                    println!("  held-out rewards not scored: {error}");
                }
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

#[allow(clippy::too_many_arguments)]
fn clip(
    request: DeviceRequest,
    out: &Path,
    steps: usize,
    batch_size: usize,
    lr: f64,
    width: usize,
    layers: usize,
    seed: u64,
) -> Result<()> {
    use portaflow::reward::clip_score::{ShapesClip, ShapesClipConfig, train_clip};
    anyhow::ensure!(
        width >= 32 && width % 32 == 0,
        "--width {width}: a multiple of 32 (heads of 32)"
    );
    anyhow::ensure!(
        steps > 0 && batch_size > 1,
        "--steps ≥ 1 and --batch-size ≥ 2"
    );
    let chosen = device::select(request)?;
    let device = chosen.device.clone().autodiff();
    let bundled = pipeline::bundled_dir();
    let pipe = pipeline::Pipeline::from_dir(&bundled, &chosen.device)?;
    let pipeline::text::TextStack::Clip(encoder) = &pipe.text else {
        anyhow::bail!("the bundled model has no CLIP text encoder to take the vocabulary from");
    };
    let heads = width / 32;
    let text = portaflow::text::clip::ClipTextConfig {
        hidden_size: width,
        intermediate_size: 4 * width,
        projection_dim: width,
        num_hidden_layers: layers,
        num_attention_heads: heads,
        ..encoder.model.config.clone()
    };
    let config = ShapesClipConfig {
        image_size: pipe.resolution(),
        patch_size: 8,
        width,
        layers,
        heads,
        projection_dim: width,
        text,
    };
    let (train, _) = portaflow::world::prompt_sets::build();
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let mut metrics = std::fs::File::create(out.join("metrics.jsonl"))?;
    println!(
        "training a Shapes CLIP (width {width}, {layers} layers per tower) on {chosen}: {steps} steps of {batch_size}"
    );
    let start = Instant::now();
    let model = train_clip(
        ShapesClip::init(config, seed, &device),
        &encoder.tokenizer,
        &train,
        steps,
        batch_size,
        lr,
        seed,
        &device,
        |log| {
            use std::io::Write;
            let _ = writeln!(metrics, "{}", serde_json::to_string(log).expect("json"));
            if log.step % 50 == 0 || log.step == steps {
                println!(
                    "step {:>5}  loss {:.3}  in-batch accuracy {:.2}  ({:.0} s)",
                    log.step,
                    log.loss,
                    log.accuracy,
                    start.elapsed().as_secs_f64()
                );
            }
        },
    )?;
    model.save(out)?;
    std::fs::copy(
        bundled.join("tokenizer").join("tokenizer.json"),
        out.join("tokenizer.json"),
    )?;
    println!("saved {}", out.display());
    Ok(())
}

fn vae(
    request: DeviceRequest,
    out: &Path,
    steps: Option<usize>,
    batch_size: Option<usize>,
    lr: Option<f64>,
    kl_weight: Option<f64>,
    seed: Option<u64>,
) -> Result<()> {
    use portaflow::model::vae::Vae;
    use portaflow::train::vae::{self, VaeTrainConfig};
    let resumed = vae::resumed_config(out)?;
    let mut config = match &resumed {
        Some(stored) => {
            anyhow::ensure!(
                batch_size.is_none() && lr.is_none() && kl_weight.is_none() && seed.is_none(),
                "{} is resumed with its stored settings; only --steps can change",
                out.display()
            );
            stored.clone()
        }
        None => VaeTrainConfig::default(),
    };
    config.steps = steps.unwrap_or(config.steps);
    config.batch_size = batch_size.unwrap_or(config.batch_size);
    config.learning_rate = lr.unwrap_or(config.learning_rate);
    config.kl_weight = kl_weight.unwrap_or(config.kl_weight);
    config.seed = seed.unwrap_or(config.seed);
    config.validate().map_err(anyhow::Error::msg)?;
    let chosen = device::select(request)?;
    let device = chosen.device.clone().autodiff();
    let (train, _) = portaflow::world::prompt_sets::build();
    let fresh = Vae::init(vae::shapes_vae_config(), config.seed, &device)?;
    if resumed.is_some() {
        println!("resuming {}", out.display());
    }
    println!(
        "training the Shapes autoencoder on {chosen}: {} steps of {} images",
        config.steps, config.batch_size
    );
    let start = Instant::now();
    vae::train_vae(fresh, &config, &train, out, &device, |m| {
        println!(
            "step {:>5}  loss {:.5}  mse {:.5}  PSNR {:.1} dB  KL {:.2}  lr {:.2e}  {:.2} s/step  ({:.0} s)",
            m.step,
            m.loss,
            m.reconstruction_mse,
            m.psnr_db,
            m.kl,
            m.learning_rate,
            m.seconds_per_step,
            start.elapsed().as_secs_f64()
        );
    })?;
    println!("saved {}", out.join("vae").display());
    Ok(())
}
