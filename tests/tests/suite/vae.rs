//! The SD3 and FLUX.2 autoencoders against diffusers (tiny random models, non-square latents).

use burn::tensor::{Device, Tensor, TensorData};
use portaflow::device::ChosenDevice;
use portaflow::model::vae;
use portaflow::model::weights::Weights;
use portaflow_tests::{golden, max_abs_diff, max_rel_diff, vulkan};

fn read4(io: &mut Weights, key: &str, device: &Device) -> (Tensor<4>, Vec<f32>) {
    let shape: [usize; 4] = io.shape(key).unwrap().try_into().unwrap();
    let values = io.read(key, &shape).unwrap().unwrap();
    (
        Tensor::from_data(TensorData::new(values.clone(), shape), device),
        values,
    )
}

fn check(name: &str, latent_key: &str, encoded_key: &str, device: &Device) {
    let dir = golden(name);
    let model = vae::load_dir(&dir, device).unwrap();
    let mut io = Weights::open_file(&dir.join("io.safetensors")).unwrap();
    let (latent, _) = read4(&mut io, latent_key, device);
    let (_, want) = read4(&mut io, "decoded", device);
    let got: Vec<f32> = model.decode(latent).into_data().try_to_vec().unwrap();
    let err = max_abs_diff(&got, &want);
    let rel = max_rel_diff(&got, &want);
    println!("{name}: decode max |ours − diffusers| = {err:.2e}, relative {rel:.2e}");
    assert!(
        rel < 1e-4,
        "{name}: decode differs by {err} (relative {rel})"
    );

    let (image, _) = read4(&mut io, "image", device);
    let (_, want) = read4(&mut io, encoded_key, device);
    let got: Vec<f32> = model.encode(image).into_data().try_to_vec().unwrap();
    let err = max_abs_diff(&got, &want);
    let rel = max_rel_diff(&got, &want);
    println!("{name}: encode max |ours − diffusers| = {err:.2e}, relative {rel:.2e}");
    assert!(
        rel < 1e-4,
        "{name}: encode differs by {err} (relative {rel})"
    );
}

#[test]
fn sd3_vae_matches_diffusers_on_cpu() {
    check(
        "vae_sd3_tiny",
        "latents_model_space",
        "encoded_model_space",
        &ChosenDevice::cpu().device,
    );
}

#[test]
fn flux2_vae_matches_diffusers_on_cpu() {
    check(
        "vae_flux2_tiny",
        "latents_normalized",
        "encoded_normalized",
        &ChosenDevice::cpu().device,
    );
}

#[test]
fn sd3_vae_matches_diffusers_on_vulkan() {
    check(
        "vae_sd3_tiny",
        "latents_model_space",
        "encoded_model_space",
        &vulkan().device,
    );
}

/// `save_dir` writes diffusers' own key names: the tiny diffusers VAE saved by us holds exactly
/// the keys (and shapes) diffusers wrote, and loads back to the same decoder output.
#[test]
fn a_saved_autoencoder_has_the_keys_diffusers_wrote() {
    let device = ChosenDevice::cpu().device;
    let dir = golden("vae_sd3_tiny");
    let model = vae::load_dir(&dir, &device).unwrap();
    let out = portaflow_tests::TempDir::new("vae-save");
    model.save_dir(out.path()).unwrap();
    let keys = |path: &std::path::Path| -> Vec<(String, Vec<usize>)> {
        let bytes = std::fs::read(path).unwrap();
        let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let mut keys: Vec<_> = file
            .tensors()
            .into_iter()
            .map(|(k, v)| (k, v.shape().to_vec()))
            .collect();
        keys.sort();
        keys
    };
    let weights = "diffusion_pytorch_model.safetensors";
    assert_eq!(keys(&out.path().join(weights)), keys(&dir.join(weights)));
    // diffusers builds one level per block type (one level when the lists are absent).
    let config = |dir: &std::path::Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap()
    };
    let (ours, theirs) = (config(out.path()), config(&dir));
    for field in ["down_block_types", "up_block_types", "block_out_channels"] {
        assert_eq!(ours[field], theirs[field], "{field}");
    }
    let reloaded = vae::load_dir(out.path(), &device).unwrap();
    let z = Tensor::<4>::from_data(
        TensorData::new(
            (0..16 * 4 * 6)
                .map(|i| ((i % 7) as f32 - 3.0) / 3.0)
                .collect(),
            [1, 16, 4, 6],
        ),
        &device,
    );
    let a: Vec<f32> = model.decode(z.clone()).into_data().try_to_vec().unwrap();
    let b: Vec<f32> = reloaded.decode(z).into_data().try_to_vec().unwrap();
    assert_eq!(a, b, "a saved and reloaded autoencoder decodes differently");
}

mod training {
    use super::*;
    use burn::module::Module;
    use portaflow::model::vae::Vae;
    use portaflow::train::vae::{VaeTrainConfig, calibrate, renders, shapes_vae_config, train_vae};
    use portaflow::world::prompt_sets;

    fn config(steps: usize) -> VaeTrainConfig {
        VaeTrainConfig {
            steps,
            batch_size: 2,
            warmup_steps: 1,
            decay_steps: 0,
            log_every: 1,
            checkpoint_every: 2,
            ..Default::default()
        }
    }

    fn decoder_out(vae: &Vae) -> Vec<f32> {
        vae.decoder
            .conv_out
            .weight
            .val()
            .into_data()
            .try_to_vec()
            .unwrap()
    }

    /// A killed autoencoder run resumes exactly; the folder it writes loads and is calibrated
    /// (the calibration batch's latents have mean 0 and std 1 in transformer space).
    #[test]
    fn autoencoder_training_resumes_exactly_and_writes_a_calibrated_folder() {
        let cpu = ChosenDevice::cpu().device;
        let ad = cpu.clone().autodiff();
        let (train, _) = prompt_sets::build();
        let fresh = || Vae::init(shapes_vae_config(), 3, &ad).unwrap();
        let straight = portaflow_tests::TempDir::new("vae-straight");
        let a = train_vae(fresh(), &config(4), &train, straight.path(), &ad, |_| {}).unwrap();
        let resumed = portaflow_tests::TempDir::new("vae-resumed");
        train_vae(fresh(), &config(2), &train, resumed.path(), &ad, |_| {}).unwrap();
        let mut losses = Vec::new();
        let b = train_vae(fresh(), &config(4), &train, resumed.path(), &ad, |m| {
            losses.push(m.loss)
        })
        .unwrap();
        assert_eq!(losses.len(), 2, "the resumed run repeats or skips steps");
        let diff = max_abs_diff(&decoder_out(&a), &decoder_out(&b));
        assert!(
            diff < 1e-6,
            "resumed run differs from the straight run by {diff}"
        );
        assert!(
            max_abs_diff(&decoder_out(&a), &decoder_out(&fresh().valid())) > 1e-4,
            "training did not move the decoder"
        );

        let saved = vae::load_dir(&straight.path().join("vae"), &cpu).unwrap();
        assert_eq!(decoder_out(&saved), decoder_out(&a));
        let images = renders(&train, &config(4), u64::MAX, 64, 64);
        let latents: Vec<f32> = saved
            .encode(portaflow::pipeline::from_images(&images, &cpu))
            .into_data()
            .try_to_vec()
            .unwrap();
        let n = latents.len() as f64;
        let mean = latents.iter().map(|&v| v as f64).sum::<f64>() / n;
        let std = (latents
            .iter()
            .map(|&v| (v as f64 - mean).powi(2))
            .sum::<f64>()
            / n)
            .sqrt();
        assert!(
            mean.abs() < 1e-3 && (std - 1.0).abs() < 1e-3,
            "calibrated latents have mean {mean}, std {std}"
        );
        let mut again = saved.clone();
        calibrate(&mut again, &images, &cpu);
        // The saved factors went through JSON, whose f64 parsing (serde_json without
        // `float_roundtrip`) may land one ulp away; everything else must match exactly.
        let close = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) => (a - b).abs() <= 1e-12 * b.abs(),
            _ => false,
        };
        assert!(
            close(again.config.shift_factor, saved.config.shift_factor)
                && close(again.config.scaling_factor, saved.config.scaling_factor),
            "calibration is not deterministic: {:?} / {:?} recomputed, {:?} / {:?} saved",
            again.config.shift_factor,
            again.config.scaling_factor,
            saved.config.shift_factor,
            saved.config.scaling_factor
        );
        let mut recomputed = again.config.clone();
        recomputed.shift_factor = saved.config.shift_factor;
        recomputed.scaling_factor = saved.config.scaling_factor;
        assert_eq!(recomputed, saved.config);
    }
}

/// Diagnostic, not a check: how faithfully a trained Shapes autoencoder reconstructs scenes, as
/// the detector sees them. Renders of the held-out prompts (correct by construction) and digit
/// renders are encoded and decoded; prints PSNR, the share of reconstructions GenEval still
/// calls correct, verdict agreement with the originals, and OCR agreement on digits.
/// `PORTAFLOW_PROBE_VAE=/path/to/vae cargo test --workspace --test suite vae::reconstruction_probe -- --ignored --nocapture`
#[test]
#[ignore]
fn reconstruction_probe() {
    use portaflow::pipeline::{from_images, to_images};
    use portaflow::world::{compose, digits, geneval, prompt_sets, render};
    use rand::SeedableRng;
    let dir = std::env::var("PORTAFLOW_PROBE_VAE").expect("PORTAFLOW_PROBE_VAE");
    let device = Device::flex();
    let model = vae::load_dir(std::path::Path::new(&dir), &device).unwrap();
    let (_, test) = prompt_sets::build();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(99);
    let mut scenes = Vec::new();
    for _ in 0..4 {
        for spec in &test {
            if let Some(scene) = compose::scene_for(&mut rng, spec) {
                scenes.push((spec.clone(), render::render(&scene, 64)));
            }
        }
    }
    let numbers: Vec<(String, render::Image)> = (0..200)
        .map(|_| {
            let n = digits::random_number(&mut rng);
            let image = digits::render_number(&mut rng, &n, 64);
            (n, image)
        })
        .collect();
    let reconstruct = |images: Vec<render::Image>| -> (Vec<render::Image>, f64) {
        let mut out = Vec::new();
        let mut squared = 0.0;
        for chunk in images.chunks(32) {
            let x = from_images(chunk, &device);
            let y = model.decode(model.encode(x.clone())).clamp(-1.0, 1.0);
            squared +=
                (y.clone() - x).square().mean().into_scalar::<f32>() as f64 * chunk.len() as f64;
            out.extend(to_images(y));
        }
        let mse = squared / images.len() as f64;
        (out, 10.0 * (4.0 / mse).log10())
    };
    let (rebuilt, psnr) = reconstruct(scenes.iter().map(|(_, i)| i.clone()).collect());
    let (mut agree, mut correct, mut originals_correct) = (0, 0, 0);
    for ((spec, original), rebuilt) in scenes.iter().zip(&rebuilt) {
        let (a, b) = (
            geneval::evaluate_image(spec, original),
            geneval::evaluate_image(spec, rebuilt),
        );
        agree += usize::from(a.correct == b.correct);
        correct += usize::from(b.correct);
        originals_correct += usize::from(a.correct);
    }
    let n = scenes.len() as f64;
    for tag in portaflow::world::prompt::TAGS {
        let of_tag: Vec<_> = scenes
            .iter()
            .zip(&rebuilt)
            .filter(|((s, _), _)| s.tag == tag)
            .collect();
        let right = of_tag
            .iter()
            .filter(|((spec, _), image)| geneval::evaluate_image(spec, image).correct)
            .count();
        println!(
            "  {tag:<14} reconstructions correct {right} / {}",
            of_tag.len()
        );
    }
    println!(
        "scenes: {} · PSNR {psnr:.1} dB · GenEval-correct originals {:.1}%, reconstructions {:.1}% · verdict agreement {:.1}%",
        scenes.len(),
        100.0 * originals_correct as f64 / n,
        100.0 * correct as f64 / n,
        100.0 * agree as f64 / n
    );
    let (rebuilt_digits, psnr) = reconstruct(numbers.iter().map(|(_, i)| i.clone()).collect());
    let (mut same, mut right) = (0, 0);
    for ((number, original), rebuilt) in numbers.iter().zip(&rebuilt_digits) {
        let (a, b) = (digits::read_digits(original), digits::read_digits(rebuilt));
        same += usize::from(a == b);
        right += usize::from(&b == number);
    }
    println!(
        "digits: {} · PSNR {psnr:.1} dB · OCR reads the reconstruction as the original {:.1}%, correctly {:.1}%",
        numbers.len(),
        100.0 * same as f64 / numbers.len() as f64,
        100.0 * right as f64 / numbers.len() as f64
    );
    if let Ok(path) = std::env::var("PORTAFLOW_PROBE_OUT") {
        let pairs: Vec<&render::Image> = scenes
            .iter()
            .map(|(_, i)| i)
            .take(8)
            .chain(rebuilt.iter().take(8))
            .collect();
        let mut grid = render::Image {
            width: 64 * 8,
            height: 128,
            pixels: vec![[255; 3]; 64 * 8 * 128],
        };
        for (k, image) in pairs.iter().enumerate() {
            for y in 0..64 {
                for x in 0..64 {
                    grid.pixels[((k / 8) * 64 + y) * grid.width + (k % 8) * 64 + x] =
                        image.get(x, y);
                }
            }
        }
        portaflow::image_io::save_png(&grid, std::path::Path::new(&path), &[]).unwrap();
        println!("wrote {path}: originals, then reconstructions");
    }
}

/// Where a model's shapes lose their corners. Single-shape renders (32 per shape) are encoded
/// with the model's autoencoder, then (a) Gaussian noise of std s is added to the
/// transformer-space latent and decoded, and (b) they are noised to σ and denoised by the model
/// in one Euler step with CFG 4 (its x̂₀), then decoded; prints the share the detector names
/// correctly per shape.
/// `PORTAFLOW_PROBE_MODEL=$PWD/assets/models/shapes-base cargo test --workspace --test suite vae::corner_probe -- --ignored --nocapture`
#[test]
#[ignore]
fn corner_probe() {
    use burn::tensor::Distribution;
    use portaflow::pipeline::{GenerateOptions, from_images, to_images};
    use portaflow::world::{compose, geneval, prompt_sets, render};
    use rand::SeedableRng;
    let (device, pipeline) = portaflow_tests::probe_pipeline();
    let vae = pipeline.vae.as_ref().expect("a latent model");
    let (train, test) = prompt_sets::build();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    for spec in train
        .iter()
        .chain(&test)
        .filter(|s| s.tag == "single_object")
    {
        let images: Vec<render::Image> = (0..32)
            .map(|_| render::render(&compose::scene_for(&mut rng, spec).unwrap(), 64))
            .collect();
        let share = |images: &[render::Image]| {
            let right = images
                .iter()
                .filter(|i| geneval::evaluate_image(spec, i).correct)
                .count();
            format!("{:>3.0}%", 100.0 * right as f64 / images.len() as f64)
        };
        let z = vae.encode(from_images(&images, &device));
        let noise = Tensor::<4>::random(z.dims(), Distribution::Normal(0.0, 1.0), &device);
        let mut line = format!("{:<24} latent + s·ε:", spec.prompt);
        for s in [0.0, 0.05, 0.1, 0.2, 0.3] {
            let decoded = to_images(vae.decode(z.clone() + noise.clone() * s));
            line += &format!("  s {s}: {}", share(&decoded));
        }
        line += "   model x̂₀ at σ:";
        for sigma in [0.1, 0.2, 0.4, 0.7] {
            let x = z.clone() * (1.0 - sigma) + noise.clone() * sigma;
            let options = GenerateOptions {
                initial_noise: Some(x),
                sigmas: Some(vec![sigma]),
                ..GenerateOptions::euler(1, 4.0, (0..32).collect())
            };
            let prompts = vec![spec.prompt.clone(); 32];
            let out = pipeline
                .generate(&prompts, &options, &device, |_| {}, None)
                .unwrap();
            line += &format!("  {sigma}: {}", share(&out));
        }
        println!("{line}");
    }
}

/// Where a model loses composition. Training and test scenes of each multi-object tag (16 per
/// prompt, at most 6 prompts per tag and set) are encoded with the model's autoencoder, noised to
/// σ and denoised by the model's ODE from σ (Euler, CFG 4.5, σ split linearly into ⌈20σ⌉ steps);
/// prints the strict GenEval accuracy per tag and σ (σ 0: the autoencoder alone).
/// `PORTAFLOW_PROBE_SIGMAS=0.2,0.4` and `PORTAFLOW_PROBE_CFG=1` change the σ's and the scale.
/// `PORTAFLOW_PROBE_MODEL=$PWD/assets/models/shapes-base cargo test --workspace --test suite vae::composition_probe -- --ignored --nocapture`
#[test]
#[ignore]
fn composition_probe() {
    use portaflow::pipeline::{GenerateOptions, from_images, to_images};
    use portaflow::sample::pipeline::NoiseSource;
    use portaflow::world::{compose, geneval, prompt_sets, render};
    use rand::SeedableRng;
    /// Scenes per prompt.
    const SCENES: usize = 16;
    let (device, pipeline) = portaflow_tests::probe_pipeline();
    let vae = pipeline.vae.as_ref().expect("a latent model");
    let (train, test) = prompt_sets::build();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
    let env = |name: &str, default: &str| std::env::var(name).unwrap_or(default.into());
    let sigmas: Vec<f64> = env("PORTAFLOW_PROBE_SIGMAS", "0,0.2,0.4,0.6,0.8,1")
        .split(',')
        .map(|s| s.parse().unwrap())
        .collect();
    let cfg: f64 = env("PORTAFLOW_PROBE_CFG", "4.5").parse().unwrap();
    println!("{:<24} σ: {:?}, CFG {cfg}", "set / tag", sigmas);
    for (set, specs) in [("train", &train), ("test", &test)] {
        for tag in ["two_object", "position", "color_attr", "counting"] {
            let chosen: Vec<_> = specs.iter().filter(|s| s.tag == tag).take(6).collect();
            let mut right = vec![0usize; sigmas.len()];
            let mut total = 0;
            for spec in chosen {
                let images: Vec<render::Image> = (0..SCENES)
                    .map(|_| render::render(&compose::scene_for(&mut rng, spec).unwrap(), 64))
                    .collect();
                let z = vae.encode(from_images(&images, &device));
                let [_, c, h, w] = z.dims();
                // One seed per scene, so reruns draw the same noise.
                let seeds = (total as u64..(total + images.len()) as u64).collect();
                let noise = NoiseSource::new(seeds).initial([c, h, w], &device);
                total += images.len();
                for (k, &sigma) in sigmas.iter().enumerate() {
                    let out = if sigma == 0.0 {
                        to_images(vae.decode(z.clone()))
                    } else {
                        let n = (20.0 * sigma).ceil() as usize;
                        let schedule: Vec<f64> = (0..n)
                            .map(|i| sigma * (1.0 - i as f64 / n as f64))
                            .collect();
                        let options = GenerateOptions {
                            initial_noise: Some(z.clone() * (1.0 - sigma) + noise.clone() * sigma),
                            sigmas: Some(schedule),
                            ..GenerateOptions::euler(n, cfg, (0..SCENES as u64).collect())
                        };
                        let prompts = vec![spec.prompt.clone(); SCENES];
                        pipeline
                            .generate(&prompts, &options, &device, |_| {}, None)
                            .unwrap()
                    };
                    right[k] += out
                        .iter()
                        .filter(|i| geneval::evaluate_image(spec, i).correct)
                        .count();
                }
            }
            let shares: Vec<String> = right
                .iter()
                .map(|r| format!("{:>5.1}", 100.0 * *r as f64 / total.max(1) as f64))
                .collect();
            println!("{:<24} {}", format!("{set}: {tag}"), shares.join(" "));
        }
    }
}
