//! Training: rectified-flow pretraining of the bundled model and Flow-GRPO on LoRA adapters.

pub mod distill;
pub mod grpo;
pub mod pretrain;

/// Restarts the peak that [`peak_memory_mib`] reports at the current resident size (Linux ≥ 4.0;
/// elsewhere nothing happens and the peak stays the process's).
pub fn reset_peak_memory() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// Peak resident memory of this process in MiB (Linux `VmHWM`; `None` elsewhere).
pub fn peak_memory_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}
