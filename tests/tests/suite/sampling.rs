//! The sampling loop across backends: the same seeds give the same image on the Flex CPU backend
//! and on the Vulkan adapter, with a real model (the tiny SD3 golden fixture) and with an exact
//! analytic velocity that isolates the step (on Vulkan the Flow-SDE steps run as the fused WGSL
//! kernel, on Flex as tensor ops).

use burn::tensor::{Device, Tensor, TensorData};
use portaflow::device::ChosenDevice;
use portaflow::model::sd3;
use portaflow::model::weights::Weights;
use portaflow::sample::pipeline::{
    Conditioning, Denoiser, NoiseSource, Rollout, SampleOptions, sample,
};
use portaflow::sample::schedule::Schedule;
use portaflow::sample::select::{OffSelection, StepPlan, StepSelection, TrainingClock};
use portaflow::sample::step::StepKind;
use portaflow_tests::{golden, io_tensor, max_rel_diff, vulkan};

const SEEDS: [u64; 2] = [7, 1234];
const STEPS: usize = 4;
const SDE: StepKind = StepKind::FlowSde { noise_level: 0.7 };

fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().try_to_vec().unwrap()
}

/// Samples `STEPS` steps from the seeds' noise; Flow-SDE runs Flow-GRPO's all-but-last plan.
fn run(
    denoiser: &dyn Denoiser,
    cond: &Conditioning,
    latent: [usize; 3],
    kind: StepKind,
    device: &Device,
) -> (Vec<f32>, Rollout) {
    let schedule = Schedule::shifted(STEPS, 3.0).unwrap();
    let plan = match kind {
        StepKind::Euler => StepPlan::ode(STEPS),
        _ => StepSelection::AllButLast.plan(
            STEPS,
            TrainingClock::default(),
            OffSelection::Stochastic,
        ),
    };
    let options = SampleOptions {
        guidance_interval: None,
        schedule: &schedule,
        kind,
        plan,
        guidance_scale: 1.0,
        shared_seeds: None,
        record: true,
    };
    let noise = NoiseSource::new(SEEDS.to_vec());
    let x = noise.initial(latent, device);
    let (image, rollout) = sample(denoiser, x, cond, None, &noise, &options, |_| {}, None).unwrap();
    (values(image), rollout.unwrap())
}

/// Final latents and every step's log-prob agree between the two backends.
fn assert_same(what: &str, cpu: &(Vec<f32>, Rollout), gpu: &(Vec<f32>, Rollout), tol: f32) {
    let rel = max_rel_diff(&gpu.0, &cpu.0);
    println!("{what}: final latent, Vulkan vs CPU relative {rel:.2e}");
    assert!(rel < tol, "{what}: final latents differ (relative {rel})");
    for (i, (a, b)) in cpu.1.log_probs.iter().zip(&gpu.1.log_probs).enumerate() {
        match (a, b) {
            (Some(a), Some(b)) => {
                let (a, b) = (values(a.clone()), values(b.clone()));
                let rel = max_rel_diff(&b, &a);
                assert!(rel < tol, "{what}: step {i} log-prob {b:?} vs {a:?}");
            }
            (None, None) => {}
            _ => panic!("{what}: step {i} is stochastic on one backend only"),
        }
    }
    assert_eq!(cpu.1.stds, gpu.1.stds, "{what}: step stds");
}

/// The tiny SD3 golden model with its io file's text conditioning.
fn sd3_tiny(device: &Device) -> (sd3::Sd3Transformer, Conditioning) {
    let dir = golden("sd3_tiny");
    let model = sd3::load_dir(&dir, device).unwrap();
    let mut io = Weights::open_file(&dir.join("io.safetensors")).unwrap();
    let cond = Conditioning {
        sequence: io_tensor(&mut io, "encoder_hidden_states", device),
        pooled: Some(io_tensor(&mut io, "pooled_projections", device)),
        guidance: None,
    };
    (model, cond)
}

#[test]
fn sd3_tiny_samples_the_same_image_on_cpu_and_vulkan() {
    let cpu = ChosenDevice::cpu().device;
    let gpu = vulkan().device;
    let (cpu_model, cpu_cond) = sd3_tiny(&cpu);
    let (gpu_model, gpu_cond) = sd3_tiny(&gpu);
    // 8 × 12 latents (the fixture's shape), 16 channels.
    let latent = [16, 8, 12];
    for (what, kind) in [("euler", StepKind::Euler), ("flow-sde", SDE)] {
        let a = run(&cpu_model, &cpu_cond, latent, kind, &cpu);
        let b = run(&gpu_model, &gpu_cond, latent, kind, &gpu);
        assert_same(&format!("sd3_tiny {what}"), &a, &b, 1e-5);
        // The seeds matter: two samples of the batch differ, and the image moved from the noise.
        let half = a.0.len() / 2;
        assert!(max_rel_diff(&a.0[..half], &a.0[half..]) > 1e-2);
    }
}

/// v(x, σ) = k(σ)·x + b(σ) elementwise: the exact velocity of Gaussian data, so the only
/// backend difference left is the step itself.
struct Affine;

impl Denoiser for Affine {
    fn velocity(&self, x: Tensor<4>, sigma: f64, _cond: &Conditioning) -> Tensor<4> {
        let (m, s) = (0.5, 0.3);
        let var = (1.0 - sigma).powi(2) * s * s + sigma * sigma;
        let k = (sigma - (1.0 - sigma) * s * s) / var;
        x.mul_scalar(k).add_scalar(-k * (1.0 - sigma) * m - m)
    }
}

#[test]
fn fused_flow_sde_sampling_matches_the_tensor_steps() {
    let cpu = ChosenDevice::cpu().device;
    let gpu = vulkan().device;
    let cond = |device: &Device| Conditioning {
        sequence: Tensor::from_data(TensorData::new(vec![0f32; 2], [2, 1, 1]), device),
        pooled: None,
        guidance: None,
    };
    let latent = [4, 32, 32];
    let a = run(&Affine, &cond(&cpu), latent, SDE, &cpu);
    let b = run(&Affine, &cond(&gpu), latent, SDE, &gpu);
    assert_same("affine flow-sde", &a, &b, 1e-5);
}
