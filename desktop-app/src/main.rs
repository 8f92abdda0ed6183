//! `portaflow-desktop`: opens the app's window (see the library's doc for what is inside).

use portaflow::device::DeviceRequest;
use portaflow_desktop::app;

fn main() -> anyhow::Result<()> {
    let request = DeviceRequest::from_arg_or_env(None)?;
    eframe::run_native(
        "portaflow",
        eframe::NativeOptions {
            viewport: egui::ViewportBuilder::default()
                .with_inner_size([1100.0, 820.0])
                .with_title("portaflow"),
            ..Default::default()
        },
        Box::new(move |cc| {
            let app = app::PortaflowApp::new(cc.egui_ctx.clone(), request);
            Ok(Box::new(app::Shell::new(app)))
        }),
    )
    .map_err(|e| anyhow::anyhow!("could not open the window: {e}"))
}
