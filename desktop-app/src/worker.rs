//! The worker thread: it owns the device, the loaded pipeline and a training run; the UI talks
//! to it through two channels and is woken with `request_repaint` after every event.
//! Cancellation is an `AtomicBool` checked by the sampler between steps. A training run advances
//! one epoch at a time; commands (pause, stop, save, generate) are taken between epochs.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender, TryRecvError, channel};
use std::time::Instant;

use portaflow::device::{self, ChosenDevice, DeviceRequest};
use portaflow::lora::{AdapterSampling, LoraWeights};
use portaflow::pipeline::{self, GenerateOptions, Pipeline};
use portaflow::sample::step::StepKind;
use portaflow::train::grpo::config::GrpoConfig;
use portaflow::train::grpo::{EpochMetrics, EvalMetrics, GrpoEvent, GrpoTrainer};
use portaflow::world::render::Image;

/// What the UI asks for.
pub enum Command {
    /// Load a pipeline folder (`None`: the bundled model).
    Load(Option<PathBuf>),
    Generate(GenerateRequest),
    /// Attach a LoRA file or PEFT folder to the loaded model with a multiplier.
    AddAdapter {
        path: PathBuf,
        weight: f64,
    },
    SetAdapterWeight {
        name: String,
        weight: f64,
    },
    RemoveAdapter(String),
    /// Start a GRPO run in `run_dir` (resumed when it holds a checkpoint).
    Train {
        config: Box<GrpoConfig>,
        run_dir: PathBuf,
    },
    /// Hold the run after the current epoch (it stays in memory).
    PauseTraining,
    ResumeTraining,
    /// Save a checkpoint after the current epoch and end the run (resumable later).
    StopTraining,
    /// Write the run's adapter (the EMA when kept) as a PEFT folder.
    SaveAdapter(PathBuf),
}

/// One generation: every field is plain data from the form.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerateRequest {
    pub prompt: String,
    pub negative_prompt: String,
    pub steps: usize,
    pub cfg: f64,
    pub sampler: Sampler,
    pub seed: u64,
    pub count: usize,
    /// The adapters attached when it was asked for, `PATH:WEIGHT` (recorded in saved PNGs).
    pub adapters: Vec<String>,
    /// An explicit σ list (a few-step student's own) instead of the scheduler's `steps`.
    pub sigmas: Option<Vec<f64>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sampler {
    Euler,
    Sde,
    Cps,
}

impl Sampler {
    pub const ALL: [Sampler; 3] = [Sampler::Euler, Sampler::Sde, Sampler::Cps];

    /// The form's sampler for a student's sampling card (its η is the form's own: CPS 0.9).
    pub fn of_card(card: &AdapterSampling) -> Option<Sampler> {
        match card.sampler.as_str() {
            "euler" => Some(Sampler::Euler),
            "cps" if card.eta == Some(0.9) => Some(Sampler::Cps),
            "sde" if card.eta == Some(0.7) => Some(Sampler::Sde),
            _ => None,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Sampler::Euler => "Euler (ODE)",
            Sampler::Sde => "Flow-GRPO SDE",
            Sampler::Cps => "CPS",
        }
    }

    fn kind(self) -> StepKind {
        match self {
            Sampler::Euler => StepKind::Euler,
            Sampler::Sde => StepKind::FlowSde { noise_level: 0.7 },
            Sampler::Cps => StepKind::Cps { eta: 0.9 },
        }
    }
}

/// An adapter attached to the loaded model.
#[derive(Clone, Debug, PartialEq)]
pub struct Adapter {
    pub name: String,
    pub path: PathBuf,
    pub weight: f64,
    /// Linears it wraps.
    pub linears: usize,
    /// A few-step student's `sampling.json`, when its folder has one.
    pub sampling: Option<AdapterSampling>,
}

/// What the worker reports.
pub enum Event {
    Device(String),
    Loaded {
        model: String,
        seconds: f64,
    },
    Progress {
        step: usize,
        steps: usize,
        /// The current latent of the first image, as a picture (pixel-space models, and latent
        /// ones whose latent is at most 32×32).
        preview: Option<Image>,
        seconds_per_step: f64,
    },
    Done {
        request: GenerateRequest,
        images: Vec<Image>,
        seconds: f64,
    },
    Cancelled,
    Error(String),
    /// The adapters on the loaded model now (after a load or an adapter command).
    Adapters(Vec<Adapter>),
    TrainStarted {
        run_dir: PathBuf,
        /// Epochs already done (a resumed run) and planned.
        epoch: usize,
        epochs: usize,
        seconds: f64,
    },
    TrainEpoch(EpochMetrics),
    TrainEval(EvalMetrics),
    TrainGrid(Image),
    TrainSaved(PathBuf),
    TrainPaused,
    TrainResumed,
    /// The run ended: stopped with a checkpoint, or finished with its final adapter.
    TrainEnded {
        message: String,
    },
    TrainError(String),
}

/// The UI's handle on the worker.
pub struct Worker {
    commands: Sender<Command>,
    pub events: Receiver<Event>,
    pub cancel: Arc<AtomicBool>,
}

impl Worker {
    /// Starts the thread; `wake` is called after every event (the UI's `request_repaint`).
    pub fn spawn(request: DeviceRequest, wake: impl Fn() + Send + 'static) -> Self {
        let (commands, inbox) = channel::<Command>();
        let (outbox, events) = channel::<Event>();
        let cancel = Arc::new(AtomicBool::new(false));
        let flag = cancel.clone();
        std::thread::spawn(move || {
            let send = |event: Event| {
                let _ = outbox.send(event);
                wake();
            };
            let chosen = match device::select(request) {
                Ok(chosen) => chosen,
                Err(e) => {
                    send(Event::Error(format!("no device: {e}")));
                    return;
                }
            };
            send(Event::Device(chosen.to_string()));
            let mut pipe: Option<Pipeline> = None;
            let mut run: Option<GrpoTrainer> = None;
            let mut adapters: Vec<Adapter> = Vec::new();
            let mut next_adapter = 0;
            let mut paused = false;
            loop {
                // While a run trains, commands are taken between epochs; otherwise wait for one.
                let command = if run.is_some() && !paused {
                    match inbox.try_recv() {
                        Ok(command) => Some(command),
                        Err(TryRecvError::Empty) => None,
                        Err(TryRecvError::Disconnected) => return,
                    }
                } else {
                    match inbox.recv() {
                        Ok(command) => Some(command),
                        Err(_) => return,
                    }
                };
                let Some(command) = command else {
                    let trainer = run.as_mut().expect("a run is active");
                    if let Err(e) = train_epoch(trainer, &send) {
                        send(Event::TrainError(format!(
                            "epoch {} failed, the run is stopped (the last checkpoint is kept): {e}",
                            trainer.epoch
                        )));
                        run = None;
                    } else if trainer.done() {
                        send(Event::TrainEnded {
                            message: format!(
                                "done after epoch {}; adapter {}",
                                trainer.epoch,
                                trainer.run_dir().join("adapter_final").display()
                            ),
                        });
                        run = None;
                    }
                    continue;
                };
                match command {
                    Command::Load(dir) => match load(dir, &chosen) {
                        Ok((loaded, event)) => {
                            pipe = Some(loaded);
                            adapters.clear();
                            send(event);
                            send(Event::Adapters(Vec::new()));
                        }
                        Err(e) => send(Event::Error(e)),
                    },
                    Command::AddAdapter { path, weight } => {
                        let Some(p) = pipe.as_mut() else {
                            send(Event::Error("load a model before adding adapters".into()));
                            continue;
                        };
                        let name = format!("adapter{next_adapter}");
                        next_adapter += 1;
                        let sampling = AdapterSampling::read(&path);
                        let added = sampling.and_then(|sampling| {
                            let w = LoraWeights::read(&path).map_err(|e| e.to_string())?;
                            p.add_lora(&w, &name, weight, &chosen.device)
                                .map(|linears| (linears, sampling))
                                .map_err(|e| e.to_string())
                        });
                        match added {
                            Ok((linears, sampling)) => {
                                adapters.push(Adapter {
                                    name,
                                    path,
                                    weight,
                                    linears,
                                    sampling,
                                });
                                send(Event::Adapters(adapters.clone()));
                            }
                            Err(e) => {
                                send(Event::Error(format!("cannot add {}: {e}", path.display())))
                            }
                        }
                    }
                    Command::SetAdapterWeight { name, weight } => {
                        let (Some(p), Some(a)) =
                            (pipe.as_mut(), adapters.iter_mut().find(|a| a.name == name))
                        else {
                            continue;
                        };
                        match p.set_lora_weight(&name, weight) {
                            Ok(_) => {
                                a.weight = weight;
                                send(Event::Adapters(adapters.clone()));
                            }
                            Err(e) => send(Event::Error(e.to_string())),
                        }
                    }
                    Command::RemoveAdapter(name) => {
                        if let Some(p) = pipe.as_mut() {
                            p.remove_lora(&name);
                        }
                        adapters.retain(|a| a.name != name);
                        send(Event::Adapters(adapters.clone()));
                    }
                    Command::Generate(request) => {
                        flag.store(false, Ordering::Relaxed);
                        let Some(p) = pipe.as_ref() else {
                            send(Event::Error("no model is loaded".into()));
                            continue;
                        };
                        send(generate(p, request, &chosen, &flag, &send));
                    }
                    Command::Train { config, run_dir } => {
                        if run.is_some() {
                            send(Event::TrainError(
                                "a run is active: stop it before starting another".into(),
                            ));
                            continue;
                        }
                        let start = Instant::now();
                        let device = chosen.device.clone().autodiff();
                        match GrpoTrainer::open(*config, &run_dir, &device) {
                            Ok(trainer) => {
                                send(Event::TrainStarted {
                                    run_dir,
                                    epoch: trainer.epoch,
                                    epochs: trainer.config.run.epochs,
                                    seconds: start.elapsed().as_secs_f64(),
                                });
                                paused = false;
                                run = Some(trainer);
                            }
                            Err(e) => send(Event::TrainError(format!("cannot start: {e}"))),
                        }
                    }
                    Command::PauseTraining if run.is_some() => {
                        paused = true;
                        send(Event::TrainPaused);
                    }
                    Command::ResumeTraining if run.is_some() => {
                        paused = false;
                        send(Event::TrainResumed);
                    }
                    Command::StopTraining => {
                        if let Some(trainer) = run.take() {
                            send(match trainer.save_checkpoint() {
                                Ok(path) => Event::TrainEnded {
                                    message: format!(
                                        "stopped after epoch {}; checkpoint {} (Start resumes it)",
                                        trainer.epoch,
                                        path.display()
                                    ),
                                },
                                Err(e) => Event::TrainError(format!("stopped, but {e}")),
                            });
                        }
                    }
                    Command::SaveAdapter(dir) => match run.as_ref() {
                        Some(trainer) => send(match trainer.save_adapter(&dir) {
                            Ok(()) => Event::TrainSaved(dir),
                            Err(e) => Event::TrainError(format!("cannot save the adapter: {e}")),
                        }),
                        None => send(Event::TrainError("no run to save an adapter from".into())),
                    },
                    Command::PauseTraining | Command::ResumeTraining => {
                        send(Event::TrainError("no run is active".into()))
                    }
                }
            }
        });
        Self {
            commands,
            events,
            cancel,
        }
    }

    pub fn send(&self, command: Command) {
        let _ = self.commands.send(command);
    }
}

fn load(dir: Option<PathBuf>, chosen: &ChosenDevice) -> Result<(Pipeline, Event), String> {
    let start = Instant::now();
    let dir = dir.unwrap_or_else(pipeline::bundled_dir);
    let pipe = Pipeline::from_dir(&dir, &chosen.device)
        .map_err(|e| format!("cannot load {}: {e}", dir.display()))?;
    let event = Event::Loaded {
        model: dir.display().to_string(),
        seconds: start.elapsed().as_secs_f64(),
    };
    Ok((pipe, event))
}

fn generate(
    pipe: &Pipeline,
    request: GenerateRequest,
    chosen: &ChosenDevice,
    cancel: &AtomicBool,
    send: &impl Fn(Event),
) -> Event {
    let start = Instant::now();
    let mut options = GenerateOptions::euler(
        request.steps,
        request.cfg,
        (0..request.count as u64)
            .map(|k| request.seed + k)
            .collect(),
    );
    options.kind = request.sampler.kind();
    options.sigmas = request.sigmas.clone();
    options.negative_prompt = request.negative_prompt.clone();
    let prompts = vec![request.prompt.clone(); request.count];
    // Pixel-space models show their latent as is; a small latent (the bundled model's 16×16)
    // goes through the autoencoder, which costs little there but seconds per step at SD3's
    // 128×128.
    let side = pipe.resolution();
    let (height, width) = options.size.unwrap_or((side, side));
    let previewable = pipe.vae.is_none()
        || pipe
            .latent_shape(height, width)
            .is_ok_and(|[_, h, w]| h * w <= 32 * 32);
    let mut last = Instant::now();
    let result = pipe.generate(
        &prompts,
        &options,
        &chosen.device,
        |p| {
            let preview = previewable
                .then(|| pipeline::to_images(pipe.decode(p.latent.clone().narrow(0, 0, 1))))
                .and_then(|images| images.into_iter().next());
            send(Event::Progress {
                step: p.step,
                steps: p.steps,
                preview,
                seconds_per_step: last.elapsed().as_secs_f64(),
            });
            last = Instant::now();
        },
        Some(cancel),
    );
    match result {
        Ok(images) => Event::Done {
            request,
            images,
            seconds: start.elapsed().as_secs_f64(),
        },
        Err(_) if cancel.load(Ordering::Relaxed) => Event::Cancelled,
        Err(e) => Event::Error(e.to_string()),
    }
}

/// One epoch of the run, its metrics, evaluation and grid forwarded as events.
fn train_epoch(trainer: &mut GrpoTrainer, send: &impl Fn(Event)) -> Result<(), String> {
    trainer
        .epoch(|event| match event {
            GrpoEvent::Epoch(m) => send(Event::TrainEpoch(m.clone())),
            GrpoEvent::Eval(e) => send(Event::TrainEval(e.clone())),
            GrpoEvent::Grid(path) => match portaflow::image_io::load_png(path) {
                Ok(image) => send(Event::TrainGrid(image)),
                Err(e) => send(Event::TrainError(format!("grid {}: {e}", path.display()))),
            },
            GrpoEvent::Checkpoint(_) => {}
        })
        .map(|_| ())
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bundled_latent_model_shows_a_decoded_preview_at_each_step() {
        let chosen = ChosenDevice::cpu();
        let (pipe, _) = load(None, &chosen).unwrap();
        assert!(pipe.vae.is_some(), "the bundled model is a latent model");
        let request = GenerateRequest {
            prompt: "a photo of a red circle".into(),
            negative_prompt: String::new(),
            steps: 2,
            cfg: 1.0,
            sampler: Sampler::Euler,
            seed: 1,
            count: 1,
            adapters: Vec::new(),
            sigmas: None,
        };
        let previews = std::sync::Mutex::new(Vec::new());
        let send = |event: Event| {
            if let Event::Progress { preview, .. } = event {
                previews.lock().unwrap().push(preview);
            }
        };
        let done = generate(&pipe, request, &chosen, &AtomicBool::new(false), &send);
        assert!(matches!(done, Event::Done { .. }));
        let previews = previews.into_inner().unwrap();
        assert_eq!(previews.len(), 2, "one report per step");
        for preview in previews {
            let image = preview.expect("a preview through the autoencoder");
            assert_eq!((image.width, image.height), (64, 64));
        }
    }
}
