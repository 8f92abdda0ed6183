//! `portaflow bench`: sampling throughput at a few step counts and batch sizes, and one Flow-GRPO
//! iteration of a training config, with peak memory per phase, on the chosen device. The PyTorch
//! reference of the same workload is `tools/bench/shapes_torch.py`; `tools/bench/shapes.sh` runs
//! both and writes the comparison into BENCHMARKS.md.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use serde::Serialize;

use burn::tensor::{Device, Distribution, Tensor};
use portaflow::device::{self, DeviceRequest};
use portaflow::model::sd3::{Sd3Config, Sd3Transformer};
use portaflow::pipeline::{self, GenerateOptions, Pipeline, Transformer};
use portaflow::train::grpo::GrpoTrainer;
use portaflow::train::grpo::config::GrpoConfig;
use portaflow::train::{peak_memory_mib, reset_peak_memory};

#[derive(clap::Args)]
pub struct BenchArgs {
    /// A pipeline folder (default: the bundled model).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Denoising step counts (NFE per image without CFG).
    #[arg(long, value_delimiter = ',', default_value = "4,20")]
    steps: Vec<usize>,
    /// Images per generate call.
    #[arg(long, value_delimiter = ',', default_value = "1,16")]
    batches: Vec<usize>,
    /// Classifier-free guidance scale (> 1 runs the transformer on twice the batch).
    #[arg(long, default_value_t = 4.0)]
    cfg: f64,
    /// Timed repetitions per setting (the median is reported).
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Untimed repetitions first (kernel compilation, autotune, allocator warm-up).
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// LoRA adapters to sample with, `PATH[:WEIGHT]`, merged into the weights as `generate`
    /// does; repeat to stack.
    #[arg(long = "lora")]
    loras: Vec<String>,
    /// Keep the adapters' side paths instead of merging them (to measure what merging saves).
    #[arg(long)]
    lora_side_path: bool,
    /// Also time Flow-GRPO iterations of this config (e.g. configs/grpo-shapes.toml).
    #[arg(long)]
    grpo: Option<PathBuf>,
    /// GRPO iterations to run; the first includes first-use costs and is reported apart.
    #[arg(long, default_value_t = 2)]
    grpo_iterations: usize,
    /// Also time one transformer forward of fresh models while image tokens, model width and
    /// batch vary one at a time around the bundled architecture.
    #[arg(long)]
    scaling: bool,
    /// Write the results as JSON here too.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Serialize)]
struct Report {
    device: String,
    model: String,
    parameters: usize,
    image_tokens: usize,
    text_tokens: usize,
    cfg: f64,
    runs: usize,
    sampling: Vec<SamplingResult>,
    grpo: Vec<GrpoResult>,
    scaling: Vec<ScalingResult>,
}

#[derive(Serialize)]
struct ScalingResult {
    /// What this row varies: "tokens", "width" or "batch".
    varies: &'static str,
    image_side: usize,
    image_tokens: usize,
    width: usize,
    batch: usize,
    median_ms: f64,
    gflops: f64,
}

#[derive(Serialize)]
struct SamplingResult {
    steps: usize,
    batch: usize,
    /// Time of the first (warm-up) call, with first-use costs.
    first_seconds: f64,
    median_seconds: f64,
    min_seconds: f64,
    images_per_second: f64,
    /// Transformer forward FLOPs per call (matmuls only, analytic) / median time.
    gflops: f64,
    /// Medians of the call's phases: text encoding (prompts and, with CFG, the negative prompt),
    /// the denoising loop, and the autoencoder's decode with the 8-bit images' readback.
    encode_seconds: f64,
    denoise_seconds: f64,
    decode_seconds: f64,
    peak_memory_mib: Option<f64>,
}

#[derive(Serialize)]
struct GrpoResult {
    iteration: usize,
    seconds: f64,
    seconds_rollout: f64,
    seconds_reward_wait: f64,
    seconds_train: f64,
    images: usize,
    peak_memory_mib: Option<f64>,
}

pub fn run(request: DeviceRequest, args: BenchArgs) -> Result<()> {
    if args.runs == 0 || args.steps.contains(&0) || args.batches.contains(&0) {
        bail!("--runs, --steps and --batches must be at least 1");
    }
    let chosen = device::select(request)?;
    let model = args.model.clone().unwrap_or_else(pipeline::bundled_dir);
    let mut pipe = Pipeline::from_dir(&model, &chosen.device)
        .with_context(|| format!("loading {}", model.display()))?;
    super::lora::apply(&mut pipe, &args.loras, &chosen.device, !args.lora_side_path)?;
    let flops = TransformerFlops::of(&pipe)?;
    println!("bench on {chosen}: {}", model.display());
    println!(
        "transformer: {} parameters, {} image tokens, {} text tokens",
        flops.parameters, flops.image_tokens, flops.text_tokens
    );
    let cfg_factor = if args.cfg > 1.0 { 2 } else { 1 };
    let prompt = "a photo of a red circle left of a blue square".to_string();
    let mut sampling = Vec::new();
    println!(
        "{:>5} {:>5} {:>10} {:>10} {:>10} {:>10} {:>8} {:>24} {:>10}",
        "steps",
        "batch",
        "first s",
        "median s",
        "min s",
        "images/s",
        "GFLOP/s",
        "encode/denoise/decode s",
        "peak MiB"
    );
    for &steps in &args.steps {
        for &batch in &args.batches {
            reset_peak_memory();
            let options = GenerateOptions::euler(steps, args.cfg, (0..batch as u64).collect());
            let prompts = vec![prompt.clone(); batch];
            // One call = `Pipeline::generate` in its three phases, each waited for, so that the
            // phases add up to the call.
            let call = || -> Result<[f64; 4]> {
                let start = Instant::now();
                let (cond, uncond) = pipe.conditioning(&prompts, &options, &chosen.device)?;
                chosen.device.sync()?;
                let encoded = Instant::now();
                let latents =
                    pipe.sample_conditioned(cond, uncond, &options, &chosen.device, |_| {}, None)?;
                chosen.device.sync()?;
                let denoised = Instant::now();
                let images = pipeline::to_images(pipe.decode(latents));
                anyhow::ensure!(images.len() == batch, "expected {batch} images");
                let end = Instant::now();
                Ok([
                    (end - start).as_secs_f64(),
                    (encoded - start).as_secs_f64(),
                    (denoised - encoded).as_secs_f64(),
                    (end - denoised).as_secs_f64(),
                ])
            };
            let mut first = 0.0;
            for k in 0..args.warmup {
                let t = call()?;
                if k == 0 {
                    first = t[0];
                }
            }
            let calls: Vec<[f64; 4]> = (0..args.runs).map(|_| call()).collect::<Result<_>>()?;
            let phase = |i: usize| {
                let mut t: Vec<f64> = calls.iter().map(|c| c[i]).collect();
                t.sort_by(f64::total_cmp);
                t
            };
            let times = phase(0);
            let median = times[times.len() / 2];
            let work = flops.forward(batch * cfg_factor) * steps as f64;
            let result = SamplingResult {
                steps,
                batch,
                first_seconds: if args.warmup > 0 { first } else { f64::NAN },
                median_seconds: median,
                min_seconds: times[0],
                images_per_second: batch as f64 / median,
                gflops: work / median / 1e9,
                encode_seconds: phase(1)[args.runs / 2],
                denoise_seconds: phase(2)[args.runs / 2],
                decode_seconds: phase(3)[args.runs / 2],
                peak_memory_mib: peak_memory_mib(),
            };
            println!(
                "{:>5} {:>5} {:>10.3} {:>10.3} {:>10.3} {:>10.2} {:>8.2} {:>24} {:>10.0}",
                steps,
                batch,
                result.first_seconds,
                median,
                result.min_seconds,
                result.images_per_second,
                result.gflops,
                format!(
                    "{:.3} / {:.3} / {:.3}",
                    result.encode_seconds, result.denoise_seconds, result.decode_seconds
                ),
                result.peak_memory_mib.unwrap_or(f64::NAN)
            );
            sampling.push(result);
        }
    }
    drop(pipe);
    let mut grpo = Vec::new();
    if let Some(path) = &args.grpo {
        let mut config = GrpoConfig::from_file(path).map_err(anyhow::Error::msg)?;
        config.model.path = Some(model.clone());
        // Iterations only: no held-out evaluation, grids or checkpoints in the timings (one
        // epoch more than is run, so none of them is the last, which saves the adapter).
        config.run.epochs = args.grpo_iterations + 1;
        config.run.eval_every = 0;
        config.run.grid_every = 0;
        config.run.save_every = usize::MAX;
        let images = config.sample.group_size * config.sample.groups_per_epoch;
        let run_dir = std::env::temp_dir().join(format!("portaflow-bench-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&run_dir);
        let device = chosen.device.clone().autodiff();
        let mut trainer = GrpoTrainer::open(config, &run_dir, &device)
            .with_context(|| format!("starting GRPO from {}", path.display()))?;
        println!(
            "flow-grpo iterations of {} ({images} images each):",
            path.display()
        );
        for iteration in 0..args.grpo_iterations {
            reset_peak_memory();
            let start = Instant::now();
            let m = trainer.epoch(|_| {})?;
            let result = GrpoResult {
                iteration,
                seconds: start.elapsed().as_secs_f64(),
                seconds_rollout: m.seconds_rollout,
                seconds_reward_wait: m.seconds_reward_wait,
                seconds_train: m.seconds_train,
                images,
                peak_memory_mib: peak_memory_mib(),
            };
            println!(
                "  iteration {iteration}: {:.2} s (rollout {:.2} s, reward wait {:.2} s, train {:.2} s), peak {:.0} MiB",
                result.seconds,
                result.seconds_rollout,
                result.seconds_reward_wait,
                result.seconds_train,
                result.peak_memory_mib.unwrap_or(f64::NAN)
            );
            grpo.push(result);
        }
        drop(trainer);
        let _ = std::fs::remove_dir_all(&run_dir);
    }
    let scaling = if args.scaling {
        scaling_rows(&chosen.device, args.runs, args.warmup)?
    } else {
        Vec::new()
    };
    let report = Report {
        device: chosen.to_string(),
        model: model.display().to_string(),
        parameters: flops.parameters,
        image_tokens: flops.image_tokens,
        text_tokens: flops.text_tokens,
        cfg: args.cfg,
        runs: args.runs,
        sampling,
        grpo,
        scaling,
    };
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&report)?;
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// Analytic matmul FLOPs of one forward of the SD3 MMDiT (the bundled architecture): each block's
/// two streams run q, k, v, out (4d²) and a 4× MLP (8d²) per token, joint attention costs
/// 2·T²·d for QKᵀ and again for AV, and the final block drops the text stream's out and MLP.
struct TransformerFlops {
    parameters: usize,
    image_tokens: usize,
    text_tokens: usize,
    width: usize,
    layers: usize,
    patch_values: usize,
}

impl TransformerFlops {
    fn of(pipe: &Pipeline) -> Result<Self> {
        let Transformer::Sd3(t) = &pipe.transformer else {
            bail!("FLOP counting covers the SD3 MMDiT only; this model is another family");
        };
        let pipeline::text::TextStack::Clip(clip) = &pipe.text else {
            bail!("FLOP counting covers the bundled Shapes architecture (one CLIP text encoder)");
        };
        let side = pipe.index.pixel_resolution.unwrap_or(t.config.sample_size);
        Ok(Self::new(
            &t.config,
            side,
            clip.tokenizer.max_length,
            burn::module::Module::num_params(t),
        ))
    }

    fn new(c: &Sd3Config, image_side: usize, text_tokens: usize, parameters: usize) -> Self {
        let side = image_side / c.patch_size;
        Self {
            parameters,
            image_tokens: side * side,
            text_tokens,
            width: c.inner_dim(),
            layers: c.num_layers,
            patch_values: c.patch_size * c.patch_size * c.in_channels,
        }
    }

    /// FLOPs of one forward on `batch` samples.
    fn forward(&self, batch: usize) -> f64 {
        let (ti, tt, d) = (
            self.image_tokens as f64,
            self.text_tokens as f64,
            self.width as f64,
        );
        let t = ti + tt;
        let linear = |tokens: f64, per_token: f64| 2.0 * tokens * per_token * d * d;
        let block = linear(t, 12.0) + 4.0 * t * t * d;
        let last_block_saving = linear(tt, 9.0);
        let patch_io = 2.0 * ti * (self.patch_values as f64) * d * 2.0;
        batch as f64 * (self.layers as f64 * block - last_block_saving + patch_io)
    }
}

/// Forward time of fresh Shapes-architecture transformers, varying one of image tokens, width
/// and batch around (64×64 at patch 8 = 64 tokens, width 128, batch 8), 16 text tokens.
fn scaling_rows(device: &Device, runs: usize, warmup: usize) -> Result<Vec<ScalingResult>> {
    const TEXT_TOKENS: usize = 16;
    let base = (64, 128, 8);
    let mut settings: Vec<(&'static str, (usize, usize, usize))> = Vec::new();
    for side in [32, 64, 128] {
        settings.push(("tokens", (side, base.1, base.2)));
    }
    for width in [64, 128, 256] {
        settings.push(("width", (base.0, width, base.2)));
    }
    for batch in [1, 8, 32] {
        settings.push(("batch", (base.0, base.1, batch)));
    }
    println!("scaling (one transformer forward of a fresh model, 6 blocks, patch 8):");
    println!(
        "{:>7} {:>5} {:>7} {:>6} {:>6} {:>11} {:>8}",
        "varies", "side", "tokens", "width", "batch", "median ms", "GFLOP/s"
    );
    let mut rows = Vec::new();
    for (varies, (side, width, batch)) in settings {
        let arch = pipeline::ShapesArchitecture {
            width,
            ..Default::default()
        };
        let (_, mut config) = pipeline::shapes_configs(64, 1, 2, arch);
        config.sample_size = side;
        config.pos_embed_max_size = side / config.patch_size;
        let model = Sd3Transformer::init(config.clone(), 0, device)?;
        let flops = TransformerFlops::new(&config, side, TEXT_TOKENS, 0);
        let normal = Distribution::Normal(0.0, 1.0);
        let x = Tensor::<4>::random([batch, 3, side, side], normal, device);
        let context = Tensor::<3>::random([batch, TEXT_TOKENS, width], normal, device);
        let pooled = Tensor::<2>::random([batch, width], normal, device);
        let timesteps = vec![500.0; batch];
        let call = || {
            let start = Instant::now();
            let out = model.forward(x.clone(), &timesteps, context.clone(), pooled.clone());
            let _ = out.into_data();
            start.elapsed().as_secs_f64()
        };
        for _ in 0..warmup.max(1) {
            call();
        }
        let mut times: Vec<f64> = (0..runs).map(|_| call()).collect();
        times.sort_by(f64::total_cmp);
        let median = times[times.len() / 2];
        let row = ScalingResult {
            varies,
            image_side: side,
            image_tokens: flops.image_tokens,
            width,
            batch,
            median_ms: median * 1e3,
            gflops: flops.forward(batch) / median / 1e9,
        };
        println!(
            "{:>7} {:>5} {:>7} {:>6} {:>6} {:>11.2} {:>8.2}",
            varies, side, row.image_tokens, width, batch, row.median_ms, row.gflops
        );
        rows.push(row);
    }
    Ok(rows)
}
