//! PEFT's `adapter_config.json` and its target selection, ported from
//! `peft/tuners/tuners_utils.py::check_target_module_exists` and
//! `peft/utils/other.py::get_pattern_key` (peft 0.21).

use regex::Regex;
use serde::de::{MapAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::LoraError;

/// `target_modules` / `exclude_modules`: a list of names (exact path or `.`-suffix match) or one
/// regular expression matched against the whole path.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Targets {
    Regex(String),
    List(Vec<String>),
}

/// A JSON value that may be one item or a list (`layers_to_transform`, `layers_pattern`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany<T> {
    One(T),
    Many(Vec<T>),
}

impl<T: Clone> OneOrMany<T> {
    fn to_vec(&self) -> Vec<T> {
        match self {
            OneOrMany::One(x) => vec![x.clone()],
            OneOrMany::Many(xs) => xs.clone(),
        }
    }
}

/// `rank_pattern` / `alpha_pattern`: keys in file order, because PEFT takes the first key that
/// matches.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Patterns<T>(pub Vec<(String, T)>);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Patterns<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Ordered<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for Ordered<T> {
            type Value = Patterns<T>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a map from module pattern to value")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut entries = Vec::new();
                while let Some(entry) = map.next_entry()? {
                    entries.push(entry);
                }
                Ok(Patterns(entries))
            }
            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(Patterns(Vec::new()))
            }
        }
        deserializer.deserialize_any(Ordered(std::marker::PhantomData))
    }
}

impl<T: Serialize> Serialize for Patterns<T> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

/// How a fresh adapter's `A` is drawn (`B` is always zero).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Init {
    /// `init_lora_weights="gaussian"`: N(0, 1/r), Flow-GRPO's and diffusers' training choice.
    Gaussian,
    /// `init_lora_weights=true`: PEFT's default Kaiming-uniform.
    Kaiming,
}

/// PEFT's `LoraConfig` as saved in `adapter_config.json`. Fields portaflow does not implement
/// (DoRA, LoRA bias, `modules_to_save`, …) are refused by [`LoraConfig::validate`] rather than
/// silently ignored.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LoraConfig {
    #[serde(default = "lora_type")]
    pub peft_type: String,
    pub r: usize,
    pub lora_alpha: f64,
    #[serde(default)]
    pub target_modules: Option<Targets>,
    #[serde(default)]
    pub exclude_modules: Option<Targets>,
    #[serde(default)]
    pub layers_to_transform: Option<OneOrMany<usize>>,
    #[serde(default)]
    pub layers_pattern: Option<OneOrMany<String>>,
    #[serde(default)]
    pub rank_pattern: Patterns<usize>,
    #[serde(default)]
    pub alpha_pattern: Patterns<f64>,
    #[serde(default)]
    pub use_rslora: bool,
    #[serde(default = "kaiming")]
    pub init_lora_weights: serde_json::Value,
    #[serde(default)]
    pub lora_dropout: f64,
    #[serde(default)]
    pub use_dora: bool,
    #[serde(default = "no_bias")]
    pub bias: String,
    #[serde(default)]
    pub fan_in_fan_out: bool,
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
}

fn lora_type() -> String {
    "LORA".into()
}
fn kaiming() -> serde_json::Value {
    serde_json::Value::Bool(true)
}
fn no_bias() -> String {
    "none".into()
}

impl LoraConfig {
    /// A config with PEFT's defaults and gaussian init.
    pub fn new(r: usize, lora_alpha: f64, targets: &[&str]) -> Self {
        Self {
            peft_type: lora_type(),
            r,
            lora_alpha,
            target_modules: Some(Targets::List(
                targets.iter().map(|t| t.to_string()).collect(),
            )),
            exclude_modules: None,
            layers_to_transform: None,
            layers_pattern: None,
            rank_pattern: Patterns::default(),
            alpha_pattern: Patterns::default(),
            use_rslora: false,
            init_lora_weights: serde_json::Value::String("gaussian".into()),
            lora_dropout: 0.0,
            use_dora: false,
            bias: no_bias(),
            fan_in_fan_out: false,
            modules_to_save: None,
            base_model_name_or_path: None,
        }
    }

    /// Flow-GRPO's SD3 / SD3.5 adapter (ALGORITHMS.md §1.10): r 32, α 64 on the eight joint
    /// attention projections; also Flow-OPD's and RTDMD's SD3.5 choice.
    pub fn flow_grpo_sd3() -> Self {
        Self::new(
            32,
            64.0,
            &[
                "attn.to_q",
                "attn.to_k",
                "attn.to_v",
                "attn.to_out.0",
                "attn.add_q_proj",
                "attn.add_k_proj",
                "attn.add_v_proj",
                "attn.to_add_out",
            ],
        )
    }

    pub fn validate(&self) -> Result<(), LoraError> {
        let refuse = |what: &str| Err(LoraError::Config(what.to_string()));
        if self.peft_type != "LORA" {
            return refuse(&format!(
                "peft_type is {:?}, not \"LORA\"; only LoRA adapters are supported",
                self.peft_type
            ));
        }
        if self.r == 0 {
            return refuse("r is 0");
        }
        if self.use_dora {
            return refuse("use_dora: DoRA adapters are not supported");
        }
        if self.bias != "none" {
            return refuse(&format!(
                "bias {:?}: adapters that train biases are not supported",
                self.bias
            ));
        }
        if self.fan_in_fan_out {
            return refuse("fan_in_fan_out: only nn.Linear-style [out, in] weights are supported");
        }
        if self.modules_to_save.as_ref().is_some_and(|m| !m.is_empty()) {
            return refuse("modules_to_save: fully trained extra modules are not supported");
        }
        if self.target_modules.is_none() {
            return refuse("target_modules is missing");
        }
        for pattern in self.regexes() {
            Regex::new(&pattern)
                .map_err(|e| LoraError::Config(format!("pattern {pattern:?}: {e}")))?;
        }
        Ok(())
    }

    /// Every regular expression the config will evaluate, anchored as Python's `re` calls are.
    fn regexes(&self) -> Vec<String> {
        let mut out = Vec::new();
        for targets in [&self.target_modules, &self.exclude_modules]
            .into_iter()
            .flatten()
        {
            if let Targets::Regex(r) = targets {
                out.push(fullmatch(r));
            }
        }
        for k in self.rank_pattern.0.iter().map(|(k, _)| k) {
            out.push(pattern_key(k));
        }
        for k in self.alpha_pattern.0.iter().map(|(k, _)| k) {
            out.push(pattern_key(k));
        }
        out
    }

    /// How a fresh adapter is initialised.
    pub fn init(&self) -> Result<Init, LoraError> {
        match &self.init_lora_weights {
            serde_json::Value::Bool(true) => Ok(Init::Kaiming),
            serde_json::Value::String(s) if s.eq_ignore_ascii_case("gaussian") => {
                Ok(Init::Gaussian)
            }
            other => Err(LoraError::Config(format!(
                "init_lora_weights {other}: only true (Kaiming) and \"gaussian\" can initialise a fresh adapter"
            ))),
        }
    }

    /// Whether the linear at `path` gets an adapter (PEFT's `check_target_module_exists`).
    pub fn selects(&self, path: &str) -> bool {
        if let Some(exclude) = &self.exclude_modules {
            let excluded = match exclude {
                Targets::Regex(r) => matches(&fullmatch(r), path),
                Targets::List(names) => names
                    .iter()
                    .any(|n| n == path || path.ends_with(&format!(".{n}"))),
            };
            if excluded {
                return false;
            }
        }
        match &self.target_modules {
            None => false,
            Some(Targets::Regex(r)) => matches(&fullmatch(r), path),
            Some(Targets::List(names)) if names.iter().any(|n| n == path) => true,
            Some(Targets::List(names)) => {
                let found = names.iter().any(|n| path.ends_with(&format!(".{n}")));
                let layers = self
                    .layers_to_transform
                    .as_ref()
                    .map(|l| l.to_vec())
                    .filter(|l| !l.is_empty());
                match layers {
                    Some(layers) if found => {
                        self.layer_index(path).is_some_and(|i| layers.contains(&i))
                    }
                    _ => found,
                }
            }
        }
    }

    /// The first numbered segment after `layers_pattern` (or after any segment without one).
    fn layer_index(&self, path: &str) -> Option<usize> {
        let patterns = self
            .layers_pattern
            .as_ref()
            .map(|p| p.to_vec())
            .unwrap_or_default();
        let regexes: Vec<String> = if patterns.iter().all(|p| p.is_empty()) {
            vec![r"^.*?\.[^.]*\.(\d+)\.".to_string()]
        } else {
            patterns
                .iter()
                .map(|p| format!(r"^(?:^|.*?\.){p}\.(\d+)\."))
                .collect()
        };
        regexes.iter().find_map(|r| {
            Regex::new(r)
                .ok()?
                .captures(path)?
                .get(1)?
                .as_str()
                .parse()
                .ok()
        })
    }

    pub fn rank_for(&self, path: &str) -> usize {
        first_pattern(&self.rank_pattern, path).unwrap_or(self.r)
    }

    pub fn alpha_for(&self, path: &str) -> f64 {
        first_pattern(&self.alpha_pattern, path).unwrap_or(self.lora_alpha)
    }

    /// α/r, or α/√r with rsLoRA (`peft/tuners/lora/layer.py::update_layer`).
    pub fn scaling(&self, r: usize, alpha: f64) -> f64 {
        if self.use_rslora {
            alpha / (r as f64).sqrt()
        } else {
            alpha / r as f64
        }
    }

    /// `target_modules` as a list of names (a regex target becomes one entry).
    pub fn target_list(&self) -> Vec<String> {
        match &self.target_modules {
            Some(Targets::List(l)) => l.clone(),
            Some(Targets::Regex(r)) => vec![r.clone()],
            None => Vec::new(),
        }
    }

    pub fn targets_text(&self) -> String {
        match &self.target_modules {
            None => "(none)".into(),
            Some(Targets::Regex(r)) => format!("regex {r:?}"),
            Some(Targets::List(names)) => format!("{names:?}"),
        }
    }
}

fn fullmatch(pattern: &str) -> String {
    format!("^(?:{pattern})$")
}

/// `get_pattern_key`: `re.match(rf"(.*\.)?({key})$", path)`.
fn pattern_key(key: &str) -> String {
    format!(r"^(?:.*\.)?(?:{key})$")
}

fn matches(regex: &str, path: &str) -> bool {
    Regex::new(regex).is_ok_and(|r| r.is_match(path))
}

fn first_pattern<T: Copy>(patterns: &Patterns<T>, path: &str) -> Option<T> {
    patterns
        .0
        .iter()
        .find(|(k, _)| matches(&pattern_key(k), path))
        .map(|(_, v)| *v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(json: &str) -> LoraConfig {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn list_targets_match_whole_segments_only() {
        let c = LoraConfig::flow_grpo_sd3();
        assert!(c.selects("transformer_blocks.0.attn.to_q"));
        assert!(c.selects("transformer_blocks.3.attn.to_out.0"));
        assert!(!c.selects("transformer_blocks.0.attn2.to_q"));
        assert!(!c.selects("transformer_blocks.0.ff.net.2"));
        // Suffix match needs a dot before the name.
        let c = LoraConfig::new(4, 4.0, &["proj"]);
        assert!(c.selects("pos_embed.proj"));
        assert!(!c.selects("proj_out"));
        assert!(!c.selects("ff.net.0.out_proj"));
        assert!(c.selects("proj"), "an exact path matches too");
    }

    #[test]
    fn regex_targets_fullmatch_and_exclusions_win() {
        let c = config(
            r#"{"r": 4, "lora_alpha": 8, "target_modules": ".*attn\\.(to_q|to_v)",
                "exclude_modules": ["transformer_blocks.1.attn.to_v"]}"#,
        );
        assert!(c.selects("transformer_blocks.0.attn.to_q"));
        assert!(!c.selects("transformer_blocks.0.attn.to_q.extra"));
        assert!(!c.selects("transformer_blocks.1.attn.to_v"));
        assert!(c.selects("transformer_blocks.0.attn.to_v"));
    }

    #[test]
    fn layers_to_transform_reads_the_first_index_after_the_pattern() {
        let c = config(
            r#"{"r": 4, "lora_alpha": 8, "target_modules": ["to_q"],
                "layers_to_transform": [1], "layers_pattern": "transformer_blocks"}"#,
        );
        assert!(c.selects("transformer_blocks.1.attn.to_q"));
        assert!(!c.selects("transformer_blocks.0.attn.to_q"));
        assert!(!c.selects("single_transformer_blocks.1.attn.to_q"));
        let c = config(
            r#"{"r": 4, "lora_alpha": 8, "target_modules": ["to_q"], "layers_to_transform": 2}"#,
        );
        // Without a pattern peft wants `<something>.<name>.<index>.`: a top-level block list
        // has no index it can read (peft's own behaviour, kept).
        assert!(c.selects("model.blocks.2.attn.to_q"));
        assert!(!c.selects("model.blocks.1.attn.to_q"));
        assert!(!c.selects("single_transformer_blocks.2.attn.to_q"));
    }

    #[test]
    fn rank_and_alpha_patterns_take_the_first_matching_key() {
        let c = config(
            r#"{"r": 4, "lora_alpha": 8, "target_modules": ["to_q", "to_k"],
                "rank_pattern": {"transformer_blocks.1.attn.to_q": 2, "to_q": 6},
                "alpha_pattern": {"to_k": 3}, "use_rslora": true}"#,
        );
        assert_eq!(c.rank_for("transformer_blocks.1.attn.to_q"), 2);
        assert_eq!(c.rank_for("transformer_blocks.0.attn.to_q"), 6);
        assert_eq!(c.rank_for("transformer_blocks.0.attn.to_k"), 4);
        assert_eq!(c.alpha_for("transformer_blocks.0.attn.to_k"), 3.0);
        assert_eq!(c.alpha_for("transformer_blocks.0.attn.add_k_proj"), 8.0);
        assert!((c.scaling(4, 8.0) - 4.0).abs() < 1e-12);
    }

    #[test]
    fn unsupported_configs_are_refused_by_name() {
        let c =
            config(r#"{"r": 4, "lora_alpha": 8, "target_modules": ["to_q"], "use_dora": true}"#);
        assert!(c.validate().unwrap_err().to_string().contains("DoRA"));
        let c = config(r#"{"r": 4, "lora_alpha": 8, "target_modules": "(unclosed"}"#);
        assert!(c.validate().unwrap_err().to_string().contains("(unclosed"));
    }
}
