//! RTDMD's AC-DMD cold start end to end on a tiny pipeline: both adapters train, a resumed run
//! continues (to float rounding), the student evaluates at its own few steps, bad settings are named.

use portaflow::device::ChosenDevice;
use portaflow::lora::{self, LoraWeights};
use portaflow::train::distill::acdmd::{AcDmdConfig, AcDmdTrainer, GENERATOR};
use portaflow::world::prompt_sets;
use portaflow_tests::{TempDir, tiny_pretrained_latent_pipeline, tiny_pretrained_pipeline};

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
    let card = std::fs::read_to_string(run.path().join("generator_final/sampling.json")).unwrap();
    let card = lora::AdapterSampling::from_json(&card).unwrap();
    assert_eq!((card.sampler.as_str(), card.eta), ("cps", Some(0.9)));
    assert_eq!(card.sigmas, t.sigmas());

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

mod reflow {
    use super::*;
    use portaflow::train::distill::reflow::{Keep, ReflowConfig, ReflowTrainer, STUDENT};
    use portaflow::world::prompt::PromptSpec;

    fn config(iterations: usize) -> ReflowConfig {
        let mut c = ReflowConfig::default();
        c.model.lora_rank = 4;
        c.model.lora_alpha = 8.0;
        c.teacher_steps = 4;
        c.teacher_guidance = 3.0;
        c.pairs_per_prompt = 1;
        c.keep = Keep::All;
        c.sigmas = vec![1.0, 0.5];
        c.batch_size = 4;
        c.iterations = iterations;
        c.learning_rate = 1e-2;
        c.eval_every = 0;
        c.save_every = 1;
        c
    }

    fn prompts(n: usize) -> (Vec<PromptSpec>, Vec<PromptSpec>) {
        let (train, test) = prompt_sets::build();
        (train.into_iter().take(n).collect(), test)
    }

    fn trainer(c: ReflowConfig, n: usize, run: &std::path::Path) -> Result<ReflowTrainer, String> {
        let device = ChosenDevice::cpu().device;
        let (train, test) = prompts(n);
        let ad = device.clone().autodiff();
        ReflowTrainer::new(
            c,
            tiny_pretrained_pipeline(&device),
            train,
            test,
            run,
            &ad,
            |_, _| {},
        )
        .map_err(|e| e.to_string())
    }

    fn student_values(t: &ReflowTrainer) -> Vec<f32> {
        lora::extract(t.student_transformer(), STUDENT)
            .unwrap()
            .into_iter()
            .flat_map(|(_, m)| m.a.into_iter().chain(m.b))
            .collect()
    }

    /// The test config's teacher image (4 Euler steps, CFG 3) of `prompt` from `seed`'s noise.
    fn teacher_latents(
        teacher: &portaflow::pipeline::Pipeline,
        prompt: &str,
        seed: u64,
    ) -> Vec<f32> {
        let options = portaflow::pipeline::GenerateOptions::euler(4, 3.0, vec![seed]);
        let device = ChosenDevice::cpu().device;
        teacher
            .generate_latents(&[prompt.to_string()], &options, &device, |_| {}, None)
            .unwrap()
            .into_data()
            .try_to_vec::<f32>()
            .unwrap()
    }

    /// The couplings are the teacher's ODE ends: x₀ stored for each kept seed equals a direct
    /// generation with that seed; the student regresses them (its loss on a single coupling
    /// falls), and a resumed run continues where it stopped.
    #[test]
    fn the_student_regresses_the_teachers_couplings_and_resumes() {
        let run = TempDir::new("reflow-run");
        let mut snapshotted = config(3);
        snapshotted.snapshot_every = 2;
        let mut t = trainer(snapshotted, 6, run.path()).unwrap();
        let index = t.couplings().clone();
        assert_eq!((index.seeds.len(), index.correct.len()), (6, 6));
        // The stored x₀ of coupling 2 is the teacher's 4-step CFG-3 image for its seed.
        let device = ChosenDevice::cpu().device;
        let teacher = tiny_pretrained_pipeline(&device);
        let (train, _) = prompts(6);
        let direct = teacher_latents(&teacher, &train[index.prompts[2]].prompt, index.seeds[2]);
        let bytes = std::fs::read(run.path().join("couplings/x0.f32")).unwrap();
        let per = direct.len();
        let stored: Vec<f32> = bytes[2 * per * 4..3 * per * 4]
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let diff = portaflow_tests::max_abs_diff(&stored, &direct);
        assert!(
            diff < 1e-5,
            "stored x0 differs from the teacher's by {diff}"
        );

        let before = student_values(&t);
        while !t.done() {
            let m = t.iterate().unwrap();
            assert!(m.loss.is_finite() && m.loss_by_sigma.len() == 2, "{m:?}");
        }
        let after = student_values(&t);
        assert_ne!(before, after, "the student adapter did not move");
        assert!(
            run.path()
                .join("student_final/adapter_model.safetensors")
                .is_file()
        );
        let card = std::fs::read_to_string(run.path().join("student_final/sampling.json")).unwrap();
        let card = lora::AdapterSampling::from_json(&card).unwrap();
        assert_eq!(
            (card.sampler.as_str(), card.sigmas.as_slice()),
            ("euler", &[1.0, 0.5][..])
        );
        let snapshots = run.path().join("snapshots");
        let kept: Vec<_> = std::fs::read_dir(&snapshots)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(kept, ["iter-2"], "snapshot_every = 2 over 3 iterations");
        assert!(snapshots.join("iter-2/sampling.json").is_file());

        // Stopped after iteration 2 and resumed: the uninterrupted run's student.
        let split = TempDir::new("reflow-resume");
        let mut first = trainer(config(2), 6, split.path()).unwrap();
        while !first.done() {
            first.iterate().unwrap();
        }
        drop(first);
        let mut resumed = trainer(config(3), 6, split.path()).unwrap();
        assert_eq!(resumed.iteration, 2);
        resumed.iterate().unwrap();
        let diff = portaflow_tests::max_abs_diff(&student_values(&resumed), &after);
        assert!(diff < 1e-6, "the resumed run differs by {diff}");

        // One coupling, 40 updates: the regression loss falls well below where it started.
        let single = TempDir::new("reflow-fit");
        let mut c = config(40);
        c.save_every = 40;
        let mut t = trainer(c, 1, single.path()).unwrap();
        let losses: Vec<f64> = (0..40).map(|_| t.iterate().unwrap().loss).collect();
        let (start, end) = (losses[0], losses[35..].iter().sum::<f64>() / 5.0);
        assert!(end < 0.5 * start, "loss {start:.4} → {end:.4}: {losses:?}");

        // The student evaluates at its own Euler steps.
        let mut c = config(1);
        c.eval_prompts = Some(2);
        c.eval_images_per_prompt = 1;
        let eval_run = TempDir::new("reflow-eval");
        let mut t = trainer(c, 2, eval_run.path()).unwrap();
        let e = t.evaluate().unwrap();
        assert!(e.steps == 2 && (0.0..=1.0).contains(&e.accuracy), "{e:?}");
    }

    /// The student's 2-step Euler latents (σ 1, 0.5, no CFG) from `seed` for the first training prompt.
    fn student_sample(t: &ReflowTrainer, seed: u64) -> Vec<f32> {
        let device = ChosenDevice::cpu().device;
        let mut pipe = tiny_pretrained_pipeline(&device);
        let adapter = t.student();
        lora::attach(
            &mut pipe.transformer,
            STUDENT,
            adapter.component("transformer"),
            1.0,
            &device,
        )
        .unwrap();
        let mut options = portaflow::pipeline::GenerateOptions::euler(2, 1.0, vec![seed]);
        options.sigmas = Some(vec![1.0, 0.5]);
        let (train, _) = prompts(1);
        pipe.generate_latents(&[train[0].prompt.clone()], &options, &device, |_| {}, None)
            .unwrap()
            .into_data()
            .try_to_vec::<f32>()
            .unwrap()
    }

    /// `student_states`: the second σ is trained where the student's own first step lands (so
    /// its loss differs from the straight line's from the first update), and the trained
    /// student's own two steps end on the teacher's x₀.
    #[test]
    fn trained_at_its_own_states_the_student_lands_on_the_teachers_image() {
        let first_losses = |student_states: bool| {
            let run = TempDir::new("reflow-own-first");
            let mut c = config(1);
            c.student_states = student_states;
            let mut t = trainer(c, 1, run.path()).unwrap();
            t.iterate().unwrap().loss_by_sigma
        };
        let (line, own) = (first_losses(false), first_losses(true));
        assert!(
            (line[0] - own[0]).abs() < 1e-9,
            "σ = 1 is the same: {line:?} {own:?}"
        );
        assert!(
            (line[1] - own[1]).abs() > 1e-4 * line[1],
            "σ = 0.5 must be trained at the student's own state: {line:?} {own:?}"
        );

        let run = TempDir::new("reflow-own");
        let mut c = config(60);
        c.student_states = true;
        c.save_every = 60;
        let mut t = trainer(c, 1, run.path()).unwrap();
        let seed = t.couplings().seeds[0];
        let bytes = std::fs::read(run.path().join("couplings/x0.f32")).unwrap();
        let x0: Vec<f32> = bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let distance = |x: &[f32]| -> f64 {
            let sq: f64 = x
                .iter()
                .zip(&x0)
                .map(|(a, b)| ((a - b) as f64).powi(2))
                .sum();
            (sq / x0.len() as f64).sqrt()
        };
        let before = distance(&student_sample(&t, seed));
        while !t.done() {
            t.iterate().unwrap();
        }
        let after = distance(&student_sample(&t, seed));
        assert!(
            after < 0.5 * before,
            "the student's own 2 steps end {after:.4} from the teacher's x₀ (untrained {before:.4})"
        );
    }

    /// `pixel_loss_weight`: the last σ's loss gains w × mean((D(x̂₀) − D(x₀))²), recomputed here
    /// from the base (a fresh adapter is the base) and its decoder; the velocity terms are the
    /// same as without it, and the term's gradient reaches the adapter.
    #[test]
    fn the_pixel_term_is_the_decoded_distance_of_the_last_steps_image() {
        use burn::tensor::{Tensor, TensorData};
        use portaflow::pipeline::PipelineDenoiser;
        use portaflow::sample::pipeline::{Denoiser, NoiseSource};

        // A latent pipeline (a fresh Shapes autoencoder), pretrained briefly, on the autodiff device.
        let plain = ChosenDevice::cpu().device;
        let device = plain.clone().autodiff();
        let weight = 2.0;
        let first_update = |w: f64| {
            let run = TempDir::new("reflow-pixel");
            let mut c = config(2);
            c.pixel_loss_weight = w;
            let (train, test) = prompts(1);
            let mut t = ReflowTrainer::new(
                c,
                tiny_pretrained_latent_pipeline(&plain),
                train,
                test,
                run.path(),
                &device,
                |_, _| {},
            )
            .unwrap();
            let m = t.iterate().unwrap();
            // Adam's first step is ±lr wherever the gradient is non-zero; the second shows magnitudes.
            t.iterate().unwrap();
            let bytes = std::fs::read(run.path().join("couplings/x0.f32")).unwrap();
            let x0: Vec<f32> = bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            (m, student_values(&t), t.couplings().clone(), x0)
        };
        let (off, off_student, _, _) = first_update(0.0);
        let (on, on_student, index, x0) = first_update(weight);
        assert_eq!(off.pixel_loss, None);
        assert_eq!(
            off.loss_by_sigma, on.loss_by_sigma,
            "velocity terms unchanged"
        );
        let pixel = on.pixel_loss.expect("logged with a weight");

        // The one coupling at σ = 0.5 (the last of [1, 0.5]) on the straight line, the base's x̂₀.
        // Nothing here is differentiated.
        let pipe = tiny_pretrained_latent_pipeline(&plain);
        let [c, h, w] = index.shape;
        // [1, c, h, w]
        let x0 = Tensor::<4>::from_data(TensorData::new(x0, [1, c, h, w]), &device);
        let z = NoiseSource::new(vec![index.seeds[0]]).initial(index.shape, &device);
        let x = x0.clone().mul_scalar(0.5) + z.mul_scalar(0.5);
        let (train, _) = prompts(1);
        let cond = pipe.encode(&[train[0].prompt.clone()], &device).unwrap();
        let denoiser = PipelineDenoiser {
            transformer: &pipe.transformer,
            prediction: pipe.index.prediction,
        };
        let x0_hat = x.clone() - denoiser.velocity(x, 0.5, &cond).mul_scalar(0.5);
        let vae = pipe.vae.as_ref().expect("an autoencoder");
        let expected = (vae.decode(x0_hat) - vae.decode(x0))
            .powi_scalar(2)
            .mean()
            .into_scalar::<f32>() as f64;
        assert!(
            (pixel - expected).abs() <= 1e-4 * expected && expected > 0.0,
            "logged {pixel}, recomputed {expected}"
        );
        // Two σ's with an equal share of the batch: loss = (l₁ + l₀.₅ + w·pixel) / 2.
        let total = (on.loss_by_sigma[0] + on.loss_by_sigma[1] + weight * pixel) / 2.0;
        assert!(
            (on.loss - total).abs() <= 1e-5 * total,
            "loss {} against {total}",
            on.loss
        );
        let moved = portaflow_tests::max_abs_diff(&on_student, &off_student);
        assert!(moved > 1e-6, "the pixel term did not reach the adapter");
    }

    /// `teacher_adapters`: the couplings are the images of the teacher with the adapter merged
    /// (a direct generation with it attached), not the plain base's, while the student is a
    /// fresh adapter on the plain base; such couplings are not pooled into a run without the
    /// adapter, and an adapter for other modules is named before anything is drawn.
    #[test]
    fn a_teacher_adapter_draws_the_couplings_for_a_student_on_the_plain_base() {
        let device = ChosenDevice::cpu().device;
        let ad = device.clone().autodiff();
        // A teacher adapter with non-zero B (a fresh one would change nothing).
        let targets = lora::LoraConfig::new(4, 8.0, &["attn.to_q", "attn.to_v", "attn.to_out.0"]);
        let mut donor = tiny_pretrained_pipeline(&device);
        lora::init_adapter(&mut donor.transformer, "t", &targets, 5, &ad).unwrap();
        let mut modules = lora::extract(&donor.transformer, "t").unwrap();
        for (_, m) in modules.iter_mut() {
            for (i, b) in m.b.iter_mut().enumerate() {
                *b = 0.05 * ((i % 7) as f32 - 3.0);
            }
        }
        let adapter = LoraWeights::from_component("transformer", modules, Some(targets));
        let adapter_dir = TempDir::new("reflow-teacher-adapter");
        adapter
            .write_peft(adapter_dir.path(), "transformer")
            .unwrap();

        let run = TempDir::new("reflow-tuned-teacher");
        let mut c = config(1);
        c.teacher_adapters = vec![adapter_dir.path().to_path_buf()];
        let mut t = trainer(c, 2, run.path()).unwrap();
        let index = t.couplings().clone();
        let bytes = std::fs::read(run.path().join("couplings/x0.f32")).unwrap();
        let per = bytes.len() / 4 / index.seeds.len();
        let stored: Vec<f32> = bytes[per * 4..2 * per * 4]
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let (train, _) = prompts(2);
        let generate = |with_adapter: bool| -> Vec<f32> {
            let mut teacher = tiny_pretrained_pipeline(&device);
            if with_adapter {
                teacher.add_lora(&adapter, "t", 1.0, &ad).unwrap();
            }
            teacher_latents(&teacher, &train[index.prompts[1]].prompt, index.seeds[1])
        };
        let tuned = portaflow_tests::max_abs_diff(&stored, &generate(true));
        let plain = portaflow_tests::max_abs_diff(&stored, &generate(false));
        // (The briefly pretrained model's output layer is small, so the adapter moves x₀ by ~1e-3.)
        assert!(
            tuned < 1e-5 && plain > 100.0 * tuned.max(1e-6),
            "x0 vs the tuned teacher {tuned}, vs the plain base {plain}"
        );
        // The student is a fresh adapter on the plain base: its first update starts from there.
        let names: Vec<String> = lora::adapters(t.student_transformer())
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(names, [STUDENT], "only the student's adapter is attached");
        t.iterate().unwrap();
        drop(t);

        let mut pooled = config(1);
        pooled.couplings_from = vec![run.path().join("couplings")];
        let err = trainer(pooled, 2, TempDir::new("reflow-pool-tuned").path())
            .err()
            .unwrap();
        assert!(err.contains("these couplings were drawn with"), "{err}");

        let mut elsewhere = LoraWeights::read(adapter_dir.path()).unwrap();
        let module = elsewhere.modules.values().next().unwrap().clone();
        elsewhere
            .modules
            .insert("transformer.transformer_blocks.99.attn.to_q".into(), module);
        let other_dir = TempDir::new("reflow-teacher-adapter-other");
        elsewhere
            .write_peft(other_dir.path(), "transformer")
            .unwrap();
        let mut c = config(1);
        c.teacher_adapters = vec![other_dir.path().to_path_buf()];
        let run = TempDir::new("reflow-bad-teacher");
        let err = trainer(c, 2, run.path()).err().unwrap();
        assert!(
            err.contains("teacher_adapters")
                && err.contains(&other_dir.path().display().to_string())
                && err.contains("transformer_blocks.99"),
            "{err}"
        );
        assert!(
            !run.path().join("couplings").exists(),
            "drew before refusing"
        );
    }

    /// The adapter as a flat vector in `order`'s module order.
    fn flat(weights: &LoraWeights, order: &[(String, lora::LoraModule)]) -> Vec<f32> {
        let stored = weights.component("transformer");
        order
            .iter()
            .flat_map(|(path, _)| {
                let (_, m) = stored.iter().find(|(p, _)| p == path).expect("module");
                m.a.iter().chain(&m.b).copied().collect::<Vec<_>>()
            })
            .collect()
    }

    /// With `ema_decay` the saved student is the average of the adapter's path with the
    /// warm-up decay min((1 + n)/(10 + n), cap), recomputed here from the raw adapters; a
    /// resumed run writes the same average.
    #[test]
    fn with_ema_the_saved_student_is_the_average_and_a_resume_keeps_it() {
        let mut c = config(3);
        c.ema_decay = 0.28;
        let run = TempDir::new("reflow-ema");
        let mut t = trainer(c.clone(), 4, run.path()).unwrap();
        let order = lora::extract(t.student_transformer(), STUDENT).unwrap();
        let mut average = student_values(&t);
        while !t.done() {
            t.iterate().unwrap();
            let n = t.iteration as f64;
            let decay = ((1.0 + n) / (10.0 + n)).min(0.28) as f32;
            for (e, x) in average.iter_mut().zip(student_values(&t)) {
                *e += (1.0 - decay) * (x - *e);
            }
        }
        let raw = student_values(&t);
        let saved = flat(
            &LoraWeights::read(&run.path().join("student_final")).unwrap(),
            &order,
        );
        let off_average = portaflow_tests::max_abs_diff(&saved, &average);
        assert!(
            off_average < 1e-6,
            "saved student vs the average: {off_average}"
        );
        let off_raw = portaflow_tests::max_abs_diff(&saved, &raw);
        assert!(
            off_raw > 1e-4,
            "the saved student is the raw adapter ({off_raw})"
        );

        let split = TempDir::new("reflow-ema-resume");
        let mut two = c.clone();
        two.iterations = 2;
        let mut first = trainer(two, 4, split.path()).unwrap();
        while !first.done() {
            first.iterate().unwrap();
        }
        drop(first);
        let mut resumed = trainer(c, 4, split.path()).unwrap();
        resumed.iterate().unwrap();
        let again = flat(
            &LoraWeights::read(&split.path().join("student_final")).unwrap(),
            &order,
        );
        let diff = portaflow_tests::max_abs_diff(&again, &saved);
        assert!(diff < 1e-6, "the resumed run's average differs by {diff}");
    }

    #[test]
    fn bad_settings_and_damaged_couplings_are_named() {
        let mut c = config(1);
        c.sigmas = vec![1.0, 0.5, 0.75];
        assert!(c.validate().unwrap_err().contains("sigmas"));
        let mut c = config(1);
        c.sigmas = vec![0.9, 0.5];
        assert!(c.validate().unwrap_err().contains("sigmas must start at 1"));
        let mut c = config(1);
        c.batch_size = 1;
        assert!(c.validate().unwrap_err().contains("batch_size"));
        let mut c = config(1);
        c.teacher_guidance = 0.5;
        assert!(c.validate().unwrap_err().contains("teacher_guidance"));
        let mut c = config(1);
        c.ema_decay = 1.0;
        assert!(c.validate().unwrap_err().contains("ema_decay"));
        let mut c = config(1);
        c.pixel_loss_weight = -1.0;
        assert!(c.validate().unwrap_err().contains("pixel_loss_weight"));
        let mut c = config(1);
        c.model.merge_adapters = vec!["runs/x".into()];
        assert!(c.validate().unwrap_err().contains("merge_adapters"));

        // A filter nothing passes: the tiny model draws no correct image of these prompts.
        let mut c = config(1);
        c.keep = Keep::Correct;
        let run = TempDir::new("reflow-none-kept");
        let (train, _) = prompt_sets::build();
        let hard: Vec<PromptSpec> = train
            .into_iter()
            .filter(|s| s.tag == "color_attr")
            .take(2)
            .collect();
        assert!(!hard.is_empty());
        let device = ChosenDevice::cpu().device;
        let err = ReflowTrainer::new(
            c,
            tiny_pretrained_pipeline(&device),
            hard,
            vec![],
            run.path(),
            &device.clone().autodiff(),
            |_, _| {},
        )
        .err()
        .expect("no coupling kept")
        .to_string();
        assert!(
            err.contains("none of the 2 couplings may be drawn"),
            "{err}"
        );

        // Other runs' couplings are reused, pooled, only when drawn by the same teacher.
        let first = TempDir::new("reflow-first");
        drop(trainer(config(1), 3, first.path()).unwrap());
        let other_draw = TempDir::new("reflow-other-draw");
        let mut seed_7 = config(1);
        seed_7.seed = 7;
        seed_7.pairs_per_prompt = 2;
        drop(trainer(seed_7, 3, other_draw.path()).unwrap());
        let mut reuse = config(1);
        reuse.couplings_from = vec![
            first.path().join("couplings"),
            other_draw.path().join("couplings"),
        ];
        let second = TempDir::new("reflow-second");
        let t = trainer(reuse.clone(), 3, second.path()).unwrap();
        assert_eq!(t.couplings().seeds.len(), 3 + 6, "both draws pooled");
        assert_eq!(t.couplings().prompts[..3], [0, 1, 2]);
        assert_eq!(t.couplings().prompts[3..], [0, 0, 1, 1, 2, 2]);
        assert!(
            !second.path().join("couplings").exists(),
            "drew again instead of reusing"
        );
        drop(t);
        let mut twice = reuse.clone();
        twice.couplings_from = vec![first.path().join("couplings"); 2];
        let err = trainer(twice, 3, TempDir::new("reflow-twice").path())
            .err()
            .unwrap();
        assert!(err.contains("occurs twice in couplings_from"), "{err}");
        // A folder that holds no couplings is named, whether pooled or rescued from.
        let empty = TempDir::new("reflow-empty");
        let mut pooled = reuse.clone();
        pooled.couplings_from = vec![empty.path().to_path_buf()];
        let mut rescuing = config(1);
        rescuing.rescue_from = vec![empty.path().to_path_buf()];
        for c in [pooled, rescuing] {
            let err = trainer(c, 3, TempDir::new("reflow-no-index").path())
                .err()
                .unwrap();
            assert!(
                err.contains("no couplings here (index.json missing)")
                    && err.contains(&empty.path().display().to_string()),
                "{err}"
            );
        }
        reuse.teacher_guidance = 2.0;
        let err = trainer(reuse, 3, TempDir::new("reflow-third").path())
            .err()
            .unwrap();
        assert!(err.contains("these couplings were drawn with"), "{err}");
        // In a config file: one folder or a list.
        let one: ReflowConfig = toml::from_str("couplings_from = \"a/couplings\"").unwrap();
        let many: ReflowConfig = toml::from_str("couplings_from = [\"a\", \"b\"]").unwrap();
        assert_eq!(
            one.couplings_from,
            [std::path::PathBuf::from("a/couplings")]
        );
        assert_eq!(many.couplings_from.len(), 2);

        // Truncated couplings are named, not read.
        let run = TempDir::new("reflow-truncated");
        drop(trainer(config(1), 3, run.path()).unwrap());
        let data = run.path().join("couplings/x0.f32");
        let bytes = std::fs::read(&data).unwrap();
        std::fs::write(&data, &bytes[..bytes.len() - 8]).unwrap();
        let err = trainer(config(1), 3, run.path()).err().unwrap();
        assert!(err.contains("x0.f32") && err.contains("truncated"), "{err}");

        // Another config in the same run directory.
        let mut other = config(1);
        other.teacher_steps = 8;
        let err = trainer(other, 3, run.path()).err().unwrap();
        assert!(err.contains("only iterations may change"), "{err}");
    }

    #[test]
    fn the_reflow_preset_parses_and_validates() {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/reflow-shapes.toml");
        let c = ReflowConfig::from_file(&path).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.keep, Keep::Correct);
        // The bundled student's recipe (assets/models/shapes-4nfe/README.md).
        assert!(c.student_states && c.ema_decay > 0.0 && c.pairs_per_prompt == 48);
        c.validate().unwrap();
    }
}
