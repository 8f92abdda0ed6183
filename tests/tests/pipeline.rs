//! The text-to-image pipeline end to end on a tiny fresh model: save / load round trip in the
//! diffusers layout, same image on the CPU and the Vulkan adapter, pretraining that resumes
//! exactly where it stopped.

use std::path::PathBuf;

use burn::tensor::Device;
use portaflow::device::ChosenDevice;
use portaflow::pipeline::{GenerateOptions, Pipeline};
use portaflow::sample::step::StepKind;
use portaflow::train::pretrain::{PretrainConfig, pretrain};
use portaflow::world::prompt_sets;
use portaflow_tests::{max_abs_diff, tiny_pipeline, vulkan};

fn temp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("portaflow-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn pixels(images: &[portaflow::world::render::Image]) -> Vec<f32> {
    images
        .iter()
        .flat_map(|i| i.pixels.iter().flatten().map(|&v| v as f32))
        .collect()
}

fn options() -> GenerateOptions {
    GenerateOptions {
        steps: 4,
        guidance_scale: 3.0,
        kind: StepKind::FlowSde { noise_level: 0.7 },
        seeds: vec![11, 12],
        negative_prompt: String::new(),
        size: None,
        initial_noise: None,
    }
}

/// Weights moved off zero so that a broken save / load or a backend difference shows.
fn trained_a_little(device: &Device) -> Pipeline {
    let dir = temp("pretrain-short");
    let config = PretrainConfig {
        steps: 3,
        batch_size: 4,
        learning_rate: 3e-3,
        warmup_steps: 1,
        checkpoint_every: 3,
        log_every: 1,
        ..Default::default()
    };
    let (train, _) = prompt_sets::build();
    let ad = device.clone().autodiff();
    let trained = pretrain(tiny_pipeline(1, &ad), &config, 0, &train, &dir, &ad, |_| {}).unwrap();
    let saved = Pipeline::from_dir(&dir.join("checkpoint"), device).unwrap();
    let proj_out = |p: &Pipeline| -> Vec<f32> {
        p.as_bundled()
            .unwrap()
            .1
            .proj_out
            .weight
            .val()
            .into_data()
            .try_to_vec()
            .unwrap()
    };
    let (a, b) = (proj_out(&trained), proj_out(&saved));
    assert!(
        max_abs_diff(&a, &b) < 1e-6,
        "checkpoint differs from the trained model"
    );
    assert!(
        a.iter().any(|&v| v != 0.0),
        "proj_out is still zero after training"
    );
    saved
}

#[test]
fn pipeline_round_trips_through_its_folder_and_matches_on_vulkan() {
    let cpu = ChosenDevice::cpu();
    let pipe = trained_a_little(&cpu.device);
    let dir = temp("roundtrip");
    pipe.save_dir(&dir).unwrap();
    let loaded = Pipeline::from_dir(&dir, &cpu.device).unwrap();
    let prompts = vec![
        "a photo of a red circle".to_string(),
        "the number \"42\"".to_string(),
    ];
    let a = pipe
        .generate(&prompts, &options(), &cpu.device, |_| {}, None)
        .unwrap();
    let b = loaded
        .generate(&prompts, &options(), &cpu.device, |_| {}, None)
        .unwrap();
    assert_eq!(a, b, "a saved and reloaded pipeline draws different images");

    let gpu = vulkan();
    let on_gpu = Pipeline::from_dir(&dir, &gpu.device).unwrap();
    let c = on_gpu
        .generate(&prompts, &options(), &gpu.device, |_| {}, None)
        .unwrap();
    // 8-bit pixels: allow rounding at a boundary, nothing more.
    let diff = max_abs_diff(&pixels(&a), &pixels(&c));
    println!("cpu vs vulkan: max pixel difference {diff}");
    assert!(diff <= 2.0, "CPU and Vulkan images differ by {diff} levels");
}

#[test]
fn pretraining_resumes_exactly() {
    let cpu = ChosenDevice::cpu().device.autodiff();
    let (train, _) = prompt_sets::build();
    let config = |steps| PretrainConfig {
        steps,
        batch_size: 3,
        learning_rate: 1e-3,
        warmup_steps: 2,
        checkpoint_every: 2,
        log_every: 1,
        ..Default::default()
    };
    let straight = temp("pretrain-straight");
    let a = pretrain(
        tiny_pipeline(5, &cpu),
        &config(4),
        0,
        &train,
        &straight,
        &cpu,
        |_| {},
    )
    .unwrap();

    let resumed = temp("pretrain-resumed");
    pretrain(
        tiny_pipeline(5, &cpu),
        &config(2),
        0,
        &train,
        &resumed,
        &cpu,
        |_| {},
    )
    .unwrap();
    // A new process would load the checkpoint folder; the run directory supplies the rest.
    let from_checkpoint = Pipeline::from_dir(&resumed.join("checkpoint"), &cpu).unwrap();
    let b = pretrain(
        from_checkpoint,
        &config(4),
        0,
        &train,
        &resumed,
        &cpu,
        |_| {},
    )
    .unwrap();

    let weights = |p: &Pipeline| -> Vec<f32> {
        let (clip, transformer) = p.as_bundled().unwrap();
        let mut v: Vec<f32> = transformer
            .proj_out
            .weight
            .val()
            .into_data()
            .try_to_vec()
            .unwrap();
        v.extend(
            clip.model.text_model.encoder_layers[0]
                .mlp
                .fc1
                .weight
                .val()
                .into_data()
                .try_to_vec::<f32>()
                .unwrap(),
        );
        v
    };
    let diff = max_abs_diff(&weights(&a), &weights(&b));
    assert!(
        diff < 1e-6,
        "resumed run differs from the straight run by {diff}"
    );
    let lines = std::fs::read_to_string(resumed.join("metrics.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 4, "metrics: {lines}");
}

/// The README's main command works out of the box: the bundled model loads from the repository,
/// draws 64×64 images for a prompt, and the same seed gives the same image.
#[test]
fn the_bundled_model_generates_from_the_repository() {
    let device = ChosenDevice::cpu().device;
    let pipe = Pipeline::from_dir(&portaflow::pipeline::bundled_dir(), &device)
        .expect("assets/models/shapes-base loads");
    assert_eq!(pipe.resolution(), 64);
    let mut opts = options();
    opts.steps = 8;
    opts.kind = StepKind::Euler;
    let prompts = vec![
        "a photo of a red circle".to_string(),
        "a photo of a red circle".to_string(),
    ];
    opts.seeds = vec![5, 5];
    let images = pipe
        .generate(&prompts, &opts, &device, |_| {}, None)
        .unwrap();
    assert_eq!((images[0].width, images[0].height), (64, 64));
    assert_eq!(
        images[0], images[1],
        "same prompt and seed, different image"
    );
    // A trained model is not noise: most pixels are the light background.
    let light = images[0]
        .pixels
        .iter()
        .filter(|p| p.iter().all(|&c| c > 180))
        .count();
    assert!(light > 64 * 64 / 2, "only {light} background pixels");
}
