//! LoRA adapters: the side path, switching off, merging, training only the adapter, PEFT's
//! target selection on real module trees, every file format against peft / diffusers outputs
//! (fixtures from `tools/golden/make_lora_fixtures.py`), and bad adapter files.

use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::{Device, Tensor, TensorData};
use portaflow::device::ChosenDevice;
use portaflow::lora::{self, Linears, LoraConfig, LoraModule, LoraWeights};
use portaflow::model::{flux1, flux2, sd3};
use portaflow::text::clip;
use portaflow_tests::{golden, max_abs_diff, sd3_forward_on_golden_inputs};

fn cpu() -> Device {
    ChosenDevice::cpu().device
}

/// Paths of every `Linear` burn's own visitor walks into.
fn linears_burn_sees(model: &impl Module) -> Vec<String> {
    struct Collect {
        path: Vec<String>,
        found: Vec<String>,
    }
    impl ModuleVisitor for Collect {
        fn enter_module(&mut self, name: &str, container_type: &str) {
            // Called for each field, with the type of the struct that owns it.
            if container_type == "Struct:Linear" && name == "weight" {
                self.found.push(self.path.join("."));
            }
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _name: &str, _container_type: &str) {
            self.path.pop();
        }
    }
    let mut visitor = Collect {
        path: Vec::new(),
        found: Vec::new(),
    };
    model.visit(&mut visitor);
    visitor.found
}

fn assert_walk_is_complete(name: &str, model: &(impl Module + Linears)) {
    let ours = lora::linear_paths(model);
    let burns = linears_burn_sees(model);
    assert_eq!(
        ours.len(),
        burns.len(),
        "{name}: the Linears walk finds {} linears, burn's visitor {} (a struct's linears! list is missing a field)",
        ours.len(),
        burns.len()
    );
    let unique: std::collections::BTreeSet<&String> = ours.iter().collect();
    assert_eq!(unique.len(), ours.len(), "{name}: duplicate module paths");
}

#[test]
fn linears_walk_finds_every_linear_of_every_family() {
    let device = cpu();
    assert_walk_is_complete("sd3", &sd3::load_dir(&golden("sd3_tiny"), &device).unwrap());
    assert_walk_is_complete(
        "sd35",
        &sd3::load_dir(&golden("sd35_tiny"), &device).unwrap(),
    );
    assert_walk_is_complete(
        "flux1",
        &flux1::load_dir(&golden("flux1_tiny"), &device).unwrap(),
    );
    assert_walk_is_complete(
        "flux2",
        &flux2::load_dir(&golden("flux2_tiny"), &device).unwrap(),
    );
    assert_walk_is_complete(
        "clip",
        &clip::load_dir(&golden("clip_text_bigg_tiny"), &device).unwrap(),
    );
    let model = sd3::load_dir(&golden("sd35_tiny"), &device).unwrap();
    let paths = lora::linear_paths(&model);
    for expected in [
        "transformer_blocks.0.attn.to_out.0",
        "transformer_blocks.0.attn2.to_q",
        "transformer_blocks.0.ff.net.0.proj",
        "pos_embed.proj",
        "norm_out.linear",
    ] {
        assert!(
            paths.iter().any(|p| p == expected),
            "no linear at {expected}"
        );
    }
}

fn module(rank: usize, d_in: usize, d_out: usize, alpha: f64, seed: u64) -> LoraModule {
    // A small deterministic pseudo-random fill.
    let fill = |n: usize, salt: u64| -> Vec<f32> {
        (0..n)
            .map(|i| {
                let x = ((i as u64 + 1) * 2654435761 + seed * 97 + salt) % 1000;
                (x as f32 / 1000.0 - 0.5) * 0.4
            })
            .collect()
    };
    LoraModule {
        rank,
        d_in,
        d_out,
        a: fill(rank * d_in, 1),
        b: fill(d_out * rank, 2),
        alpha,
        scaling: alpha / rank as f64,
    }
}

fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_to_vec().unwrap()
}

#[test]
fn side_path_equals_the_dense_update_and_switches_off_exactly() {
    let device = cpu();
    let mut model = sd3::load_dir(&golden("sd3_tiny"), &device).unwrap();
    let base = sd3_forward_on_golden_inputs(&model, "sd3_tiny", &device);
    let path = "transformer_blocks.0.attn.to_q";
    let (d_in, d_out) = {
        let mut dims = (0, 0);
        model.for_each_linear(&mut |l| {
            if l.path == path {
                dims = (l.d_in(), l.d_out())
            }
        });
        dims
    };
    let m = module(3, d_in, d_out, 6.0, 1);
    lora::attach(&mut model, "a", [(path, &m)], 0.7, &device).unwrap();

    // The side path against x·(W + s·w·AᵀᵀBᵀ) built by hand from the PEFT-layout factors.
    let x = Tensor::<2>::from_data(
        TensorData::new((0..2 * d_in).map(|i| (i as f32).sin()).collect(), [2, d_in]),
        &device,
    );
    let mut got = Vec::new();
    let mut dense = Vec::new();
    model.for_each_linear(&mut |l| {
        if l.path == path {
            got = values(l.forward(x.clone()));
            let a = Tensor::<2>::from_data(TensorData::new(m.a.clone(), [3, d_in]), &device);
            let b = Tensor::<2>::from_data(TensorData::new(m.b.clone(), [d_out, 3]), &device);
            let delta = a.transpose().matmul(b.transpose()).mul_scalar(2.0 * 0.7);
            let w = l.weight.val() + delta;
            let bias = l.bias.as_ref().unwrap().val().unsqueeze::<2>();
            dense = values(x.clone().matmul(w) + bias);
        }
    });
    assert!(max_abs_diff(&got, &dense) < 1e-5);

    let adapted = sd3_forward_on_golden_inputs(&model, "sd3_tiny", &device);
    assert!(
        max_abs_diff(&adapted, &base) > 1e-3,
        "the adapter must change the output"
    );
    lora::set_enabled(&mut model, false);
    assert_eq!(
        sd3_forward_on_golden_inputs(&model, "sd3_tiny", &device),
        base
    );
    lora::set_enabled(&mut model, true);
    lora::set_weight(&mut model, "a", 0.0).unwrap();
    assert_eq!(
        sd3_forward_on_golden_inputs(&model, "sd3_tiny", &device),
        base
    );
    lora::set_weight(&mut model, "a", 0.7).unwrap();
    assert_eq!(
        sd3_forward_on_golden_inputs(&model, "sd3_tiny", &device),
        adapted
    );
}

#[test]
fn merge_folds_the_adapter_in_and_unmerge_restores_the_base() {
    let device = cpu();
    let mut model = sd3::load_dir(&golden("sd3_tiny"), &device).unwrap();
    let base = sd3_forward_on_golden_inputs(&model, "sd3_tiny", &device);
    let config = LoraConfig::flow_grpo_sd3();
    let paths = lora::init_adapter(&mut model, "fresh", &config, 0, &device).unwrap();
    assert!(paths.len() >= 8, "selected {paths:?}");
    // B = 0: a fresh adapter leaves the model unchanged.
    assert_eq!(
        sd3_forward_on_golden_inputs(&model, "sd3_tiny", &device),
        base
    );
    lora::remove(&mut model, "fresh");

    let modules: Vec<(String, LoraModule)> = {
        let mut out = Vec::new();
        model.for_each_linear(&mut |l| {
            if config.selects(&l.path) {
                out.push((
                    l.path.clone(),
                    module(4, l.d_in(), l.d_out(), 8.0, out.len() as u64),
                ));
            }
        });
        out
    };
    let pairs = || modules.iter().map(|(p, m)| (p.as_str(), m));
    lora::attach(&mut model, "x", pairs(), 1.0, &device).unwrap();
    let side = sd3_forward_on_golden_inputs(&model, "sd3_tiny", &device);
    lora::merge(&mut model, "x").unwrap();
    let merged = sd3_forward_on_golden_inputs(&model, "sd3_tiny", &device);
    assert!(
        max_abs_diff(&side, &merged) < 1e-4,
        "merged differs by {}",
        max_abs_diff(&side, &merged)
    );
    lora::unmerge(&mut model, "x").unwrap();
    lora::set_enabled(&mut model, false);
    let restored = sd3_forward_on_golden_inputs(&model, "sd3_tiny", &device);
    assert!(max_abs_diff(&restored, &base) < 1e-5);

    // merge_and_unload keeps the effect and drops the adapter (RTDMD's stacking step).
    lora::set_enabled(&mut model, true);
    lora::merge_and_unload(&mut model, "x").unwrap();
    assert!(lora::adapters(&model).is_empty());
    let unloaded = sd3_forward_on_golden_inputs(&model, "sd3_tiny", &device);
    assert!(max_abs_diff(&side, &unloaded) < 1e-4);
}

#[test]
fn training_touches_only_the_adapter() {
    let device = cpu().autodiff();
    let mut model = sd3::load_dir(&golden("sd3_tiny"), &device).unwrap();
    lora::init_adapter(
        &mut model,
        "policy",
        &LoraConfig::flow_grpo_sd3(),
        3,
        &device,
    )
    .unwrap();
    lora::train_only(&mut model, "policy");
    // Make B non-zero so A receives a gradient too.
    model.for_each_linear_mut(&mut |l| {
        for a in &mut l.lora {
            a.b = Param::initialized(
                a.b.id,
                a.b.val().detach().add_scalar(0.01).detach().require_grad(),
            );
        }
    });
    let mut io =
        portaflow::model::weights::Weights::open_file(&golden("sd3_tiny").join("io.safetensors"))
            .unwrap();
    let x: Tensor<4> = portaflow_tests::io_tensor(&mut io, "hidden_states", &device);
    let context: Tensor<3> = portaflow_tests::io_tensor(&mut io, "encoder_hidden_states", &device);
    let pooled: Tensor<2> = portaflow_tests::io_tensor(&mut io, "pooled_projections", &device);
    let loss = model
        .forward(x, &[500.0, 250.0], context, pooled)
        .square()
        .mean();
    let grads = loss.backward();
    let mut adapter_grads = 0;
    let mut base_grads = 0;
    model.for_each_linear(&mut |l| {
        base_grads += l.weight.val().grad(&grads).is_some() as usize;
        for a in &l.lora {
            adapter_grads += a.a.val().grad(&grads).is_some() as usize;
            adapter_grads += a.b.val().grad(&grads).is_some() as usize;
        }
    });
    assert_eq!(base_grads, 0, "a frozen base weight received a gradient");
    assert!(
        adapter_grads >= 16,
        "only {adapter_grads} adapter factors received a gradient"
    );
}

#[test]
fn saved_peft_and_diffusers_files_read_back_identically() {
    let device = cpu();
    let mut model = sd3::load_dir(&golden("sd3_tiny"), &device).unwrap();
    let mut config = LoraConfig::flow_grpo_sd3();
    config.r = 4;
    config.lora_alpha = 8.0;
    lora::init_adapter(&mut model, "mine", &config, 5, &device).unwrap();
    let extracted = lora::extract(&model, "mine").unwrap();
    let weights = LoraWeights::from_component("transformer", extracted, Some(config));
    let dir = std::env::temp_dir().join(format!("portaflow-lora-{}", std::process::id()));
    weights
        .write_peft(&dir.join("peft"), "transformer")
        .unwrap();
    weights
        .write_diffusers(&dir.join("pytorch_lora_weights.safetensors"))
        .unwrap();
    for path in [
        dir.join("peft"),
        dir.join("pytorch_lora_weights.safetensors"),
    ] {
        let read = LoraWeights::read(&path).unwrap();
        assert_eq!(read.modules, weights.modules, "{}", path.display());
        assert_eq!(read.configs["transformer"].r, 4);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_adapter_for_another_model_names_the_modules_that_match_nothing() {
    let device = cpu();
    let mut model = sd3::load_dir(&golden("sd3_tiny"), &device).unwrap();
    let m = module(2, 32, 32, 2.0, 0);
    let err = lora::attach(
        &mut model,
        "alien",
        [
            ("single_transformer_blocks.0.attn.to_q", &m),
            ("transformer_blocks.0.attn.to_q", &m),
        ],
        1.0,
        &device,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("single_transformer_blocks.0.attn.to_q"),
        "{err}"
    );
    assert!(
        lora::adapters(&model).is_empty(),
        "nothing may stay attached after a failure"
    );
    let wrong = module(2, 7, 32, 2.0, 0);
    let err = lora::attach(
        &mut model,
        "w",
        [("transformer_blocks.0.attn.to_q", &wrong)],
        1.0,
        &device,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("transformer_blocks.0.attn.to_q") && err.contains("7 → 32"),
        "{err}"
    );
}
