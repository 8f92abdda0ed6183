//! RTDMD's AC-DMD cold start end to end on a tiny pipeline: both adapters train, a resumed run
//! continues (to float rounding), the student evaluates at its own few steps, bad settings are named.

use portaflow::device::ChosenDevice;
use portaflow::lora::{self, LoraWeights};
use portaflow::train::distill::acdmd::{AcDmdConfig, AcDmdTrainer, GENERATOR};
use portaflow::world::prompt_sets;
use portaflow_tests::{TempDir, tiny_pretrained_pipeline};

fn config(iterations: usize) -> AcDmdConfig {
    let mut c = AcDmdConfig::default();
    c.model.lora_rank = 4;
    c.model.lora_alpha = 8.0;
    c.teacher_guidance = 3.0;
    c.fake_update_ratio = 2;
    c.batch_size = 2;
    c.iterations = iterations;
    c.learning_rate = 1e-2;
    c.fake_learning_rate = 1e-2;
    c.eval_every = 0;
    c.save_every = 1;
    c
}

fn trainer(c: AcDmdConfig, run: &std::path::Path) -> AcDmdTrainer {
    let device = ChosenDevice::cpu().device;
    let (train, test) = prompt_sets::build();
    let prompts = train.into_iter().take(16).map(|s| s.prompt).collect();
    let ad = device.clone().autodiff();
    AcDmdTrainer::new(
        c,
        tiny_pretrained_pipeline(&device),
        prompts,
        test,
        run,
        &ad,
    )
    .unwrap()
}

fn student_values(t: &AcDmdTrainer) -> Vec<f32> {
    lora::extract(t.generator(), GENERATOR)
        .unwrap()
        .into_iter()
        .flat_map(|(_, m)| m.a.into_iter().chain(m.b))
        .collect()
}

#[test]
fn both_adapters_train_and_a_resumed_run_continues() {
    let run = TempDir::new("acdmd-run");
    let mut t = trainer(config(3), run.path());
    // RTDMD's 4 timesteps through the tiny model's shift.
    assert_eq!(t.sigmas().len(), 4);
    assert!(t.sigmas()[0] == 1.0 && t.sigmas().windows(2).all(|w| w[1] < w[0]));
    let before = student_values(&t);
    let mut logged = Vec::new();
    while !t.done() {
        let m = t.iterate().unwrap();
        assert!(
            m.dmd_loss.is_finite() && m.fake_loss.is_finite() && m.consistency.is_finite(),
            "{m:?}"
        );
        assert!((1..=4).contains(&m.stop_step), "{m:?}");
        logged.push(m);
    }
    let after = student_values(&t);
    assert_ne!(before, after, "the generator adapter did not move");
    let fake_b: f32 = LoraWeights::read(&run.path().join("checkpoint/fake_score"))
        .unwrap()
        .component("transformer")
        .iter()
        .flat_map(|(_, m)| m.b.clone())
        .map(f32::abs)
        .sum();
    assert!(fake_b > 0.0, "the fake score's B factors are still zero");
    assert!(
        run.path()
            .join("generator_final/adapter_model.safetensors")
            .is_file()
    );

    // Stopped after iteration 2 and resumed: the same student as the uninterrupted run.
    let split = TempDir::new("acdmd-resume");
    let mut first = trainer(config(2), split.path());
    while !first.done() {
        first.iterate().unwrap();
    }
    drop(first);
    let mut resumed = trainer(config(3), split.path());
    assert_eq!(resumed.iteration, 2);
    resumed.iterate().unwrap();
    // Adapters and both optimizers restore bit-exactly, but the first resumed step lands within
    // float rounding (≈ 3e-8 on factors of ≈ 1e-2), not bit-exactly as Flow-GRPO's resume does;
    // the cause is not found yet.
    let diff = portaflow_tests::max_abs_diff(&student_values(&resumed), &after);
    assert!(diff < 1e-6, "the resumed run differs by {diff}");
    let lines = std::fs::read_to_string(split.path().join("metrics.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 3);

    // The student samples at its own 4 σ with CPS, and is scored.
    let mut c = config(1);
    c.eval_every = 1;
    c.eval_prompts = Some(2);
    let eval_run = TempDir::new("acdmd-eval");
    let mut t = trainer(c, eval_run.path());
    let e = t.evaluate().unwrap();
    assert!(e.steps == 4 && (0.0..=1.0).contains(&e.accuracy), "{e:?}");
}

#[test]
fn settings_that_cannot_run_are_named() {
    let mut c = config(1);
    c.timesteps = vec![1000.0, 500.0, 750.0];
    assert!(
        c.validate()
            .unwrap_err()
            .contains("timesteps must be decreasing")
    );
    let mut c = config(1);
    c.renoise_range = [980.0, 20.0];
    assert!(c.validate().unwrap_err().contains("renoise_range"));
    let mut c = config(1);
    c.eta = 1.5;
    assert!(c.validate().unwrap_err().contains("eta"));
    let mut c = config(1);
    c.model.merge_adapters = vec!["runs/acdmd/generator_final".into()];
    assert!(c.validate().unwrap_err().contains("merge_adapters"));
    let mut c = config(1);
    c.model.init_adapter = Some("runs/opd-cold".into());
    assert!(c.validate().unwrap_err().contains("model.init_adapter"));
    let run = TempDir::new("acdmd-other-config");
    let mut t = trainer(config(1), run.path());
    t.iterate().unwrap();
    drop(t);
    let mut other = config(2);
    other.eta = 0.5;
    let device = ChosenDevice::cpu().device;
    let (train, test) = prompt_sets::build();
    let prompts = train.into_iter().take(16).map(|s| s.prompt).collect();
    let ad = device.clone().autodiff();
    let err = AcDmdTrainer::new(
        other,
        tiny_pretrained_pipeline(&device),
        prompts,
        test,
        run.path(),
        &ad,
    )
    .err()
    .expect("a run directory started with another config")
    .to_string();
    assert!(err.contains("only iterations may change"), "{err}");
}

#[test]
fn every_acdmd_preset_parses_and_validates() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs");
    let mut count = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("acdmd-")
        {
            AcDmdConfig::from_file(&path).unwrap_or_else(|e| panic!("{e}"));
            count += 1;
        }
    }
    assert!(count >= 2, "presets missing from {}", dir.display());
}
