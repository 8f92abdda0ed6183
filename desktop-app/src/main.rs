//! portaflow desktop app. For now: a window that shows the device portaflow would use.
//! The prompt box, gallery and training tab follow (issue "Desktop app").

use portaflow::device::{self, DeviceRequest};

struct App {
    device_line: String,
}

impl eframe::App for App {
    fn ui(&mut self, ui: &mut egui::Ui, _frame: &mut eframe::Frame) {
        egui::Frame::central_panel(ui.style()).show(ui, |ui| {
            ui.heading("portaflow");
            ui.label(&self.device_line);
        });
    }
}

fn main() -> anyhow::Result<()> {
    let device_line = match DeviceRequest::from_arg_or_env(None).and_then(device::select) {
        Ok(chosen) => format!("Device: {chosen}"),
        Err(err) => format!("No device: {err}"),
    };
    eframe::run_native(
        "portaflow",
        eframe::NativeOptions::default(),
        Box::new(|_cc| Ok(Box::new(App { device_line }))),
    )
    .map_err(|e| anyhow::anyhow!("could not open the window: {e}"))
}
