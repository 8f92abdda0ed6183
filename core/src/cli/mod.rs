//! Subcommands of the `portaflow` binary that have grown past a function in `main.rs`.

pub mod bench;
pub mod distill;
pub mod lora;
pub mod train;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// Ctrl-C sets the returned flag (a training loop finishes its step or epoch, saves a checkpoint
/// and stops); a second Ctrl-C exits at once. `unit` names what finishes: "step", "epoch".
pub(crate) fn stop_on_ctrl_c(unit: &'static str) -> anyhow::Result<Arc<AtomicBool>> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            eprintln!("\nsecond Ctrl-C: exiting without saving");
            std::process::exit(130);
        }
        eprintln!(
            "\nCtrl-C: finishing this {unit}, then saving a checkpoint (Ctrl-C again to quit now)"
        );
    })
    .map_err(|e| anyhow::anyhow!("installing the Ctrl-C handler: {e}"))?;
    Ok(stop)
}
