//! The desktop app driven through its accessibility tree (egui_kittest), headless: the same
//! `Shell` the window shows, a real worker thread and real models.

use std::time::{Duration, Instant};

use egui::accesskit::Role;
use egui_kittest::Harness;
use egui_kittest::kittest::Queryable;
use portaflow::device::DeviceRequest;
use portaflow_desktop::app::{PortaflowApp, Shell, Status, Tab};
use portaflow_desktop::train::RunStatus;

fn harness(request: DeviceRequest) -> Harness<'static, Shell> {
    let app = PortaflowApp::with_wake(request, || {});
    Harness::builder()
        .with_size(egui::vec2(1200.0, 900.0))
        .build_ui_state(
            |ui, shell: &mut Shell| {
                shell.app.drain_events();
                shell.show(ui);
            },
            Shell::new(app),
        )
}

/// Steps the UI until `done` holds; fails with the app's last message after `limit`.
fn wait_until(
    h: &mut Harness<'static, Shell>,
    limit: Duration,
    what: &str,
    done: impl Fn(&Shell) -> bool,
) {
    let start = Instant::now();
    loop {
        h.step();
        if done(h.state()) {
            return;
        }
        let app = &h.state().app;
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}; message {:?}, train message {:?}",
            app.message,
            app.train.message
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn type_into(h: &mut Harness<'static, Shell>, field: &str, text: &str) {
    h.get_by_label(field).focus();
    h.step();
    h.key_combination_modifiers(egui::Modifiers::COMMAND, &[egui::Key::A]);
    h.get_by_label(field).type_text(text);
    h.step();
}

fn click_button(h: &mut Harness<'static, Shell>, label: &str) {
    // The last match: a tab and an action can share a name ("Generate"); actions come after the
    // tab bar.
    h.get_all_by_role_and_label(Role::Button, label)
        .last()
        .unwrap_or_else(|| panic!("no button {label}"))
        .click();
    // One frame takes the click, the next one draws what it changed.
    h.step();
    h.step();
}

#[test]
fn typing_a_prompt_and_pressing_generate_shows_an_image_on_vulkan() {
    let chosen = portaflow_tests::vulkan();
    let mut h = harness(DeviceRequest::Vulkan);
    wait_until(&mut h, Duration::from_secs(120), "the bundled model", |s| {
        s.app.status == Status::Ready
    });
    let adapter = chosen.adapter().expect("wgpu adapter").name.clone();
    assert!(
        h.state().app.device.contains(&adapter),
        "the app runs on {}, expected the Vulkan adapter {adapter}",
        h.state().app.device
    );
    type_into(&mut h, "Prompt", "a photo of a blue square");
    type_into(&mut h, "Steps", "3");
    type_into(&mut h, "Images", "2");
    assert_eq!(h.state().app.form.prompt, "a photo of a blue square");
    click_button(&mut h, "Generate");
    wait_until(&mut h, Duration::from_secs(300), "two images", |s| {
        s.app.gallery.len() == 2
    });
    let app = &h.state().app;
    assert_eq!(app.gallery[0].request.prompt, "a photo of a blue square");
    assert_eq!(app.gallery[0].request.steps, 3);
    let image = &app.gallery[0].image;
    assert_eq!((image.width, image.height), (64, 64));
    h.step();
    assert!(
        h.query_by_label_contains("2 image(s) in").is_some(),
        "the timing message is shown"
    );
}

#[test]
fn nonsense_in_fields_and_a_bad_model_folder_show_errors_not_crashes() {
    let mut h = harness(DeviceRequest::Cpu);
    wait_until(&mut h, Duration::from_secs(60), "the bundled model", |s| {
        s.app.status == Status::Ready
    });
    type_into(&mut h, "Steps", "twenty");
    click_button(&mut h, "Generate");
    assert!(
        h.query_by_label_contains("a whole number from 1 to 1000")
            .is_some()
    );
    assert!(h.state().app.gallery.is_empty());

    h.state_mut().tab = Tab::Models;
    h.step();
    let missing = std::env::temp_dir().join("portaflow-no-such-model");
    type_into(&mut h, "Model folder", &missing.display().to_string());
    click_button(&mut h, "Load");
    wait_until(&mut h, Duration::from_secs(30), "the load error", |s| {
        s.app
            .message
            .as_deref()
            .is_some_and(|m| m.contains("cannot load"))
    });
    h.step();
    assert!(h.query_by_label_contains("cannot load").is_some());
    // The bundled model is still there and generates.
    assert_eq!(h.state().app.status, Status::Ready);

    type_into(&mut h, "Adapter", &missing.display().to_string());
    click_button(&mut h, "Add adapter");
    wait_until(&mut h, Duration::from_secs(30), "the adapter error", |s| {
        s.app
            .message
            .as_deref()
            .is_some_and(|m| m.contains("cannot add"))
    });

    h.state_mut().tab = Tab::Train;
    h.step();
    type_into(&mut h, "Epochs", "many");
    click_button(&mut h, "Start");
    assert!(h.query_by_label_contains("a whole number ≥ 1").is_some());
    assert_eq!(h.state().app.train.status, RunStatus::Idle);
}

#[test]
fn a_training_run_plots_pauses_resumes_stops_and_continues() {
    let run_dir = std::env::temp_dir().join(format!("portaflow-app-train-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&run_dir);
    // Training runs on the CPU worker (Flex): the GPU path of the trainer is tests/grpo.rs'.
    let mut h = harness(DeviceRequest::Cpu);
    h.state_mut().tab = Tab::Train;
    h.step();
    type_into(&mut h, "Run directory", &run_dir.display().to_string());
    type_into(&mut h, "Epochs", "50");
    type_into(&mut h, "Group size", "2");
    type_into(&mut h, "Prompts/epoch", "2");
    type_into(&mut h, "Batch size", "4");
    type_into(&mut h, "Eval every", "0");
    click_button(&mut h, "Start");
    assert_eq!(
        h.state().app.train.errors,
        Default::default(),
        "the form is valid"
    );
    let limit = Duration::from_secs(600);
    wait_until(&mut h, limit, "the first epoch's point", |s| {
        !s.app.train.epochs.is_empty()
    });
    assert!(h.state().app.train.epochs[0].reward_mean.is_finite());

    click_button(&mut h, "Pause");
    wait_until(&mut h, limit, "the pause", |s| {
        s.app.train.status == RunStatus::Paused
    });
    let paused_at = h.state().app.train.epochs.len();
    std::thread::sleep(Duration::from_millis(500));
    h.step();
    assert_eq!(
        h.state().app.train.epochs.len(),
        paused_at,
        "paused runs do not train"
    );
    click_button(&mut h, "Resume");
    click_button(&mut h, "Stop");
    wait_until(&mut h, limit, "the stop", |s| {
        s.app.train.status == RunStatus::Idle
    });
    let message = h.state().app.train.message.clone().unwrap_or_default();
    assert!(message.contains("stopped after epoch"), "{message}");
    assert!(run_dir.join("checkpoint/state.json").is_file());

    let stopped_after = h.state().app.train.epochs.last().expect("epochs").epoch;
    assert!(
        message.contains(&format!("stopped after epoch {stopped_after};")),
        "{message}"
    );

    // Start again: the run directory's checkpoint is resumed where it stopped.
    click_button(&mut h, "Start");
    wait_until(&mut h, limit, "the resumed run", |s| {
        matches!(s.app.train.status, RunStatus::Running { .. })
    });
    let message = h.state().app.train.message.clone().unwrap_or_default();
    assert!(
        message.contains(&format!(
            "resumed {} at epoch {stopped_after} of 50",
            run_dir.display()
        )),
        "{message}"
    );
    wait_until(&mut h, limit, "an epoch after the resume", |s| {
        !s.app.train.epochs.is_empty()
    });
    assert_eq!(h.state().app.train.epochs[0].epoch, stopped_after + 1);
    click_button(&mut h, "Stop");
    wait_until(&mut h, limit, "the second stop", |s| {
        s.app.train.status == RunStatus::Idle
    });
    let _ = std::fs::remove_dir_all(&run_dir);
}

/// The Models tab attaches the bundled 4-step student; its sampling card sets the form (sampler,
/// 4 steps, CFG 1) and a generation samples at its σ list.
#[test]
fn the_bundled_student_sets_its_own_sampling_and_generates() {
    let mut h = harness(DeviceRequest::Cpu);
    wait_until(&mut h, Duration::from_secs(60), "the bundled model", |s| {
        s.app.status == Status::Ready
    });
    h.state_mut().tab = Tab::Models;
    h.step();
    click_button(&mut h, "Bundled 4-step student");
    wait_until(&mut h, Duration::from_secs(30), "the student", |s| {
        !s.app.adapters.is_empty()
    });
    h.step();
    let app = &h.state().app;
    let card = app.student().expect("the student's sampling card").clone();
    assert_eq!(app.form.steps, card.sigmas.len().to_string());
    assert_eq!(app.form.cfg, "1");
    assert_eq!(
        Some(app.form.sampler),
        portaflow_desktop::worker::Sampler::of_card(&card)
    );
    assert!(
        app.message
            .as_deref()
            .is_some_and(|m| m.contains("-step student")),
        "{:?}",
        app.message
    );
    h.state_mut().tab = Tab::Generate;
    h.step();
    type_into(&mut h, "Images", "1");
    click_button(&mut h, "Generate");
    wait_until(&mut h, Duration::from_secs(120), "an image", |s| {
        s.app.gallery.len() == 1
    });
    let request = &h.state().app.gallery[0].request;
    assert_eq!(request.sigmas.as_deref(), Some(card.sigmas.as_slice()));
    assert!(request.adapters[0].contains("shapes-4nfe"));
}
