//! LoRA adapters: the side path, switching off, merging, training only the adapter, PEFT's
//! target selection on real module trees, every file format against peft / diffusers outputs
//! (fixtures from `tools/golden/make_lora_fixtures.py`), and bad adapter files.

use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::{Device, Tensor, TensorData};
use portaflow::device::ChosenDevice;
use portaflow::lora::{self, Linears, LoraConfig, LoraModule, LoraWeights};
use portaflow::model::weights::Weights;
use portaflow::model::{flux1, flux2, sd3};
use portaflow::text::clip;
use portaflow_tests::{
    flux1_forward_on_golden_inputs, flux2_forward_on_golden_inputs, golden, max_abs_diff,
    max_rel_diff, sd3_forward_on_golden_inputs,
};

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
    let mut model = lora::train_only(model, "policy");
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
    // Nothing else either: norms, embeddings, biases are frozen too.
    let every = burn::optim::GradientsParams::from_grads(grads, &model);
    assert_eq!(
        every.len(),
        adapter_grads,
        "parameters outside the adapter received gradients"
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

// ---- parity with peft / diffusers (assets/golden/lora, tools/golden/make_lora_fixtures.py) ----

fn case(name: &str) -> std::path::PathBuf {
    golden("lora").join(name)
}

fn expected(name: &str, key: &str) -> Vec<f32> {
    let file = if name == "roundtrip" {
        "portaflow_output.safetensors"
    } else {
        "expected.safetensors"
    };
    let mut io = Weights::open_file(&case(name).join(file)).unwrap();
    let shape = io.shape(key).unwrap_or_else(|| panic!("{name}: no {key}"));
    io.read(key, &shape).unwrap().unwrap()
}

fn assert_matches(what: &str, got: &[f32], want: &[f32], base: &[f32]) {
    let rel = max_rel_diff(got, want);
    println!("{what}: relative difference to peft {rel:.2e}");
    assert!(rel < 1e-4, "{what}: differs from peft by {rel} (relative)");
    assert!(
        max_abs_diff(base, want) > 100.0 * max_abs_diff(got, want),
        "{what}: the adapter's effect must dwarf the error"
    );
}

fn read(name: &str, file: &str) -> LoraWeights {
    LoraWeights::read(&case(name).join(file)).unwrap()
}

#[test]
fn sd3_peft_and_diffusers_adapters_match_peft() {
    let device = cpu();
    let base_model = sd3::load_dir(&golden("sd3_tiny"), &device).unwrap();
    let base = sd3_forward_on_golden_inputs(&base_model, "sd3_tiny", &device);
    let want = expected("sd3_flowgrpo", "output");
    for (file, format) in [
        ("adapter", lora::Format::Peft),
        ("pytorch_lora_weights.safetensors", lora::Format::Diffusers),
    ] {
        let weights = read("sd3_flowgrpo", file);
        assert_eq!(weights.format, format);
        assert_eq!(weights.modules.len(), 15);
        let mut model = sd3::load_dir(&golden("sd3_tiny"), &device).unwrap();
        model = {
            let mut m = model;
            lora::attach(&mut m, "x", weights.component("transformer"), 1.0, &device).unwrap();
            m
        };
        let got = sd3_forward_on_golden_inputs(&model, "sd3_tiny", &device);
        assert_matches(file, &got, &want, &base);
    }
    // No metadata and no alpha keys: diffusers takes α = r.
    let weights = read(
        "sd3_flowgrpo",
        "pytorch_lora_weights_no_metadata.safetensors",
    );
    assert!(weights.modules.values().all(|m| m.scaling == 1.0));
    let mut model = sd3::load_dir(&golden("sd3_tiny"), &device).unwrap();
    lora::attach(
        &mut model,
        "x",
        weights.component("transformer"),
        1.0,
        &device,
    )
    .unwrap();
    let got = sd3_forward_on_golden_inputs(&model, "sd3_tiny", &device);
    assert_matches(
        "no metadata",
        &got,
        &expected("sd3_flowgrpo", "output_no_metadata"),
        &base,
    );
}

#[test]
fn peft_target_selection_matches_peft_module_by_module() {
    let device = cpu();
    let case_json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(case("sd35_patterns").join("case.json")).unwrap(),
    )
    .unwrap();
    let model = sd3::load_dir(&golden("sd35_tiny"), &device).unwrap();
    let paths = lora::linear_paths(&model);
    for adapter in ["adapter_regex", "adapter_lists"] {
        let text = std::fs::read_to_string(
            case("sd35_patterns")
                .join(adapter)
                .join("adapter_config.json"),
        )
        .unwrap();
        let config: LoraConfig = serde_json::from_str(&text).unwrap();
        let ours: Vec<(String, usize, f64)> = paths
            .iter()
            .filter(|p| config.selects(p))
            .map(|p| {
                let (r, alpha) = (config.rank_for(p), config.alpha_for(p));
                (p.clone(), r, config.scaling(r, alpha))
            })
            .collect();
        let mut peft: Vec<(String, usize, f64)> = case_json["wrapped_modules"][adapter]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                (
                    m["module"].as_str().unwrap().to_string(),
                    m["r"].as_u64().unwrap() as usize,
                    m["scaling"].as_f64().unwrap(),
                )
            })
            .collect();
        let mut ours_sorted = ours.clone();
        ours_sorted.sort_by(|a, b| a.0.cmp(&b.0));
        peft.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(
            ours_sorted.len(),
            peft.len(),
            "{adapter}: {ours_sorted:?} vs {peft:?}"
        );
        for (o, p) in ours_sorted.iter().zip(&peft) {
            assert_eq!((&o.0, o.1), (&p.0, p.1), "{adapter}");
            assert!(
                (o.2 - p.2).abs() < 1e-12,
                "{adapter} {}: scaling {} vs {}",
                o.0,
                o.2,
                p.2
            );
        }
    }
}

#[test]
fn sd35_stacked_weighted_adapters_match_diffusers_set_adapters() {
    let device = cpu();
    let fresh = || sd3::load_dir(&golden("sd35_tiny"), &device).unwrap();
    let base = sd3_forward_on_golden_inputs(&fresh(), "sd35_tiny", &device);
    let regex = read("sd35_patterns", "adapter_regex");
    let lists = read("sd35_patterns", "adapter_lists");
    let mut model = fresh();
    lora::attach(
        &mut model,
        "regex",
        regex.component("transformer"),
        1.0,
        &device,
    )
    .unwrap();
    let got = sd3_forward_on_golden_inputs(&model, "sd35_tiny", &device);
    assert_matches(
        "regex",
        &got,
        &expected("sd35_patterns", "output_regex"),
        &base,
    );
    lora::attach(
        &mut model,
        "lists",
        lists.component("transformer"),
        0.5,
        &device,
    )
    .unwrap();
    let got = sd3_forward_on_golden_inputs(&model, "sd35_tiny", &device);
    assert_matches(
        "regex + 0.5·lists",
        &got,
        &expected("sd35_patterns", "output"),
        &base,
    );
    lora::set_weight(&mut model, "regex", 0.0).unwrap();
    lora::set_weight(&mut model, "lists", 1.0).unwrap();
    let got = sd3_forward_on_golden_inputs(&model, "sd35_tiny", &device);
    assert_matches(
        "lists",
        &got,
        &expected("sd35_patterns", "output_lists"),
        &base,
    );
}

#[test]
fn flux1_peft_and_kohya_adapters_match_diffusers() {
    let device = cpu();
    let fresh = || flux1::load_dir(&golden("flux1_tiny"), &device).unwrap();
    let base = flux1_forward_on_golden_inputs(&fresh(), "flux1_tiny", &device);
    let mut model = fresh();
    let peft = read("flux1_boxflow", "adapter");
    assert_eq!(peft.modules.len(), 18);
    lora::attach(
        &mut model,
        "boxflow",
        peft.component("transformer"),
        1.0,
        &device,
    )
    .unwrap();
    let got = flux1_forward_on_golden_inputs(&model, "flux1_tiny", &device);
    assert_matches(
        "flux1 peft",
        &got,
        &expected("flux1_boxflow", "output"),
        &base,
    );

    let kohya = read("flux1_boxflow", "kohya.safetensors");
    assert_eq!(kohya.format, lora::Format::Kohya);
    let mut model = fresh();
    lora::attach(
        &mut model,
        "kohya",
        kohya.component("transformer"),
        1.0,
        &device,
    )
    .unwrap();
    let got = flux1_forward_on_golden_inputs(&model, "flux1_tiny", &device);
    assert_matches(
        "flux1 kohya",
        &got,
        &expected("flux1_boxflow", "output_kohya"),
        &base,
    );
}

#[test]
fn flux2_rtdmd_torch_state_dicts_stack_as_rtdmd_does() {
    let device = cpu();
    let fresh = || flux2::load_dir(&golden("flux2_tiny"), &device).unwrap();
    let base = flux2_forward_on_golden_inputs(&fresh(), "flux2_tiny", &device);
    // RTDMD's .pt files carry no α; its card says r 32, α 64 (here r 4, α 8).
    let cold = read("flux2_rtdmd", "cold_start/generator_ema.pt").with_alpha(8.0);
    let rl = read("flux2_rtdmd", "rtdmd/generator_ema.pt").with_alpha(8.0);
    assert_eq!(cold.format, lora::Format::TorchPt);
    assert_eq!((cold.modules.len(), rl.modules.len()), (12, 12));
    // The same adapter as peft saved it.
    let peft = read("flux2_rtdmd", "cold_start_peft");
    assert_eq!(peft.modules, cold.modules);

    let mut model = fresh();
    lora::attach(
        &mut model,
        "cold",
        cold.component("transformer"),
        1.0,
        &device,
    )
    .unwrap();
    let got = flux2_forward_on_golden_inputs(&model, "flux2_tiny", &device);
    assert_matches(
        "cold start",
        &got,
        &expected("flux2_rtdmd", "output_cold_start"),
        &base,
    );
    // RTDMD's stacking: merge the cold start into the base, then the RL adapter on top.
    lora::merge_and_unload(&mut model, "cold").unwrap();
    lora::attach(
        &mut model,
        "rtdmd",
        rl.component("transformer"),
        1.0,
        &device,
    )
    .unwrap();
    let got = flux2_forward_on_golden_inputs(&model, "flux2_tiny", &device);
    assert_matches("stacked", &got, &expected("flux2_rtdmd", "output"), &base);
}

#[test]
fn bad_adapter_files_are_refused_with_the_reason() {
    let dir = std::env::temp_dir().join(format!("portaflow-bad-lora-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // Truncated safetensors.
    let good =
        std::fs::read(case("sd3_flowgrpo").join("pytorch_lora_weights.safetensors")).unwrap();
    std::fs::write(dir.join("cut.safetensors"), &good[..good.len() / 2]).unwrap();
    let err = LoraWeights::read(&dir.join("cut.safetensors"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("cut.safetensors") && err.contains("truncated"),
        "{err}"
    );
    // A config whose rank disagrees with the tensors.
    let peft = dir.join("peft");
    std::fs::create_dir_all(&peft).unwrap();
    let src = case("sd3_flowgrpo").join("adapter");
    std::fs::copy(
        src.join("adapter_model.safetensors"),
        peft.join("adapter_model.safetensors"),
    )
    .unwrap();
    let config = std::fs::read_to_string(src.join("adapter_config.json"))
        .unwrap()
        .replace("\"r\": 4", "\"r\": 8");
    std::fs::write(peft.join("adapter_config.json"), config).unwrap();
    let err = LoraWeights::read(&peft).unwrap_err().to_string();
    assert!(
        err.contains("rank 4 disagrees with the config's rank 8"),
        "{err}"
    );
    // A pickle that would run code.
    let err = LoraWeights::read(&golden("torch_pt").join("evil.pt"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("system"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

// ---- round trip: what portaflow writes loads in peft / diffusers with the same output ----
//
// `PORTAFLOW_WRITE_ROUNDTRIP=1 cargo test --workspace --test lora roundtrip` rewrites
// `assets/golden/lora/roundtrip/` (a trained-looking adapter on sd3_tiny saved as PEFT and
// diffusers, plus portaflow's output); `tools/check/load_lora_in_peft.py` then loads both files
// with peft / diffusers and stores their outputs next to them. This test checks the committed
// files without Python.

fn roundtrip_adapter(device: &Device) -> (sd3::Sd3Transformer, LoraWeights) {
    let mut model = sd3::load_dir(&golden("sd3_tiny"), device).unwrap();
    let mut config = LoraConfig::flow_grpo_sd3();
    config.r = 4;
    config.lora_alpha = 8.0;
    config.alpha_pattern.0.push(("attn.to_out.0".into(), 2.0));
    config.rank_pattern.0.push(("add_k_proj".into(), 2));
    lora::init_adapter(&mut model, "trained", &config, 7, device).unwrap();
    // Move B off zero as training would.
    let mut k = 0u64;
    let modules: Vec<(String, LoraModule)> = lora::extract(&model, "trained")
        .unwrap()
        .into_iter()
        .map(|(p, mut m)| {
            k += 1;
            m.b = module(m.rank, m.d_in, m.d_out, m.alpha, k).b;
            (p, m)
        })
        .collect();
    lora::remove(&mut model, "trained");
    let weights = LoraWeights::from_component("transformer", modules, Some(config));
    lora::attach(
        &mut model,
        "trained",
        weights.component("transformer"),
        1.0,
        device,
    )
    .unwrap();
    (model, weights)
}

#[test]
fn roundtrip_adapters_portaflow_writes_load_in_peft_and_diffusers_unchanged() {
    let device = cpu();
    let dir = case("roundtrip");
    let (model, weights) = roundtrip_adapter(&device);
    let ours = sd3_forward_on_golden_inputs(&model, "sd3_tiny", &device);
    if std::env::var("PORTAFLOW_WRITE_ROUNDTRIP").is_ok_and(|v| v == "1") {
        weights
            .write_peft(&dir.join("adapter"), "transformer")
            .unwrap();
        weights
            .write_diffusers(&dir.join("pytorch_lora_weights.safetensors"))
            .unwrap();
        let stored = std::collections::BTreeMap::from([(
            "output".to_string(),
            portaflow::model::export::Stored {
                shape: vec![2, 16, 8, 12],
                values: ours.clone(),
            },
        )]);
        portaflow::model::export::save_safetensors(
            &stored,
            &dir.join("portaflow_output.safetensors"),
            None,
        )
        .unwrap();
        eprintln!(
            "wrote {}; now run tools/check/load_lora_in_peft.py",
            dir.display()
        );
        return;
    }
    // File-level invariants of what we write, without Python.
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("adapter/adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(config["peft_type"], "LORA");
    assert_eq!(config["r"], 4);
    assert_eq!(config["rank_pattern"]["add_k_proj"], 2);
    let peft = Weights::open_file(&dir.join("adapter/adapter_model.safetensors")).unwrap();
    for key in peft.keys() {
        assert!(
            key.starts_with("base_model.model.transformer_blocks."),
            "{key}"
        );
        assert!(
            key.ends_with(".lora_A.weight") || key.ends_with(".lora_B.weight"),
            "{key}"
        );
    }
    let diffusers = Weights::open_file(&dir.join("pytorch_lora_weights.safetensors")).unwrap();
    assert!(
        diffusers
            .keys()
            .iter()
            .all(|k| k.starts_with("transformer.transformer_blocks."))
    );
    let metadata: serde_json::Value =
        serde_json::from_str(&diffusers.metadata()["lora_adapter_metadata"]).unwrap();
    assert_eq!(metadata["transformer.lora_alpha"], 8.0);
    // The committed files are what this code writes today.
    assert_eq!(
        LoraWeights::read(&dir.join("adapter")).unwrap().modules,
        weights.modules
    );
    // And peft / diffusers computed the same output from them.
    // (Within float noise: the CPU's SIMD width changes the last bits of a sum.)
    let committed = expected("roundtrip", "output");
    let drift = max_rel_diff(&ours, &committed);
    assert!(
        drift < 1e-5,
        "portaflow's own output changed by {drift} since the files were written"
    );
    let mut io = Weights::open_file(&dir.join("peft_output.safetensors"))
        .expect("run tools/check/load_lora_in_peft.py to record peft's output");
    for key in ["peft", "diffusers"] {
        let theirs = io.read(key, &[2, 16, 8, 12]).unwrap().unwrap();
        let rel = max_rel_diff(&ours, &theirs);
        assert!(
            rel < 1e-4,
            "{key} loads our adapter with output {rel} (relative) away from ours"
        );
    }
}
