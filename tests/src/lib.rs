//! Shared helpers for the workspace integration tests in `tests/tests/`.

use std::path::{Path, PathBuf};

use portaflow::device::{self, ChosenDevice, DeviceRequest};

/// The Vulkan device GPU-path tests run on.
///
/// Never falls back to the CPU: a GPU test that silently ran on Flex would prove nothing. Under
/// `CI=true` the adapter must be the software one (Mesa lavapipe / llvmpipe), which is what CI
/// machines have; a developer's hardware GPU is fine elsewhere.
pub fn vulkan() -> ChosenDevice {
    let chosen = device::select(DeviceRequest::Vulkan).unwrap_or_else(|e| {
        panic!("GPU tests need a Vulkan adapter ({e}); run the README's test command, which installs Mesa lavapipe")
    });
    let adapter = chosen
        .adapter()
        .expect("a Vulkan request yields a wgpu adapter");
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        assert!(
            adapter.is_software() && adapter.name.to_ascii_lowercase().contains("llvmpipe"),
            "CI=true: expected the software Vulkan adapter (lavapipe/llvmpipe), found {adapter}"
        );
    }
    chosen
}

/// Largest absolute difference between two equally long slices.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Largest absolute difference relative to the reference's largest magnitude (at least 1): the
/// issue's "relative error" for comparing whole outputs against a reference implementation.
pub fn max_rel_diff(got: &[f32], want: &[f32]) -> f32 {
    let scale = want.iter().fold(1f32, |m, v| m.max(v.abs()));
    max_abs_diff(got, want) / scale
}

/// A golden fixture folder under `assets/golden/` (made by `tools/golden/`).
pub fn golden(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../assets/golden")
        .join(name)
}

/// A tensor of a golden `io.safetensors` file, with the shape stored in the file.
pub fn io_tensor<const D: usize>(
    io: &mut portaflow::model::weights::Weights,
    key: &str,
    device: &burn::tensor::Device,
) -> burn::tensor::Tensor<D> {
    let shape: [usize; D] = io
        .shape(key)
        .unwrap_or_else(|| panic!("io has no {key}"))
        .try_into()
        .unwrap_or_else(|s| panic!("{key}: stored shape {s:?} is not {D}-D"));
    let values = io.read(key, &shape).unwrap().unwrap();
    burn::tensor::Tensor::from_data(burn::tensor::TensorData::new(values, shape), device)
}

/// An SD3 transformer's output on the inputs of a golden fixture's `io.safetensors`
/// (`hidden_states`, `encoder_hidden_states`, `pooled_projections`, `timestep`).
pub fn sd3_forward_on_golden_inputs(
    model: &portaflow::model::sd3::Sd3Transformer,
    fixture: &str,
    device: &burn::tensor::Device,
) -> Vec<f32> {
    let mut io =
        portaflow::model::weights::Weights::open_file(&golden(fixture).join("io.safetensors"))
            .unwrap();
    let x: burn::tensor::Tensor<4> = io_tensor(&mut io, "hidden_states", device);
    let context: burn::tensor::Tensor<3> = io_tensor(&mut io, "encoder_hidden_states", device);
    let pooled: burn::tensor::Tensor<2> = io_tensor(&mut io, "pooled_projections", device);
    let timesteps: Vec<f64> = io_tensor::<1>(&mut io, "timestep", device)
        .into_data()
        .iter::<f32>()
        .map(f64::from)
        .collect();
    model
        .forward(x, &timesteps, context, pooled)
        .into_data()
        .try_to_vec()
        .unwrap()
}

fn golden_io(fixture: &str) -> portaflow::model::weights::Weights {
    portaflow::model::weights::Weights::open_file(&golden(fixture).join("io.safetensors")).unwrap()
}

fn scalars(io: &mut portaflow::model::weights::Weights, key: &str) -> Vec<f64> {
    let shape = io.shape(key).unwrap_or_else(|| panic!("io has no {key}"));
    io.read(key, &shape)
        .unwrap()
        .unwrap()
        .iter()
        .map(|&v| v as f64)
        .collect()
}

/// Position-id rows (`img_ids`, `txt_ids`) of a golden `io.safetensors`.
fn id_rows(io: &mut portaflow::model::weights::Weights, key: &str) -> Vec<Vec<f64>> {
    let shape = io.shape(key).unwrap_or_else(|| panic!("io has no {key}"));
    scalars(io, key)
        .chunks(shape[1])
        .map(|r| r.to_vec())
        .collect()
}

/// A FLUX.1 transformer's output on a golden fixture's inputs.
pub fn flux1_forward_on_golden_inputs(
    model: &portaflow::model::flux1::Flux1Transformer,
    fixture: &str,
    device: &burn::tensor::Device,
) -> Vec<f32> {
    let mut io = golden_io(fixture);
    let x: burn::tensor::Tensor<3> = io_tensor(&mut io, "hidden_states", device);
    let context: burn::tensor::Tensor<3> = io_tensor(&mut io, "encoder_hidden_states", device);
    let pooled: burn::tensor::Tensor<2> = io_tensor(&mut io, "pooled_projections", device);
    let t = scalars(&mut io, "timestep");
    let guidance = model
        .config
        .guidance_embeds
        .then(|| scalars(&mut io, "guidance"));
    let (img, txt) = (id_rows(&mut io, "img_ids"), id_rows(&mut io, "txt_ids"));
    model
        .forward(x, &t, guidance.as_deref(), context, pooled, &img, &txt)
        .into_data()
        .try_to_vec()
        .unwrap()
}

/// A FLUX.2 transformer's output on a golden fixture's inputs.
pub fn flux2_forward_on_golden_inputs(
    model: &portaflow::model::flux2::Flux2Transformer,
    fixture: &str,
    device: &burn::tensor::Device,
) -> Vec<f32> {
    let mut io = golden_io(fixture);
    let x: burn::tensor::Tensor<3> = io_tensor(&mut io, "hidden_states", device);
    let context: burn::tensor::Tensor<3> = io_tensor(&mut io, "encoder_hidden_states", device);
    let t = scalars(&mut io, "timestep");
    let guidance = model
        .config
        .guidance_embeds
        .then(|| scalars(&mut io, "guidance"));
    let (img, txt) = (id_rows(&mut io, "img_ids"), id_rows(&mut io, "txt_ids"));
    model
        .forward(x, &t, guidance.as_deref(), context, &img, &txt)
        .into_data()
        .try_to_vec()
        .unwrap()
}

/// A fresh 16×16 pixel-space pipeline (2-layer CLIP, 2-block SD3 MMDiT) on the Shapes vocabulary.
pub fn tiny_pipeline(seed: u64, device: &burn::tensor::Device) -> portaflow::pipeline::Pipeline {
    tiny_pipeline_of_depth(seed, 2, device)
}

/// [`tiny_pipeline`] with `blocks` MMDiT blocks.
pub fn tiny_pipeline_of_depth(
    seed: u64,
    blocks: usize,
    device: &burn::tensor::Device,
) -> portaflow::pipeline::Pipeline {
    let (tok, text, mut transformer) = tiny_configs();
    transformer.num_layers = blocks;
    portaflow::pipeline::Pipeline::fresh(tok, text, transformer, None, seed, device).unwrap()
}

/// [`tiny_pipeline`]'s text side and transformer on the latents of a fresh Shapes autoencoder
/// (64×64 images ↔ 16×16×4 latents, patch 4).
pub fn tiny_latent_pipeline(
    seed: u64,
    device: &burn::tensor::Device,
) -> portaflow::pipeline::Pipeline {
    let (tok, text, transformer) = tiny_configs();
    let vae = portaflow::model::vae::Vae::init(
        portaflow::train::vae::shapes_vae_config(),
        seed.wrapping_add(7),
        device,
    )
    .unwrap();
    let transformer = portaflow::pipeline::on_latents(transformer, &vae.config);
    portaflow::pipeline::Pipeline::fresh(tok, text, transformer, Some(vae), seed, device).unwrap()
}

fn tiny_configs() -> (
    portaflow::text::tokenizer::PromptTokenizer,
    portaflow::text::clip::ClipTextConfig,
    portaflow::model::sd3::Sd3Config,
) {
    use portaflow::model::sd3::Sd3Config;
    use portaflow::text::clip::ClipTextConfig;
    use portaflow::text::tokenizer::{self, PromptTokenizer};
    const SIZE: usize = 16;
    let words = portaflow::world::prompt::vocabulary();
    let word_level = tokenizer::word_level(&words).unwrap();
    let start = word_level.token_to_id(tokenizer::START).unwrap();
    let end = word_level.token_to_id(tokenizer::END).unwrap();
    let text = ClipTextConfig {
        vocab_size: word_level.get_vocab_size(true),
        hidden_size: 32,
        intermediate_size: 64,
        projection_dim: 32,
        num_hidden_layers: 2,
        num_attention_heads: 2,
        max_position_embeddings: 16,
        hidden_act: "quick_gelu".into(),
        layer_norm_eps: 1e-5,
        bos_token_id: start,
        eos_token_id: end,
        pad_token_id: 0,
    };
    let transformer = Sd3Config {
        sample_size: SIZE,
        patch_size: 4,
        in_channels: 3,
        num_layers: 2,
        attention_head_dim: 16,
        num_attention_heads: 2,
        joint_attention_dim: 32,
        caption_projection_dim: 32,
        pooled_projection_dim: 32,
        out_channels: 3,
        pos_embed_max_size: SIZE / 4,
        dual_attention_layers: vec![],
        qk_norm: Some("rms_norm".into()),
    };
    let tok = PromptTokenizer {
        tokenizer: word_level,
        max_length: 16,
        pad_id: 0,
        truncate: false,
    };
    (tok, text, transformer)
}

/// [`tiny_pipeline`] after two pretraining steps, which move its output layer off zero (a fresh
/// one predicts nothing), on the autodiff version of `device`.
pub fn tiny_pretrained_pipeline(device: &burn::tensor::Device) -> portaflow::pipeline::Pipeline {
    let ad = device.clone().autodiff();
    pretrained_briefly(tiny_pipeline(3, &ad), &ad)
}

/// [`tiny_latent_pipeline`] after the same two pretraining steps as
/// [`tiny_pretrained_pipeline`], on the autodiff device.
pub fn tiny_pretrained_latent_pipeline(
    device: &burn::tensor::Device,
) -> portaflow::pipeline::Pipeline {
    let ad = device.clone().autodiff();
    pretrained_briefly(tiny_latent_pipeline(3, &ad), &ad)
}

/// `network` after two pretraining steps of 4 Shapes scenes (lr 3e-3), reloaded from its
/// checkpoint on `ad`.
fn pretrained_briefly(
    network: portaflow::pipeline::Pipeline,
    ad: &burn::tensor::Device,
) -> portaflow::pipeline::Pipeline {
    use portaflow::train::pretrain::{PretrainConfig, pretrain};
    let dir = TempDir::new("tiny-pretrained");
    let (train, _) = portaflow::world::prompt_sets::build();
    let short = PretrainConfig {
        steps: 2,
        batch_size: 4,
        learning_rate: 3e-3,
        warmup_steps: 1,
        checkpoint_every: 2,
        log_every: 1,
        ..Default::default()
    };
    pretrain(network, &short, 0, &train, dir.path(), ad, |_| {}).unwrap();
    portaflow::pipeline::Pipeline::from_dir(&dir.path().join("checkpoint"), ad).unwrap()
}

/// The `output` tensor of a golden fixture's `io.safetensors`.
pub fn golden_output(fixture: &str) -> Vec<f32> {
    let mut io =
        portaflow::model::weights::Weights::open_file(&golden(fixture).join("io.safetensors"))
            .unwrap();
    let shape = io.shape("output").expect("io has an output");
    io.read("output", &shape).unwrap().unwrap()
}

/// The pipeline a diagnostic probe examines (the folder in `PORTAFLOW_PROBE_MODEL`), on Flex,
/// with that device.
pub fn probe_pipeline() -> (burn::tensor::Device, portaflow::pipeline::Pipeline) {
    let dir = std::env::var("PORTAFLOW_PROBE_MODEL").expect("PORTAFLOW_PROBE_MODEL");
    let device = burn::tensor::Device::flex();
    let pipeline = portaflow::pipeline::Pipeline::from_dir(Path::new(&dir), &device).unwrap();
    (device, pipeline)
}

/// A copy of a golden fixture's `config.json` and `diffusion_pytorch_model.safetensors` in a
/// fresh temporary folder, for tests that damage them.
pub fn copy_fixture(name: &str) -> TempDir {
    let tmp = TempDir::new(name);
    for file in ["config.json", "diffusion_pytorch_model.safetensors"] {
        std::fs::copy(golden(name).join(file), tmp.path().join(file)).unwrap();
    }
    tmp
}

/// A self-cleaning temporary folder, unique per process and thread (no extra dependency).
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let path = std::env::temp_dir().join(format!(
            "portaflow-test-{tag}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        Self(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
