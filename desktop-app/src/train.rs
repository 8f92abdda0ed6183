//! The Train tab: a GRPO run from a preset or a config file with its main knobs editable,
//! start / pause / resume / stop, live curves and the latest sample grid. The worker runs the
//! same `GrpoTrainer` as `portaflow train grpo`.

use std::path::{Path, PathBuf};

use egui::TextureHandle;
use egui_plot::{Legend, Line, Plot, PlotPoints, Points};
use portaflow::train::grpo::config::GrpoConfig;
use portaflow::train::grpo::{EpochMetrics, EvalMetrics};
use portaflow::world::render::Image;

use crate::app::{field_error, to_texture};
use crate::worker::{Command, Event, Worker};

/// The presets shipped in `configs/`.
pub fn presets() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs");
    let dir = dir.canonicalize().unwrap_or(dir);
    let mut found: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "toml"))
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    found
}

/// The Train form as typed: a config file plus the knobs most runs change.
#[derive(Clone, Debug)]
pub struct TrainForm {
    pub config_path: String,
    pub run_dir: String,
    pub epochs: String,
    pub group_size: String,
    pub groups_per_epoch: String,
    pub batch_size: String,
    pub steps: String,
    pub learning_rate: String,
    pub beta: String,
    pub noise_level: String,
    pub eval_every: String,
    /// The file the knobs were last filled from.
    loaded_from: Option<String>,
}

/// Per-field problems of the Train form (`config`: the file or the config as a whole).
#[derive(Debug, Default, PartialEq)]
pub struct TrainErrors {
    pub config: Option<String>,
    pub run_dir: Option<String>,
    pub epochs: Option<String>,
    pub group_size: Option<String>,
    pub groups_per_epoch: Option<String>,
    pub batch_size: Option<String>,
    pub steps: Option<String>,
    pub learning_rate: Option<String>,
    pub beta: Option<String>,
    pub noise_level: Option<String>,
    pub eval_every: Option<String>,
}

impl Default for TrainForm {
    fn default() -> Self {
        let preset = presets()
            .into_iter()
            .find(|p| p.ends_with("grpo-shapes.toml"))
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        let mut form = Self {
            config_path: preset,
            run_dir: "portaflow-runs/grpo".into(),
            epochs: String::new(),
            group_size: String::new(),
            groups_per_epoch: String::new(),
            batch_size: String::new(),
            steps: String::new(),
            learning_rate: String::new(),
            beta: String::new(),
            noise_level: String::new(),
            eval_every: String::new(),
            loaded_from: None,
        };
        let _ = form.fill_from_file();
        form
    }
}

impl TrainForm {
    fn read_config(&self) -> Result<GrpoConfig, String> {
        let path = self.config_path.trim();
        if path.is_empty() {
            return Ok(GrpoConfig::default());
        }
        GrpoConfig::from_file(Path::new(path))
    }

    /// Fills the knobs from the config file (after choosing a preset or typing a path).
    pub fn fill_from_file(&mut self) -> Result<(), String> {
        let c = self.read_config()?;
        self.epochs = c.run.epochs.to_string();
        self.group_size = c.sample.group_size.to_string();
        self.groups_per_epoch = c.sample.groups_per_epoch.to_string();
        self.batch_size = c.sample.batch_size.to_string();
        self.steps = c.sample.steps.to_string();
        self.learning_rate = c.train.learning_rate.to_string();
        self.beta = c.train.beta.to_string();
        self.noise_level = c.sample.noise_level.to_string();
        self.eval_every = c.run.eval_every.to_string();
        self.loaded_from = Some(self.config_path.clone());
        Ok(())
    }

    /// The config file with the knobs applied and validated, and the run directory; or what is
    /// wrong, field by field.
    pub fn parse(&self) -> Result<(GrpoConfig, PathBuf), TrainErrors> {
        let mut errors = TrainErrors::default();
        let mut config = match self.read_config() {
            Ok(c) => c,
            Err(e) => {
                errors.config = Some(e);
                return Err(errors);
            }
        };
        if self.loaded_from.as_deref() != Some(self.config_path.as_str()) {
            errors.config = Some("press Load to read this file's settings first".into());
        }
        fn whole(text: &str, min: usize, error: &mut Option<String>) -> usize {
            match text.trim().parse::<usize>() {
                Ok(n) if n >= min => n,
                _ => {
                    *error = Some(format!("a whole number ≥ {min}"));
                    0
                }
            }
        }
        fn real(
            text: &str,
            ok: impl Fn(f64) -> bool,
            what: &str,
            error: &mut Option<String>,
        ) -> f64 {
            match text.trim().parse::<f64>() {
                Ok(x) if x.is_finite() && ok(x) => x,
                _ => {
                    *error = Some(what.to_string());
                    0.0
                }
            }
        }
        config.run.epochs = whole(&self.epochs, 1, &mut errors.epochs);
        config.sample.group_size = whole(&self.group_size, 2, &mut errors.group_size);
        config.sample.groups_per_epoch =
            whole(&self.groups_per_epoch, 1, &mut errors.groups_per_epoch);
        config.sample.batch_size = whole(&self.batch_size, 1, &mut errors.batch_size);
        config.sample.steps = whole(&self.steps, 2, &mut errors.steps);
        config.run.eval_every = whole(&self.eval_every, 0, &mut errors.eval_every);
        config.train.learning_rate = real(
            &self.learning_rate,
            |x| x > 0.0 && x < 1.0,
            "a number in (0, 1)",
            &mut errors.learning_rate,
        );
        config.train.beta = real(&self.beta, |x| x >= 0.0, "a number ≥ 0", &mut errors.beta);
        config.sample.noise_level = real(
            &self.noise_level,
            |x| x > 0.0 && x <= 2.0,
            "a number in (0, 2]",
            &mut errors.noise_level,
        );
        if self.run_dir.trim().is_empty() {
            errors.run_dir = Some("choose a run directory".into());
        }
        if errors == TrainErrors::default()
            && let Err(e) = config.validate()
        {
            errors.config = Some(e);
        }
        if errors != TrainErrors::default() {
            return Err(errors);
        }
        Ok((config, PathBuf::from(self.run_dir.trim())))
    }
}

/// Where the run is.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RunStatus {
    Idle,
    Starting,
    Running { epoch: usize, epochs: usize },
    Pausing,
    Paused,
    Stopping,
}

/// The Train tab's state: the form, the run's curves and its latest grid.
pub struct TrainTab {
    pub form: TrainForm,
    pub errors: TrainErrors,
    pub status: RunStatus,
    /// The run's planned epochs (from `TrainStarted`).
    planned: usize,
    pub epochs: Vec<EpochMetrics>,
    pub evals: Vec<EvalMetrics>,
    grid: Option<(Image, Option<TextureHandle>)>,
    pub message: Option<String>,
    pub adapter_dir: String,
    preset_choice: usize,
}

impl Default for TrainTab {
    fn default() -> Self {
        Self {
            form: TrainForm::default(),
            errors: TrainErrors::default(),
            status: RunStatus::Idle,
            planned: 0,
            epochs: Vec::new(),
            evals: Vec::new(),
            grid: None,
            message: None,
            adapter_dir: "portaflow-runs/adapter".into(),
            preset_choice: 0,
        }
        .with_preset_matching_the_form()
    }
}

impl TrainTab {
    fn with_preset_matching_the_form(mut self) -> Self {
        if let Some(i) = presets()
            .iter()
            .position(|p| p.display().to_string() == self.form.config_path)
        {
            self.preset_choice = i;
        }
        self
    }

    /// Takes a training event; returns it back if it is not one.
    pub fn on_event(&mut self, event: Event) -> Option<Event> {
        match event {
            Event::TrainStarted {
                run_dir,
                epoch,
                epochs,
                seconds,
            } => {
                self.status = RunStatus::Running { epoch, epochs };
                self.planned = epochs;
                self.epochs.clear();
                self.evals.clear();
                self.message = Some(format!(
                    "{} {} at epoch {epoch} of {epochs} (loaded in {seconds:.1} s)",
                    if epoch > 0 { "resumed" } else { "started" },
                    run_dir.display()
                ));
            }
            Event::TrainEpoch(m) => {
                if let RunStatus::Running { epochs, .. } = self.status {
                    // `m.epoch` counts finished epochs
                    self.status = RunStatus::Running {
                        epoch: m.epoch,
                        epochs,
                    };
                }
                self.epochs.push(m);
            }
            Event::TrainEval(e) => self.evals.push(e),
            Event::TrainGrid(image) => self.grid = Some((image, None)),
            Event::TrainSaved(dir) => {
                self.message = Some(format!("adapter saved to {}", dir.display()))
            }
            Event::TrainPaused => self.status = RunStatus::Paused,
            Event::TrainResumed => {
                let epoch = self.epochs.last().map_or(0, |m| m.epoch);
                self.status = RunStatus::Running {
                    epoch,
                    epochs: self.planned,
                };
            }
            Event::TrainEnded { message } => {
                self.status = RunStatus::Idle;
                self.message = Some(message);
            }
            Event::TrainError(e) => {
                if self.status == RunStatus::Starting {
                    self.status = RunStatus::Idle;
                }
                self.message = Some(e);
            }
            other => return Some(other),
        }
        None
    }

    /// Validates the form and asks the worker to start (or resume) the run.
    pub fn start(&mut self, worker: &Worker) {
        match self.form.parse() {
            Ok((config, run_dir)) => {
                self.errors = TrainErrors::default();
                self.status = RunStatus::Starting;
                self.message = Some("loading the model and prompts…".into());
                worker.send(Command::Train {
                    config: Box::new(config),
                    run_dir,
                });
            }
            Err(errors) => self.errors = errors,
        }
    }

    pub fn ui(&mut self, ui: &mut egui::Ui, worker: &Worker) {
        let presets = presets();
        ui.horizontal(|ui| {
            ui.label("Preset");
            let names: Vec<String> = presets
                .iter()
                .map(|p| {
                    p.file_name()
                        .unwrap_or_default()
                        .to_string_lossy()
                        .into_owned()
                })
                .collect();
            let before = self.preset_choice;
            egui::ComboBox::from_id_salt("preset")
                .selected_text(names.get(self.preset_choice).cloned().unwrap_or_default())
                .show_ui(ui, |ui| {
                    for (i, name) in names.iter().enumerate() {
                        ui.selectable_value(&mut self.preset_choice, i, name);
                    }
                });
            if self.preset_choice != before
                && let Some(path) = presets.get(self.preset_choice)
            {
                self.form.config_path = path.display().to_string();
                self.errors.config = self.form.fill_from_file().err();
            }
        });
        ui.horizontal(|ui| {
            field_error(
                ui,
                "Config file",
                &mut self.form.config_path,
                &self.errors.config,
                true,
            );
            if ui.button("Load").clicked() {
                self.errors.config = self.form.fill_from_file().err();
            }
        });
        field_error(
            ui,
            "Run directory",
            &mut self.form.run_dir,
            &self.errors.run_dir,
            true,
        );
        let f = &mut self.form;
        let e = &self.errors;
        ui.horizontal(|ui| {
            field_error(ui, "Epochs", &mut f.epochs, &e.epochs, false);
            field_error(ui, "Group size", &mut f.group_size, &e.group_size, false);
            field_error(
                ui,
                "Prompts/epoch",
                &mut f.groups_per_epoch,
                &e.groups_per_epoch,
                false,
            );
            field_error(ui, "Batch size", &mut f.batch_size, &e.batch_size, false);
            field_error(ui, "Sampling steps", &mut f.steps, &e.steps, false);
        });
        ui.horizontal(|ui| {
            field_error(
                ui,
                "Learning rate",
                &mut f.learning_rate,
                &e.learning_rate,
                false,
            );
            field_error(ui, "KL β", &mut f.beta, &e.beta, false);
            field_error(ui, "Noise level", &mut f.noise_level, &e.noise_level, false);
            field_error(ui, "Eval every", &mut f.eval_every, &e.eval_every, false);
        });
        ui.horizontal(|ui| {
            let idle = self.status == RunStatus::Idle;
            let running = matches!(self.status, RunStatus::Running { .. });
            if ui
                .add_enabled(idle, egui::Button::new("Start"))
                .on_hover_text("a run directory with a checkpoint is resumed")
                .clicked()
            {
                self.start(worker);
            }
            if ui
                .add_enabled(running, egui::Button::new("Pause"))
                .clicked()
            {
                self.status = RunStatus::Pausing;
                worker.send(Command::PauseTraining);
            }
            if ui
                .add_enabled(
                    self.status == RunStatus::Paused,
                    egui::Button::new("Resume"),
                )
                .clicked()
            {
                worker.send(Command::ResumeTraining);
            }
            let active = running || matches!(self.status, RunStatus::Paused | RunStatus::Pausing);
            if ui.add_enabled(active, egui::Button::new("Stop")).clicked() {
                self.status = RunStatus::Stopping;
                worker.send(Command::StopTraining);
            }
            ui.label(self.status_text());
        });
        ui.horizontal(|ui| {
            ui.label("Adapter folder");
            ui.text_edit_singleline(&mut self.adapter_dir);
            let active = !matches!(self.status, RunStatus::Idle | RunStatus::Starting);
            if ui
                .add_enabled(active, egui::Button::new("Save adapter"))
                .clicked()
            {
                worker.send(Command::SaveAdapter(PathBuf::from(self.adapter_dir.trim())));
            }
        });
        if let Some(message) = &self.message {
            ui.label(message);
        }
        ui.separator();
        ui.columns(2, |columns| {
            self.curves(&mut columns[0]);
            if let Some((image, texture)) = &mut self.grid {
                let texture = texture
                    .get_or_insert_with(|| to_texture(columns[1].ctx(), "train-grid", image));
                columns[1].label("Latest samples");
                let side = columns[1].available_width().min(360.0);
                let aspect = image.height as f32 / image.width.max(1) as f32;
                columns[1].image((texture.id(), egui::vec2(side, side * aspect)));
            }
        });
    }

    fn status_text(&self) -> String {
        let last = self.epochs.last();
        match self.status {
            RunStatus::Idle => "idle".into(),
            RunStatus::Starting => "starting…".into(),
            RunStatus::Running { epoch, epochs } => match last {
                Some(m) => format!(
                    "{epoch}/{epochs} epochs done · {:.1} s sampling + {:.1} s training per epoch",
                    m.seconds_rollout + m.seconds_reward_wait,
                    m.seconds_train
                ),
                None => format!("{epoch}/{epochs} epochs done · the first one is running…"),
            },
            RunStatus::Pausing => "pausing after this epoch…".into(),
            RunStatus::Paused => "paused".into(),
            RunStatus::Stopping => "stopping after this epoch, then saving…".into(),
        }
    }

    /// Reward and accuracies on one plot, KL and clip fraction on another (per epoch).
    fn curves(&self, ui: &mut egui::Ui) {
        let per_epoch = |f: &dyn Fn(&EpochMetrics) -> f64| -> Vec<[f64; 2]> {
            self.epochs.iter().map(|m| [m.epoch as f64, f(m)]).collect()
        };
        // GenEval lines only: a text-prompt evaluation (OCR) has no detector accuracy.
        let held_out: Vec<[f64; 2]> = self
            .evals
            .iter()
            .filter(|e| !e.accuracy_by_tag.is_empty())
            .map(|e| [e.epoch as f64, e.accuracy])
            .collect();
        ui.label("Reward and accuracy");
        Plot::new("reward")
            .height(170.0)
            .legend(Legend::default())
            .show(ui, |plot| {
                plot.line(Line::new(
                    "reward",
                    PlotPoints::from(per_epoch(&|m| m.reward_mean)),
                ));
                plot.line(Line::new(
                    "train accuracy",
                    PlotPoints::from(per_epoch(&|m| m.train_accuracy)),
                ));
                plot.line(Line::new(
                    "held-out accuracy",
                    PlotPoints::from(held_out.clone()),
                ));
                plot.points(Points::new("held-out", PlotPoints::from(held_out)).radius(3.0));
                // The run's own rewards on the held-out images: on a real model, a reward
                // server's GenEval is the held-out curve.
                let names: std::collections::BTreeSet<&String> =
                    self.evals.iter().flat_map(|e| e.rewards.keys()).collect();
                for name in names {
                    let success: Vec<[f64; 2]> = self
                        .evals
                        .iter()
                        .filter_map(|e| e.rewards.get(name).map(|r| [e.epoch as f64, r.success]))
                        .collect();
                    plot.line(Line::new(
                        format!("held-out {name} success"),
                        PlotPoints::from(success),
                    ));
                }
            });
        ui.label("KL and clip fraction");
        Plot::new("kl")
            .height(130.0)
            .legend(Legend::default())
            .show(ui, |plot| {
                plot.line(Line::new("KL", PlotPoints::from(per_epoch(&|m| m.kl))));
                plot.line(Line::new(
                    "clip fraction",
                    PlotPoints::from(per_epoch(&|m| m.clip_fraction)),
                ));
            });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_preset_fills_the_knobs_and_bad_knobs_are_named() {
        let form = TrainForm::default();
        assert!(form.config_path.ends_with("grpo-shapes.toml"));
        let (config, _) = form.parse().expect("the preset as it is");
        assert_eq!(config.sample.group_size.to_string(), form.group_size);

        let bad = TrainForm {
            epochs: "0".into(),
            learning_rate: "fast".into(),
            run_dir: " ".into(),
            ..form.clone()
        };
        let errors = bad.parse().unwrap_err();
        assert!(errors.epochs.is_some() && errors.learning_rate.is_some());
        assert!(errors.run_dir.is_some());

        // Valid numbers the trainer would still refuse: its message goes to the config field.
        let refused = TrainForm {
            group_size: "3".into(),
            ..form.clone()
        };
        let errors = refused.parse().unwrap_err();
        assert!(
            errors
                .config
                .as_deref()
                .is_some_and(|e| e.contains("batch_size")),
            "{errors:?}"
        );

        let edited = TrainForm {
            config_path: "/nonexistent.toml".into(),
            ..form
        };
        assert!(edited.parse().unwrap_err().config.is_some());
    }
}
