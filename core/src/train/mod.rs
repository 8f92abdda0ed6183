//! Training: rectified-flow pretraining of the bundled model and Flow-GRPO on LoRA adapters.

pub mod grpo;
pub mod pretrain;

/// Peak resident memory of this process in MiB (Linux `VmHWM`; `None` elsewhere).
pub fn peak_memory_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}
