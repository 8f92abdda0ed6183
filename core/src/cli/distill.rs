//! `portaflow distill acdmd|reflow|rtdmd|opd --config FILE.toml --out RUN_DIR`: the AC-DMD cold
//! start and reflow have their own trainers; RTDMD's RL stage and Flow-OPD run on the GRPO trainer
//! with a config that must be theirs.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};

use portaflow::device::{self, DeviceRequest};
use portaflow::pipeline::{self, Pipeline};
use portaflow::train::distill::acdmd::{AcDmdConfig, AcDmdMetrics, AcDmdTrainer};
use portaflow::train::distill::reflow::{ReflowConfig, ReflowMetrics, ReflowTrainer};
use portaflow::train::distill::{DistillError, StudentEval};
use portaflow::train::grpo::config::{GrpoConfig, SdeType};
use portaflow::world::prompt;

use super::train::{GrpoRunArgs, run_grpo_config};

#[derive(clap::Subcommand)]
pub enum DistillCommand {
    /// RTDMD's AC-DMD cold start: distil the model (with CFG) into a few-step CPS student held
    /// in a LoRA adapter (presets: configs/acdmd-*.toml).
    Acdmd(StudentArgs),
    /// Reward-filtered reflow: the teacher's ODE couplings (kept when the Shapes detector marks
    /// the image correct) regressed by a few-step Euler student in a LoRA adapter (preset:
    /// configs/reflow-shapes.toml).
    Reflow(StudentArgs),
    /// RTDMD's RL stage on the GRPO trainer: SubGRPO on the few-step CPS student, the
    /// final-step auxiliary loss, LoRA stacking (default config: configs/rtdmd-shapes.toml; it
    /// must roll out with CPS at a few-step `sample.sigmas`).
    Rtdmd(GrpoRunArgs),
    /// Flow-OPD on the GRPO trainer: on-policy distillation from routed task teachers (default
    /// config: configs/opd-shapes.toml; it must have `[train.opd]`).
    Opd(GrpoRunArgs),
}

/// `distill acdmd` / `distill reflow`: the trainers of their own.
#[derive(clap::Args)]
pub struct StudentArgs {
    /// The run config (TOML); every field has a default.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Run directory: metrics.jsonl, eval.jsonl, checkpoint/, the student folder
    /// (generator_final/ or student_final/). A run directory with a checkpoint is resumed.
    #[arg(long)]
    out: PathBuf,
    /// Override `iterations` (the only setting a resumed run may change).
    #[arg(long)]
    iterations: Option<usize>,
    /// Print the effective config and exit.
    #[arg(long)]
    print_config: bool,
}

/// What `student_config` needs of a student trainer's config.
trait StudentConfig: Default + Sized {
    fn from_file(path: &Path) -> Result<Self, String>;
    fn to_toml(&self) -> String;
    fn set_iterations(&mut self, n: usize);
}

macro_rules! student_config {
    ($config:ty) => {
        impl StudentConfig for $config {
            fn from_file(path: &Path) -> Result<Self, String> {
                <$config>::from_file(path)
            }
            fn to_toml(&self) -> String {
                <$config>::to_toml(self)
            }
            fn set_iterations(&mut self, n: usize) {
                self.iterations = n;
            }
        }
    };
}
student_config!(AcDmdConfig);
student_config!(ReflowConfig);

/// The config file given (or the defaults) with `--iterations` applied; `None` after
/// `--print-config` printed it.
fn student_config<C: StudentConfig>(args: &StudentArgs) -> Result<Option<C>> {
    let mut config = match &args.config {
        Some(path) => C::from_file(path).map_err(anyhow::Error::msg)?,
        None => C::default(),
    };
    if let Some(n) = args.iterations {
        config.set_iterations(n);
    }
    if args.print_config {
        print!("{}", config.to_toml());
        return Ok(None);
    }
    Ok(Some(config))
}

/// The config of `distill rtdmd` / `distill opd`: the file given, or the preset; `check` names
/// what makes it that method's config.
fn method_config(
    args: &GrpoRunArgs,
    preset: &str,
    check: impl Fn(&GrpoConfig) -> Result<(), String>,
) -> Result<GrpoConfig> {
    let path = args.config.clone().unwrap_or_else(|| repo_file(preset));
    let config = GrpoConfig::from_file(&path).map_err(anyhow::Error::msg)?;
    check(&config).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    Ok(config)
}

/// What `distill rtdmd` needs beyond a valid GRPO config.
pub fn check_rtdmd(c: &GrpoConfig) -> Result<(), String> {
    if c.sample.sde_type != SdeType::Cps {
        return Err("RTDMD rolls out with CPS: sample.sde_type must be \"cps\"".into());
    }
    if c.sample.sigmas.is_none() {
        return Err(
            "RTDMD trains a few-step student: set sample.sigmas (e.g. [1.0, 0.75, 0.5, 0.25])"
                .into(),
        );
    }
    Ok(())
}

/// What `distill opd` needs beyond a valid GRPO config.
pub fn check_opd(c: &GrpoConfig) -> Result<(), String> {
    if c.train.opd.is_none() {
        return Err("Flow-OPD needs a [train.opd] section with its teachers".into());
    }
    Ok(())
}

pub fn run(request: DeviceRequest, command: DistillCommand) -> Result<()> {
    match command {
        DistillCommand::Acdmd(args) => match student_config(&args)? {
            Some(config) => acdmd(request, config, &args.out),
            None => Ok(()),
        },
        DistillCommand::Reflow(args) => match student_config(&args)? {
            Some(config) => reflow(request, config, &args.out),
            None => Ok(()),
        },
        DistillCommand::Rtdmd(args) => {
            let config = method_config(&args, "configs/rtdmd-shapes.toml", check_rtdmd)?;
            run_grpo_config(request, config, &args)
        }
        DistillCommand::Opd(args) => {
            let config = method_config(&args, "configs/opd-shapes.toml", check_opd)?;
            run_grpo_config(request, config, &args)
        }
    }
}

fn repo_file(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(relative)
}

fn print_eval(e: &StudentEval) {
    let tags: Vec<String> = e
        .accuracy_by_tag
        .iter()
        .map(|(t, a)| format!("{t} {a:.2}"))
        .collect();
    println!(
        "  student at {} NFE: held-out accuracy {:.3} ({}), artifacts/image {:.3}, {:.1} s",
        e.steps,
        e.accuracy,
        tags.join(", "),
        e.artifact_rate,
        e.seconds
    );
}

/// The training and held-out prompt files, the repository's Shapes prompts by default.
fn prompt_files(
    train: &Option<PathBuf>,
    test: &Option<PathBuf>,
) -> Result<(Vec<prompt::PromptSpec>, Vec<prompt::PromptSpec>)> {
    let train = train
        .clone()
        .unwrap_or_else(|| repo_file("assets/prompts/shapes_train.jsonl"));
    let test = test
        .clone()
        .unwrap_or_else(|| repo_file("assets/prompts/shapes_test.jsonl"));
    Ok((prompt::read_jsonl(&train)?, prompt::read_jsonl(&test)?))
}

fn acdmd(request: DeviceRequest, config: AcDmdConfig, out: &Path) -> Result<()> {
    config.validate().map_err(anyhow::Error::msg)?;
    let chosen = device::select(request)?;
    let device = chosen.device.clone().autodiff();
    let model = config
        .model
        .path
        .clone()
        .unwrap_or_else(pipeline::bundled_dir);
    let (train, test) = prompt_files(&config.train_prompts, &config.test_prompts)?;
    let train: Vec<String> = train.into_iter().map(|s| s.prompt).collect();
    let base = Pipeline::from_dir(&model, &device)
        .with_context(|| format!("loading the teacher {}", model.display()))?;
    let mut trainer = AcDmdTrainer::new(config, base, train, test, out, &device)?;
    println!(
        "AC-DMD on {chosen}: teacher {}, student σ {:?} (CPS η {}), run dir {}",
        model.display(),
        trainer.sigmas(),
        trainer.config.eta,
        out.display()
    );
    if trainer.iteration == 0 && trainer.config.eval_every > 0 {
        // Where the curve starts: the teacher itself sampled with the student's few steps.
        print_eval(&trainer.evaluate()?);
    } else if trainer.iteration > 0 {
        println!("resumed at iteration {}", trainer.iteration);
    }
    drive(&mut trainer, Instant::now(), |m: &AcDmdMetrics| {
        format!(
            "dmd {:.4}  fake {:.4}  consistency {:.2e}  stop {} (s {:.2})  |∇| {:.3}  {:.1} s  peak {:.0} MiB",
            m.dmd_loss,
            m.fake_loss,
            m.consistency,
            m.stop_step,
            m.ambient_sigma,
            m.generator_grad_norm,
            m.seconds,
            m.peak_memory_mib.unwrap_or(0.0),
        )
    })?;
    Ok(())
}

fn reflow(request: DeviceRequest, config: ReflowConfig, out: &Path) -> Result<()> {
    config.validate().map_err(anyhow::Error::msg)?;
    let chosen = device::select(request)?;
    let device = chosen.device.clone().autodiff();
    let model = config
        .model
        .path
        .clone()
        .unwrap_or_else(pipeline::bundled_dir);
    let (train, test) = prompt_files(&config.train_prompts, &config.test_prompts)?;
    let base = Pipeline::from_dir(&model, &device)
        .with_context(|| format!("loading the teacher {}", model.display()))?;
    let teacher_adapters: String = config
        .teacher_adapters
        .iter()
        .map(|p| format!(" + {}", p.display()))
        .collect();
    println!(
        "reflow on {chosen}: teacher {}{teacher_adapters} ({} Euler steps, CFG {}), student σ {:?} (Euler), run dir {}",
        model.display(),
        config.teacher_steps,
        config.teacher_guidance,
        config.sigmas,
        out.display()
    );
    let start = Instant::now();
    let mut last_report = Instant::now();
    let mut trainer =
        ReflowTrainer::new(config, base, train, test, out, &device, |done, total| {
            if done == total || last_report.elapsed().as_secs() >= 30 {
                last_report = Instant::now();
                println!(
                    "  teacher couplings {done}/{total} ({:.0} s)",
                    start.elapsed().as_secs_f64()
                );
            }
        })?;
    let by_tag = trainer.couplings_by_tag();
    let tags: Vec<String> = by_tag
        .iter()
        .map(|(t, [correct, drawn])| format!("{t} {correct}/{drawn}"))
        .collect();
    let index = trainer.couplings();
    println!(
        "couplings: {} of {} correct ({}), drawn in {:.0} s; keep {:?}, correct weight {}",
        index.correct.iter().filter(|&&c| c).count(),
        index.seeds.len(),
        tags.join(", "),
        index.seconds,
        trainer.config.keep,
        trainer.config.correct_weight
    );
    let c = &trainer.config;
    println!(
        "student: balance_tags {}, student_states {}, ema_decay {}, pixel_loss_weight {}",
        c.balance_tags, c.student_states, c.ema_decay, c.pixel_loss_weight
    );
    if !trainer.config.rescue_from.is_empty() {
        println!(
            "rescued: {} wrong couplings learn a correct image of the same noise from {}",
            trainer.rescued(),
            trainer.config.rescue_from.len()
        );
    }
    if trainer.config.recouple_min_correct > 0 {
        println!(
            "re-coupled: {} wrong couplings learn the nearest correct image of their prompt (prompts with at least {} correct)",
            trainer.recoupled(),
            trainer.config.recouple_min_correct
        );
    }
    if trainer.iteration == 0 && trainer.config.eval_every > 0 {
        // Where the curve starts: the base sampled with the student's few Euler steps, no CFG.
        print_eval(&trainer.evaluate()?);
    } else if trainer.iteration > 0 {
        println!("resumed at iteration {}", trainer.iteration);
    }
    drive(&mut trainer, start, |m: &ReflowMetrics| {
        let by_sigma: Vec<String> = m.loss_by_sigma.iter().map(|l| format!("{l:.4}")).collect();
        let pixel = m
            .pixel_loss
            .map_or(String::new(), |p| format!(", pixels at the last σ {p:.4}"));
        format!(
            "loss {:.4} (velocity per σ {}{pixel})  |∇| {:.3}  {:.1} s  peak {:.0} MiB",
            m.loss,
            by_sigma.join(" "),
            m.grad_norm,
            m.seconds,
            m.peak_memory_mib.unwrap_or(0.0),
        )
    })?;
    Ok(())
}

/// What `drive` needs of a student's trainer.
trait StudentRun {
    type Metrics;
    fn done(&self) -> bool;
    fn iterate(&mut self) -> Result<Self::Metrics, DistillError>;
    fn iteration(&self) -> usize;
    fn eval_due(&self) -> bool;
    fn evaluate(&mut self) -> Result<StudentEval, DistillError>;
    fn save_checkpoint(&self) -> Result<PathBuf, DistillError>;
    fn write_student(&self) -> Result<PathBuf, DistillError>;
    fn student_dir(&self) -> PathBuf;
    /// How to sample the student: the `generate` flags.
    fn sampling_flags(&self) -> String;
}

macro_rules! student_run {
    ($trainer:ty, $metrics:ty, $dir:literal, $flags:expr) => {
        impl StudentRun for $trainer {
            type Metrics = $metrics;
            fn done(&self) -> bool {
                <$trainer>::done(self)
            }
            fn iterate(&mut self) -> Result<$metrics, DistillError> {
                <$trainer>::iterate(self)
            }
            fn iteration(&self) -> usize {
                self.iteration
            }
            fn eval_due(&self) -> bool {
                <$trainer>::eval_due(self)
            }
            fn evaluate(&mut self) -> Result<StudentEval, DistillError> {
                <$trainer>::evaluate(self)
            }
            fn save_checkpoint(&self) -> Result<PathBuf, DistillError> {
                <$trainer>::save_checkpoint(self)
            }
            fn write_student(&self) -> Result<PathBuf, DistillError> {
                <$trainer>::write_student(self)
            }
            fn student_dir(&self) -> PathBuf {
                self.run_dir().join($dir)
            }
            fn sampling_flags(&self) -> String {
                let flags: fn(&$trainer) -> String = $flags;
                flags(self)
            }
        }
    };
}

fn sigma_list(sigmas: &[f64]) -> String {
    sigmas
        .iter()
        .map(|s| format!("{s}"))
        .collect::<Vec<_>>()
        .join(",")
}

student_run!(AcDmdTrainer, AcDmdMetrics, "generator_final", |t| format!(
    "--sigmas {} --sampler cps:{} --cfg 1",
    sigma_list(t.sigmas()),
    t.config.eta
));
student_run!(ReflowTrainer, ReflowMetrics, "student_final", |t| format!(
    "--sigmas {} --sampler euler --cfg 1",
    sigma_list(&t.config.sigmas)
));

/// Runs a student's iterations to the end with its evaluations; Ctrl-C saves a checkpoint and
/// the student so far. `line` formats an iteration's metrics.
fn drive<T: StudentRun>(
    trainer: &mut T,
    start: Instant,
    line: impl Fn(&T::Metrics) -> String,
) -> Result<()> {
    let stop = super::stop_on_ctrl_c("iteration")?;
    while !trainer.done() {
        if stop.load(std::sync::atomic::Ordering::SeqCst) {
            let checkpoint = trainer.save_checkpoint()?;
            let student = trainer.write_student()?;
            println!(
                "stopped after iteration {}: checkpoint {}, the student so far {} (rerun the same command to resume)",
                trainer.iteration(),
                checkpoint.display(),
                student.display()
            );
            return Ok(());
        }
        let m = trainer.iterate()?;
        println!(
            "iter {:>5}  {}  ({:.0} s)",
            trainer.iteration(),
            line(&m),
            start.elapsed().as_secs_f64()
        );
        if trainer.eval_due() {
            print_eval(&trainer.evaluate()?);
        }
    }
    // A run resumed after its last iteration (e.g. with a smaller --iterations) still leaves its
    // student.
    let student = trainer.student_dir();
    if !student.join("adapter_model.safetensors").is_file() {
        trainer.write_student()?;
    }
    println!(
        "done in {:.0} s: the student adapter is {} (generate with --lora it {})",
        start.elapsed().as_secs_f64(),
        student.display(),
        trainer.sampling_flags()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_presets_are_their_methods_configs_and_a_plain_grpo_config_is_named_as_neither() {
        let read = |p: &str| GrpoConfig::from_file(&repo_file(p)).unwrap();
        check_rtdmd(&read("configs/rtdmd-shapes.toml")).unwrap();
        check_rtdmd(&read("configs/rtdmd-student-shapes.toml")).unwrap();
        // The paper settings for real GPUs (`read` validates).
        let (rtdmd, opd) = (
            read("configs/rtdmd-sd3.5m.toml"),
            read("configs/opd-sd3.5m.toml"),
        );
        check_rtdmd(&rtdmd).unwrap();
        check_opd(&opd).unwrap();
        for c in [&rtdmd, &opd] {
            let path = c.model.path.as_deref().and_then(|p| p.to_str());
            assert_eq!(path, Some("stable-diffusion-3.5-medium"));
        }
        check_opd(&read("configs/opd-shapes.toml")).unwrap();
        let plain = read("configs/grpo-shapes.toml");
        assert!(check_rtdmd(&plain).unwrap_err().contains("sample.sigmas"));
        assert!(check_opd(&plain).unwrap_err().contains("[train.opd]"));
        let sde = read("configs/grpo-shapes-flow-grpo.toml");
        assert!(check_rtdmd(&sde).unwrap_err().contains("sample.sde_type"));
    }
}
