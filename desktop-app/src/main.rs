//! portaflow desktop app: a Generate tab (prompt, sampler settings, live preview, gallery, PNG
//! with metadata) and a Models tab (device, bundled model or a diffusers folder). A worker
//! thread owns the device and the model (`worker.rs`); the UI holds plain data (`app.rs`).
//! The training tab follows (issue "Desktop app").

mod app;
mod worker;

use portaflow::device::DeviceRequest;

fn main() -> anyhow::Result<()> {
    let request = DeviceRequest::from_arg_or_env(None)?;
    eframe::run_native(
        "portaflow",
        eframe::NativeOptions::default(),
        Box::new(move |cc| {
            let app = app::PortaflowApp::new(cc.egui_ctx.clone(), request);
            Ok(Box::new(app::Shell {
                app,
                tab: app::Tab::Generate,
            }))
        }),
    )
    .map_err(|e| anyhow::anyhow!("could not open the window: {e}"))
}
