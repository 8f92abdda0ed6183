//! The text-to-image pipeline end to end on a tiny fresh model: save / load round trip in the
//! diffusers layout, same image on the CPU and the Vulkan adapter, pretraining that resumes
//! exactly where it stopped.

use std::path::PathBuf;

use burn::module::Module;
use burn::tensor::{Device, Tensor, TensorData};
use portaflow::device::ChosenDevice;
use portaflow::pipeline::{GenerateOptions, Pipeline, TextStack, Transformer};
use portaflow::sample::step::StepKind;
use portaflow::train::pretrain::{PretrainConfig, PretrainMetrics, pretrain, pretrain_until};
use portaflow::world::prompt_sets;
use portaflow_tests::{max_abs_diff, tiny_latent_pipeline, tiny_pipeline, vulkan};
use std::sync::atomic::{AtomicBool, Ordering};

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
        guidance_interval: None,
        steps: 4,
        guidance_scale: 3.0,
        kind: StepKind::FlowSde { noise_level: 0.7 },
        seeds: vec![11, 12],
        negative_prompt: String::new(),
        size: None,
        initial_noise: None,
        sigmas: None,
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
        // The raw weights in the checkpoint, so it can be compared with what `pretrain` returns.
        ema_decay: 0.0,
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

/// A few steps of 3 images, a checkpoint every 2 steps, a log line every step.
fn resume_test_config(steps: usize) -> PretrainConfig {
    PretrainConfig {
        steps,
        batch_size: 3,
        learning_rate: 1e-3,
        warmup_steps: 2,
        checkpoint_every: 2,
        log_every: 1,
        ..Default::default()
    }
}

#[test]
fn pretraining_resumes_exactly() {
    let cpu = ChosenDevice::cpu().device.autodiff();
    let (train, _) = prompt_sets::build();
    let config = resume_test_config;
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

    let diff = max_abs_diff(&bundled_weights(&a), &bundled_weights(&b));
    assert!(
        diff < 1e-6,
        "resumed run differs from the straight run by {diff}"
    );
    let lines = std::fs::read_to_string(resumed.join("metrics.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 4, "metrics: {lines}");
}

/// A sample of a bundled-architecture pipeline's weights: the transformer's output layer and the
/// text encoder's first MLP.
fn bundled_weights(p: &Pipeline) -> Vec<f32> {
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
}

/// Ctrl-C during pretraining (`pretrain_until`'s flag): the running step finishes, a checkpoint is
/// written at that step although it is not a multiple of `checkpoint_every`, and rerunning reaches
/// the weights of a run that was never stopped.
#[test]
fn pretraining_stopped_between_checkpoints_resumes_exactly() {
    let cpu = ChosenDevice::cpu().device.autodiff();
    let (train, _) = prompt_sets::build();
    let config = resume_test_config(4);
    let straight = temp("pretrain-unstopped");
    let a = pretrain(
        tiny_pipeline(5, &cpu),
        &config,
        0,
        &train,
        &straight,
        &cpu,
        |_| {},
    )
    .unwrap();

    let stopped = temp("pretrain-stopped");
    let stop = AtomicBool::new(false);
    // Ctrl-C arrives while step 3 runs (after step 2's log line).
    let on_log = |m: &PretrainMetrics| {
        if m.step == 2 {
            stop.store(true, Ordering::SeqCst);
        }
    };
    let (_, reached) = pretrain_until(
        tiny_pipeline(5, &cpu),
        &config,
        0,
        &train,
        &stopped,
        &cpu,
        on_log,
        &stop,
    )
    .unwrap();
    assert_eq!(reached, 3);
    let state = std::fs::read_to_string(stopped.join("state.json")).unwrap();
    assert!(state.contains("\"step\": 3"), "state.json: {state}");

    let from_checkpoint = Pipeline::from_dir(&stopped.join("checkpoint"), &cpu).unwrap();
    let b = pretrain(from_checkpoint, &config, 0, &train, &stopped, &cpu, |_| {}).unwrap();
    let diff = max_abs_diff(&bundled_weights(&a), &bundled_weights(&b));
    assert!(diff < 1e-6, "the stopped and resumed run differs by {diff}");
}

/// Pretraining on a frozen autoencoder's latents: the checkpoint folder lists and holds the
/// autoencoder, loads as a latent pipeline (x-prediction, 16×16×4 latents) and draws the
/// same 64×64 images as the model that was trained; the autoencoder itself does not move.
#[test]
fn latent_pretraining_writes_a_pipeline_with_its_autoencoder() {
    let cpu = ChosenDevice::cpu().device;
    let ad = cpu.clone().autodiff();
    let dir = temp("pretrain-latent");
    let config = PretrainConfig {
        steps: 2,
        batch_size: 2,
        learning_rate: 3e-3,
        warmup_steps: 1,
        checkpoint_every: 2,
        log_every: 1,
        ema_decay: 0.0,
        ..Default::default()
    };
    let (train, _) = prompt_sets::build();
    let start = tiny_latent_pipeline(2, &ad);
    let vae_before: Vec<f32> = start
        .vae
        .as_ref()
        .unwrap()
        .decoder
        .conv_out
        .weight
        .val()
        .into_data()
        .try_to_vec()
        .unwrap();
    let trained = pretrain(start, &config, 0, &train, &dir, &ad, |m| {
        assert!(m.loss.is_finite())
    })
    .unwrap();
    let saved = Pipeline::from_dir(&dir.join("checkpoint"), &cpu).unwrap();
    let index = std::fs::read_to_string(dir.join("checkpoint/model_index.json")).unwrap();
    assert!(
        index.contains("\"vae\""),
        "model_index.json lists no vae: {index}"
    );
    assert_eq!(
        saved.index.prediction,
        portaflow::pipeline::Prediction::Sample
    );
    let vae = saved
        .vae
        .as_ref()
        .expect("the checkpoint loads with its autoencoder");
    let vae_after: Vec<f32> = vae
        .decoder
        .conv_out
        .weight
        .val()
        .into_data()
        .try_to_vec()
        .unwrap();
    assert_eq!(
        vae_before, vae_after,
        "pretraining changed the frozen autoencoder"
    );
    assert_eq!(saved.latent_shape(64, 64).unwrap(), [4, 16, 16]);
    assert_eq!(saved.resolution(), 64);
    let prompts = vec![
        "a photo of a red circle".to_string(),
        "a photo of a blue square".into(),
    ];
    let mut opts = options();
    opts.kind = StepKind::Euler;
    let a = trained
        .generate(&prompts, &opts, &ad, |_| {}, None)
        .unwrap();
    let b = saved.generate(&prompts, &opts, &cpu, |_| {}, None).unwrap();
    assert_eq!((a[0].width, a[0].height), (64, 64));
    let diff = max_abs_diff(&pixels(&a), &pixels(&b));
    assert!(
        diff <= 1.0,
        "the saved latent pipeline draws {diff} levels away from the trained one"
    );

    // The browser's path: the same folder from memory, and a clear error without its vae.
    use portaflow::pipeline::memory::{AUTOENCODER_FILES, BUNDLED_FILES};
    let checkpoint = dir.join("checkpoint");
    let files = |names: &[&str]| -> std::collections::BTreeMap<String, Vec<u8>> {
        names
            .iter()
            .map(|f| (f.to_string(), std::fs::read(checkpoint.join(f)).unwrap()))
            .collect()
    };
    let all: Vec<&str> = BUNDLED_FILES
        .iter()
        .chain(&AUTOENCODER_FILES)
        .copied()
        .collect();
    let from_memory = Pipeline::from_memory(files(&all), &cpu).unwrap();
    let c = from_memory
        .generate(&prompts, &opts, &cpu, |_| {}, None)
        .unwrap();
    assert_eq!(b, c, "the latent pipeline draws differently from memory");
    let err = Pipeline::from_memory(files(&all[..all.len() - 1]), &cpu)
        .err()
        .expect("a latent model without its autoencoder weights loads");
    assert!(
        err.to_string()
            .contains("vae/diffusion_pytorch_model.safetensors"),
        "{err}"
    );
}

/// A warm start copies what fits: a latent model takes a pixel model's text encoder and MMDiT
/// blocks, and keeps its own patch embedding and output projection (their shapes differ).
#[test]
fn a_latent_model_warm_starts_from_a_pixel_model() {
    let cpu = ChosenDevice::cpu().device;
    // pretraining builds its model on the autodiff device
    let trainable = cpu.clone().autodiff();
    let pixel = tiny_pipeline(3, &cpu);
    let (latent, report) =
        portaflow::train::pretrain::warm_start(tiny_latent_pipeline(4, &trainable), &pixel)
            .unwrap();
    let mut kept = report.kept.clone();
    kept.sort();
    assert_eq!(
        kept,
        // the embedding's bias has the width's shape in both, so it is copied
        [
            "transformer.pos_embed.proj.weight",
            "transformer.proj_out.bias",
            "transformer.proj_out.weight",
        ],
        "copied {}",
        report.copied
    );
    let Transformer::Sd3(a) = &pixel.transformer else {
        unreachable!()
    };
    let Transformer::Sd3(b) = &latent.transformer else {
        unreachable!()
    };
    let weights = |t: &portaflow::model::sd3::Sd3Transformer| -> Vec<f32> {
        t.transformer_blocks[1]
            .attn
            .to_k
            .weight
            .val()
            .into_data()
            .try_to_vec()
            .unwrap()
    };
    assert_eq!(weights(a), weights(b));
    // the copies must train: a weight made from data does not track gradients by itself
    struct Frozen(Vec<String>, Vec<String>);
    impl burn::module::ModuleVisitor for Frozen {
        fn enter_module(&mut self, name: &str, _container_type: &str) {
            self.0.push(name.to_string());
        }
        fn exit_module(&mut self, _name: &str, _container_type: &str) {
            self.0.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<Tensor<D>>) {
            if !param.val().is_require_grad() {
                self.1.push(self.0.join("."));
            }
        }
    }
    let mut frozen = Frozen(Vec::new(), Vec::new());
    b.visit(&mut frozen);
    let TextStack::Clip(text) = &latent.text else {
        unreachable!()
    };
    text.model.visit(&mut frozen);
    assert_eq!(
        frozen.1,
        ["pos_embed.pos_embed"],
        "only the fixed sin-cos table is frozen"
    );
    assert_eq!(
        b.config.in_channels, 4,
        "the latent model's own config is kept"
    );
}

/// Growing depth keeps what the model computes: a 2-block model warm-started into 4 blocks keeps
/// its first block, moves its last (`context_pre_only`) block to the end, and the two added
/// blocks start as the identity (all-zero AdaLN-Zero modulation), so sampling gives the same
/// latents before any training.
#[test]
fn a_deeper_model_warm_starts_as_the_same_function() {
    let cpu = ChosenDevice::cpu().device;
    let ad = cpu.clone().autodiff();
    let source = portaflow_tests::tiny_pretrained_pipeline(&cpu);
    let (grown, report) = portaflow::train::pretrain::warm_start(
        portaflow_tests::tiny_pipeline_of_depth(9, 4, &ad),
        &source,
    )
    .unwrap();
    let blocks = |p: &Pipeline| match &p.transformer {
        Transformer::Sd3(t) => t.transformer_blocks.len(),
        _ => unreachable!(),
    };
    assert_eq!((blocks(&source), blocks(&grown)), (2, 4));
    let Transformer::Sd3(t) = &grown.transformer else {
        unreachable!()
    };
    for block in &t.transformer_blocks[1..3] {
        for linear in [&block.norm1, &block.norm1_context] {
            let w: Vec<f32> = linear.weight.val().into_data().try_to_vec().unwrap();
            assert!(
                w.iter().all(|&v| v == 0.0),
                "an added block starts gated shut"
            );
        }
        let w: Vec<f32> = block
            .attn
            .to_q
            .weight
            .val()
            .into_data()
            .try_to_vec()
            .unwrap();
        assert!(
            w.iter().any(|&v| v != 0.0),
            "its other weights keep their fresh init"
        );
    }
    // only the added blocks (1 and 2) keep fresh tensors; everything else is copied or zeroed
    assert!(
        report
            .kept
            .iter()
            .all(|k| k.contains("transformer_blocks.1.") || k.contains("transformer_blocks.2.")),
        "kept: {:?}",
        report.kept
    );
    let options = GenerateOptions::euler(3, 2.0, vec![4, 5]);
    let prompts = vec![
        "a photo of a red circle".to_string(),
        "two squares".to_string(),
    ];
    let sample = |p: &Pipeline| -> Vec<f32> {
        p.generate_latents(&prompts, &options, &ad, |_| {}, None)
            .unwrap()
            .into_data()
            .try_to_vec()
            .unwrap()
    };
    let (a, b) = (sample(&source), sample(&grown));
    let moved = a.iter().map(|v| v.abs()).fold(0f32, f32::max);
    assert!(moved > 0.1, "the source draws something ({moved})");
    let diff = max_abs_diff(&a, &b);
    assert!(diff < 1e-5, "max |Δ| {diff}");
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

/// `generate --lora` folds the adapter into the weights: the bundled 4-step student draws the
/// same images merged as through its side path (8-bit pixels within one level), and merging an
/// adapter twice or one that is not attached is refused.
#[test]
fn a_merged_student_draws_what_its_side_path_draws() {
    let device = ChosenDevice::cpu().device;
    let student = portaflow::lora::LoraWeights::read(
        &portaflow::pipeline::bundled_dir().join("../shapes-4nfe"),
    )
    .unwrap();
    let mut pipe = Pipeline::from_dir(&portaflow::pipeline::bundled_dir(), &device).unwrap();
    let mut opts = options();
    opts.kind = StepKind::Euler;
    opts.guidance_scale = 1.0;
    opts.sigmas = Some(vec![1.0, 0.75, 0.5, 0.25]);
    opts.seeds = vec![3, 4];
    let prompts = vec![
        "a photo of two red circles".to_string(),
        "a photo of a blue square left of a green triangle".to_string(),
    ];
    let base = pipe
        .generate(&prompts, &opts, &device, |_| {}, None)
        .unwrap();
    let linears = pipe.add_lora(&student, "student", 1.0, &device).unwrap();
    let side = pipe
        .generate(&prompts, &opts, &device, |_| {}, None)
        .unwrap();
    assert_eq!(pipe.merge_lora("student").unwrap(), linears);
    let merged = pipe
        .generate(&prompts, &opts, &device, |_| {}, None)
        .unwrap();
    assert!(
        max_abs_diff(&pixels(&side), &pixels(&base)) > 50.0,
        "the student must change the images"
    );
    let diff = max_abs_diff(&pixels(&side), &pixels(&merged));
    assert!(diff <= 1.0, "merged images differ by {diff} levels");
    assert!(pipe.merge_lora("nobody").is_err());
    // Merging again leaves the weights as they are.
    pipe.merge_lora("student").unwrap();
    let again = pipe
        .generate(&prompts, &opts, &device, |_| {}, None)
        .unwrap();
    assert_eq!(pixels(&again), pixels(&merged));
}

/// Diagnostic, not a check: how well a Shapes model denoises held-in training scenes at each
/// noise level, against predicting the batch's mean image. A model whose error at σ = 0.9 equals
/// its error at σ = 1 ignores its input there and cannot lay out a scene.
/// `PORTAFLOW_PROBE_MODEL=/path/to/pipeline cargo test --workspace --test suite pipeline::denoising_probe -- --ignored --nocapture`
#[test]
#[ignore]
fn denoising_probe() {
    use portaflow::pipeline::{Transformer, from_images};
    use portaflow::train::pretrain::{PretrainConfig, example};
    use rand::SeedableRng;
    use rand_distr::Distribution;
    let (device, pipe) = portaflow_tests::probe_pipeline();
    let train = portaflow::world::prompt::read_jsonl(
        &std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../assets/prompts/shapes_train.jsonl"),
    )
    .unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(123);
    let config = PretrainConfig {
        digits_fraction: 0.0,
        ..Default::default()
    };
    let (prompts, images): (Vec<String>, Vec<_>) = (0..48)
        .map(|_| example(&mut rng, &train, 64, &config))
        .unzip();
    // A latent model is probed in its latent space; its pictures are decoded.
    let x0 = match &pipe.vae {
        Some(vae) => vae.encode(from_images(&images, &device)),
        None => from_images(&images, &device),
    };
    let [b, c, h, w] = x0.dims();
    let velocity = pipe.index.prediction == portaflow::pipeline::Prediction::Velocity;
    // the transformer's output as x̂₀
    let sample = |x: Tensor<4>, out: Tensor<4>, sigma: f64| match velocity {
        true => x - out * sigma,
        false => out,
    };
    let cond = pipe.encode(&prompts, &device).unwrap();
    let Transformer::Sd3(t) = &pipe.transformer else {
        panic!("an SD3 Shapes model")
    };
    let mean = x0.clone().mean_dim(0);
    let baseline = (x0.clone() - mean.clone())
        .square()
        .mean()
        .into_scalar::<f32>();
    println!("mean-image error {baseline:.4}");
    // Optional picture: the first 8 clean images, then x̂₀ at each σ, one row each.
    let shown = 8.min(b);
    let mut rows: Vec<Vec<portaflow::world::render::Image>> = vec![images[..shown].to_vec()];
    for sigma in [0.1, 0.3, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0f64] {
        let noise: Vec<f32> = (0..b * c * h * w)
            .map(|_| rand_distr::StandardNormal.sample(&mut rng))
            .collect();
        let noise = Tensor::<4>::from_data(TensorData::new(noise, [b, c, h, w]), &device);
        let x = x0.clone() * (1.0 - sigma) + noise * sigma;
        let out = t.forward(
            x.clone(),
            &vec![sigma * 1000.0; b],
            cond.sequence.clone(),
            cond.pooled.clone().expect("pooled"),
        );
        let out = sample(x, out, sigma);
        let error = (out.clone() - x0.clone())
            .square()
            .mean()
            .into_scalar::<f32>();
        rows.push(portaflow::pipeline::to_images(
            pipe.decode(out.clone().slice(0..shown)),
        ));
        let spread = (out - mean.clone()).square().mean().into_scalar::<f32>();
        println!("σ {sigma:.2}  error {error:.4}  distance from the mean image {spread:.4}");
    }
    // Receptive field at σ 0.8: how much each patch's x̂₀ moves when only patch (row 3, col 3)
    // of the input gets fresh noise (mean |Δ| per 8×8 patch, in units of 1e-3).
    let sigma = 0.8f64;
    let draw = |rng: &mut rand_chacha::ChaCha8Rng| {
        let noise: Vec<f32> = (0..b * c * h * w)
            .map(|_| rand_distr::StandardNormal.sample(rng))
            .collect();
        Tensor::<4>::from_data(TensorData::new(noise, [b, c, h, w]), &device)
    };
    let noise = draw(&mut rng);
    let other = draw(&mut rng);
    let p = t.config.patch_size;
    let mask: Vec<f32> = (0..b * c * h * w)
        .map(|i| {
            let (y, x) = ((i / w) % h, i % w);
            if y / p == 3 && x / p == 3 { 1.0 } else { 0.0 }
        })
        .collect();
    let mask = Tensor::<4>::from_data(TensorData::new(mask, [b, c, h, w]), &device);
    let noise2 = noise.clone() * (mask.clone().neg().add_scalar(1.0)) + other * mask;
    let run = |n: Tensor<4>| {
        let x = x0.clone() * (1.0 - sigma) + n * sigma;
        let out = t.forward(
            x.clone(),
            &vec![sigma * 1000.0; b],
            cond.sequence.clone(),
            cond.pooled.clone().expect("pooled"),
        );
        sample(x, out, sigma)
    };
    let delta = (run(noise) - run(noise2)).abs().mean_dim(0).mean_dim(1); // [1, 1, h, w]
    let delta: Vec<f32> = delta.into_data().try_to_vec().unwrap();
    for py in 0..h / p {
        let row: Vec<String> = (0..w / p)
            .map(|px| {
                let mut s = 0.0;
                for y in py * p..(py + 1) * p {
                    for x in px * p..(px + 1) * p {
                        s += delta[y * w + x];
                    }
                }
                format!("{:6.1}", 1e3 * s / (p * p) as f32)
            })
            .collect();
        println!("{}", row.join(""));
    }
    if let Ok(path) = std::env::var("PORTAFLOW_PROBE_OUT") {
        let (h, w) = (images[0].height, images[0].width);
        let mut grid = portaflow::world::render::Image {
            width: w * shown,
            height: h * rows.len(),
            pixels: vec![[255; 3]; w * shown * h * rows.len()],
        };
        for (r, row) in rows.iter().enumerate() {
            for (k, image) in row.iter().enumerate() {
                for y in 0..h {
                    for x in 0..w {
                        grid.pixels[(r * h + y) * grid.width + k * w + x] = image.get(x, y);
                    }
                }
            }
        }
        portaflow::image_io::save_png(&grid, std::path::Path::new(&path), &[]).unwrap();
        println!("wrote {path}: clean images, then x̂₀ at σ = 0.1 … 1.0");
    }
}

/// On Flex a batch's forward runs in chunks on their own threads: every chunking gives the
/// single forward's velocities (uneven chunks included), and the default takes that path.
#[test]
fn chunked_forwards_equal_the_batch_forward() {
    use portaflow::sample::pipeline::Denoiser;
    let device = ChosenDevice::cpu().device;
    let pipe = Pipeline::from_dir(&portaflow::pipeline::bundled_dir(), &device).unwrap();
    let prompts: Vec<String> = [
        "a photo of a red circle",
        "a photo of two blue squares",
        "",
        "a photo of a green triangle left of a yellow circle",
        "a photo of four purple circles",
    ]
    .map(String::from)
    .to_vec();
    let cond = pipe.encode(&prompts, &device).unwrap();
    let shape = pipe.latent_shape(64, 64).unwrap();
    let n = prompts.len() * shape.iter().product::<usize>();
    let values: Vec<f32> = (0..n)
        .map(|i| ((i * 7919) % 997) as f32 / 498.5 - 1.0)
        .collect();
    // [5, c, h, w]
    let x = Tensor::<4>::from_data(
        TensorData::new(values, [prompts.len(), shape[0], shape[1], shape[2]]),
        &device,
    );
    let t = &pipe.transformer;
    let values = |v: Tensor<4>| v.to_data().try_to_vec::<f32>().unwrap();
    let whole = values(t.velocity_in_chunks(x.clone(), 0.6, &cond, 1));
    for chunks in [2, 3, 5, 9] {
        let split = values(t.velocity_in_chunks(x.clone(), 0.6, &cond, chunks));
        let diff = max_abs_diff(&whole, &split);
        assert!(
            diff < 1e-5,
            "{chunks} chunks differ from one forward by {diff}"
        );
    }
    let default = values(t.velocity(x, 0.6, &cond));
    assert!(max_abs_diff(&whole, &default) < 1e-5);
}
