//! The UI: plain data (the form as typed, finished images and their textures), drawn each
//! frame; events from the worker are drained in `logic`.

use std::path::PathBuf;

use egui::{ColorImage, TextureHandle, TextureOptions};
use portaflow::device::DeviceRequest;
use portaflow::lora::AdapterSampling;
use portaflow::world::render::Image;

use crate::train::TrainTab;
use crate::worker::{Adapter, Command, Event, GenerateRequest, Sampler, Worker};

/// The Generate form as typed: numbers stay text until Generate, so nonsense is shown next to
/// its field instead of being silently replaced.
#[derive(Clone, Debug)]
pub struct Form {
    pub prompt: String,
    pub negative_prompt: String,
    pub steps: String,
    pub cfg: String,
    pub sampler: Sampler,
    pub random_seed: bool,
    pub seed: String,
    pub count: String,
}

impl Default for Form {
    fn default() -> Self {
        Self {
            prompt: "a photo of a red circle".into(),
            negative_prompt: String::new(),
            steps: "20".into(),
            cfg: "4".into(),
            sampler: Sampler::Euler,
            random_seed: true,
            seed: "0".into(),
            count: "4".into(),
        }
    }
}

/// Per-field problems of a form.
#[derive(Debug, Default, PartialEq)]
pub struct FormErrors {
    pub prompt: Option<String>,
    pub steps: Option<String>,
    pub cfg: Option<String>,
    pub seed: Option<String>,
    pub count: Option<String>,
}

impl Form {
    /// The request, or what is wrong with each field.
    pub fn parse(&self, random: u64) -> Result<GenerateRequest, FormErrors> {
        let mut errors = FormErrors::default();
        if self.prompt.trim().is_empty() {
            errors.prompt = Some("type a prompt".into());
        }
        let steps = match self.steps.trim().parse::<usize>() {
            Ok(s) if (1..=1000).contains(&s) => s,
            _ => {
                errors.steps = Some("a whole number from 1 to 1000".into());
                0
            }
        };
        let cfg = match self.cfg.trim().parse::<f64>() {
            Ok(c) if c.is_finite() && (1.0..=30.0).contains(&c) => c,
            _ => {
                errors.cfg = Some("a number from 1 (off) to 30".into());
                0.0
            }
        };
        let seed = if self.random_seed {
            random
        } else {
            self.seed.trim().parse::<u64>().unwrap_or_else(|_| {
                errors.seed = Some("a whole number ≥ 0".into());
                0
            })
        };
        let count = match self.count.trim().parse::<usize>() {
            Ok(n) if (1..=64).contains(&n) => n,
            _ => {
                errors.count = Some("1 to 64 images".into());
                0
            }
        };
        if errors != FormErrors::default() {
            return Err(errors);
        }
        Ok(GenerateRequest {
            prompt: self.prompt.clone(),
            negative_prompt: self.negative_prompt.clone(),
            steps,
            cfg,
            sampler: self.sampler,
            seed,
            count,
            adapters: Vec::new(),
            sigmas: None,
        })
    }

    /// Fills the form from an earlier request (the gallery's "use these settings").
    pub fn set_from(&mut self, request: &GenerateRequest, seed: u64) {
        self.prompt = request.prompt.clone();
        self.negative_prompt = request.negative_prompt.clone();
        self.steps = request.steps.to_string();
        self.cfg = request.cfg.to_string();
        self.sampler = request.sampler;
        self.random_seed = false;
        self.seed = seed.to_string();
        self.count = "1".into();
    }
}

/// A finished image in the gallery.
pub struct Picture {
    pub request: GenerateRequest,
    pub seed: u64,
    pub image: Image,
    texture: Option<TextureHandle>,
}

/// Where the worker is.
#[derive(Debug, PartialEq)]
pub enum Status {
    Starting,
    Loading,
    Ready,
    Generating { step: usize, steps: usize },
}

pub struct PortaflowApp {
    pub worker: Worker,
    pub train: TrainTab,
    pub form: Form,
    pub errors: FormErrors,
    pub status: Status,
    pub device: String,
    pub model: String,
    pub message: Option<String>,
    pub gallery: Vec<Picture>,
    preview: Option<(Image, Option<TextureHandle>)>,
    seconds_per_step: f64,
    pub save_dir: String,
    pub model_dir: String,
    pub adapters: Vec<Adapter>,
    pub adapter_path: String,
    pub adapter_weight: String,
    pub adapter_error: Option<String>,
}

impl PortaflowApp {
    pub fn new(ctx: egui::Context, request: DeviceRequest) -> Self {
        Self::with_wake(request, move || ctx.request_repaint())
    }

    /// Starts the worker on `request`'s device and loads the bundled model; `wake` is called
    /// after every worker event (the window's `request_repaint`; tests poll instead).
    pub fn with_wake(request: DeviceRequest, wake: impl Fn() + Send + 'static) -> Self {
        let worker = Worker::spawn(request, wake);
        worker.send(Command::Load(None));
        Self {
            worker,
            train: TrainTab::default(),
            form: Form::default(),
            errors: FormErrors::default(),
            status: Status::Starting,
            device: "finding a device…".into(),
            model: String::new(),
            message: None,
            gallery: Vec::new(),
            preview: None,
            seconds_per_step: 0.0,
            save_dir: "portaflow-images".into(),
            model_dir: String::new(),
            adapters: Vec::new(),
            adapter_path: String::new(),
            adapter_weight: "1.0".into(),
            adapter_error: None,
        }
    }

    /// Drains the worker's events into plain state.
    pub fn drain_events(&mut self) {
        while let Ok(event) = self.worker.events.try_recv() {
            let Some(event) = self.train.on_event(event) else {
                continue;
            };
            match event {
                Event::Device(d) => {
                    self.device = d;
                    self.status = Status::Loading;
                }
                Event::Loaded { model, seconds } => {
                    self.model = format!("{model} (loaded in {seconds:.1} s)");
                    self.status = Status::Ready;
                    self.message = None;
                }
                Event::Progress {
                    step,
                    steps,
                    preview,
                    seconds_per_step,
                } => {
                    self.status = Status::Generating { step, steps };
                    self.seconds_per_step = seconds_per_step;
                    if let Some(image) = preview {
                        self.preview = Some((image, None));
                    }
                }
                Event::Done {
                    request,
                    images,
                    seconds,
                } => {
                    self.message = Some(format!("{} image(s) in {seconds:.1} s", images.len()));
                    for (k, image) in images.into_iter().enumerate() {
                        self.gallery.insert(
                            0,
                            Picture {
                                seed: request.seed + k as u64,
                                request: request.clone(),
                                image,
                                texture: None,
                            },
                        );
                    }
                    self.status = Status::Ready;
                    self.preview = None;
                }
                Event::Adapters(list) => {
                    let had_student = self.student().is_some();
                    self.adapters = list;
                    self.adapter_error = None;
                    if !had_student && let Some(card) = self.student().cloned() {
                        self.use_student_settings(&card);
                    }
                }
                Event::Cancelled => {
                    self.status = Status::Ready;
                    self.message = Some("cancelled".into());
                    self.preview = None;
                }
                Event::Error(e) => {
                    if self.status != Status::Starting {
                        self.status = Status::Ready;
                    }
                    self.message = Some(e);
                }
                _ => unreachable!("training events are taken by the Train tab"),
            }
        }
    }

    /// Validates the form and starts a generation.
    pub fn start_generation(&mut self) {
        match self.form.parse(rand_seed()) {
            Ok(mut request) => {
                request.adapters = self
                    .adapters
                    .iter()
                    .map(|a| format!("{}:{}", a.path.display(), a.weight))
                    .collect();
                // A student samples at its own σ list when asked for its step count.
                request.sigmas = self
                    .student()
                    .filter(|card| card.sigmas.len() == request.steps)
                    .map(|card| card.sigmas.clone());
                self.errors = FormErrors::default();
                self.message = None;
                self.status = Status::Generating {
                    step: 0,
                    steps: request.steps,
                };
                self.worker.send(Command::Generate(request));
            }
            Err(errors) => self.errors = errors,
        }
    }

    pub fn generate_tab(&mut self, ui: &mut egui::Ui) {
        let busy = matches!(
            self.status,
            Status::Generating { .. } | Status::Loading | Status::Starting
        );
        field_error(
            ui,
            "Prompt",
            &mut self.form.prompt,
            &self.errors.prompt,
            true,
        );
        field_error(
            ui,
            "Negative prompt",
            &mut self.form.negative_prompt,
            &None,
            true,
        );
        ui.horizontal(|ui| {
            field_error(ui, "Steps", &mut self.form.steps, &self.errors.steps, false);
            field_error(ui, "CFG", &mut self.form.cfg, &self.errors.cfg, false);
            field_error(
                ui,
                "Images",
                &mut self.form.count,
                &self.errors.count,
                false,
            );
        });
        ui.horizontal(|ui| {
            ui.label("Sampler");
            egui::ComboBox::from_id_salt("sampler")
                .selected_text(self.form.sampler.label())
                .show_ui(ui, |ui| {
                    for s in Sampler::ALL {
                        ui.selectable_value(&mut self.form.sampler, s, s.label());
                    }
                });
            ui.checkbox(&mut self.form.random_seed, "Random seed");
            if !self.form.random_seed {
                field_error(ui, "Seed", &mut self.form.seed, &self.errors.seed, false);
            }
        });
        self.adapter_list(ui);
        ui.horizontal(|ui| {
            if ui
                .add_enabled(!busy, egui::Button::new("Generate"))
                .clicked()
            {
                self.start_generation();
            }
            if let Status::Generating { step, steps } = self.status {
                if ui.button("Cancel").clicked() {
                    self.worker
                        .cancel
                        .store(true, std::sync::atomic::Ordering::Relaxed);
                }
                let fraction = step as f32 / steps.max(1) as f32;
                ui.add(egui::ProgressBar::new(fraction).text(format!(
                    "step {step}/{steps} · {:.2} s/step",
                    self.seconds_per_step
                )));
            }
        });
        if let Some(message) = &self.message {
            ui.label(message);
        }
        if let Some((image, texture)) = &mut self.preview {
            let texture = texture.get_or_insert_with(|| to_texture(ui.ctx(), "preview", image));
            ui.image((texture.id(), egui::vec2(192.0, 192.0)));
        }
        ui.separator();
        ui.horizontal(|ui| {
            ui.label("Save to");
            ui.text_edit_singleline(&mut self.save_dir);
        });
        let mut use_settings = None;
        let mut saved = None;
        egui::ScrollArea::vertical().show(ui, |ui| {
            ui.horizontal_wrapped(|ui| {
                for (i, picture) in self.gallery.iter_mut().enumerate() {
                    ui.vertical(|ui| {
                        let texture = picture.texture.get_or_insert_with(|| {
                            to_texture(ui.ctx(), &format!("gallery-{i}"), &picture.image)
                        });
                        ui.image((texture.id(), egui::vec2(128.0, 128.0)))
                            .on_hover_text(format!(
                                "{} (seed {})",
                                picture.request.prompt, picture.seed
                            ));
                        ui.horizontal(|ui| {
                            if ui.small_button("Save").clicked() {
                                saved = Some(i);
                            }
                            if ui.small_button("Use settings").clicked() {
                                use_settings = Some(i);
                            }
                        });
                    });
                }
            });
        });
        if let Some(i) = use_settings {
            let picture = &self.gallery[i];
            self.form.set_from(&picture.request, picture.seed);
        }
        if let Some(i) = saved {
            self.message = Some(match self.save(i) {
                Ok(path) => format!("saved {}", path.display()),
                Err(e) => format!("could not save: {e}"),
            });
        }
    }

    /// Writes gallery picture `i` as a PNG with its settings in text chunks.
    pub fn save(&self, i: usize) -> Result<PathBuf, String> {
        let picture = &self.gallery[i];
        let dir = PathBuf::from(&self.save_dir);
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let path = dir.join(format!("portaflow-{}-{}.png", picture.seed, i));
        let r = &picture.request;
        let text = [
            ("prompt", r.prompt.clone()),
            ("negative_prompt", r.negative_prompt.clone()),
            ("seed", picture.seed.to_string()),
            ("sampler", r.sampler.label().to_string()),
            ("steps", r.steps.to_string()),
            (
                "sigmas",
                r.sigmas.as_ref().map_or(String::new(), |s| {
                    s.iter().map(f64::to_string).collect::<Vec<_>>().join(",")
                }),
            ),
            ("cfg", r.cfg.to_string()),
            ("model", self.model.clone()),
            ("loras", r.adapters.join(" ")),
            (
                "software",
                format!("portaflow-desktop {}", env!("CARGO_PKG_VERSION")),
            ),
        ];
        portaflow::image_io::save_png(&picture.image, &path, &text).map_err(|e| e.to_string())?;
        Ok(path)
    }

    pub fn models_tab(&mut self, ui: &mut egui::Ui) {
        ui.label(format!("Device: {}", self.device));
        ui.label(format!(
            "Model: {}",
            if self.model.is_empty() {
                "loading…"
            } else {
                &self.model
            }
        ));
        ui.horizontal(|ui| {
            field_error(ui, "Model folder", &mut self.model_dir, &None, true);
            if ui.button("Load").clicked() {
                self.status = Status::Loading;
                self.message = Some("loading…".into());
                let dir = self.model_dir.trim();
                let dir = (!dir.is_empty()).then(|| PathBuf::from(dir));
                self.worker.send(Command::Load(dir));
            }
            if ui.button("Bundled model").clicked() {
                self.status = Status::Loading;
                self.message = Some("loading…".into());
                self.worker.send(Command::Load(None));
            }
        });
        ui.horizontal(|ui| {
            field_error(
                ui,
                "Adapter",
                &mut self.adapter_path,
                &self.adapter_error,
                true,
            );
            ui.label("weight");
            ui.add(egui::TextEdit::singleline(&mut self.adapter_weight).desired_width(40.0));
            if ui.button("Add adapter").clicked() {
                self.add_adapter();
            }
            if ui.button("Bundled 4-step student").clicked() {
                self.add_bundled_student();
            }
        });
        ui.label("PEFT folder, diffusers / kohya .safetensors or torch .pt; weight −2 to 2.");
        self.adapter_list(ui);
        if let Some(message) = &self.message {
            ui.label(message);
        }
    }

    /// The sampling card of an attached few-step student (the first one with a card).
    pub fn student(&self) -> Option<&AdapterSampling> {
        self.adapters
            .iter()
            .filter(|a| a.weight != 0.0)
            .find_map(|a| a.sampling.as_ref())
    }

    /// Sets the form to sample a student as it was trained: its sampler, its steps, no CFG.
    fn use_student_settings(&mut self, card: &AdapterSampling) {
        self.form.steps = card.sigmas.len().to_string();
        self.form.cfg = "1".into();
        match Sampler::of_card(card) {
            Some(sampler) => {
                self.form.sampler = sampler;
                self.message = Some(format!(
                    "a {}-step student: sampler {}, {} steps at its σ list, CFG 1",
                    card.sigmas.len(),
                    sampler.label(),
                    card.sigmas.len()
                ));
            }
            None => {
                self.message = Some(format!(
                    "a {}-step student sampled with {} η {:?}, which the form does not offer: set the sampler by hand",
                    card.sigmas.len(),
                    card.sampler,
                    card.eta
                ))
            }
        }
    }

    /// Attaches the bundled model's few-step student (`assets/models/shapes-4nfe`).
    pub fn add_bundled_student(&mut self) {
        let dir = portaflow::pipeline::bundled_dir().with_file_name("shapes-4nfe");
        self.worker.send(Command::AddAdapter {
            path: dir,
            weight: 1.0,
        });
    }

    /// Validates the adapter fields and asks the worker to attach it.
    pub fn add_adapter(&mut self) {
        let path = self.adapter_path.trim();
        let weight = self.adapter_weight.trim().parse::<f64>();
        self.adapter_error = match (path.is_empty(), weight) {
            (true, _) => Some("type the adapter's path".into()),
            (false, Ok(w)) if w.is_finite() && (-2.0..=2.0).contains(&w) => {
                self.worker.send(Command::AddAdapter {
                    path: PathBuf::from(path),
                    weight: w,
                });
                None
            }
            (false, _) => Some("the weight must be a number from −2 to 2".into()),
        };
    }

    /// The attached adapters with a weight slider and a remove button each.
    fn adapter_list(&mut self, ui: &mut egui::Ui) {
        let mut changed = None;
        let mut removed = None;
        for adapter in &mut self.adapters {
            ui.horizontal(|ui| {
                ui.label(format!(
                    "LoRA {} ({} linears)",
                    adapter.path.display(),
                    adapter.linears
                ));
                let slider =
                    ui.add(egui::Slider::new(&mut adapter.weight, -2.0..=2.0).text("weight"));
                // While dragging only the slider moves; the model follows on release.
                if slider.drag_stopped() || (slider.changed() && !slider.dragged()) {
                    changed = Some((adapter.name.clone(), adapter.weight));
                }
                if ui.small_button("Remove").clicked() {
                    removed = Some(adapter.name.clone());
                }
            });
        }
        if let Some((name, weight)) = changed {
            self.worker.send(Command::SetAdapterWeight { name, weight });
        }
        if let Some(name) = removed {
            self.worker.send(Command::RemoveAdapter(name));
        }
    }
}

/// A text field with its error shown next to it in red.
pub(crate) fn field_error(
    ui: &mut egui::Ui,
    label: &str,
    value: &mut String,
    error: &Option<String>,
    wide: bool,
) {
    ui.horizontal(|ui| {
        let name = ui.label(label);
        let edit = egui::TextEdit::singleline(value).desired_width(if wide { 420.0 } else { 60.0 });
        ui.add(edit).labelled_by(name.id);
        if let Some(error) = error {
            ui.colored_label(egui::Color32::RED, error);
        }
    });
}

pub(crate) fn to_texture(ctx: &egui::Context, name: &str, image: &Image) -> TextureHandle {
    let rgb: Vec<u8> = image.pixels.iter().flatten().copied().collect();
    let color = ColorImage::from_rgb([image.width, image.height], &rgb);
    ctx.load_texture(name, color, TextureOptions::NEAREST)
}

fn rand_seed() -> u64 {
    use std::time::{SystemTime, UNIX_EPOCH};
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    (nanos as u64) ^ 0x9E37_79B9_7F4A_7C15
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Tab {
    Generate,
    Train,
    Models,
}

/// The app with its tab bar.
pub struct Shell {
    pub app: PortaflowApp,
    pub tab: Tab,
}

impl eframe::App for Shell {
    fn logic(&mut self, _ctx: &egui::Context, _frame: &mut eframe::Frame) {
        self.app.drain_events();
    }

    fn ui(&mut self, ui: &mut egui::Ui, _frame: &mut eframe::Frame) {
        self.show(ui);
    }
}

impl Shell {
    pub fn new(app: PortaflowApp) -> Self {
        Self {
            app,
            tab: Tab::Generate,
        }
    }

    /// Draws the tab bar and the current tab.
    pub fn show(&mut self, ui: &mut egui::Ui) {
        egui::Frame::central_panel(ui.style()).show(ui, |ui| {
            ui.set_min_size(ui.available_size());
            ui.horizontal(|ui| {
                ui.heading("portaflow");
                ui.selectable_value(&mut self.tab, Tab::Generate, "Generate");
                ui.selectable_value(&mut self.tab, Tab::Train, "Train");
                ui.selectable_value(&mut self.tab, Tab::Models, "Models");
                ui.label(format!("· {}", self.app.device));
            });
            ui.separator();
            match self.tab {
                Tab::Generate => self.app.generate_tab(ui),
                Tab::Train => self.app.train.ui(ui, &self.app.worker),
                Tab::Models => self.app.models_tab(ui),
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nonsense_in_numeric_fields_is_named_per_field() {
        let form = Form {
            prompt: "  ".into(),
            steps: "twenty".into(),
            cfg: "NaN".into(),
            random_seed: false,
            seed: "-3".into(),
            count: "0".into(),
            ..Form::default()
        };
        let errors = form.parse(7).unwrap_err();
        assert!(errors.prompt.is_some());
        assert!(errors.steps.unwrap().contains("1 to 1000"));
        assert!(errors.cfg.unwrap().contains("1 (off) to 30"));
        assert!(errors.seed.is_some());
        assert!(errors.count.unwrap().contains("1 to 64"));
    }

    #[test]
    fn a_valid_form_becomes_a_request_and_round_trips_through_the_gallery() {
        let form = Form::default();
        let request = form.parse(42).unwrap();
        assert_eq!(
            (request.steps, request.cfg, request.seed, request.count),
            (20, 4.0, 42, 4)
        );
        let mut other = Form::default();
        other.set_from(&request, 44);
        let again = other.parse(0).unwrap();
        assert_eq!(
            (again.seed, again.count, again.prompt),
            (44, 1, request.prompt)
        );
    }
}
