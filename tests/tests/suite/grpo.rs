//! Flow-GRPO training end to end on a tiny pipeline: the on-policy ratio is exactly 1 on the CPU
//! and on the Vulkan adapter, a run resumed from its checkpoint continues exactly, and an epoch
//! leaves everything a user expects in the run directory.

use burn::tensor::Device;
use portaflow::device::ChosenDevice;
use portaflow::lora::{self, LoraWeights};
use portaflow::pipeline::eval::{EvalOptions, evaluate_pipeline};
use portaflow::pipeline::{self, GenerateOptions, Pipeline};
use portaflow::reward::{Reward, RewardError, Score, Task};
use portaflow::sample::select::StepSelection;
use portaflow::sample::step::StepKind;
use portaflow::train::grpo::config::{GrpoConfig, KlType, SdeType, StdScope};
use portaflow::train::grpo::{GrpoTrainer, POLICY};
use portaflow::world::prompt_sets;
use portaflow::world::render::Image;
use portaflow_tests::{TempDir, tiny_pipeline, vulkan};

/// A dense, continuous reward so that every group has non-zero advantages: redness.
struct Redness;

impl Reward for Redness {
    fn name(&self) -> &str {
        "redness"
    }
    fn score(&self, images: &[Image], _tasks: &[Task]) -> Result<Vec<Option<Score>>, RewardError> {
        Ok(images
            .iter()
            .map(|image| {
                let red = image
                    .pixels
                    .iter()
                    .map(|p| p[0] as f32 - (p[1] as f32 + p[2] as f32) / 2.0)
                    .sum::<f32>()
                    / (255.0 * image.pixels.len() as f32);
                Some(Score {
                    reward: red,
                    success: red > 0.0,
                })
            })
            .collect())
    }
}

/// Redness, but NaN for every fourth image (a reward server returning garbage).
struct SometimesNan;

impl Reward for SometimesNan {
    fn name(&self) -> &str {
        "sometimes-nan"
    }
    fn score(&self, images: &[Image], tasks: &[Task]) -> Result<Vec<Option<Score>>, RewardError> {
        let mut scores = Redness.score(images, tasks)?;
        for s in scores.iter_mut().step_by(4) {
            s.as_mut().unwrap().reward = f32::NAN;
        }
        Ok(scores)
    }
}

/// Flow-GRPO's original recipe at toy size: SDE, every step but the last, CFG in rollout and
/// training, x-space KL.
fn config(epochs: usize) -> GrpoConfig {
    let mut c: GrpoConfig = toml::from_str("").unwrap();
    c.model.lora_rank = 4;
    c.model.lora_alpha = 8.0;
    c.sample.steps = 4;
    c.sample.eval_steps = 4;
    c.sample.group_size = 2;
    c.sample.groups_per_epoch = 4;
    c.sample.batch_size = 4;
    c.sample.sde_type = SdeType::Sde;
    c.sample.noise_level = 0.7;
    c.sample.guidance_scale = 3.0;
    c.sample.eval_guidance_scale = 3.0;
    c.train.cfg = true;
    c.train.steps = StepSelection::AllButLast;
    c.train.clip_range = 1e-4;
    c.train.beta = 0.04;
    c.train.kl_type = KlType::X;
    c.train.std_scope = StdScope::Global;
    c.train.learning_rate = 1e-2;
    c.train.grad_accum = 1;
    c.train.ema_every = 1;
    c.run.epochs = epochs;
    c.run.eval_every = 1;
    c.run.eval_prompts = Some(4);
    c.run.grid_every = 1;
    c.run.save_every = 1;
    c
}

fn base(device: &Device) -> Pipeline {
    portaflow_tests::tiny_pretrained_pipeline(device)
}

/// `config` without held-out evaluation or grids (tests of one epoch's training).
fn without_eval(mut c: GrpoConfig) -> GrpoConfig {
    c.run.eval_every = 0;
    c.run.grid_every = 0;
    c
}

fn trainer(config: GrpoConfig, run: &std::path::Path, device: &Device) -> GrpoTrainer {
    let (train, test) = prompt_sets::build();
    let tasks = train.into_iter().take(32).map(Task::Shapes).collect();
    let ad = device.clone().autodiff();
    GrpoTrainer::new(config, base(device), tasks, test, run, &ad)
        .unwrap()
        .with_reward(Box::new(Redness))
}

/// A run of `config` on the tiny FLUX.1-dev pipeline (guidance-distilled), 8 training prompts,
/// rewarded by redness.
fn flux1_trainer(config: GrpoConfig, run: &std::path::Path, device: &Device) -> GrpoTrainer {
    let dir = portaflow_tests::golden("pipelines").join("flux1_pipeline_tiny");
    let (train, test) = prompt_sets::build();
    let tasks = train.into_iter().take(8).map(Task::Shapes).collect();
    let pipeline = Pipeline::from_dir(&dir, device).unwrap();
    GrpoTrainer::new(
        config,
        pipeline,
        tasks,
        test,
        run,
        &device.clone().autodiff(),
    )
    .unwrap()
    .with_reward(Box::new(Redness))
}

fn assert_same(a: &[f32], b: &[f32], what: &str) {
    let diff = portaflow_tests::max_abs_diff(a, b);
    assert!(diff == 0.0, "{what}: max |difference| {diff}");
}

fn adapter_values(t: &GrpoTrainer) -> Vec<f32> {
    lora::extract(t.policy(), POLICY)
        .unwrap()
        .into_iter()
        .flat_map(|(_, m)| m.a.into_iter().chain(m.b))
        .collect()
}

fn first_ratio_is_one(device: &Device, what: &str) {
    let run = TempDir::new(&format!("grpo-ratio-{what}"));
    // One rollout batch, two trained steps: lavapipe is slow.
    let mut c = without_eval(config(1));
    c.sample.steps = 3;
    c.sample.groups_per_epoch = 2;
    let mut t = trainer(c, run.path(), device);
    let m = t.epoch(|_| {}).unwrap();
    println!(
        "{what}: first ratio error {:.2e}, epoch ratio range [{}, {}]",
        m.first_ratio_error, m.ratio_min, m.ratio_max
    );
    assert!(
        m.first_ratio_error < 1e-5,
        "{what}: on-policy ratio is off by {}",
        m.first_ratio_error
    );
    assert!(m.kl >= 0.0 && m.kl.is_finite());
}

#[test]
fn the_on_policy_ratio_is_one_on_the_cpu() {
    first_ratio_is_one(&ChosenDevice::cpu().device, "cpu");
}

#[test]
fn the_on_policy_ratio_is_one_on_vulkan() {
    first_ratio_is_one(&vulkan().device, "vulkan");
}

/// `train.inner_epochs = 2` (Flow-GRPO's `num_inner_epochs`): the first pass is on-policy (one
/// optimizer step after both micro-batches, so every ratio is 1), the second trains the same
/// rollouts again after that update, off-policy.
#[test]
fn a_second_inner_epoch_trains_the_same_rollouts_off_policy() {
    let device = ChosenDevice::cpu().device;
    let run_epoch = |inner: usize| {
        let run = TempDir::new(&format!("grpo-inner-{inner}"));
        let mut c = without_eval(config(1));
        // 4 groups × 2 images in micro-batches of 4: one optimizer step per pass.
        c.train.grad_accum = 2;
        c.train.inner_epochs = inner;
        c.validate().unwrap();
        let mut t = trainer(c, run.path(), &device);
        let m = t.epoch(|_| {}).unwrap();
        (m, adapter_values(&t))
    };
    let (one, after_one) = run_epoch(1);
    let (two, after_two) = run_epoch(2);
    println!(
        "inner epochs 1: ratios [{}, {}]; 2: ratios [{}, {}]",
        one.ratio_min, one.ratio_max, two.ratio_min, two.ratio_max
    );
    assert!(one.first_ratio_error < 1e-5 && two.first_ratio_error < 1e-5);
    assert!(
        (one.ratio_min - 1.0).abs() < 1e-5 && (one.ratio_max - 1.0).abs() < 1e-5,
        "one pass is on-policy"
    );
    assert!(
        two.ratio_max - two.ratio_min > 1e-5,
        "the second pass did not see the first pass's update"
    );
    assert!(
        portaflow_tests::max_abs_diff(&after_one, &after_two) > 0.0,
        "the second pass did not train"
    );
    let mut none = config(1);
    none.train.inner_epochs = 0;
    assert!(none.validate().unwrap_err().contains("train.inner_epochs"));
}

#[test]
fn an_epoch_trains_the_adapter_and_writes_the_run_directory() {
    let run = TempDir::new("grpo-epoch");
    let device = ChosenDevice::cpu().device;
    let mut c = config(1);
    c.run.snapshot_every = 1;
    let mut t = trainer(c, run.path(), &device);
    let before = adapter_values(&t);
    let mut events = Vec::new();
    let m = t
        .epoch(|e| {
            events.push(match e {
                portaflow::train::grpo::GrpoEvent::Epoch(_) => "epoch",
                portaflow::train::grpo::GrpoEvent::Eval(_) => "eval",
                portaflow::train::grpo::GrpoEvent::Grid(_) => "grid",
                portaflow::train::grpo::GrpoEvent::Checkpoint(_) => "checkpoint",
            })
        })
        .unwrap();
    assert!(t.done());
    assert_eq!(
        events,
        ["eval", "epoch", "grid", "eval", "checkpoint", "checkpoint"]
    );
    assert_ne!(
        before,
        adapter_values(&t),
        "one epoch must move the adapter"
    );
    assert!(m.reward_std > 0.0 && m.kept > 0 && m.global_step == 2);
    assert_eq!(m.trained_steps, vec![0, 1, 2]);
    // Kept samples have an advantage, so at least one group's rewards differ.
    assert!(m.flat_groups < config(1).sample.groups_per_epoch, "{m:?}");
    // The epoch's mean reward is a mean of the per-tag means, so it lies between them.
    let (lo, hi) = m
        .reward_by_tag
        .values()
        .fold((f64::MAX, f64::MIN), |(lo, hi), &r| (lo.min(r), hi.max(r)));
    assert!(
        lo - 1e-9 <= m.reward_mean && m.reward_mean <= hi + 1e-9,
        "{m:?}"
    );
    let dir = run.path();
    for file in [
        "config.toml",
        "metrics.jsonl",
        "eval.jsonl",
        "grids/epoch00001.png",
        "checkpoint/state.json",
        "checkpoint/optimizer.bin",
    ] {
        assert!(dir.join(file).is_file(), "{file} is missing");
    }
    // The saved adapters are plain PEFT folders.
    for folder in [
        "checkpoint/adapter",
        "checkpoint/ema",
        "adapter_final",
        "snapshots/epoch-1",
    ] {
        let w = LoraWeights::read(&dir.join(folder)).unwrap();
        assert_eq!(w.configs["transformer"].r, 4, "{folder}");
        assert!(!w.modules.is_empty());
    }
    let line = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    let json: serde_json::Value = serde_json::from_str(line.trim()).unwrap();
    for key in [
        "reward_mean",
        "reward_std",
        "approx_kl",
        "kl",
        "clip_fraction",
        "ratio_mean",
        "train_accuracy_by_tag",
        "reward_by_tag",
        "flat_groups",
        "seconds_rollout",
        "seconds_train",
        "learning_rate",
    ] {
        assert!(json.get(key).is_some(), "metrics.jsonl lacks {key}");
    }
    // The held-out evaluation also reports the run's own reward on the same images.
    let evals = std::fs::read_to_string(dir.join("eval.jsonl")).unwrap();
    for line in evals.lines() {
        let eval: serde_json::Value = serde_json::from_str(line).unwrap();
        let redness = &eval["rewards"]["redness"];
        assert_eq!(redness["judged"], eval["images"], "{line}");
        let mean = redness["mean"].as_f64().unwrap();
        assert!(mean > 0.0 && mean < 1.0, "{line}");
        assert!(
            redness["success_by_tag"].as_object().unwrap().len() > 1,
            "{line}"
        );
    }
}

/// Redness that fails while `down` is set, like a reward server that went away.
struct Flaky(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl Reward for Flaky {
    fn name(&self) -> &str {
        "flaky"
    }
    fn score(&self, images: &[Image], tasks: &[Task]) -> Result<Vec<Option<Score>>, RewardError> {
        if self.0.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(RewardError::Config("connection refused".into()));
        }
        Redness.score(images, tasks)
    }
}

#[test]
fn a_reward_failing_in_the_held_out_evaluation_is_logged_and_loses_nothing() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let run = TempDir::new("grpo-eval-reward");
    let device = ChosenDevice::cpu().device;
    let down = Arc::new(AtomicBool::new(true));
    let mut t = trainer(config(1), run.path(), &device).with_reward(Box::new(Flaky(down.clone())));
    let failed = t.evaluate().unwrap();
    assert!(failed.rewards.is_empty(), "{failed:?}");
    let error = failed.rewards_error.as_deref().unwrap();
    assert!(error.contains("connection refused"), "{error}");
    assert!(
        failed.images > 0 && failed.accuracy.is_finite(),
        "the detector's numbers stand"
    );
    down.store(false, Ordering::SeqCst);
    let scored = t.evaluate().unwrap();
    assert_eq!(scored.rewards["flaky"].judged, scored.images);
    assert_eq!(scored.rewards_error, None);
    assert_eq!(scored.accuracy, failed.accuracy, "the same images");
}

#[test]
fn flow_grpo_trains_a_flux1_pipeline_on_policy_with_its_guidance_embedding() {
    // FLUX.1-dev takes the guidance scale as an input and runs no CFG: rollout and training
    // both embed 3.5 (`Pipeline::guided_conditioning`), so the first ratio is exactly 1.
    let device = ChosenDevice::cpu().device;
    let dir = portaflow_tests::golden("pipelines").join("flux1_pipeline_tiny");
    let mut c = without_eval(config(1));
    c.sample.guidance_scale = 3.5;
    c.sample.eval_guidance_scale = 3.5;
    c.sample.groups_per_epoch = 2;
    // The fixture's size (FLUX's default 1024 px would not fit a test).
    c.sample.resolution = Some(32);
    let run = TempDir::new("grpo-flux1");
    let mut t = flux1_trainer(c, run.path(), &device);
    let before = adapter_values(&t);
    let m = t.epoch(|_| {}).unwrap();
    assert!(m.first_ratio_error <= 1e-5, "{m:?}");
    // The error of opening a run of `config` on `pipeline`, if any.
    let open = |config: &GrpoConfig, pipeline: Pipeline| {
        GrpoTrainer::new(
            config.clone(),
            pipeline,
            prompt_sets::build()
                .0
                .into_iter()
                .take(8)
                .map(Task::Shapes)
                .collect(),
            Vec::<Task>::new(),
            TempDir::new("grpo-open").path(),
            &device.clone().autodiff(),
        )
        .err()
        .map(|e| e.to_string())
    };
    // A size the model cannot sample is named before any compute.
    let mut odd = without_eval(config(1));
    odd.sample.resolution = Some(33);
    let flux = || Pipeline::from_dir(&dir, &device).unwrap();
    let err = open(&odd, flux()).expect("33 px is refused");
    assert!(err.contains("sample.resolution = 33"), "{err}");
    // CFG in rollouts but not in training is refused for a model that runs CFG; FLUX.1-dev runs
    // none, so its scale needs no `train.cfg`.
    let mut no_cfg = without_eval(config(1));
    no_cfg.train.cfg = false;
    let err = open(&no_cfg, base(&device)).expect("the bundled model runs CFG at 3");
    assert!(err.contains("train.cfg = false"), "{err}");
    no_cfg.sample.resolution = Some(32);
    assert_eq!(open(&no_cfg, flux()), None, "FLUX.1-dev embeds the scale");
    assert!(m.kept > 0, "{m:?}");
    assert_ne!(
        before,
        adapter_values(&t),
        "the epoch must move the adapter"
    );
}

#[test]
fn a_resumed_run_continues_exactly() {
    let device = ChosenDevice::cpu().device;
    let straight = TempDir::new("grpo-straight");
    let mut a = trainer(config(2), straight.path(), &device);
    a.epoch(|_| {}).unwrap();
    let a1 = adapter_values(&a);
    a.epoch(|_| {}).unwrap();

    let resumed = TempDir::new("grpo-resumed");
    let mut b = trainer(config(2), resumed.path(), &device);
    b.epoch(|_| {}).unwrap();
    assert_same(
        &a1,
        &adapter_values(&b),
        "two identical runs differ after one epoch",
    );
    drop(b); // a killed process: only the run directory survives
    let mut b = trainer(config(2), resumed.path(), &device);
    assert_eq!(b.epoch, 1);
    assert_same(
        &a1,
        &adapter_values(&b),
        "the checkpoint does not restore the adapter",
    );
    b.epoch(|_| {}).unwrap();
    assert_same(
        &adapter_values(&a),
        &adapter_values(&b),
        "the resumed run diverged",
    );
    let lines = |d: &std::path::Path| {
        std::fs::read_to_string(d.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .count()
    };
    assert_eq!(lines(resumed.path()), 2);
    let ema = |d: &std::path::Path| LoraWeights::read(&d.join("adapter_final")).unwrap().modules;
    assert_eq!(ema(straight.path()), ema(resumed.path()));

    // Changing anything but the length is refused.
    let mut other = config(3);
    other.train.beta = 0.0;
    let (train, test) = prompt_sets::build();
    let tasks = train.into_iter().take(32).map(Task::Shapes).collect();
    let ad = device.clone().autodiff();
    let err = GrpoTrainer::new(other, base(&device), tasks, test, resumed.path(), &ad)
        .err()
        .unwrap();
    assert!(
        err.to_string()
            .contains("only run.epochs and run.budget_minutes may change"),
        "{err}"
    );
}

#[test]
fn a_time_budget_ends_the_run_and_survives_a_resume() {
    let device = ChosenDevice::cpu().device;
    let run = TempDir::new("grpo-budget");
    let mut c = without_eval(config(50));
    c.run.budget_minutes = Some(1e-6);
    let mut t = trainer(c.clone(), run.path(), &device);
    assert!(!t.done());
    t.epoch(|_| {}).unwrap();
    assert!(t.done() && t.epoch == 1, "a spent budget ends the run");
    assert!(run.path().join("adapter_final").is_dir());
    let spent = t.trained_seconds;
    assert!(spent > 0.0);
    drop(t);
    // A longer budget on resume continues where the clock stopped.
    c.run.budget_minutes = Some(600.0);
    let t = trainer(c, run.path(), &device);
    assert_eq!((t.epoch, t.trained_seconds), (1, spent));
    assert!(!t.done());
}

#[test]
fn every_preset_in_configs_parses_and_validates() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs");
    let mut count = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if !["grpo-", "draft-", "opd-", "rtdmd-"]
            .iter()
            .any(|p| name.starts_with(p))
        {
            continue;
        }
        GrpoConfig::from_file(&path).unwrap_or_else(|e| panic!("{e}"));
        count += 1;
    }
    assert!(count >= 5, "presets missing from {}", dir.display());
    // The same-budget comparison: every method on one budget and one held-out eval.
    let mut budgets = Vec::new();
    for entry in std::fs::read_dir(dir.join("compare")).unwrap() {
        let path = entry.unwrap().path();
        let c = GrpoConfig::from_file(&path).unwrap_or_else(|e| panic!("{e}"));
        budgets.push((
            c.run.budget_minutes,
            c.run.eval_images_per_prompt,
            c.run.seed,
        ));
    }
    assert_eq!(budgets.len(), 7, "the seven methods of RESULTS.md");
    assert!(
        budgets.iter().all(|b| b == &budgets[0] && b.0.is_some()),
        "{budgets:?}"
    );
}

#[test]
fn non_finite_rewards_are_left_out_and_never_reach_the_weights() {
    let run = TempDir::new("grpo-nan");
    let device = ChosenDevice::cpu().device;
    let c = without_eval(config(1));
    let mut t = trainer(c, run.path(), &device).with_reward(Box::new(SometimesNan));
    let m = t.epoch(|_| {}).unwrap();
    assert_eq!(m.nonfinite_rewards, 2);
    assert!(m.reward_mean.is_finite() && m.kept > 0);
    assert!(adapter_values(&t).iter().all(|v| v.is_finite()));
}

#[test]
fn a_reward_server_dying_mid_run_abandons_the_epoch_and_keeps_the_state() {
    use portaflow::reward::remote::{RemoteConfig, RemoteReward};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    // Serves Redness while `up`; answers 503 while down.
    let up = Arc::new(AtomicBool::new(true));
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/", listener.local_addr().unwrap());
    let state = up.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let stream = stream.unwrap();
            if state.load(Ordering::SeqCst) {
                portaflow::reward::server::handle_connection(stream, &Redness);
            } else {
                let _ = portaflow::reward::http::read_request(&stream);
                let _ =
                    portaflow::reward::http::write_response(&stream, 503, "text/plain", b"gone");
            }
        }
    });
    let remote = RemoteReward::new(RemoteConfig {
        url,
        retries: 1,
        backoff_seconds: 0.01,
        ..Default::default()
    })
    .unwrap();
    let run = TempDir::new("grpo-remote");
    let device = ChosenDevice::cpu().device;
    let c = without_eval(config(3));
    let mut t = trainer(c, run.path(), &device).with_reward(Box::new(remote));
    t.epoch(|_| {}).unwrap();
    assert_eq!(t.epoch, 1);
    let before = adapter_values(&t);

    up.store(false, Ordering::SeqCst);
    let err = t.epoch(|_| {}).unwrap_err().to_string();
    assert!(err.contains("epoch abandoned, no update made"), "{err}");
    assert!(
        err.contains("HTTP 503: gone") && err.contains("2 attempt(s)"),
        "{err}"
    );
    assert_eq!(t.epoch, 1, "the failed epoch does not count");
    assert_same(
        &adapter_values(&t),
        &before,
        "adapter after the failed epoch",
    );

    up.store(true, Ordering::SeqCst);
    let m = t.epoch(|_| {}).unwrap();
    assert_eq!((t.epoch, m.epoch), (2, 2));
    assert!(m.reward_mean.is_finite());
}

#[test]
fn a_multi_reward_run_draws_both_tasks_and_scores_each_with_its_reward() {
    use portaflow::train::grpo::config::{RewardAggregate, RewardKind, RewardTerm};
    let run = TempDir::new("grpo-multi");
    let device = ChosenDevice::cpu().device;
    let mut c = without_eval(config(1));
    c.data.rewards = vec![
        RewardTerm {
            reward: RewardKind::Geneval,
            weight: 1.0,
            remote: None,
        },
        RewardTerm {
            reward: RewardKind::Ocr,
            weight: 0.5,
            remote: None,
        },
    ];
    c.data.aggregate = RewardAggregate::Advantages;
    c.validate().unwrap();
    assert_eq!(c.data.reward_name(), "1×geneval + 0.5×ocr");
    let (tasks, test) = portaflow::train::grpo::run_prompts(&c).unwrap();
    let digits = tasks
        .iter()
        .filter(|t| matches!(t, Task::Digits { .. }))
        .count();
    let shapes = tasks.len() - digits;
    assert!(
        shapes > 0 && digits.abs_diff(shapes) <= shapes / 10,
        "{shapes} vs {digits}"
    );
    // Without a test file, both tasks are held out, alternating: the Shapes test prompts and
    // the numbers training never draws.
    let held_out_numbers = portaflow::world::digits::held_out_prompts();
    assert_eq!(held_out_numbers.len(), 40);
    let kinds: Vec<bool> = test
        .iter()
        .map(|t| matches!(t, Task::Digits { .. }))
        .collect();
    assert_eq!(kinds.iter().filter(|&&d| d).count(), 40);
    assert_eq!(kinds[..4], [false, true, false, true], "{kinds:?}");
    assert!(
        tasks
            .iter()
            .all(|t| !held_out_numbers.iter().any(|h| h == t.prompt()))
    );
    let mut ocr_only = c.clone();
    ocr_only.data.rewards.remove(0);
    let (ocr_train, ocr_test) = portaflow::train::grpo::run_prompts(&ocr_only).unwrap();
    assert_eq!(ocr_train.len(), 960);
    let ocr_test: Vec<&str> = ocr_test.iter().map(|t| t.prompt()).collect();
    assert_eq!(ocr_test, held_out_numbers);
    // Enough groups that both tasks are drawn: 8 groups of 2.
    c.sample.groups_per_epoch = 8;
    let ad = device.clone().autodiff();
    let mut t = GrpoTrainer::new(c, base(&device), tasks, test, run.path(), &ad).unwrap();
    let m = t.epoch(|_| {}).unwrap();
    let names: Vec<&String> = m.reward_means.keys().collect();
    assert_eq!(names, ["geneval", "ocr"], "{:?}", m.reward_means);
    assert!(m.reward_mean.is_finite());
}

#[test]
fn real_prompt_files_load_as_flow_grpo_writes_them_and_text_prompts_are_held_out_by_the_reward() {
    use portaflow::train::grpo::config::RewardKind;
    let files = TempDir::new("grpo-real-prompts");
    let write = |name: &str, text: &str| {
        let path = files.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    // flow_grpo's dataset/geneval lines name COCO classes, which a reward server judges.
    let coco = write(
        "geneval.jsonl",
        concat!(
            r#"{"tag": "two_object", "include": [{"class": "bench", "count": 1}, {"class": "bus", "count": 1}], "exclude": [{"class": "bench", "count": 2}], "prompt": "a photo of a bench and a bus"}"#,
            "\n"
        ),
    );
    let mut c = without_eval(config(1));
    c.data.train_prompts = Some(coco.clone());
    c.data.test_prompts = Some(coco.clone());
    c.data.reward = RewardKind::Remote;
    c.data.remote = Some(Default::default());
    let (train, test) = portaflow::train::grpo::run_prompts(&c).unwrap();
    assert!(matches!(&train[0], Task::Shapes(s) if s.include[1].class == "bus"));
    assert_eq!(test.len(), 1);
    // The built-in detector knows circles, squares and triangles only: named.
    c.data.reward = RewardKind::Geneval;
    c.data.remote = None;
    let err = portaflow::train::grpo::run_prompts(&c)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("geneval.jsonl") && err.contains("unknown class `bench`"),
        "{err}"
    );

    // flow_grpo's dataset/ocr: one prompt per line, the text in double quotes.
    let ocr = write(
        "ocr.txt",
        "A sign that reads \"37\"\n\nthe number \"512\"\n",
    );
    c.data.reward = RewardKind::Ocr;
    c.data.train_prompts = Some(ocr.clone());
    c.data.test_prompts = Some(ocr.clone());
    let (train, test) = portaflow::train::grpo::run_prompts(&c).unwrap();
    let prompts: Vec<&str> = train.iter().map(|t| t.prompt()).collect();
    assert_eq!(prompts, ["A sign that reads \"37\"", "the number \"512\""]);
    assert!(test.iter().all(|t| matches!(t, Task::Digits { .. })));
    // Without a test file, the held-out numbers (not the Shapes prompts OCR cannot judge).
    let mut untested = c.clone();
    untested.data.test_prompts = None;
    let (_, test) = portaflow::train::grpo::run_prompts(&untested).unwrap();
    let test: Vec<&str> = test.iter().map(|t| t.prompt()).collect();
    assert_eq!(test, portaflow::world::digits::held_out_prompts());
    c.data.reward = RewardKind::Geneval;
    let err = portaflow::train::grpo::run_prompts(&c)
        .unwrap_err()
        .to_string();
    assert!(err.contains("reads text"), "{err}");
    c.data.reward = RewardKind::Ocr;
    let bad = write("bad.txt", "the number \"1\"\na sign without quotes\n");
    c.data.train_prompts = Some(bad);
    let err = portaflow::train::grpo::run_prompts(&c)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("bad.txt") && err.contains("line 2") && err.contains("double quotes"),
        "{err}"
    );

    // Held out, the text prompts are scored by the run's reward (the detector cannot).
    let run = TempDir::new("grpo-text-held-out");
    let device = ChosenDevice::cpu().device;
    c.data.train_prompts = Some(ocr);
    c.sample.groups_per_epoch = 2;
    c.run.eval_every = 1;
    c.run.eval_images_per_prompt = 2;
    let (train, test) = portaflow::train::grpo::run_prompts(&c).unwrap();
    let mut t = GrpoTrainer::new(
        c,
        base(&device),
        train,
        test,
        run.path(),
        &device.autodiff(),
    )
    .unwrap();
    let eval = t.evaluate().unwrap();
    assert_eq!(eval.images, 4);
    assert_eq!(eval.rewards["ocr"].judged, 4, "{eval:?}");
    assert!(eval.rewards["ocr"].success_by_tag.contains_key("digits"));
    assert!(
        eval.accuracy_by_tag.is_empty(),
        "no GenEval lines: {eval:?}"
    );
}

#[test]
fn the_real_gpu_presets_run_an_epoch_on_tiny_pipelines_of_their_family() {
    // configs/grpo-sd3.5m-{geneval,ocr}.toml and grpo-flux1-boxflow.toml as written, shrunk only
    // in size (model, batch, resolution, prompt files), against a reward server in this process.
    use portaflow::reward::remote::RemoteConfig;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            portaflow::reward::server::handle_connection(stream.unwrap(), &RednessWithBoxes);
        }
    });
    let files = TempDir::new("grpo-presets-prompts");
    let geneval = files.path().join("geneval.jsonl");
    std::fs::write(
        &geneval,
        concat!(
            r#"{"tag": "two_object", "include": [{"class": "bench", "count": 1}, {"class": "bus", "count": 1}], "prompt": "a photo of a bench and a bus"}"#,
            "\n",
            r#"{"tag": "counting", "include": [{"class": "cat", "count": 3}], "prompt": "a photo of three cats"}"#,
            "\n"
        ),
    )
    .unwrap();
    let ocr = files.path().join("ocr.txt");
    std::fs::write(
        &ocr,
        "a sign that reads \"OPEN\"\na cup with \"tea\" on it\n",
    )
    .unwrap();
    let configs = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs");
    let device = ChosenDevice::cpu().device;
    for (preset, fixture, prompts) in [
        ("grpo-sd3.5m-geneval.toml", "sd35_pipeline_tiny", &geneval),
        ("grpo-sd3.5m-ocr.toml", "sd35_pipeline_tiny", &ocr),
        ("grpo-flux1-boxflow.toml", "flux1_pipeline_tiny", &geneval),
    ] {
        let mut c = GrpoConfig::from_file(&configs.join(preset)).unwrap();
        let reward_name = c.data.remote.as_ref().unwrap().name.clone();
        c.model.path = Some(portaflow_tests::golden("pipelines").join(fixture));
        c.model.lora_rank = 4;
        c.model.lora_alpha = 8.0;
        c.data.train_prompts = Some(prompts.clone());
        c.data.test_prompts = Some(prompts.clone());
        c.data.remote = Some(RemoteConfig {
            url: url.clone(),
            name: reward_name.clone(),
            ..Default::default()
        });
        c.sample.resolution = Some(32);
        c.sample.eval_steps = 4;
        c.sample.group_size = 2;
        c.sample.groups_per_epoch = 2;
        c.sample.batch_size = 2;
        c.train.grad_accum = 1;
        c.run.epochs = 1;
        c.run.eval_every = 1;
        c.run.eval_prompts = Some(2);
        c.run.eval_images_per_prompt = 1;
        c.run.grid_every = 0;
        let run = TempDir::new(&format!("grpo-preset-{fixture}"));
        let mut t = GrpoTrainer::open(c, run.path(), &device.clone().autodiff())
            .unwrap_or_else(|e| panic!("{preset}: {e}"));
        let before = adapter_values(&t);
        let mut evals = Vec::new();
        let m = t
            .epoch(|event| {
                if let portaflow::train::grpo::GrpoEvent::Eval(e) = event {
                    evals.push(e.rewards[&reward_name].judged);
                }
            })
            .unwrap_or_else(|e| panic!("{preset}: {e}"));
        assert!(m.first_ratio_error <= 1e-5, "{preset}: {m:?}");
        assert_ne!(
            before,
            adapter_values(&t),
            "{preset}: the adapter did not move"
        );
        assert_eq!(evals, [2, 2], "{preset}: held-out images the server judged");
    }
}

#[test]
fn grpo_guard_and_dance_sde_keep_the_on_policy_ratio_at_one() {
    let device = ChosenDevice::cpu().device;
    for (sde, ratio_norm) in [
        (SdeType::Sde, true),
        (SdeType::Dance, false),
        (SdeType::Dance, true),
    ] {
        let run = TempDir::new("grpo-guard");
        let mut c = without_eval(config(1));
        c.sample.sde_type = sde;
        c.sample.noise_level = if sde == SdeType::Dance { 0.3 } else { 0.7 };
        c.train.ratio_norm = ratio_norm;
        c.validate().unwrap();
        let mut t = trainer(c, run.path(), &device);
        let before = adapter_values(&t);
        let m = t.epoch(|_| {}).unwrap();
        assert!(
            m.first_ratio_error < 1e-5,
            "{sde:?}, ratio_norm {ratio_norm}: first ratio off by {}",
            m.first_ratio_error
        );
        assert_ne!(before, adapter_values(&t), "{sde:?}: the adapter must move");
    }
    let mut c = config(1);
    c.sample.sde_type = SdeType::Cps;
    c.train.ratio_norm = true;
    assert!(c.validate().unwrap_err().contains("ratio_norm"));
}

/// Redness with a BoxFlow artifact box over the top-left quarter of every other image.
struct RednessWithBoxes;

impl Reward for RednessWithBoxes {
    fn name(&self) -> &str {
        "redness+boxes"
    }
    fn score(&self, images: &[Image], tasks: &[Task]) -> Result<Vec<Option<Score>>, RewardError> {
        Redness.score(images, tasks)
    }
    fn score_with_boxes(
        &self,
        images: &[Image],
        tasks: &[Task],
    ) -> Result<portaflow::reward::Scored, RewardError> {
        use portaflow::reward::boxes::{DefectBox, DefectLabel};
        Ok(portaflow::reward::Scored {
            scores: self.score(images, tasks)?,
            boxes: (0..images.len())
                .map(|i| {
                    (i % 2 == 0)
                        .then(|| DefectBox {
                            label: DefectLabel::Artifact,
                            bbox: [0.0, 0.0, 0.5, 0.5],
                            importance: None,
                        })
                        .into_iter()
                        .collect()
                })
                .collect(),
        })
    }
}

#[test]
fn boxflow_spatial_training_keeps_the_ratio_at_one_and_moves_the_adapter() {
    let device = ChosenDevice::cpu().device;
    let run = TempDir::new("grpo-spatial");
    let mut c = without_eval(config(1));
    c.train.spatial = Some(Default::default());
    c.validate().unwrap();
    let mut t = trainer(c, run.path(), &device).with_reward(Box::new(RednessWithBoxes));
    let before = adapter_values(&t);
    let m = t.epoch(|_| {}).unwrap();
    assert!(m.first_ratio_error < 1e-5, "{}", m.first_ratio_error);
    assert!(m.kept > 0);
    assert_ne!(before, adapter_values(&t));
    let mut c = config(1);
    c.train.spatial = Some(Default::default());
    c.data.aggregate = portaflow::train::grpo::config::RewardAggregate::Advantages;
    assert!(c.validate().unwrap_err().contains("spatial"));
}

#[test]
fn dense_grpo_credits_each_step_and_keeps_the_ratio_at_one() {
    use portaflow::train::grpo::config::DenseReward;
    let device = ChosenDevice::cpu().device;
    for completion_steps in [0, 2] {
        let run = TempDir::new("grpo-dense");
        let mut c = without_eval(config(1));
        c.train.dense_reward = Some(DenseReward { completion_steps });
        c.train.steps = StepSelection::Window { start: 0, size: 2 };
        c.validate().unwrap();
        let mut t = trainer(c, run.path(), &device);
        let before = adapter_values(&t);
        let m = t.epoch(|_| {}).unwrap();
        assert!(m.first_ratio_error < 1e-5, "{}", m.first_ratio_error);
        assert!(m.kept > 0 && m.trained_steps == [0, 1], "{m:?}");
        assert_ne!(before, adapter_values(&t));
    }
}

/// A Shapes CLIP for the tiny pipeline's 16×16 images (fresh: a random but fixed
/// differentiable reward), saved with the bundled tokenizer as `portaflow train clip` saves it.
fn tiny_clip(dir: &std::path::Path) {
    use portaflow::pipeline::text::TextStack;
    use portaflow::reward::clip_score::{ShapesClip, ShapesClipConfig};
    use portaflow::text::clip::ClipTextConfig;
    let device = ChosenDevice::cpu().device;
    let bundled = portaflow::pipeline::bundled_dir();
    let pipe = Pipeline::from_dir(&bundled, &device).unwrap();
    let TextStack::Clip(encoder) = &pipe.text else {
        panic!("the bundled model has one CLIP text encoder")
    };
    let text = ClipTextConfig {
        hidden_size: 32,
        intermediate_size: 64,
        projection_dim: 16,
        num_hidden_layers: 1,
        num_attention_heads: 1,
        ..encoder.model.config.clone()
    };
    let config = ShapesClipConfig {
        image_size: 16,
        patch_size: 4,
        width: 32,
        layers: 1,
        heads: 1,
        projection_dim: 16,
        text,
    };
    ShapesClip::init(config, 5, &device).save(dir).unwrap();
    std::fs::copy(
        bundled.join("tokenizer/tokenizer.json"),
        dir.join("tokenizer.json"),
    )
    .unwrap();
}

#[test]
fn draft_k_and_draft_lv_climb_their_differentiable_reward() {
    use portaflow::train::grpo::config::Draft;
    let device = ChosenDevice::cpu().device;
    let clip = TempDir::new("draft-clip");
    tiny_clip(clip.path());
    // The reward by epoch of a run at `lr`; runs at any lr see the same prompts and noise.
    let rewards = |lv_samples: usize, lr: f64| -> (Vec<f64>, bool) {
        let run = TempDir::new("draft-run");
        let mut c = without_eval(config(8));
        c.sample.guidance_scale = 1.0;
        c.train.cfg = false;
        c.train.beta = 0.0;
        c.train.learning_rate = lr;
        c.train.draft = Some(Draft {
            clip: clip.path().to_path_buf(),
            k: 1,
            lv_samples,
            margin: None,
        });
        c.validate().unwrap();
        let mut t = trainer(c, run.path(), &device);
        let before = adapter_values(&t);
        let rewards: Vec<f64> = (0..8)
            .map(|_| t.epoch(|_| {}).unwrap().reward_mean)
            .collect();
        (rewards, before != adapter_values(&t))
    };
    for lv_samples in [0, 2] {
        let (trained, moved) = rewards(lv_samples, 2e-2);
        let (control, _) = rewards(lv_samples, 1e-12);
        println!("DRaFT (lv_samples {lv_samples}): CLIP reward {trained:?}, untrained {control:?}");
        assert!(moved, "the adapter did not move");
        assert!(
            trained
                .iter()
                .all(|r| r.is_finite() && (-1.0..=1.0).contains(r))
        );
        // Epoch 1 samples before any update: both runs score the same there.
        assert!(
            (trained[0] - control[0]).abs() < 1e-4,
            "{trained:?} {control:?}"
        );
        let gain: f64 = (5..8).map(|e| trained[e] - control[e]).sum::<f64>() / 3.0;
        assert!(
            gain > 0.05,
            "DRaFT (lv_samples {lv_samples}) did not raise its reward over the untrained run: {gain:.3}"
        );
    }
}

#[test]
fn draft_settings_that_cannot_run_are_named_before_any_compute() {
    use portaflow::train::grpo::config::Draft;
    let mut c = without_eval(config(1));
    c.sample.guidance_scale = 1.0;
    c.train.cfg = false;
    c.train.beta = 0.0;
    let draft = |k, lv_samples| Draft {
        clip: "nowhere".into(),
        k,
        lv_samples,
        margin: None,
    };
    c.train.draft = Some(draft(2, 2));
    assert!(c.validate().unwrap_err().contains("needs k = 1"));
    c.train.draft = Some(draft(9, 0));
    assert!(
        c.validate()
            .unwrap_err()
            .contains("train.draft.k must be in 1..=4")
    );
    c.train.draft = Some(draft(1, 0));
    c.train.beta = 0.04;
    assert!(c.validate().unwrap_err().contains("train.beta"));
    c.train.beta = 0.0;
    c.validate().unwrap();
    let run = TempDir::new("draft-missing-clip");
    let (train, test) = prompt_sets::build();
    let tasks = train.into_iter().take(32).map(Task::Shapes).collect();
    let ad = ChosenDevice::cpu().device.autodiff();
    let err = GrpoTrainer::new(c, tiny_pipeline(3, &ad), tasks, test, run.path(), &ad)
        .err()
        .expect("a missing CLIP folder is an error")
        .to_string();
    assert!(
        err.contains("no config.json") && err.contains("portaflow train clip"),
        "{err}"
    );
}

/// A teacher adapter for the tiny pipeline: the GRPO config's LoRA shape with B drawn too, so
/// the teacher differs from the base.
fn teacher_adapter(dir: &std::path::Path, seed: u64) {
    use rand::{Rng, SeedableRng};
    let device = ChosenDevice::cpu().device;
    let mut model = portaflow_tests::tiny_pipeline(3, &device).transformer;
    let c = config(1);
    lora::init_adapter(&mut model, "teacher", &c.lora(), seed, &device).unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let modules = lora::extract(&model, "teacher")
        .unwrap()
        .into_iter()
        .map(|(path, mut m)| {
            for b in m.b.iter_mut() {
                *b = rng.random_range(-0.5..0.5);
            }
            (path, m)
        })
        .collect();
    LoraWeights::from_component("transformer", modules, Some(c.lora()))
        .write_peft(dir, "transformer")
        .unwrap();
}

#[test]
fn flow_opd_pulls_the_policy_toward_the_routed_teacher() {
    use portaflow::train::grpo::config::{Opd, OpdTeacher};
    let device = ChosenDevice::cpu().device;
    let teacher = TempDir::new("opd-teacher");
    teacher_adapter(teacher.path(), 11);
    let opd = |mar: bool, direct_kl: bool| Opd {
        teachers: vec![OpdTeacher {
            route: "shapes".into(),
            lora: teacher.path().to_path_buf(),
        }],
        kl_scale: 1.0,
        with_task_advantage: false,
        // Standardised, the detached per-step rewards make a policy gradient of magnitude 1
        // that is noise (see below); raw, it is ≈ 1e-7 here and the KL gradient leads.
        normalize: !direct_kl,
        direct_kl,
        mar: mar.then(|| teacher.path().to_path_buf()),
    };
    // The mean KL to the teacher by epoch, at `lr`; runs at any lr see the same prompts and noise.
    let kls = |lr: f64, mar: bool, direct_kl: bool| -> (Vec<f64>, f64) {
        let run = TempDir::new("opd-run");
        let mut c = without_eval(config(10));
        c.train.beta = if mar { 0.04 } else { 0.0 };
        c.train.learning_rate = lr;
        c.train.opd = Some(opd(mar, direct_kl));
        c.validate().unwrap();
        let mut t = trainer(c, run.path(), &device);
        let mut worst_ratio: f64 = 0.0;
        let kls = (0..10)
            .map(|_| {
                let m = t.epoch(|_| {}).unwrap();
                worst_ratio = worst_ratio.max(m.first_ratio_error);
                m.teacher_kl.unwrap()
            })
            .collect();
        (kls, worst_ratio)
    };
    let (control, _) = kls(1e-12, false, false);
    // The analytic KL gradient (Flow-OPD's code) pulls the policy to the teacher.
    let (trained, ratio) = kls(1e-2, false, true);
    println!("Flow-OPD (direct_kl): KL to the teacher {trained:?}, untrained {control:?}");
    assert!(ratio < 1e-5, "on-policy ratio off by {ratio}");
    assert!((trained[0] - control[0]).abs() < 1e-6 * control[0]);
    let late = trained[5..].iter().sum::<f64>();
    let late_control = control[5..].iter().sum::<f64>();
    assert!(
        late < 0.6 * late_control,
        "the KL to the teacher did not fall: {trained:?} against {control:?}"
    );
    // The paper's detached reward alone credits step j's action with KL_j, which depends on x_j
    // only: it carries no signal about the action, and the KL does not fall (measured, printed).
    let (detached, ratio) = kls(1e-2, false, false);
    println!("Flow-OPD (detached): KL to the teacher {detached:?}");
    assert!(ratio < 1e-5, "on-policy ratio off by {ratio}");
    // MAR: the teacher as the β·KL reference; it trains too.
    let (with_mar, _) = kls(1e-2, true, false);
    assert!(with_mar.iter().all(|k| k.is_finite()));

    // A prompt without a teacher, or an unknown route, is named before anything runs.
    let mut c = without_eval(config(1));
    c.train.opd = Some(Opd {
        teachers: vec![OpdTeacher {
            route: "digits".into(),
            lora: teacher.path().to_path_buf(),
        }],
        ..opd(false, false)
    });
    c.train.beta = 0.0;
    let (train, test) = prompt_sets::build();
    let tasks: Vec<Task> = train.into_iter().take(32).map(Task::Shapes).collect();
    let ad = device.clone().autodiff();
    let err = GrpoTrainer::new(
        c.clone(),
        base(&device),
        tasks,
        test,
        TempDir::new("opd-bad").path(),
        &ad,
    )
    .err()
    .expect("shapes prompts without a teacher")
    .to_string();
    assert!(err.contains("no teacher for training prompt 0"), "{err}");
    c.train.opd.as_mut().unwrap().teachers[0].route = "poetry".into();
    assert!(c.validate().unwrap_err().contains("\"poetry\" is not"));
}

/// RTDMD's RL stage at toy size (ALGORITHMS.md §3.3): 4 CPS steps (η 0.9) at an explicit σ
/// list, no CFG, no KL, SubGRPO training 2 of the stochastic steps {0, 1, 2}; the last step is
/// deterministic.
fn rtdmd_config(epochs: usize) -> GrpoConfig {
    let mut c = without_eval(config(epochs));
    c.sample.sigmas = Some(vec![1.0, 0.75, 0.5, 0.25]);
    c.sample.sde_type = SdeType::Cps;
    c.sample.noise_level = 0.9;
    c.sample.guidance_scale = 1.0;
    c.train.cfg = false;
    c.train.beta = 0.0;
    c.train.steps = StepSelection::RandomSubset {
        candidates: vec![0, 1, 2],
        count: 2,
        seed_offset: 104729,
    };
    c
}

#[test]
fn eval_stochastic_scores_with_the_rollout_step_and_the_default_with_the_ode() {
    let device = ChosenDevice::cpu().device;
    let mut c = rtdmd_config(1);
    c.run.eval_every = 1;
    c.run.eval_prompts = Some(6);
    c.run.eval_images_per_prompt = 2;
    c.sample.eval_guidance_scale = 1.0;
    let (_, test) = prompt_sets::build();
    let specs: Vec<_> = test.into_iter().take(6).collect();
    // The bundled model: the tiny test pipeline draws nothing the detector sees, so every score
    // would be 0 whichever sampler ran.
    let bundled = || Pipeline::from_dir(&pipeline::bundled_dir(), &device).unwrap();
    // The same evaluation straight on the base (the fresh adapter's B is zero, so it adds 0).
    let direct = |kind| {
        let options = EvalOptions {
            images_per_prompt: 2,
            batch_size: c.sample.batch_size,
            generate: GenerateOptions {
                kind,
                sigmas: c.sample.sigmas.clone(),
                ..GenerateOptions::euler(4, 1.0, vec![])
            },
            seed: c.run.seed,
        };
        evaluate_pipeline(&bundled(), &specs, &options, &device, None, |_, _| {}).unwrap()
    };
    let (ode, cps) = (direct(StepKind::Euler), direct(StepKind::Cps { eta: 0.9 }));
    assert_ne!(
        ode.dense_mean(),
        cps.dense_mean(),
        "the two samplers drew the same images"
    );
    for (stochastic, want) in [(false, &ode), (true, &cps)] {
        let mut c = c.clone();
        c.sample.eval_stochastic = stochastic;
        let run = TempDir::new("grpo-eval-stochastic");
        let (train, test) = prompt_sets::build();
        let tasks = train.into_iter().take(8).map(Task::Shapes).collect();
        let ad = device.clone().autodiff();
        let e = GrpoTrainer::new(c, bundled(), tasks, test, run.path(), &ad)
            .unwrap()
            .evaluate()
            .unwrap();
        assert_eq!(
            (e.accuracy, e.dense_mean, e.artifact_rate),
            (want.overall as f64, want.dense_mean(), want.artifact_rate()),
            "eval_stochastic = {stochastic}"
        );
    }
}

#[test]
fn rtdmd_stacking_trains_a_fresh_adapter_on_the_merged_student_at_its_own_sigmas() {
    let device = ChosenDevice::cpu().device;
    let student = TempDir::new("rtdmd-student");
    teacher_adapter(student.path(), 5);
    let run = TempDir::new("rtdmd-run");
    let mut c = rtdmd_config(1);
    c.model.merge_adapters = vec![student.path().to_path_buf()];
    c.validate().unwrap();
    let mut t = trainer(c.clone(), run.path(), &device);
    let before = adapter_values(&t);
    assert!(before.iter().any(|&v| v != 0.0), "A is drawn");
    let m = t.epoch(|_| {}).unwrap();
    assert!(m.first_ratio_error < 1e-5, "{}", m.first_ratio_error);
    assert_eq!(m.trained_steps.len(), 2);
    assert!(
        m.trained_steps.iter().all(|j| *j <= 2),
        "{:?}",
        m.trained_steps
    );
    assert_ne!(before, adapter_values(&t));
    // Only the fresh adapter is the policy's; the stacked one is in the base weights.
    assert_eq!(lora::adapters(t.policy()).len(), 1);
    // The final adapter says how its held-out evaluation sampled (here the ODE at the σ list).
    let card = lora::AdapterSampling::read(&run.path().join("adapter_final"))
        .unwrap()
        .expect("a few-step run writes sampling.json");
    let sigmas = c.sample.sigmas.clone().unwrap();
    assert_eq!(
        card,
        lora::AdapterSampling::new(StepKind::Euler, &sigmas, c.sample.eval_guidance_scale)
    );
    let mut stochastic = c.clone();
    stochastic.sample.eval_stochastic = true;
    let run2 = TempDir::new("rtdmd-run-cps");
    let t2 = trainer(stochastic, run2.path(), &device);
    t2.save_adapter(&run2.path().join("saved")).unwrap();
    let card = lora::AdapterSampling::read(&run2.path().join("saved")).unwrap();
    assert_eq!(card.unwrap().kind(), Ok(StepKind::Cps { eta: 0.9 }));

    let mut bad = c;
    bad.sample.eval_steps = 20;
    assert!(
        bad.validate()
            .unwrap_err()
            .contains("sample.sigmas has 4 steps")
    );
}

#[test]
fn rtdmd_final_step_reward_backprop_climbs_its_reward_beside_the_policy_gradient() {
    use portaflow::train::grpo::config::{Draft, RewardBackprop};
    let device = ChosenDevice::cpu().device;
    let clip = TempDir::new("bp-clip");
    tiny_clip(clip.path());
    // `scale` weighs L_BP (1e-12: the policy gradient alone).
    let settings = |scale: f64| -> GrpoConfig {
        let mut c = rtdmd_config(12);
        c.train.reward_backprop = Some(RewardBackprop {
            clip: clip.path().to_path_buf(),
            margin: 3.0,
            scale,
        });
        c.validate().unwrap();
        c
    };
    let rewards = |scale: f64| -> Vec<f64> {
        let run = TempDir::new("bp-run");
        let mut t = trainer(settings(scale), run.path(), &device);
        (0..12)
            .map(|_| {
                let m = t.epoch(|_| {}).unwrap();
                assert!(m.first_ratio_error < 1e-5, "{}", m.first_ratio_error);
                m.final_step_reward.expect("logged with reward_backprop")
            })
            .collect()
    };
    let trained = rewards(1.0);
    let control = rewards(1e-12);
    println!("final-step CLIP reward {trained:?}, policy gradient alone {control:?}");
    assert!(
        (trained[0] - control[0]).abs() < 1e-3,
        "{trained:?} {control:?}"
    );
    let gain: f64 = (6..12).map(|e| trained[e] - control[e]).sum::<f64>() / 6.0;
    assert!(
        gain > 0.05,
        "L_BP did not raise the final-step reward: {gain:.3}"
    );

    let mut bad = settings(1.0);
    bad.train.reward_backprop.as_mut().unwrap().scale = 0.0;
    assert!(
        bad.validate()
            .unwrap_err()
            .contains("train.reward_backprop.scale")
    );
    let mut bad = settings(1.0);
    bad.train.draft = Some(Draft {
        clip: clip.path().to_path_buf(),
        k: 1,
        lv_samples: 0,
        margin: None,
    });
    assert!(bad.validate().unwrap_err().contains("train.draft"));
    let mut bad = settings(1.0);
    bad.train.reward_backprop.as_mut().unwrap().clip = "nowhere".into();
    let run = TempDir::new("bp-missing-clip");
    let (train, test) = prompt_sets::build();
    let tasks = train.into_iter().take(32).map(Task::Shapes).collect();
    let ad = device.clone().autodiff();
    let err = GrpoTrainer::new(bad, base(&device), tasks, test, run.path(), &ad)
        .err()
        .expect("a missing CLIP folder is an error")
        .to_string();
    assert!(
        err.contains("train.reward_backprop.clip") && err.contains("portaflow train clip"),
        "{err}"
    );
}

#[test]
fn flow_opd_cold_starts_from_the_combined_teachers() {
    use portaflow::train::grpo::config::{Opd, OpdTeacher};
    let device = ChosenDevice::cpu().device;
    let (t1, t2, combined) = (
        TempDir::new("cold-t1"),
        TempDir::new("cold-t2"),
        TempDir::new("cold-combined"),
    );
    teacher_adapter(t1.path(), 11);
    teacher_adapter(t2.path(), 12);
    let (a, b) = (
        LoraWeights::read(t1.path()).unwrap(),
        LoraWeights::read(t2.path()).unwrap(),
    );
    // `portaflow lora combine T1 T2`: ΔW = ½ΔW₁ + ½ΔW₂ exactly, rank 4 + 4.
    let merged = LoraWeights::sum_of_deltas(&[(&a, 0.5), (&b, 0.5)]).unwrap();
    merged.write_peft(combined.path(), "transformer").unwrap();
    let settings = |init: bool, rank: usize| {
        let mut c = without_eval(config(1));
        c.train.beta = 0.0;
        c.model.lora_rank = rank;
        c.model.lora_alpha = rank as f64;
        c.model.init_adapter = init.then(|| combined.path().to_path_buf());
        c.train.opd = Some(Opd {
            teachers: vec![OpdTeacher {
                route: "shapes".into(),
                lora: t1.path().to_path_buf(),
            }],
            kl_scale: 1.0,
            with_task_advantage: false,
            normalize: false,
            direct_kl: true,
            mar: None,
        });
        c.validate().unwrap();
        c
    };
    let new = |c: GrpoConfig, run: &std::path::Path| {
        let (train, test) = prompt_sets::build();
        let tasks = train.into_iter().take(32).map(Task::Shapes).collect();
        let ad = device.clone().autodiff();
        GrpoTrainer::new(c, base(&device), tasks, test, run, &ad)
            .map(|t| t.with_reward(Box::new(Redness)))
    };
    // The policy starts as the combination, module for module.
    let run = TempDir::new("cold-run");
    let mut cold = new(settings(true, 8), run.path()).unwrap();
    let start = lora::extract(cold.policy(), POLICY).unwrap();
    assert_eq!(start.len(), merged.modules.len());
    for (path, m) in &start {
        let want = &merged.modules[&format!("transformer.{path}")];
        assert_eq!((&m.a, &m.b, m.rank), (&want.a, &want.b, 8), "{path}");
    }
    let m = cold.epoch(|_| {}).unwrap();
    assert!(m.first_ratio_error < 1e-5, "{}", m.first_ratio_error);
    // Half of the teacher's ΔW is already in: the first rollout is closer to it than the base's.
    let run = TempDir::new("fresh-run");
    let fresh = new(settings(false, 8), run.path())
        .unwrap()
        .epoch(|_| {})
        .unwrap();
    let (cold_kl, fresh_kl) = (m.teacher_kl.unwrap(), fresh.teacher_kl.unwrap());
    println!(
        "KL to the teacher at the first rollout: cold start {cold_kl:.3e}, fresh {fresh_kl:.3e}"
    );
    assert!(cold_kl < 0.8 * fresh_kl, "{cold_kl} vs {fresh_kl}");
    // A rank that does not fit is named before any compute.
    let run = TempDir::new("cold-bad");
    let err = new(settings(true, 4), run.path())
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("model.init_adapter") && err.contains("rank 8") && err.contains("rank 4"),
        "{err}"
    );
    let mut scaled = settings(true, 8);
    scaled.model.lora_alpha = 16.0;
    let run = TempDir::new("cold-bad-alpha");
    let err = new(scaled, run.path()).err().unwrap().to_string();
    assert!(err.contains("α/r = 1") && err.contains("make 2"), "{err}");
}

#[test]
fn rtdmd_final_step_dmd_trains_its_fake_score_and_resumes_exactly() {
    use portaflow::train::grpo::config::FinalStepDmd;
    let device = ChosenDevice::cpu().device;
    let student = TempDir::new("dmd-student");
    teacher_adapter(student.path(), 5);
    let cold_fake = TempDir::new("dmd-cold-fake");
    teacher_adapter(cold_fake.path(), 9);
    let with_fake_lora = |fake_lora: &std::path::Path| -> GrpoConfig {
        let mut c = rtdmd_config(2);
        c.model.merge_adapters = vec![student.path().to_path_buf()];
        c.train.final_step_dmd = Some(FinalStepDmd {
            weight: 1.0,
            fake_lora: Some(fake_lora.to_path_buf()),
            fake_updates: 2,
            fake_learning_rate: Some(1e-2),
            teacher_guidance: 3.0,
            renoise_range: [20.0, 980.0],
        });
        c.validate().unwrap();
        c
    };
    let settings = |dmd: bool| -> GrpoConfig {
        let mut c = rtdmd_config(2);
        c.model.merge_adapters = vec![student.path().to_path_buf()];
        c.train.final_step_dmd = dmd.then(|| FinalStepDmd {
            weight: 1.0,
            fake_lora: None,
            fake_updates: 2,
            fake_learning_rate: Some(1e-2),
            teacher_guidance: 3.0,
            renoise_range: [20.0, 980.0],
        });
        c.validate().unwrap();
        c
    };
    let straight = TempDir::new("dmd-straight");
    let mut a = trainer(settings(true), straight.path(), &device);
    let m = a.epoch(|_| {}).unwrap();
    assert!(m.first_ratio_error < 1e-5, "{}", m.first_ratio_error);
    let (dmd, fake) = (m.final_step_dmd.unwrap(), m.fake_score_loss.unwrap());
    println!("epoch 1: weighted DMD loss {dmd:.4e}, fake-score loss {fake:.4}");
    assert!(dmd.is_finite() && dmd > 0.0 && fake.is_finite() && fake > 0.0);
    a.epoch(|_| {}).unwrap();
    assert!(straight.path().join("checkpoint/fake_score").is_dir());

    // The term reaches the weights: the same run without it ends elsewhere.
    let plain = TempDir::new("dmd-off");
    let mut p = trainer(settings(false), plain.path(), &device);
    p.epoch(|_| {}).unwrap();
    p.epoch(|_| {}).unwrap();
    assert_ne!(adapter_values(&a), adapter_values(&p));

    // Killed after epoch 1, resumed: the fake score and its optimizer come back too.
    let resumed = TempDir::new("dmd-resumed");
    let mut b = trainer(settings(true), resumed.path(), &device);
    b.epoch(|_| {}).unwrap();
    drop(b);
    let mut b = trainer(settings(true), resumed.path(), &device);
    assert_eq!(b.epoch, 1);
    b.epoch(|_| {}).unwrap();
    assert_same(
        &adapter_values(&a),
        &adapter_values(&b),
        "the resumed run diverged",
    );
    let fake = |d: &std::path::Path| {
        LoraWeights::read(&d.join("checkpoint/fake_score"))
            .unwrap()
            .modules
    };
    assert_eq!(fake(straight.path()), fake(resumed.path()));

    // The cold start's fake adapter is merged into the fake score only: the same first rollout
    // (the policy is untouched by it) meets another fake prediction, so another DMD loss.
    let cold = TempDir::new("dmd-cold");
    let mut c = trainer(with_fake_lora(cold_fake.path()), cold.path(), &device);
    let mc = c.epoch(|_| {}).unwrap();
    assert_eq!(
        mc.reward_mean, m.reward_mean,
        "the fake adapter reached the policy"
    );
    let cold_dmd = mc.final_step_dmd.unwrap();
    println!("epoch 1 with the cold start's fake adapter: weighted DMD loss {cold_dmd:.4e}");
    assert!(
        (cold_dmd - dmd).abs() > 1e-3 * dmd,
        "{cold_dmd} vs {dmd}: the fake adapter was not merged"
    );
    let missing = straight.path().join("no-such-adapter");
    let run = TempDir::new("dmd-missing-fake");
    let (train, test) = prompt_sets::build();
    let tasks = train.into_iter().take(32).map(Task::Shapes).collect();
    let ad = device.clone().autodiff();
    let err = GrpoTrainer::new(
        with_fake_lora(&missing),
        base(&device),
        tasks,
        test,
        run.path(),
        &ad,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("no-such-adapter"), "{err}");

    let mut bad = settings(true);
    bad.train.final_step_dmd.as_mut().unwrap().renoise_range = [980.0, 20.0];
    assert!(
        bad.validate()
            .unwrap_err()
            .contains("train.final_step_dmd.renoise_range")
    );
}

#[test]
fn the_final_step_dmd_teacher_embeds_its_scale_on_a_guidance_distilled_model() {
    // FLUX.1-dev runs no CFG: RTDMD's teacher takes `teacher_guidance` as its embedded scale.
    // With the fake score not yet moved (a vanishing learning rate) and the teacher given the
    // rollout's own scale, teacher and fake are one function, so the DMD term is 0; given 1.0
    // instead, they differ. (A CFG batch against the empty prompt, as SD3 runs, would make the
    // first term large and the second 0.)
    use portaflow::train::grpo::config::FinalStepDmd;
    let device = ChosenDevice::cpu().device;
    let dmd_term = |teacher_guidance: f64| -> f64 {
        let mut c = rtdmd_config(1);
        c.sample.guidance_scale = 3.5;
        c.sample.resolution = Some(32);
        c.train.final_step_dmd = Some(FinalStepDmd {
            weight: 1.0,
            fake_lora: None,
            fake_updates: 1,
            fake_learning_rate: Some(1e-30),
            teacher_guidance,
            renoise_range: [20.0, 980.0],
        });
        let run = TempDir::new("dmd-flux1");
        let mut t = flux1_trainer(c, run.path(), &device);
        t.epoch(|_| {}).unwrap().final_step_dmd.unwrap()
    };
    let (same, other) = (dmd_term(3.5), dmd_term(1.0));
    println!("DMD term, teacher at the rollout's 3.5: {same:.3e}; at 1.0: {other:.3e}");
    assert!(other > 0.0 && same <= 1e-6 * other, "{same} vs {other}");
}

/// The policy gradient points uphill: Flow-GRPO on the redness reward raises it over an
/// untrained control that sees the same prompts and noise, with the Flow-GRPO SDE (and CFG) and
/// with CPS at η 0.8 without CFG. The tiny model's blocks are barely trained out of adaLN-Zero
/// (their gates are near 0, so attention adapters move little), so the adapter also wraps the
/// output projection. CPS gets PPO's usual clip 0.2 here: with the presets' 1e-5 the toy's reward
/// rises for about five epochs, then drifts below the control (so does CPS at η 0.3, even fully
/// on-policy), which the session notes record.
#[test]
fn flow_grpo_climbs_its_reward_over_an_untrained_control() {
    let device = ChosenDevice::cpu().device;
    let rewards = |cps: bool, lr: f64| -> Vec<f64> {
        let run = TempDir::new("grpo-climb");
        let mut c = without_eval(config(10));
        c.model.lora_targets.push("proj_out".into());
        c.train.beta = 0.0;
        c.train.learning_rate = lr;
        if cps {
            c.sample.sde_type = SdeType::Cps;
            c.sample.noise_level = 0.8;
            c.sample.guidance_scale = 1.0;
            c.train.cfg = false;
            c.train.clip_range = 0.2;
        }
        c.validate().unwrap();
        let mut t = trainer(c, run.path(), &device);
        (0..10)
            .map(|_| t.epoch(|_| {}).unwrap().reward_mean)
            .collect()
    };
    for cps in [false, true] {
        let trained = rewards(cps, 1e-2);
        let control = rewards(cps, 1e-12);
        println!("GRPO (cps {cps}): redness {trained:?}, untrained {control:?}");
        assert!((trained[0] - control[0]).abs() < 1e-6, "epoch 1 differs");
        let gain: f64 = (6..10).map(|e| trained[e] - control[e]).sum::<f64>() / 4.0;
        assert!(
            gain > 0.003,
            "GRPO (cps {cps}) did not raise its reward over the untrained run: gain {gain:.4}"
        );
    }
    let mut still = without_eval(config(1));
    still.sample.sde_type = SdeType::Cps;
    still.sample.noise_level = 0.0;
    assert!(
        still
            .validate()
            .unwrap_err()
            .contains("sample.noise_level is 0")
    );
}
