//! The worker thread: it owns the device and the loaded pipeline; the UI talks to it through two
//! channels and is woken with `request_repaint` after every event. Cancellation is an
//! `AtomicBool` checked by the sampler between steps.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::time::Instant;

use portaflow::device::{self, ChosenDevice, DeviceRequest};
use portaflow::pipeline::{self, GenerateOptions, Pipeline};
use portaflow::sample::step::StepKind;
use portaflow::world::render::Image;

/// What the UI asks for.
pub enum Command {
    /// Load a pipeline folder (`None`: the bundled model).
    Load(Option<PathBuf>),
    Generate(GenerateRequest),
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
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sampler {
    Euler,
    Sde,
    Cps,
}

impl Sampler {
    pub const ALL: [Sampler; 3] = [Sampler::Euler, Sampler::Sde, Sampler::Cps];

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
        /// The current latent of the first image, as a picture (pixel-space models).
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
            for command in inbox {
                match command {
                    Command::Load(dir) => match load(dir, &chosen) {
                        Ok((loaded, event)) => {
                            pipe = Some(loaded);
                            send(event);
                        }
                        Err(e) => send(Event::Error(e)),
                    },
                    Command::Generate(request) => {
                        flag.store(false, Ordering::Relaxed);
                        let Some(p) = pipe.as_ref() else {
                            send(Event::Error("no model is loaded".into()));
                            continue;
                        };
                        send(generate(p, request, &chosen, &flag, &send));
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
    options.negative_prompt = request.negative_prompt.clone();
    let prompts = vec![request.prompt.clone(); request.count];
    let pixel_space = pipe.vae.is_none();
    let mut last = Instant::now();
    let result = pipe.generate(
        &prompts,
        &options,
        &chosen.device,
        |p| {
            let preview = pixel_space
                .then(|| pipeline::to_images(p.latent.clone().narrow(0, 0, 1)))
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
