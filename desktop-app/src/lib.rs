//! portaflow desktop app: a Generate tab (prompt, sampler settings, live preview, gallery, PNG
//! with metadata), a Train tab (Flow-GRPO runs with live curves) and a Models tab (device,
//! bundled model or a diffusers folder). A worker thread owns the device, the model and the
//! training run (`worker.rs`); the UI holds plain data (`app.rs`, `train.rs`).

pub mod app;
pub mod train;
pub mod worker;
