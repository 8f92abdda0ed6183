//! EMA of the adapter (`flow_grpo/ema.py::EMAModuleWrapper`): after optimizer step n (counted
//! from 1), when `n % every == 0`, θ_ema += (1 − d)(θ − θ_ema) with d = min((1 + n)/(10 + n), cap).
//! Flow-GRPO evaluates and saves with the EMA weights; so do reflow students with `ema_decay`.

use std::path::Path;

use crate::lora::{LoraConfig, LoraError, LoraModule, LoraWeights};

/// The averaged adapter, module by module in PEFT layout (exact f32, so a resume is exact).
pub struct Ema {
    pub modules: Vec<(String, LoraModule)>,
}

impl Ema {
    pub fn new(modules: Vec<(String, LoraModule)>) -> Self {
        Self { modules }
    }

    /// Flow-GRPO's decay warm-up.
    pub fn decay(step: usize, cap: f64) -> f64 {
        ((1 + step) as f64 / (10 + step) as f64).min(cap)
    }

    /// Called after every optimizer step with the step count `n` (≥ 1).
    pub fn step(&mut self, current: &[(String, LoraModule)], n: usize, cap: f64, every: usize) {
        // ema.py: `if (optimization_step + 1) % interval == 0`, called with the already
        // incremented global step.
        if (n + 1) % every != 0 {
            return;
        }
        let rate = (1.0 - Self::decay(n, cap)) as f32;
        for (path, now) in current {
            let Some((_, ema)) = self.modules.iter_mut().find(|(p, _)| p == path) else {
                continue;
            };
            for (e, &x) in ema.a.iter_mut().zip(&now.a) {
                *e += rate * (x - *e);
            }
            for (e, &x) in ema.b.iter_mut().zip(&now.b) {
                *e += rate * (x - *e);
            }
        }
    }

    pub fn write(&self, dir: &Path, config: &LoraConfig) -> Result<(), LoraError> {
        LoraWeights::from_component("transformer", self.modules.clone(), Some(config.clone()))
            .write_peft(dir, "transformer")
    }

    /// Reads the EMA back in the walk order of `like` (the live adapter), so saving it again
    /// writes the same file.
    pub fn read(dir: &Path, like: &[(String, LoraModule)]) -> Result<Self, LoraError> {
        let weights = LoraWeights::read(dir)?;
        let stored = weights.component("transformer");
        let modules = like
            .iter()
            .map(|(path, _)| {
                stored
                    .iter()
                    .find(|(p, _)| p == path)
                    .map(|(p, m)| (p.to_string(), (*m).clone()))
                    .ok_or_else(|| LoraError::NoSuchModule {
                        adapter: "ema".into(),
                        paths: vec![path.clone()],
                    })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { modules })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decay_warms_up_to_its_cap() {
        assert!((Ema::decay(1, 0.9) - 2.0 / 11.0).abs() < 1e-12);
        assert_eq!(Ema::decay(1000, 0.9), 0.9);
    }
}
