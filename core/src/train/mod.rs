//! Training: the Shapes autoencoder, rectified-flow pretraining of the bundled model and
//! Flow-GRPO on LoRA adapters; reflow and RTDMD students.

pub mod distill;
pub mod ema;
pub mod grpo;
pub mod pretrain;
pub mod vae;

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

/// Appends `value` as one JSON line (a run's `metrics.jsonl`, `eval.jsonl`).
pub fn append_jsonl(path: &std::path::Path, value: &impl serde::Serialize) -> std::io::Result<()> {
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    writeln!(file, "{}", serde_json::to_string(value).expect("json"))
}

/// Drops the JSON lines whose `counter` field is past `last` (written after the checkpoint a
/// resumed run restarts from), so the log holds each epoch or iteration once. A missing file is
/// left missing.
pub fn truncate_jsonl(path: &std::path::Path, counter: &str, last: usize) -> std::io::Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let kept: String = text
        .lines()
        .filter(|line| {
            serde_json::from_str::<serde_json::Value>(line)
                .ok()
                .and_then(|v| v[counter].as_u64())
                .is_some_and(|n| n as usize <= last)
        })
        .map(|line| format!("{line}\n"))
        .collect();
    std::fs::write(path, kept)
}

/// A TOML run config read and checked by `validate`; errors start with the file's path.
pub fn read_toml_config<T: serde::de::DeserializeOwned>(
    path: &std::path::Path,
    validate: impl Fn(&T) -> Result<(), String>,
) -> Result<T, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let config: T = toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    validate(&config).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(config)
}

/// Linear warm-up over `warmup_steps` from `first_step`, constant, then a linear decay to a tenth
/// over the last `decay_steps` of `steps` (pretraining and the autoencoder).
pub fn warmup_decay_lr(
    base: f64,
    warmup_steps: usize,
    decay_steps: usize,
    steps: usize,
    first_step: usize,
    step: usize,
) -> f64 {
    let warm = ((step - first_step + 1) as f64 / warmup_steps.max(1) as f64).min(1.0);
    let decay_start = steps.saturating_sub(decay_steps);
    let decay = if decay_steps > 0 && step >= decay_start {
        1.0 - 0.9 * (step - decay_start) as f64 / decay_steps as f64
    } else {
        1.0
    };
    base * warm * decay
}

/// The `config` field of a run directory's `state.json`, if it has a checkpoint to resume.
pub fn resumed_run_config<C: serde::de::DeserializeOwned>(
    run_dir: &std::path::Path,
) -> Result<Option<C>, crate::model::weights::LoadError> {
    #[derive(serde::Deserialize)]
    struct Stored<C> {
        config: C,
    }
    let path = run_dir.join("state.json");
    if !path.exists() {
        return Ok(None);
    }
    let state: Stored<C> = crate::model::read_config(&path)?;
    Ok(Some(state.config))
}

/// Config checks: every count is at least 1; the error names the first that is not.
pub fn require_counts(fields: &[(&str, usize)]) -> Result<(), String> {
    match fields.iter().find(|(_, value)| *value == 0) {
        Some((name, _)) => Err(format!("{name} must be at least 1")),
        None => Ok(()),
    }
}

/// Config checks: every value is finite and ≥ 0; the error names the first that is not.
pub fn require_non_negative(fields: &[(&str, f64)]) -> Result<(), String> {
    match fields.iter().find(|(_, v)| !(v.is_finite() && *v >= 0.0)) {
        Some((name, value)) => Err(format!("{name} must be ≥ 0, found {value}")),
        None => Ok(()),
    }
}

/// Config checks: every value is finite and positive; the error names the first that is not.
pub fn require_positive(fields: &[(&str, f64)]) -> Result<(), String> {
    match fields.iter().find(|(_, v)| !(v.is_finite() && *v > 0.0)) {
        Some((name, value)) => Err(format!("{name} must be positive, got {value}")),
        None => Ok(()),
    }
}
