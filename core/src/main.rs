//! The `portaflow` command line.

use std::time::Instant;

use anyhow::{Context, Result};
use burn::tensor::{Distribution, Tensor};
use clap::{Parser, Subcommand};

use portaflow::device::{self, Backend, ChosenDevice, DeviceRequest};
use portaflow::sample::schedule::Schedule;
use portaflow::sample::step;

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
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    let request = DeviceRequest::from_arg_or_env(cli.device.as_deref())?;
    match cli.command {
        Command::Info => info(request),
    }
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

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}
