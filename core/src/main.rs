//! The `portaflow` command line.

mod cli;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use burn::tensor::{Distribution, Tensor};
use clap::{Parser, Subcommand};

use portaflow::device::{self, Backend, ChosenDevice, DeviceRequest};
use portaflow::image_io;
use portaflow::pipeline::{self, GenerateOptions, Pipeline, eval};
use portaflow::sample::schedule::Schedule;
use portaflow::sample::step::{self, StepKind};
use portaflow::text::tokenizer;
use portaflow::train::pretrain::{self, PretrainConfig};
use portaflow::world::prompt;

#[derive(Parser)]
#[command(
    name = "portaflow",
    version,
    about = "Sample, adapt and RL-train flow-matching text-to-image models on any GPU or CPU"
)]
struct Cli {
    /// Where to run: auto, vulkan, metal, dx12, gl, webgpu or cpu (env PORTAFLOW_DEVICE).
    #[arg(long, global = true)]
    device: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// List every adapter wgpu sees, the device portaflow would use, and run a small computation
    /// on it checked against the CPU.
    Info,
    /// Generate images from a prompt (the bundled Shapes model unless --model is given).
    Generate(GenerateArgs),
    /// Pretrain a text-to-image model from scratch on the Shapes world (rectified flow).
    Pretrain(PretrainArgs),
    /// Score a model (or a folder of images) on a GenEval-format prompt file.
    Eval(EvalArgs),
    /// Train adapters: `train grpo --config FILE.toml --out RUN_DIR`.
    Train {
        #[command(subcommand)]
        command: cli::train::TrainCommand,
    },
    /// Distil the model into a few-step student: `distill acdmd --config FILE.toml --out RUN_DIR`.
    Distill {
        #[command(subcommand)]
        command: cli::distill::DistillCommand,
    },
    /// Time sampling (images/s at several step counts and batch sizes) and Flow-GRPO iterations,
    /// with peak memory, on the chosen device.
    Bench(cli::bench::BenchArgs),
    /// Serve the Shapes rewards over HTTP (the reference server of the remote reward protocol,
    /// `reward = "remote"` in a training config).
    RewardServer(RewardServerArgs),
    /// Copy a model folder with its weights in another precision (f16 halves a checkpoint).
    Convert(ConvertArgs),
    /// Inspect, convert and merge LoRA adapters (PEFT, diffusers, kohya, torch .pt).
    Lora {
        #[command(subcommand)]
        command: cli::lora::LoraCommand,
    },
}

#[derive(clap::Args)]
struct RewardServerArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8077")]
    addr: String,
    /// geneval, geneval_dense, ocr, or by-task (each prompt judged by its own task's reward).
    #[arg(long, default_value = "by-task")]
    reward: String,
}

#[derive(clap::Args)]
struct ConvertArgs {
    /// The model folder to read.
    #[arg(long)]
    model: PathBuf,
    /// The new folder to write (must not exist).
    #[arg(long)]
    out: PathBuf,
    /// f32, f16 or bf16.
    #[arg(long)]
    dtype: portaflow::model::export::StoreDtype,
}

#[derive(clap::Args)]
struct EvalArgs {
    /// GenEval-format prompt metadata (JSONL) to generate for.
    #[arg(long, conflicts_with = "images", required_unless_present = "images")]
    prompts: Option<PathBuf>,
    /// Score existing images laid out as GenEval lays them out instead of generating.
    #[arg(long)]
    images: Option<PathBuf>,
    #[command(flatten)]
    model: ModelArgs,
    #[arg(long, default_value_t = 4)]
    images_per_prompt: usize,
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Also write the generated images in GenEval's layout here.
    #[arg(long)]
    save_images: Option<PathBuf>,
    /// Write the JSON report here.
    #[arg(long)]
    out: Option<PathBuf>,
}

/// The model `generate` and `eval` sample: a pipeline folder, its adapters and how to sample.
#[derive(clap::Args)]
struct ModelArgs {
    /// A pipeline folder (default: the bundled model, or env PORTAFLOW_MODEL).
    #[arg(long)]
    model: Option<PathBuf>,
    /// LoRA adapters to apply, `PATH[:WEIGHT]` (PEFT folder, diffusers / kohya .safetensors,
    /// torch .pt); repeat to stack.
    #[arg(long = "lora")]
    loras: Vec<String>,
    #[command(flatten)]
    sampling: SamplingArgs,
}

impl ModelArgs {
    fn dir(&self) -> PathBuf {
        self.model.clone().unwrap_or_else(pipeline::bundled_dir)
    }
}

/// How `generate` and `eval` sample; what is not given comes from a student adapter's
/// `sampling.json` (see [`Sampling::resolve`]), else the defaults.
#[derive(clap::Args)]
struct SamplingArgs {
    /// Denoising steps [default: 20, or a student adapter's own].
    #[arg(long)]
    steps: Option<usize>,
    /// Classifier-free guidance scale (1 disables CFG) [default: 4, or a student adapter's own].
    #[arg(long)]
    cfg: Option<f64>,
    /// Guide only while LOW < σ ≤ HIGH (`--cfg-interval 0.3,1`); every step when absent.
    #[arg(long, value_delimiter = ',', value_name = "LOW,HIGH")]
    cfg_interval: Option<Vec<f64>>,
    /// euler, sde[:LEVEL] (Flow-GRPO SDE, noise level 0.7) or cps[:ETA] (η 0.9) [default:
    /// euler, or a student adapter's own: a `--lora` folder with a `sampling.json`].
    #[arg(long)]
    sampler: Option<String>,
    /// An explicit σ list instead of `--steps` (e.g. `1,0.75,0.5,0.25`, the bundled student's).
    #[arg(long, value_delimiter = ',')]
    sigmas: Option<Vec<f64>>,
}

#[derive(clap::Args)]
struct GenerateArgs {
    /// The text prompt.
    #[arg(long)]
    prompt: String,
    /// What to avoid (the unconditional branch of CFG).
    #[arg(long, default_value = "")]
    negative_prompt: String,
    #[command(flatten)]
    model: ModelArgs,
    /// Seed of the first image; image k uses seed + k. Random if absent.
    #[arg(long)]
    seed: Option<u64>,
    #[arg(long, default_value_t = 1)]
    num_images: usize,
    /// Image width in pixels (default: the model's).
    #[arg(long, requires = "height")]
    width: Option<usize>,
    /// Image height in pixels (default: the model's).
    #[arg(long, requires = "width")]
    height: Option<usize>,
    /// The initial noise from a safetensors file (one tensor `[n, c, h, w]` in the sampler's
    /// latent space, e.g. the `latents` a diffusers pipeline was given), to reproduce its image.
    #[arg(long)]
    latents: Option<PathBuf>,
    /// Token length of the long text encoder (T5 / Qwen3; diffusers' `max_sequence_length`).
    #[arg(long)]
    max_sequence_length: Option<usize>,
    /// FLUX.2-klein: the Qwen3 layers stacked as the prompt embedding (default 9,18,27).
    #[arg(long, value_delimiter = ',')]
    text_encoder_out_layers: Option<Vec<usize>>,
    /// Load the text encoders, encode, free them, then load the transformer and VAE: peak
    /// memory is the larger half instead of the sum (LoRA adapters then apply to the
    /// transformer only).
    #[arg(long)]
    low_memory: bool,
    /// Output PNG (with several images: `<stem>-<k>.png`).
    #[arg(short = 'o', long, default_value = "out.png")]
    out: PathBuf,
}

#[derive(clap::Args)]
struct PretrainArgs {
    /// Run directory (resumed if it holds a checkpoint).
    #[arg(long)]
    out: PathBuf,
    /// Training prompts (GenEval JSONL; default: the repository's `assets/prompts/shapes_train.jsonl`).
    #[arg(long)]
    prompts: Option<PathBuf>,
    #[arg(long)]
    steps: Option<usize>,
    #[arg(long)]
    batch_size: Option<usize>,
    #[arg(long)]
    lr: Option<f64>,
    #[arg(long)]
    seed: Option<u64>,
    #[arg(long)]
    checkpoint_every: Option<usize>,
    /// Linear learning-rate decay to a tenth over this many final steps.
    #[arg(long)]
    decay_steps: Option<usize>,
    /// Loss weight 1/max(σ, floor)² of sample-predicting models (0.05: JiT's v-loss).
    #[arg(long)]
    loss_sigma_floor: Option<f64>,
    /// Training noise levels σ = sigmoid(mean + std·u), u ~ N(0, 1): SD3's (0, 1) or JiT's
    /// noisier (0.8, 0.8), the default.
    #[arg(long)]
    sigma_mean: Option<f64>,
    #[arg(long)]
    sigma_std: Option<f64>,
    /// Start a new run from this pipeline folder's weights (e.g. `assets/models/shapes-base`)
    /// with a fresh optimizer, instead of from a seeded initialisation.
    #[arg(long, requires = "init_step")]
    init: Option<PathBuf>,
    /// The step the `--init` weights reached; the new run continues the schedule and data from it.
    #[arg(long, requires = "init")]
    init_step: Option<usize>,
    /// Decay of the weight average saved as the checkpoint (0: raw weights).
    #[arg(long)]
    ema_decay: Option<f64>,
    /// A new model's patch side in pixels, or in latent cells with --vae (a divisor of the
    /// grid side; default 8 in pixels, 2 on latents).
    #[arg(long)]
    patch_size: Option<usize>,
    /// Pretrain a new model on the latents of this frozen autoencoder folder (from
    /// `portaflow train vae`) instead of in pixel space.
    #[arg(long)]
    vae: Option<PathBuf>,
    /// A new model copies every text-encoder and transformer weight whose name and shape match
    /// this trained Shapes pipeline folder's (e.g. a latent model from the pixel model: all but
    /// the patch embedding and output projection).
    #[arg(long, conflicts_with = "init")]
    warm_start: Option<PathBuf>,
    /// A new model's width (a multiple of 32).
    #[arg(long)]
    width: Option<usize>,
    /// A new model's number of MMDiT blocks.
    #[arg(long)]
    layers: Option<usize>,
}

fn main() {
    // wgpu's GL probe logs EGL failures as errors on machines without a display; they are noise.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,wgpu_hal=off"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    if let Err(err) = run(Cli::parse()) {
        eprintln!("error: {}", describe(&err));
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    let request = DeviceRequest::from_arg_or_env(cli.device.as_deref())?;
    match cli.command {
        Command::Info => info(request),
        Command::Generate(args) => generate(request, args),
        Command::Pretrain(args) => pretrain(request, args),
        Command::Eval(args) => eval(request, args),
        Command::Convert(args) => convert(args),
        Command::RewardServer(args) => reward_server(args),
        Command::Bench(args) => cli::bench::run(request, args),
        Command::Lora { command } => cli::lora::run(request, command),
        Command::Train { command } => cli::train::run(request, command),
        Command::Distill { command } => cli::distill::run(request, command),
    }
}

fn reward_server(args: RewardServerArgs) -> Result<()> {
    use portaflow::reward::{ByTaskReward, DenseShapesReward, OcrReward, Reward, ShapesReward};
    let reward: std::sync::Arc<dyn Reward> = match args.reward.as_str() {
        "geneval" => std::sync::Arc::new(ShapesReward),
        "geneval_dense" => std::sync::Arc::new(DenseShapesReward),
        "ocr" => std::sync::Arc::new(OcrReward),
        "by-task" => std::sync::Arc::new(ByTaskReward),
        other => {
            anyhow::bail!("--reward {other:?}: expected geneval, geneval_dense, ocr or by-task")
        }
    };
    let listener = std::net::TcpListener::bind(&args.addr)
        .with_context(|| format!("listening on {}", args.addr))?;
    println!(
        "serving the {} reward on http://{} ({}; GET /health)",
        reward.name(),
        listener.local_addr()?,
        portaflow::reward::remote::PROTOCOL
    );
    portaflow::reward::server::serve(listener, reward);
    Ok(())
}

fn convert(args: ConvertArgs) -> Result<()> {
    let reports =
        portaflow::model::export::convert_folder_dtype(&args.model, &args.out, args.dtype)?;
    println!(
        "{:<50} {:>9} {:>5} {:>12} {:>12} {:>10} {:>10} {:>7}",
        "file",
        "converted",
        "kept",
        "bytes before",
        "bytes after",
        "max |err|",
        "max rel",
        "to zero"
    );
    for (path, r) in &reports {
        println!(
            "{:<50} {:>9} {:>5} {:>12} {:>12} {:>10.2e} {:>10.2e} {:>7}",
            path.display(),
            r.converted,
            r.kept,
            r.bytes_before,
            r.bytes_after,
            r.max_abs_error,
            r.max_rel_error,
            r.flushed_to_zero
        );
    }
    println!("wrote {}", args.out.display());
    Ok(())
}

fn info(request: DeviceRequest) -> Result<()> {
    let adapters = device::adapters();
    println!("wgpu adapters ({}):", adapters.len());
    if adapters.is_empty() {
        println!(
            "  none (install a Vulkan driver; Mesa's lavapipe: apt-get install mesa-vulkan-drivers)"
        );
    }
    for adapter in &adapters {
        println!("  - {adapter}");
    }
    let chosen = device::select(request)?;
    println!("requested: {request}");
    println!("chosen:    {chosen}");
    check_computation(&chosen)
}

/// A 256×256 matmul and one Flow-GRPO SDE step on the chosen device, compared with the CPU.
fn check_computation(chosen: &ChosenDevice) -> Result<()> {
    let cpu = ChosenDevice::cpu();
    let a = Tensor::<2>::random([256, 256], Distribution::Normal(0.0, 1.0), &cpu.device);
    let b = Tensor::<2>::random([256, 256], Distribution::Normal(0.0, 1.0), &cpu.device);
    let on = |t: &Tensor<2>| Tensor::<2>::from_data(t.to_data(), &chosen.device);

    let start = Instant::now();
    let product = on(&a).matmul(on(&b)).into_data();
    let elapsed = start.elapsed();
    let reference = a.clone().matmul(b.clone()).into_data();
    let error = max_abs_diff(
        &product.try_to_vec::<f32>()?,
        &reference.try_to_vec::<f32>()?,
    );
    println!(
        "matmul 256x256x256: {:.1} ms (first call, includes kernel compilation), max |diff| vs cpu {error:.2e}",
        elapsed.as_secs_f64() * 1e3
    );
    anyhow::ensure!(
        error < 1e-2,
        "matmul on {chosen} disagrees with the CPU by {error}"
    );

    let schedule = Schedule::shifted(10, 3.0)?;
    let (sigma, next, sigma_max) = (schedule.sigmas[0], schedule.sigmas[1], schedule.sigma_max());
    let reference =
        step::flow_sde_step(a.clone(), b.clone(), a.clone(), sigma, next, sigma_max, 0.7);
    let reference = reference.log_prob.into_data().try_to_vec::<f32>()?;
    let start = Instant::now();
    let log_prob = match chosen.backend {
        Backend::Wgpu(_) => {
            let out = portaflow_shaders::flow_sde_step(
                on(&a),
                on(&b),
                on(&a),
                sigma,
                next,
                sigma_max,
                0.7,
            )
            .context("fused SDE step kernel")?;
            out.log_prob
        }
        Backend::Flex => {
            step::flow_sde_step(on(&a), on(&b), on(&a), sigma, next, sigma_max, 0.7).log_prob
        }
    };
    let log_prob = log_prob.into_data().try_to_vec::<f32>()?;
    let error = max_abs_diff(&log_prob, &reference);
    println!(
        "flow-grpo sde step {}: {:.1} ms, log-prob[0] {:.5}, max |diff| vs cpu {error:.2e}",
        if matches!(chosen.backend, Backend::Wgpu(_)) {
            "(fused WGSL kernel)"
        } else {
            "(tensor ops)"
        },
        start.elapsed().as_secs_f64() * 1e3,
        log_prob[0]
    );
    anyhow::ensure!(
        error < 1e-4,
        "SDE step on {chosen} disagrees with the CPU by {error}"
    );
    Ok(())
}

fn generate(request: DeviceRequest, args: GenerateArgs) -> Result<()> {
    anyhow::ensure!(!args.prompt.trim().is_empty(), "--prompt is empty");
    anyhow::ensure!(args.num_images > 0, "--num-images must be at least 1");
    let chosen = device::select(request)?;
    let dir = args.model.dir();
    let start = Instant::now();
    let loading = || format!("loading the model from {}", dir.display());
    let configure = |text: &mut pipeline::TextStack| -> Result<()> {
        if let Some(length) = args.max_sequence_length {
            text.set_max_sequence_length(length);
        }
        if let Some(layers) = args.text_encoder_out_layers.clone() {
            text.set_text_layers(layers)?;
        }
        let unknown = text.unknown_words(&args.prompt);
        if !unknown.is_empty() {
            eprintln!(
                "warning: the model does not know {}; they are read as <unk>",
                unknown.join(", ")
            );
        }
        Ok(())
    };
    let prompts = vec![args.prompt.clone(); args.num_images];
    let negatives = vec![args.negative_prompt.clone(); args.num_images];
    // --low-memory: both branches are encoded before the encoders are dropped; the sampler
    // uses the negative one only if the model runs CFG.
    let (mut pipe, encoded) = if args.low_memory {
        let mut text = Pipeline::load_text(&dir, &chosen.device).with_context(loading)?;
        configure(&mut text)?;
        let cond = text.encode(&prompts, &chosen.device)?;
        let uncond = text.encode(&negatives, &chosen.device)?;
        drop(text);
        let pipe = Pipeline::without_text(&dir, &chosen.device).with_context(loading)?;
        (pipe, Some((cond, uncond)))
    } else {
        let mut pipe = Pipeline::from_dir(&dir, &chosen.device).with_context(loading)?;
        configure(&mut pipe.text)?;
        (pipe, None)
    };
    cli::lora::apply(&mut pipe, &args.model.loras, &chosen.device, true)?;
    let sampling = Sampling::resolve(&args.model)?;
    let kind = sampler_kind(&sampling.sampler)?;
    let first_seed = args.seed.unwrap_or_else(rand::random);
    let seeds: Vec<u64> = (0..args.num_images as u64)
        .map(|k| first_seed + k)
        .collect();
    let options = GenerateOptions {
        guidance_interval: interval(&args.model.sampling.cfg_interval)?,
        steps: sampling.steps,
        guidance_scale: sampling.cfg,
        kind,
        seeds: seeds.clone(),
        negative_prompt: args.negative_prompt.clone(),
        size: args.height.zip(args.width),
        initial_noise: args
            .latents
            .as_deref()
            .map(|path| pipeline::read_noise(path, &chosen.device))
            .transpose()?,
        sigmas: sampling.sigmas.clone(),
    };
    let loaded = start.elapsed();
    let progress =
        |p: portaflow::sample::pipeline::Progress| eprint!("\rstep {}/{}", p.step, p.steps);
    let images = match encoded {
        Some((cond, uncond)) => {
            let uncond = pipe.runs_cfg(options.guidance_scale).then_some(uncond);
            let latents =
                pipe.sample_conditioned(cond, uncond, &options, &chosen.device, progress, None)?;
            pipeline::to_images(pipe.decode(latents))
        }
        None => pipe.generate(&prompts, &options, &chosen.device, progress, None)?,
    };
    eprintln!();
    for (k, (image, seed)) in images.iter().zip(&seeds).enumerate() {
        let path = if images.len() == 1 {
            args.out.clone()
        } else {
            let stem = args
                .out
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or("out");
            args.out.with_file_name(format!("{stem}-{k}.png"))
        };
        let text = [
            ("prompt", args.prompt.clone()),
            ("negative_prompt", args.negative_prompt.clone()),
            ("seed", seed.to_string()),
            ("sampler", sampling.sampler.clone()),
            ("steps", sampling.steps.to_string()),
            ("cfg", sampling.cfg.to_string()),
            ("model", dir.display().to_string()),
            ("loras", args.model.loras.join(" ")),
            (
                "software",
                format!("portaflow {}", env!("CARGO_PKG_VERSION")),
            ),
        ];
        image_io::save_png(image, &path, &text)?;
        println!("{} (seed {seed})", path.display());
    }
    println!(
        "{} image(s) {}×{} on {chosen}: load {:.1} s, sampling {:.1} s",
        images.len(),
        images[0].width,
        images[0].height,
        loaded.as_secs_f64(),
        (start.elapsed() - loaded).as_secs_f64()
    );
    Ok(())
}

fn pretrain(request: DeviceRequest, args: PretrainArgs) -> Result<()> {
    let chosen = device::select(request)?;
    let device = chosen.device.clone().autodiff();
    let prompts = args.prompts.clone().unwrap_or_else(|| {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../assets/prompts/shapes_train.jsonl")
    });
    let train = prompt::read_jsonl(&prompts)?;
    let resumed = pretrain::resumed_config(&args.out)?;
    let mut config = match &resumed {
        Some(stored) => {
            // A resumed run keeps its data, batch and optimiser settings, or it would not
            // continue exactly; only its length, schedule and checkpoint interval may change.
            // Rerunning the command that started it passes them again, unchanged.
            let differs = stored.resume_conflicts(&pretrain::ResumeFlags {
                batch_size: args.batch_size,
                learning_rate: args.lr,
                seed: args.seed,
                ema_decay: args.ema_decay,
                sigma_mean: args.sigma_mean,
                sigma_std: args.sigma_std,
            });
            anyhow::ensure!(
                differs.is_empty(),
                "{} is resumed with its stored settings, which cannot change: {}",
                args.out.display(),
                differs.join(", ")
            );
            stored.clone()
        }
        None => PretrainConfig::default(),
    };
    if let Some(v) = args.steps {
        config.steps = v;
    }
    if let Some(v) = args.batch_size {
        config.batch_size = v;
    }
    if let Some(v) = args.lr {
        config.learning_rate = v;
    }
    if let Some(v) = args.seed {
        config.seed = v;
    }
    if let Some(v) = args.checkpoint_every {
        config.checkpoint_every = v;
    }
    if let Some(v) = args.decay_steps {
        config.decay_steps = v;
    }
    if let Some(v) = args.sigma_mean {
        anyhow::ensure!(v.is_finite(), "--sigma-mean must be finite, got {v}");
        config.sigma_mean = v;
    }
    if let Some(v) = args.sigma_std {
        anyhow::ensure!(v.is_finite() && v > 0.0, "--sigma-std must be > 0, got {v}");
        config.sigma_std = v;
    }
    if let Some(v) = args.loss_sigma_floor {
        anyhow::ensure!(
            v > 0.0 && v <= 1.0,
            "--loss-sigma-floor must be in (0, 1], got {v}"
        );
        config.loss_sigma_floor = v;
    }
    if let Some(v) = args.ema_decay {
        anyhow::ensure!(
            (0.0..1.0).contains(&v),
            "--ema-decay must be in [0, 1), got {v}"
        );
        config.ema_decay = v;
    }
    let defaults = pipeline::ShapesArchitecture::default();
    let arch = pipeline::ShapesArchitecture {
        patch_size: args.patch_size.unwrap_or(match args.vae {
            Some(_) => 2,
            None => defaults.patch_size,
        }),
        width: args.width.unwrap_or(defaults.width),
        layers: args.layers.unwrap_or(defaults.layers),
    };
    let new_shape = args.patch_size.is_some()
        || args.width.is_some()
        || args.layers.is_some()
        || args.vae.is_some()
        || args.warm_start.is_some();
    anyhow::ensure!(
        !new_shape || resumed.is_some() || args.init.is_none(),
        "--patch-size, --width, --layers, --vae and --warm-start shape a new model; an --init model keeps its own"
    );
    if resumed.is_some() && (new_shape || args.init.is_some() || args.init_step.is_some()) {
        println!(
            "{} holds a run: its checkpoint fixes the model, so --init, --init-step and the new-model flags are not used",
            args.out.display()
        );
    }
    let vae = match &args.vae {
        Some(dir) => Some(
            portaflow::model::vae::load_dir(dir, &device)
                .with_context(|| format!("loading the autoencoder from {}", dir.display()))?,
        ),
        None => None,
    };
    let grid = pipeline::SHAPES_RESOLUTION / vae.as_ref().map_or(1, |v| v.config.downscale());
    anyhow::ensure!(
        arch.patch_size > 0 && grid % arch.patch_size == 0,
        "--patch-size must divide the grid side {grid}, got {}",
        arch.patch_size
    );
    anyhow::ensure!(
        arch.width >= 32 && arch.width % 32 == 0 && arch.layers > 0,
        "--width must be a positive multiple of 32 and --layers positive, got {} and {}",
        arch.width,
        arch.layers
    );
    let first_step = args.init_step.unwrap_or(0);
    anyhow::ensure!(
        first_step < config.steps,
        "--init-step {first_step} leaves nothing to train: the run ends at step {}",
        config.steps
    );
    let pipe = if resumed.is_some() {
        println!("resuming {}", args.out.display());
        Pipeline::from_dir(&args.out.join("checkpoint"), &device)?
    } else if let Some(init) = &args.init {
        println!("continuing {} from step {first_step}", init.display());
        Pipeline::from_dir(init, &device)?
    } else {
        let words = prompt::vocabulary();
        let word_level = tokenizer::word_level(&words)?;
        let start_id = word_level
            .token_to_id(tokenizer::START)
            .expect("start token");
        let end_id = word_level.token_to_id(tokenizer::END).expect("end token");
        let (text, mut transformer) =
            pipeline::shapes_configs(word_level.get_vocab_size(true), start_id, end_id, arch);
        if let Some(vae) = &vae {
            transformer = pipeline::on_latents(transformer, &vae.config);
        }
        let tok = tokenizer::PromptTokenizer {
            tokenizer: word_level,
            max_length: text.max_position_embeddings,
            pad_id: 0,
            truncate: false,
        };
        let fresh = Pipeline::fresh(tok, text, transformer, vae, config.seed, &device)?;
        match &args.warm_start {
            None => fresh,
            Some(dir) => {
                let source = Pipeline::from_dir(dir, &chosen.device)
                    .with_context(|| format!("loading the warm start {}", dir.display()))?;
                let (pipe, report) = pretrain::warm_start(fresh, &source)?;
                println!(
                    "warm start from {}: {} tensors copied; fresh: {}",
                    dir.display(),
                    report.copied,
                    report.kept.join(", ")
                );
                pipe
            }
        }
    };
    let params = pipe.transformer.parameters() + pipe.text.parameters();
    println!(
        "pretraining {params} parameters on {chosen}: {} steps of {} images",
        config.steps, config.batch_size
    );
    let start = Instant::now();
    let stop = cli::stop_on_ctrl_c("step")?;
    let log = |m: &pretrain::PretrainMetrics| {
        println!(
            "step {:>6}  loss {:.4}  lr {:.2e}  {:.2} s/step  ({:.0} s)",
            m.step,
            m.loss,
            m.learning_rate,
            m.seconds_per_step,
            start.elapsed().as_secs_f64()
        );
    };
    let (_, reached) = pretrain::pretrain_until(
        pipe, &config, first_step, &train, &args.out, &device, log, &stop,
    )?;
    if stop.load(std::sync::atomic::Ordering::SeqCst) {
        println!(
            "stopped after step {reached}; checkpoint {} (rerun the same command to resume)",
            args.out.join("checkpoint").display()
        );
        return Ok(());
    }
    println!(
        "done: {} (load it with --model {})",
        args.out.join("checkpoint").display(),
        args.out.join("checkpoint").display()
    );
    Ok(())
}

/// `generate`'s and `eval`'s sampler settings: the flags given, else the first `--lora`
/// folder's `sampling.json` (a few-step student's own), else the defaults (20 Euler steps, CFG 4).
struct Sampling {
    sampler: String,
    steps: usize,
    cfg: f64,
    sigmas: Option<Vec<f64>>,
}

impl Sampling {
    fn resolve(model: &ModelArgs) -> Result<Self> {
        let args = &model.sampling;
        let mut card = None;
        for spec in &model.loras {
            let (dir, _) = cli::lora::parse_spec(spec)?;
            if let Some(parsed) =
                portaflow::lora::AdapterSampling::read(&dir).map_err(anyhow::Error::msg)?
            {
                card = Some(parsed);
                break;
            }
        }
        if let Some(c) = &card {
            eprintln!(
                "sampling as the student's sampling.json says: {} at σ {:?}, CFG {} (flags override)",
                c.sampler, c.sigmas, c.guidance_scale
            );
        }
        let card_sampler = card.as_ref().map(|c| match c.eta {
            Some(eta) => format!("{}:{eta}", c.sampler),
            None => c.sampler.clone(),
        });
        Ok(Self {
            sampler: args
                .sampler
                .clone()
                .or(card_sampler)
                .unwrap_or_else(|| "euler".into()),
            steps: args
                .steps
                .or(card.as_ref().map(|c| c.sigmas.len()))
                .unwrap_or(20),
            cfg: args
                .cfg
                .or(card.as_ref().map(|c| c.guidance_scale))
                .unwrap_or(4.0),
            // The card's σ list applies unless the steps or the σ list were given.
            sigmas: match (&args.sigmas, args.steps) {
                (Some(s), _) => Some(s.clone()),
                (None, Some(_)) => None,
                (None, None) => card.map(|c| c.sigmas),
            },
        })
    }
}

/// `--sampler NAME[:NOISE]`: `sde:0.8` sets the Flow-SDE noise level, `cps:0.5` the CPS η.
fn sampler_kind(spec: &str) -> Result<StepKind> {
    let (name, noise) = match spec.split_once(':') {
        Some((name, value)) => {
            let noise: f64 = value
                .parse()
                .map_err(|_| anyhow::anyhow!("--sampler {spec}: `{value}` is not a number"))?;
            (name, Some(noise))
        }
        None => (spec, None),
    };
    let kind = match (name, noise) {
        ("euler", None) => StepKind::Euler,
        ("euler", Some(_)) => anyhow::bail!("--sampler {spec}: euler takes no noise level"),
        ("sde", noise) => StepKind::FlowSde {
            noise_level: noise.unwrap_or(0.7),
        },
        ("cps", eta) => StepKind::Cps {
            eta: eta.unwrap_or(0.9),
        },
        _ => anyhow::bail!("unknown sampler `{spec}` (euler, sde[:LEVEL], cps[:ETA])"),
    };
    kind.validate()
        .map_err(|e| anyhow::anyhow!("--sampler {spec}: {e}"))?;
    Ok(kind)
}

/// `--cfg-interval LOW,HIGH`.
fn interval(values: &Option<Vec<f64>>) -> Result<Option<(f64, f64)>> {
    match values.as_deref() {
        None => Ok(None),
        Some(&[low, high]) => Ok(Some((low, high))),
        Some(other) => anyhow::bail!("--cfg-interval takes LOW,HIGH (two numbers), got {other:?}"),
    }
}

fn eval(request: DeviceRequest, args: EvalArgs) -> Result<()> {
    let start = Instant::now();
    let report = if let Some(dir) = &args.images {
        eval::evaluate_folder(dir)?
    } else {
        let path = args
            .prompts
            .as_ref()
            .expect("clap requires --prompts or --images");
        let specs = prompt::read_jsonl(path)?;
        anyhow::ensure!(!specs.is_empty(), "{}: no prompts", path.display());
        let chosen = device::select(request)?;
        let dir = args.model.dir();
        let mut pipe = Pipeline::from_dir(&dir, &chosen.device)
            .with_context(|| format!("loading the model from {}", dir.display()))?;
        cli::lora::apply(&mut pipe, &args.model.loras, &chosen.device, true)?;
        let sampling = Sampling::resolve(&args.model)?;
        let options = eval::EvalOptions {
            images_per_prompt: args.images_per_prompt,
            batch_size: args.batch_size,
            generate: GenerateOptions {
                guidance_interval: interval(&args.model.sampling.cfg_interval)?,
                steps: sampling.steps,
                guidance_scale: sampling.cfg,
                kind: sampler_kind(&sampling.sampler)?,
                seeds: vec![],
                negative_prompt: String::new(),
                size: None,
                initial_noise: None,
                sigmas: sampling.sigmas,
            },
            seed: args.seed,
        };
        println!(
            "evaluating {} on {} prompts × {} images on {chosen}",
            dir.display(),
            specs.len(),
            args.images_per_prompt
        );
        eval::evaluate_pipeline(
            &pipe,
            &specs,
            &options,
            &chosen.device,
            args.save_images.as_deref(),
            {
                // A redrawn counter on a terminal; each new tenth on a line of its own in a log.
                let mut tenths_shown = 0;
                move |done, total| {
                    if std::io::stderr().is_terminal() {
                        eprint!("\r{done}/{total} images");
                    } else if done * 10 / total.max(1) > tenths_shown {
                        tenths_shown = done * 10 / total.max(1);
                        eprintln!("{done}/{total} images");
                    }
                }
            },
        )?
    };
    eprintln!();
    print!("{}", eval::table(&report));
    if !report.missing_tags().is_empty() {
        println!("(no images for: {})", report.missing_tags().join(", "));
    }
    println!("{:.1} s", start.elapsed().as_secs_f64());
    if let Some(out) = &args.out {
        std::fs::write(out, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", out.display()))?;
        println!("report: {}", out.display());
    }
    Ok(())
}

/// The error and its causes, leaving out a cause its parent's message already quotes (library
/// errors print their I/O cause themselves, so anyhow's `{:#}` would say it twice).
fn describe(err: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in err.chain() {
        let line = cause.to_string();
        if !text.contains(&line) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&line);
        }
    }
    text
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve_for(command: &[&str], extra: &[&str]) -> Sampling {
        let student = concat!(env!("CARGO_MANIFEST_DIR"), "/../assets/models/shapes-4nfe");
        let mut argv = vec!["portaflow"];
        argv.extend_from_slice(command);
        argv.extend_from_slice(extra);
        let argv: Vec<String> = argv.iter().map(|a| a.replace("STUDENT", student)).collect();
        match Cli::try_parse_from(argv).unwrap().command {
            Command::Generate(args) => Sampling::resolve(&args.model).unwrap(),
            Command::Eval(args) => Sampling::resolve(&args.model).unwrap(),
            _ => unreachable!(),
        }
    }

    fn resolve(extra: &[&str]) -> Sampling {
        resolve_for(&["generate", "--prompt", "a red circle"], extra)
    }

    /// A student's sampling.json sets what the flags leave open; flags win; without a student
    /// the defaults stand.
    #[test]
    fn generate_and_eval_take_a_students_sampling_unless_flags_say_otherwise() {
        let plain = resolve(&[]);
        assert_eq!(
            (plain.sampler.as_str(), plain.steps, plain.cfg),
            ("euler", 20, 4.0)
        );
        assert_eq!(plain.sigmas, None);
        let card = portaflow::lora::AdapterSampling::from_json(
            &std::fs::read_to_string(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../assets/models/shapes-4nfe/sampling.json"
            ))
            .unwrap(),
        )
        .unwrap();
        let student = resolve(&["--lora", "STUDENT"]);
        assert_eq!(student.steps, card.sigmas.len());
        assert_eq!(student.cfg, card.guidance_scale);
        assert_eq!(student.sigmas.as_ref(), Some(&card.sigmas));
        assert!(student.sampler.starts_with(&card.sampler));
        let weighted = resolve(&["--lora", "STUDENT:0.5", "--cfg", "2"]);
        assert_eq!(
            (weighted.cfg, weighted.sigmas.as_ref()),
            (2.0, Some(&card.sigmas))
        );
        let stepped = resolve(&["--lora", "STUDENT", "--steps", "8", "--sampler", "cps"]);
        assert_eq!((stepped.steps, stepped.sigmas), (8, None));
        assert_eq!(stepped.sampler, "cps");
        // `eval` resolves the same way.
        let eval = ["eval", "--prompts", "p.jsonl"];
        let scored = resolve_for(&eval, &["--lora", "STUDENT"]);
        assert_eq!(scored.sigmas.as_ref(), Some(&card.sigmas));
        assert_eq!(scored.cfg, card.guidance_scale);
        let base = resolve_for(&eval, &[]);
        assert_eq!((base.steps, base.cfg, base.sigmas), (20, 4.0, None));
    }
}
