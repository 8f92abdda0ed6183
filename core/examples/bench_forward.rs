//! Forward time of each tiny golden model (the fixtures under `assets/golden/`, the same weights
//! and inputs `tools/bench/forward.py` gives diffusers) on the Flex CPU backend and on the Vulkan
//! adapter. The Rust side of `tools/bench/forward.sh`, which writes BENCHMARKS.md.
//!
//! Each model: load, run `--warmup` forwards (on wgpu the first ones compile and autotune
//! kernels), then time `--runs` forwards one by one and report the median. A timed forward ends
//! when its output is back on the host (`into_data`), so nothing is left queued on the device.
//! Then the Flow-SDE sampler step on a few latent sizes, as tensor ops and (on wgpu) as the fused
//! WGSL kernel, each synchronised with the device. Prints one JSON object on stdout.
//!
//! Run: `cargo build --workspace --examples && target/debug/examples/bench_forward [--runs N]
//! [--warmup N] [--devices flex,vulkan]`

use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::tensor::{Device, Tensor, TensorData};
use portaflow::device::{self, ChosenDevice, DeviceRequest};
use portaflow::model::weights::Weights;
use portaflow::model::{flux1, flux2, sd3, vae};
use portaflow::sample::step;

fn golden(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../assets/golden")
        .join(name)
}

/// The inputs of a fixture's `io.safetensors`.
struct Io(Weights);

impl Io {
    fn open(fixture: &str) -> Self {
        Self(Weights::open_file(&golden(fixture).join("io.safetensors")).expect("io file"))
    }

    fn values(&mut self, key: &str) -> (Vec<usize>, Vec<f32>) {
        let shape = self
            .0
            .shape(key)
            .unwrap_or_else(|| panic!("io has no {key}"));
        let values = self.0.read(key, &shape).unwrap().unwrap();
        (shape, values)
    }

    fn tensor<const D: usize>(&mut self, key: &str, device: &Device) -> Tensor<D> {
        let (shape, values) = self.values(key);
        let shape: [usize; D] = shape.try_into().expect("rank");
        Tensor::from_data(TensorData::new(values, shape), device)
    }

    fn scalars(&mut self, key: &str) -> Vec<f64> {
        self.values(key).1.into_iter().map(f64::from).collect()
    }

    /// Position ids `[n, axes]` as one row per token.
    fn rows(&mut self, key: &str) -> Vec<Vec<f64>> {
        let (shape, values) = self.values(key);
        values
            .chunks(shape[1])
            .map(|row| row.iter().map(|&v| f64::from(v)).collect())
            .collect()
    }
}

/// One forward of a model on its golden inputs, ending with the output on the host.
type Forward = Box<dyn Fn() -> TensorData>;

fn sd3_case(fixture: &str, device: &Device) -> Forward {
    let model = sd3::load_dir(&golden(fixture), device).expect("load");
    let mut io = Io::open(fixture);
    let x: Tensor<4> = io.tensor("hidden_states", device);
    let context: Tensor<3> = io.tensor("encoder_hidden_states", device);
    let pooled: Tensor<2> = io.tensor("pooled_projections", device);
    let t = io.scalars("timestep");
    Box::new(move || {
        model
            .forward(x.clone(), &t, context.clone(), pooled.clone())
            .into_data()
    })
}

fn flux1_case(fixture: &str, device: &Device) -> Forward {
    let model = flux1::load_dir(&golden(fixture), device).expect("load");
    let mut io = Io::open(fixture);
    let x: Tensor<3> = io.tensor("hidden_states", device);
    let context: Tensor<3> = io.tensor("encoder_hidden_states", device);
    let pooled: Tensor<2> = io.tensor("pooled_projections", device);
    let (t, g) = (io.scalars("timestep"), io.scalars("guidance"));
    let (img_ids, txt_ids) = (io.rows("img_ids"), io.rows("txt_ids"));
    Box::new(move || {
        model
            .forward(
                x.clone(),
                &t,
                Some(&g),
                context.clone(),
                pooled.clone(),
                &img_ids,
                &txt_ids,
            )
            .into_data()
    })
}

fn flux2_case(fixture: &str, device: &Device) -> Forward {
    let model = flux2::load_dir(&golden(fixture), device).expect("load");
    let mut io = Io::open(fixture);
    let x: Tensor<3> = io.tensor("hidden_states", device);
    let context: Tensor<3> = io.tensor("encoder_hidden_states", device);
    let t = io.scalars("timestep");
    let (img_ids, txt_ids) = (io.rows("img_ids"), io.rows("txt_ids"));
    Box::new(move || {
        model
            .forward(x.clone(), &t, None, context.clone(), &img_ids, &txt_ids)
            .into_data()
    })
}

/// The raw decoder on the VAE-space latent (what diffusers' `vae.decode` does).
fn vae_decode_case(fixture: &str, device: &Device) -> Forward {
    let model = vae::load_dir(&golden(fixture), device).expect("load");
    let latent: Tensor<4> = Io::open(fixture).tensor("latent", device);
    Box::new(move || model.decode_raw(latent.clone()).into_data())
}

const CASES: [(&str, fn(&Device) -> Forward); 6] = [
    ("sd3_tiny", |d| sd3_case("sd3_tiny", d)),
    ("sd35_tiny", |d| sd3_case("sd35_tiny", d)),
    ("flux1_tiny", |d| flux1_case("flux1_tiny", d)),
    ("flux2_tiny", |d| flux2_case("flux2_tiny", d)),
    ("vae_sd3_tiny.decode", |d| {
        vae_decode_case("vae_sd3_tiny", d)
    }),
    ("vae_flux2_tiny.decode", |d| {
        vae_decode_case("vae_flux2_tiny", d)
    }),
];

/// Median wall time of `run` after `warmup` untimed calls.
fn median_ms(run: &dyn Fn(), warmup: usize, runs: usize) -> f64 {
    for _ in 0..warmup {
        run();
    }
    let mut times: Vec<f64> = (0..runs)
        .map(|_| {
            let start = Instant::now();
            run();
            start.elapsed().as_secs_f64() * 1000.0
        })
        .collect();
    times.sort_by(f64::total_cmp);
    let mid = times.len() / 2;
    if times.len() % 2 == 1 {
        times[mid]
    } else {
        (times[mid - 1] + times[mid]) / 2.0
    }
}

/// Latent shapes for the Flow-SDE step comparison, from the tiny fixture's (1,536 values per
/// sample) through 16-channel SD3 latents of 256², 512² and 1024² images (the fused kernel runs
/// one workgroup per sample, so what matters is the per-sample size and the batch).
const SDE_SHAPES: [[usize; 4]; 6] = [
    [2, 16, 8, 12],
    [8, 16, 8, 12],
    [2, 16, 32, 32],
    [8, 16, 32, 32],
    [2, 16, 64, 64],
    [4, 16, 128, 128],
];

/// Median time of one Flow-SDE step (x, v, noise → x', mean, log-prob), synchronised with the
/// device, as tensor ops and (on wgpu) as the fused WGSL kernel.
fn sde_step_ms(device: &Device, shape: [usize; 4], fused: bool, warmup: usize, runs: usize) -> f64 {
    let input = |seed: u64| {
        let n: usize = shape.iter().product();
        let values: Vec<f32> = (0..n)
            .map(|i| ((i as u64 * 2654435761 + seed) % 1000) as f32 / 500.0 - 1.0)
            .collect();
        Tensor::<4>::from_data(TensorData::new(values, shape), device)
    };
    let (x, v, noise) = (input(1), input(2), input(3));
    let (sigma, sigma_next, sigma_max, level) = (0.8, 0.7, 0.95, 0.7);
    let step = || {
        let (x, v, noise) = (x.clone(), v.clone(), noise.clone());
        // Outputs stay alive until the device has finished them.
        let outputs = if fused {
            let out =
                portaflow_shaders::flow_sde_step(x, v, noise, sigma, sigma_next, sigma_max, level)
                    .expect("fused step");
            (out.next, out.mean, out.log_prob)
        } else {
            let out = step::flow_sde_step(x, v, noise, sigma, sigma_next, sigma_max, level);
            (out.next, out.mean, out.log_prob)
        };
        device.sync().expect("device sync");
        std::hint::black_box(outputs);
    };
    median_ms(&step, warmup, runs)
}

fn arg(args: &[String], name: &str, default: &str) -> String {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
        .unwrap_or_else(|| default.to_string())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let runs: usize = arg(&args, "--runs", "50").parse().expect("--runs N");
    let warmup: usize = arg(&args, "--warmup", "5").parse().expect("--warmup N");
    let devices = arg(&args, "--devices", "flex,vulkan");
    let mut report = serde_json::json!({ "runs": runs, "warmup": warmup, "devices": {} });
    for name in devices.split(',') {
        let chosen = match name {
            "flex" => ChosenDevice::cpu(),
            "vulkan" => device::select(DeviceRequest::Vulkan).expect("a Vulkan adapter"),
            other => panic!("unknown device {other}: expected flex or vulkan"),
        };
        let mut models = serde_json::Map::new();
        for (case, make) in CASES {
            let forward = make(&chosen.device);
            let run = || {
                std::hint::black_box(forward().as_bytes().len());
            };
            let ms = median_ms(&run, warmup, runs);
            eprintln!("{name:>6} {case:<22} {ms:8.3} ms");
            models.insert(
                case.into(),
                serde_json::json!((ms * 1000.0).round() / 1000.0),
            );
        }
        let mut sde = serde_json::Map::new();
        for shape in SDE_SHAPES {
            let label = format!("{shape:?}");
            let tensor = sde_step_ms(&chosen.device, shape, false, warmup, runs);
            let mut entry = serde_json::json!({ "tensor": tensor });
            if chosen.adapter().is_some() {
                entry["fused"] = sde_step_ms(&chosen.device, shape, true, warmup, runs).into();
            }
            eprintln!("{name:>6} flow-sde step {label:<18} {entry}");
            sde.insert(label, entry);
        }
        report["devices"][name] = serde_json::json!({
            "device": chosen.to_string(),
            "models": models,
            "flow_sde_step": sde,
        });
    }
    println!("{report}");
}
