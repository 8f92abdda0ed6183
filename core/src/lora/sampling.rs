//! `sampling.json` beside a few-step student's PEFT files: how the adapter was trained to be
//! sampled (its sampler, σ list and CFG). PEFT has no place for it; `distill acdmd` and
//! `distill reflow` write it, the web engine and the desktop app read it.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::sample::step::StepKind;

/// The file's name inside the adapter folder.
pub const SAMPLING_FILE: &str = "sampling.json";

/// A student adapter's sampling settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdapterSampling {
    /// "euler", "cps", "sde" (Flow-GRPO) or "dance-sde".
    pub sampler: String,
    /// The stochastic sampler's η / noise level (absent for Euler).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta: Option<f64>,
    /// The σ list (0 appended by the sampler): one model call per entry without CFG.
    pub sigmas: Vec<f64>,
    pub guidance_scale: f64,
}

impl AdapterSampling {
    pub fn new(kind: StepKind, sigmas: &[f64], guidance_scale: f64) -> Self {
        let (sampler, eta) = match kind {
            StepKind::Cps { eta } => ("cps", Some(eta)),
            StepKind::FlowSde { noise_level } => ("sde", Some(noise_level)),
            StepKind::DanceSde { eta } => ("dance-sde", Some(eta)),
            StepKind::Euler => ("euler", None),
        };
        Self {
            sampler: sampler.into(),
            eta,
            sigmas: sigmas.to_vec(),
            guidance_scale,
        }
    }

    /// The step rule, checked.
    pub fn kind(&self) -> Result<StepKind, String> {
        let kind = match (self.sampler.as_str(), self.eta) {
            ("euler", None) => StepKind::Euler,
            ("cps", Some(eta)) => StepKind::Cps { eta },
            ("sde", Some(noise_level)) => StepKind::FlowSde { noise_level },
            ("dance-sde", Some(eta)) => StepKind::DanceSde { eta },
            (other, eta) => {
                return Err(format!(
                    "{SAMPLING_FILE}: sampler \"{other}\" with eta {eta:?} (euler without eta, or cps / sde / dance-sde with it)"
                ));
            }
        };
        kind.validate()
            .map_err(|e| format!("{SAMPLING_FILE}: {e}"))?;
        Ok(kind)
    }

    pub fn from_json(text: &str) -> Result<Self, String> {
        let card: Self = serde_json::from_str(text).map_err(|e| format!("{SAMPLING_FILE}: {e}"))?;
        card.kind()?;
        let s = &card.sigmas;
        if s.is_empty() || s.iter().any(|v| !(v.is_finite() && *v > 0.0 && *v <= 1.0)) {
            return Err(format!(
                "{SAMPLING_FILE}: sigmas must be in (0, 1], got {s:?}"
            ));
        }
        Ok(card)
    }

    /// The card in adapter folder `dir`; `None` when there is none (or `dir` is an adapter file).
    /// A card that cannot be read or parsed is an error naming `dir`.
    pub fn read(dir: &Path) -> Result<Option<Self>, String> {
        let path = dir.join(SAMPLING_FILE);
        if !path.is_file() {
            return Ok(None);
        }
        std::fs::read_to_string(&path)
            .map_err(|e| format!("{SAMPLING_FILE}: {e}"))
            .and_then(|text| Self::from_json(&text))
            .map(Some)
            .map_err(|e| format!("{}: {e}", dir.display()))
    }

    pub fn write(&self, dir: &Path) -> std::io::Result<()> {
        let text = serde_json::to_string_pretty(self).expect("plain data");
        std::fs::write(dir.join(SAMPLING_FILE), text + "\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_card_round_trips_and_names_what_is_wrong() {
        for kind in [StepKind::Euler, StepKind::Cps { eta: 0.9 }] {
            let card = AdapterSampling::new(kind, &[1.0, 0.75, 0.5, 0.25], 1.0);
            let text = serde_json::to_string(&card).unwrap();
            let back = AdapterSampling::from_json(&text).unwrap();
            assert_eq!(back, card);
            assert_eq!(back.kind().unwrap(), kind);
        }
        let err = AdapterSampling::from_json(
            r#"{"sampler": "cps", "sigmas": [1.0, 0.5], "guidance_scale": 1.0}"#,
        )
        .unwrap_err();
        assert!(err.contains("\"cps\" with eta None"), "{err}");
        let err = AdapterSampling::from_json(
            r#"{"sampler": "euler", "sigmas": [1.0, 0.0], "guidance_scale": 1.0}"#,
        )
        .unwrap_err();
        assert!(err.contains("sigmas must be in (0, 1]"), "{err}");
        let err = AdapterSampling::from_json(
            r#"{"sampler": "cps", "eta": 2.0, "sigmas": [1.0], "guidance_scale": 1.0}"#,
        )
        .unwrap_err();
        assert!(err.contains("cps eta must be in [0, 1]"), "{err}");
    }

    #[test]
    fn a_folder_without_a_card_has_none_and_a_bad_card_is_named() {
        let dir = std::env::temp_dir().join(format!("portaflow-card-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(AdapterSampling::read(&dir), Ok(None));
        let card = AdapterSampling::new(StepKind::Euler, &[1.0, 0.5], 1.0);
        card.write(&dir).unwrap();
        assert_eq!(AdapterSampling::read(&dir), Ok(Some(card)));
        std::fs::write(dir.join(SAMPLING_FILE), "{\"sampler\": \"euler\"").unwrap();
        let err = AdapterSampling::read(&dir).unwrap_err();
        assert!(
            err.starts_with(&format!("{}: {SAMPLING_FILE}: ", dir.display())),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
