//! Real pipeline folders against diffusers: tiny SD3.5, FLUX.1 and FLUX.2-klein pipelines saved
//! with `save_pretrained` (`tools/golden/make_pipeline_fixtures.py`).

use burn::tensor::{Device, Tensor};
use portaflow::device::ChosenDevice;
use portaflow::model::weights::Weights;
use portaflow::pipeline::text::TextStack;
use portaflow::pipeline::{GenerateOptions, Pipeline};
use portaflow_tests::{golden, max_rel_diff};

fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().try_to_vec().unwrap()
}

fn call(name: &str) -> serde_json::Value {
    let path = golden("pipelines").join(name).join("golden/call.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn expect(io: &mut Weights, key: &str, got: Tensor<3>) {
    let dims = got.dims().to_vec();
    let want = io.read(key, &dims).unwrap().unwrap();
    let rel = max_rel_diff(&values(got), &want);
    println!("{key}: relative error {rel:.2e}");
    assert!(rel < 1e-5, "{key} differs from diffusers by {rel}");
}

fn check_text(name: &str, text: TextStack, pooled: bool, device: &Device) {
    let mut text = text;
    let call = call(name);
    text.set_max_sequence_length(call["max_sequence_length"].as_u64().unwrap() as usize);
    let dir = golden("pipelines").join(name);
    let mut io = Weights::open_file(&dir.join("golden/io.safetensors")).unwrap();
    let prompt = call["prompt"].as_str().unwrap().to_string();
    let cond = text.encode(&[prompt], device).unwrap();
    expect(&mut io, "prompt_embeds", cond.sequence);
    if pooled {
        let got = cond.pooled.unwrap();
        let want = io
            .read("pooled_prompt_embeds", &got.dims())
            .unwrap()
            .unwrap();
        let rel = max_rel_diff(&values(got), &want);
        println!("pooled_prompt_embeds: relative error {rel:.2e}");
        assert!(rel < 1e-5, "pooled differs from diffusers by {rel}");
    }
}

#[test]
fn sd35_prompt_embeddings_match_diffusers() {
    let device = ChosenDevice::cpu().device;
    let dir = golden("pipelines").join("sd35_pipeline_tiny");
    let text = TextStack::load_sd3(&dir, 32, &device).unwrap();
    check_text("sd35_pipeline_tiny", text, true, &device);
}

#[test]
fn flux1_prompt_embeddings_match_diffusers() {
    let device = ChosenDevice::cpu().device;
    let dir = golden("pipelines").join("flux1_pipeline_tiny");
    let text = TextStack::load_flux1(&dir, &device).unwrap();
    check_text("flux1_pipeline_tiny", text, true, &device);
}

#[test]
fn klein_prompt_embeddings_match_diffusers() {
    let device = ChosenDevice::cpu().device;
    let dir = golden("pipelines").join("klein_pipeline_tiny");
    let mut text = TextStack::load_flux2(&dir, &device).unwrap();
    text.set_text_layers(vec![1, 2, 3]).unwrap();
    check_text("klein_pipeline_tiny", text, false, &device);
}

/// The whole pipeline from the stored initial noise: our image against diffusers'.
fn check_image(name: &str, noise_key: &str, device: &Device) {
    let dir = golden("pipelines").join(name);
    let call = call(name);
    let mut pipe = Pipeline::from_dir(&dir, device).unwrap();
    pipe.text
        .set_max_sequence_length(call["max_sequence_length"].as_u64().unwrap() as usize);
    if let Some(asked) = call["text_encoder_out_layers"].as_array() {
        let layers = asked.iter().map(|v| v.as_u64().unwrap() as usize).collect();
        pipe.text.set_text_layers(layers).unwrap();
    }
    let mut io = Weights::open_file(&dir.join("golden/io.safetensors")).unwrap();
    let shape = io.shape(noise_key).unwrap();
    let noise = io
        .tensor(noise_key, [shape[0], shape[1], shape[2], shape[3]], device)
        .unwrap();
    let size = call["height"].as_u64().unwrap() as usize;
    let mut options = GenerateOptions::euler(
        call["num_inference_steps"].as_u64().unwrap() as usize,
        call["guidance_scale"].as_f64().unwrap(),
        vec![0],
    );
    options.negative_prompt = call["negative_prompt"].as_str().unwrap_or("").to_string();
    options.size = Some((size, size));
    options.initial_noise = Some(noise);
    let prompt = call["prompt"].as_str().unwrap().to_string();
    let latents = pipe
        .generate_latents(&[prompt], &options, device, |_| {}, None)
        .unwrap();
    // diffusers' output_type="pt": (x / 2 + 0.5).clamp(0, 1)
    let image = pipe
        .decode(latents)
        .div_scalar(2.0)
        .add_scalar(0.5)
        .clamp(0.0, 1.0);
    let want = io.read("image", &image.dims()).unwrap().unwrap();
    let got = values(image);
    let worst = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    println!("{name}: image max abs difference {worst:.2e}");
    assert!(
        worst < 2e-4,
        "{name}: image differs from diffusers by {worst}"
    );
}

#[test]
fn sd35_pipeline_image_matches_diffusers() {
    check_image("sd35_pipeline_tiny", "noise", &ChosenDevice::cpu().device);
}

#[test]
fn flux1_pipeline_image_matches_diffusers() {
    check_image(
        "flux1_pipeline_tiny",
        "noise_unpacked",
        &ChosenDevice::cpu().device,
    );
}

#[test]
fn klein_pipeline_image_matches_diffusers() {
    check_image("klein_pipeline_tiny", "noise", &ChosenDevice::cpu().device);
}

#[test]
fn klein_layers_beyond_the_encoder_are_an_error() {
    let device = ChosenDevice::cpu().device;
    let dir = golden("pipelines").join("klein_pipeline_tiny");
    let mut text = TextStack::load_flux2(&dir, &device).unwrap();
    let err = text
        .set_text_layers(vec![9, 18, 27])
        .unwrap_err()
        .to_string();
    assert!(err.contains("27") && err.contains("4 layers"), "{err}");
}

#[test]
fn an_unsupported_pipeline_class_is_named() {
    let dir = std::env::temp_dir().join(format!("pf-unsupported-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("scheduler")).unwrap();
    std::fs::write(
        dir.join("model_index.json"),
        r#"{"_class_name": "StableDiffusionXLPipeline"}"#,
    )
    .unwrap();
    std::fs::write(
        dir.join("scheduler/scheduler_config.json"),
        r#"{"_class_name": "EulerDiscreteScheduler"}"#,
    )
    .unwrap();
    let err = load_error(&dir);
    assert!(
        err.contains("StableDiffusionXLPipeline") && err.contains("FluxPipeline"),
        "{err}"
    );
}

/// The message of a folder that must not load.
fn load_error(dir: &std::path::Path) -> String {
    match Pipeline::from_dir(dir, &ChosenDevice::cpu().device) {
        Ok(_) => panic!("{} loaded", dir.display()),
        Err(e) => e.to_string(),
    }
}

/// A copy of a fixture pipeline folder to break.
fn copy_fixture(name: &str, tag: &str) -> std::path::PathBuf {
    fn copy(from: &std::path::Path, to: &std::path::Path) {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            let target = to.join(entry.file_name());
            if entry.file_type().unwrap().is_dir() {
                copy(&entry.path(), &target);
            } else {
                std::fs::copy(entry.path(), target).unwrap();
            }
        }
    }
    let dir = std::env::temp_dir().join(format!("pf-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    copy(&golden("pipelines").join(name), &dir);
    dir
}

#[test]
fn a_missing_component_names_the_file() {
    let dir = copy_fixture("sd35_pipeline_tiny", "missing");
    std::fs::remove_file(dir.join("text_encoder_2/model.safetensors")).unwrap();
    let err = load_error(&dir);
    assert!(
        err.contains("text_encoder_2") && err.contains("model.safetensors"),
        "{err}"
    );
}

#[test]
fn a_tokenizer_of_another_model_is_refused() {
    let dir = copy_fixture("flux1_pipeline_tiny", "tokenizer");
    // FLUX.1's T5 tokenizer folder replaced by klein's Qwen3 one (a larger vocabulary).
    std::fs::remove_dir_all(dir.join("tokenizer_2")).unwrap();
    std::fs::create_dir_all(dir.join("tokenizer_2")).unwrap();
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(
            golden("pipelines")
                .join("klein_pipeline_tiny/tokenizer")
                .join(f),
            dir.join("tokenizer_2").join(f),
        )
        .unwrap();
    }
    let err = load_error(&dir);
    assert!(
        err.contains("tokens but its text encoder embeds only"),
        "{err}"
    );
}

/// `--low-memory`: encoding with the text side alone, freeing it, then sampling with the
/// transformer alone gives the same latents as the whole pipeline.
#[test]
fn text_first_loading_gives_the_same_latents() {
    let device = ChosenDevice::cpu().device;
    let dir = golden("pipelines").join("sd35_pipeline_tiny");
    let prompts = vec!["a red circle".to_string()];
    let mut options = GenerateOptions::euler(3, 4.0, vec![5]);
    options.negative_prompt = "blurry".into();
    options.size = Some((32, 32));
    let whole = Pipeline::from_dir(&dir, &device).unwrap();
    let expected = values(
        whole
            .generate_latents(&prompts, &options, &device, |_| {}, None)
            .unwrap(),
    );
    let text = Pipeline::load_text(&dir, &device).unwrap();
    let cond = text.encode(&prompts, &device).unwrap();
    let uncond = text.encode(&["blurry".to_string()], &device).unwrap();
    drop(text);
    let denoiser = Pipeline::without_text(&dir, &device).unwrap();
    assert!(denoiser.encode(&prompts, &device).is_err());
    let got = denoiser
        .sample_conditioned(cond, Some(uncond), &options, &device, |_| {}, None)
        .unwrap();
    assert_eq!(values(got), expected);
}

/// `generate --latents`: one tensor `[n, c, h, w]` read back exactly; anything else named.
#[test]
fn initial_noise_files_are_read_or_refused_by_name() {
    let device = ChosenDevice::cpu().device;
    let golden_io = golden("pipelines").join("sd35_pipeline_tiny/golden/io.safetensors");
    let err = portaflow::pipeline::read_noise(&golden_io, &device)
        .unwrap_err()
        .to_string();
    assert!(err.contains("expected one tensor"), "{err}");
    let mut io = Weights::open_file(&golden_io).unwrap();
    let noise = io.read("noise", &[1, 4, 16, 16]).unwrap().unwrap();
    let bytes: Vec<u8> = noise.iter().flat_map(|v| v.to_le_bytes()).collect();
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![1, 4, 16, 16], &bytes)
            .unwrap();
    let path = std::env::temp_dir().join(format!("pf-noise-{}.safetensors", std::process::id()));
    safetensors::serialize_to_file([("latents", view)], None, &path).unwrap();
    let read = portaflow::pipeline::read_noise(&path, &device).unwrap();
    assert_eq!(values(read), noise);
}

#[test]
fn trainers_condition_each_family_as_its_pipeline_guides() {
    let device = ChosenDevice::cpu().device;
    let prompts = vec!["a photo of a cat".to_string()];
    let open = |name: &str| Pipeline::from_dir(&golden("pipelines").join(name), &device).unwrap();
    // FLUX.1-dev embeds the scale and, like diffusers' FluxPipeline, runs no CFG.
    let (cond, uncond) = open("flux1_pipeline_tiny")
        .guided_conditioning(&prompts, 3.5, &device)
        .unwrap();
    assert_eq!(cond.guidance, Some(3.5));
    assert!(uncond.is_none(), "FLUX.1 got an unconditional branch");
    // SD3.5 runs CFG against the empty prompt above scale 1.
    let sd = open("sd35_pipeline_tiny");
    let (cond, uncond) = sd.guided_conditioning(&prompts, 4.5, &device).unwrap();
    assert_eq!(cond.guidance, None);
    assert_eq!(uncond.expect("CFG at 4.5").batch(), 1);
    let (_, uncond) = sd.guided_conditioning(&prompts, 1.0, &device).unwrap();
    assert!(uncond.is_none(), "no CFG at scale 1");
}
