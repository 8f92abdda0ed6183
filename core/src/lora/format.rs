//! Reading and writing adapter files. Every format becomes one [`LoraWeights`]: module paths in
//! the diffusers pipeline tree (`transformer.transformer_blocks.0.attn.to_q`) with PEFT-layout
//! factors and the scaling the file implies.
//!
//! | format | how it is recognised | keys |
//! | --- | --- | --- |
//! | PEFT folder | `adapter_config.json` | `base_model.model.<path>.lora_A.weight` `[r, in]`, `.lora_B.weight` `[out, r]` |
//! | diffusers | `*.safetensors` with `transformer.` / `text_encoder.` keys | `<component>.<path>.lora_A.weight`, config in the `lora_adapter_metadata` metadata (α = r without it) |
//! | kohya (FLUX) | `lora_unet_*` / `lora_te1_*` keys | `.lora_down.weight`, `.lora_up.weight`, `.alpha`, BFL module names |
//! | torch state dict | `*.pt`, `*.pth`, `*.bin` (read without executing pickled code) | `<path>.lora_A[.<adapter>].weight` |

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use super::config::LoraConfig;
use super::{LoraError, kohya, list};
use crate::model::export::{Stored, save_safetensors};
use crate::model::weights::Weights;

/// Which file layout an adapter came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Peft,
    Diffusers,
    Kohya,
    TorchPt,
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Format::Peft => "PEFT folder",
            Format::Diffusers => "diffusers safetensors",
            Format::Kohya => "kohya safetensors",
            Format::TorchPt => "torch state dict",
        })
    }
}

/// One adapted linear in PEFT layout.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraModule {
    pub rank: usize,
    pub d_in: usize,
    pub d_out: usize,
    /// `lora_A.weight`: `[rank, d_in]`, row-major.
    pub a: Vec<f32>,
    /// `lora_B.weight`: `[d_out, rank]`, row-major.
    pub b: Vec<f32>,
    pub alpha: f64,
    /// What the side path is multiplied by: α/r, or α/√r with rsLoRA.
    pub scaling: f64,
}

/// An adapter as read from a file (or extracted from a model), format-neutral.
#[derive(Clone, Debug)]
pub struct LoraWeights {
    pub format: Format,
    pub source: PathBuf,
    /// Pipeline paths (`transformer.…`, `text_encoder.…`) → modules.
    pub modules: BTreeMap<String, LoraModule>,
    /// The PEFT config per component, when the file carries one.
    pub configs: BTreeMap<String, LoraConfig>,
}

/// A float tensor read from a file, before it is interpreted.
pub(super) struct RawTensor {
    pub shape: Vec<usize>,
    pub values: Vec<f32>,
}

impl LoraWeights {
    /// Reads an adapter, recognising its format (see the module doc).
    pub fn read(path: &Path) -> Result<Self, LoraError> {
        let format_error = |message: String| LoraError::Format {
            path: path.to_path_buf(),
            message,
        };
        if path.is_dir() {
            if path.join("adapter_config.json").is_file() {
                return Self::read_peft(path);
            }
            let diffusers = path.join("pytorch_lora_weights.safetensors");
            if diffusers.is_file() {
                return Self::read(&diffusers);
            }
            return Err(format_error(
                "a folder without adapter_config.json (PEFT) or pytorch_lora_weights.safetensors (diffusers)".into(),
            ));
        }
        if !path.exists() {
            return Err(LoraError::Io {
                path: path.to_path_buf(),
                source: std::io::Error::from(std::io::ErrorKind::NotFound),
            });
        }
        let extension = path
            .extension()
            .and_then(|e| e.to_str())
            .unwrap_or("")
            .to_ascii_lowercase();
        match extension.as_str() {
            "safetensors" => {
                let (raw, metadata) = read_safetensors(path)?;
                if raw
                    .keys()
                    .any(|k| k.starts_with("lora_unet_") || k.starts_with("lora_te"))
                {
                    let modules = kohya::convert(path, raw)?;
                    return Ok(Self {
                        format: Format::Kohya,
                        source: path.to_path_buf(),
                        modules,
                        configs: BTreeMap::new(),
                    });
                }
                let configs = diffusers_configs(path, &metadata)?;
                let format = if raw.keys().any(|k| k.starts_with("base_model.model.")) {
                    Format::Peft
                } else {
                    Format::Diffusers
                };
                Self::from_state_dict(path, format, raw, configs)
            }
            "pt" | "pth" | "bin" | "ckpt" => {
                let raw = read_torch(path)?;
                // A PEFT config next to the file gives α (RTDMD ships r 32, α 64 in its card).
                let configs = match path.parent().map(|d| d.join("adapter_config.json")) {
                    Some(c) if c.is_file() => {
                        let config = read_peft_config(&c)?;
                        BTreeMap::from([(String::new(), config)])
                    }
                    _ => BTreeMap::new(),
                };
                Self::from_state_dict(path, Format::TorchPt, raw, configs)
            }
            other => Err(format_error(format!(
                "unknown adapter file type {other:?}: expected a PEFT folder, .safetensors or a torch .pt/.pth/.bin state dict"
            ))),
        }
    }

    fn read_peft(dir: &Path) -> Result<Self, LoraError> {
        let config = read_peft_config(&dir.join("adapter_config.json"))?;
        let file = dir.join("adapter_model.safetensors");
        if !file.is_file() {
            let hint = if dir.join("adapter_model.bin").is_file() {
                " (adapter_model.bin found: convert it with `portaflow lora convert`)"
            } else {
                ""
            };
            return Err(LoraError::Format {
                path: dir.to_path_buf(),
                message: format!("adapter_model.safetensors is missing{hint}"),
            });
        }
        let (raw, _) = read_safetensors(&file)?;
        let mut weights = Self::from_state_dict(
            &file,
            Format::Peft,
            raw,
            BTreeMap::from([(String::new(), config)]),
        )?;
        weights.source = dir.to_path_buf();
        Ok(weights)
    }

    /// A PEFT adapter from the contents of its two files, for callers without a file system (the
    /// browser); errors name the file as `adapter_model.safetensors` / `adapter_config.json`.
    pub fn from_peft_bytes(config_json: &str, safetensors: Vec<u8>) -> Result<Self, LoraError> {
        let config = parse_peft_config(Path::new("adapter_config.json"), config_json)?;
        let file = Path::new("adapter_model.safetensors");
        let weights =
            Weights::from_bytes("adapter_model.safetensors", safetensors).map_err(|e| {
                LoraError::Format {
                    path: file.to_path_buf(),
                    message: e.to_string(),
                }
            })?;
        let (raw, _) = read_all(file, weights)?;
        Self::from_state_dict(
            file,
            Format::Peft,
            raw,
            BTreeMap::from([(String::new(), config)]),
        )
    }

    /// Interprets `<prefix><path>.lora_A[.<adapter>].weight` / `lora_B` / `.alpha` keys.
    /// `configs` is keyed by component; the key `""` is the config of an unprefixed file.
    fn from_state_dict(
        path: &Path,
        format: Format,
        raw: BTreeMap<String, RawTensor>,
        mut configs: BTreeMap<String, LoraConfig>,
    ) -> Result<Self, LoraError> {
        let format_error = |message: String| LoraError::Format {
            path: path.to_path_buf(),
            message,
        };
        let mut a = BTreeMap::new();
        let mut b = BTreeMap::new();
        let mut alphas = BTreeMap::new();
        let mut unknown = Vec::new();
        for (key, tensor) in raw {
            if key.contains("lora_magnitude_vector") || key.ends_with("dora_scale") {
                return Err(format_error(format!(
                    "{key}: DoRA adapters are not supported"
                )));
            }
            match split_key(&key) {
                Some((module, Part::A)) => {
                    a.insert(module, (key, tensor));
                }
                Some((module, Part::B)) => {
                    b.insert(module, (key, tensor));
                }
                Some((module, Part::Alpha)) => {
                    alphas.insert(module, tensor.values.first().copied().unwrap_or(0.0) as f64);
                }
                None => unknown.push(key),
            }
        }
        if !unknown.is_empty() {
            return Err(format_error(format!(
                "{} key(s) are not LoRA factors (lora_A / lora_B / alpha): {}",
                unknown.len(),
                list(&unknown)
            )));
        }
        let unpaired: Vec<String> = a
            .keys()
            .filter(|m| !b.contains_key(*m))
            .chain(b.keys().filter(|m| !a.contains_key(*m)))
            .cloned()
            .collect();
        if !unpaired.is_empty() {
            return Err(format_error(format!(
                "lora_A without lora_B (or the reverse) for: {}",
                list(&unpaired)
            )));
        }
        if a.is_empty() {
            return Err(format_error("no LoRA tensors found".into()));
        }
        let default_component = if a.keys().all(|m| m.starts_with("text_model.")) {
            "text_encoder"
        } else {
            "transformer"
        };
        if let Some(config) = configs.remove("") {
            configs.insert(default_component.to_string(), config);
        }
        let mut modules = BTreeMap::new();
        for (module, (a_key, a_raw)) in a {
            let (b_key, b_raw) = b.remove(&module).expect("paired above");
            let (&[rank, d_in], &[d_out, rank_b]) =
                (a_raw.shape.as_slice(), b_raw.shape.as_slice())
            else {
                return Err(format_error(format!(
                    "{a_key} {:?} and {b_key} {:?} must be 2-D ([r, in] and [out, r])",
                    a_raw.shape, b_raw.shape
                )));
            };
            if rank != rank_b {
                return Err(format_error(format!(
                    "{a_key} has rank {rank} but {b_key} has rank {rank_b}"
                )));
            }
            let pipeline_path = with_component(&module, default_component);
            let (component, inner) = pipeline_path
                .split_once('.')
                .expect("with_component adds a component");
            let alpha_key = alphas.get(&module).copied();
            let (alpha, scaling) = match (configs.get(component), alpha_key) {
                (_, Some(alpha)) => (alpha, alpha / rank as f64),
                (Some(config), None) => {
                    let expected = config.rank_for(inner);
                    if expected != rank {
                        return Err(format_error(format!(
                            "{a_key}: rank {rank} disagrees with the config's rank {expected} for {inner}"
                        )));
                    }
                    let alpha = config.alpha_for(inner);
                    (alpha, config.scaling(rank, alpha))
                }
                // diffusers' get_peft_kwargs: without metadata or alpha keys, α = r.
                (None, None) => (rank as f64, 1.0),
            };
            modules.insert(
                pipeline_path,
                LoraModule {
                    rank,
                    d_in,
                    d_out,
                    a: a_raw.values,
                    b: b_raw.values,
                    alpha,
                    scaling,
                },
            );
        }
        Ok(Self {
            format,
            source: path.to_path_buf(),
            modules,
            configs,
        })
    }

    /// An adapter extracted from a model component (see [`super::extract`]).
    pub fn from_component(
        component: &str,
        modules: Vec<(String, LoraModule)>,
        config: Option<LoraConfig>,
    ) -> Self {
        Self {
            format: Format::Peft,
            source: PathBuf::from(format!("<{component} adapter>")),
            modules: modules
                .into_iter()
                .map(|(p, m)| (format!("{component}.{p}"), m))
                .collect(),
            configs: config
                .map(|c| BTreeMap::from([(component.to_string(), c)]))
                .unwrap_or_default(),
        }
    }

    /// Components the adapter touches (`transformer`, `text_encoder`, …).
    pub fn components(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .modules
            .keys()
            .filter_map(|k| k.split_once('.').map(|(c, _)| c.to_string()))
            .collect();
        out.dedup();
        out
    }

    /// The modules of one component with component-relative paths, ready for [`super::attach`].
    pub fn component(&self, component: &str) -> Vec<(&str, &LoraModule)> {
        let prefix = format!("{component}.");
        self.modules
            .iter()
            .filter_map(|(k, m)| k.strip_prefix(&prefix).map(|p| (p, m)))
            .collect()
    }

    /// Overrides α for every module (for state dicts that carry none, e.g. RTDMD's `.pt`).
    pub fn with_alpha(mut self, alpha: f64) -> Self {
        for m in self.modules.values_mut() {
            m.scaling = alpha / m.rank as f64;
            m.alpha = alpha;
        }
        self
    }

    /// One adapter whose ΔW is exactly Σ_i w_i·ΔW_i (Flow-OPD's cold start from several
    /// teachers, done on ΔW): per module, `A = [A_1; …; A_n]` and
    /// `B = [w_1·s_1·B_1, …, w_n·s_n·B_n]`, rank Σ r_i, scaling 1 (α = rank). A module missing
    /// from some adapters takes the others' terms. Weights 1/n give the average.
    pub fn sum_of_deltas(parts: &[(&LoraWeights, f64)]) -> Result<Self, LoraError> {
        let paths: std::collections::BTreeSet<&String> =
            parts.iter().flat_map(|(w, _)| w.modules.keys()).collect();
        let mut modules = BTreeMap::new();
        for path in paths {
            let terms: Vec<(&LoraModule, f64)> = parts
                .iter()
                .filter_map(|(w, weight)| w.modules.get(path).map(|m| (m, *weight)))
                .collect();
            let (d_in, d_out) = same_shape(path, &terms)?;
            let rank: usize = terms.iter().map(|(m, _)| m.rank).sum();
            let mut a = Vec::with_capacity(rank * d_in);
            for (m, _) in &terms {
                a.extend_from_slice(&m.a);
            }
            // B is [d_out, r] row-major: row o is the concatenation of each term's row o.
            let mut b = Vec::with_capacity(d_out * rank);
            for o in 0..d_out {
                for (m, weight) in &terms {
                    let scale = (weight * m.scaling) as f32;
                    b.extend(m.b[o * m.rank..(o + 1) * m.rank].iter().map(|v| v * scale));
                }
            }
            modules.insert(
                path.clone(),
                LoraModule {
                    rank,
                    d_in,
                    d_out,
                    a,
                    b,
                    alpha: rank as f64,
                    scaling: 1.0,
                },
            );
        }
        Ok(Self {
            format: Format::Peft,
            source: PathBuf::from("<sum of adapter deltas>"),
            modules,
            configs: BTreeMap::new(),
        })
    }

    /// The merge of Flow-OPD's released code (`scripts/merge.py`): the weighted average of the A
    /// factors and, separately, of the B factors. Its ΔW is mean(B)·mean(A), not mean(B·A); kept
    /// to measure that difference. Needs the same modules, ranks and scalings in every adapter.
    pub fn average_of_factors(parts: &[(&LoraWeights, f64)]) -> Result<Self, LoraError> {
        let (first, _) = parts
            .first()
            .ok_or_else(|| LoraError::Config("no adapter to average".into()))?;
        let total: f64 = parts.iter().map(|(_, w)| w).sum();
        let mut modules = BTreeMap::new();
        for (path, m0) in &first.modules {
            let mut a = vec![0f32; m0.a.len()];
            let mut b = vec![0f32; m0.b.len()];
            for (w, weight) in parts {
                let m = w.modules.get(path).ok_or_else(|| LoraError::Shape {
                    adapter: w.source.display().to_string(),
                    path: path.clone(),
                    message: "missing: factor averaging needs the same modules in every adapter"
                        .into(),
                })?;
                if m.rank != m0.rank
                    || m.d_in != m0.d_in
                    || m.d_out != m0.d_out
                    || m.scaling != m0.scaling
                {
                    return Err(LoraError::Shape {
                        adapter: w.source.display().to_string(),
                        path: path.clone(),
                        message: format!(
                            "rank {} / shape [{}, {}] / scaling {} differ from the first adapter's {} / [{}, {}] / {}",
                            m.rank,
                            m.d_out,
                            m.d_in,
                            m.scaling,
                            m0.rank,
                            m0.d_out,
                            m0.d_in,
                            m0.scaling
                        ),
                    });
                }
                let share = (weight / total) as f32;
                a.iter_mut().zip(&m.a).for_each(|(x, v)| *x += share * v);
                b.iter_mut().zip(&m.b).for_each(|(x, v)| *x += share * v);
            }
            modules.insert(path.clone(), LoraModule { a, b, ..m0.clone() });
        }
        if let Some((w, _)) = parts
            .iter()
            .find(|(w, _)| w.modules.len() != first.modules.len())
        {
            return Err(LoraError::Config(format!(
                "{} has {} modules, the first adapter {}: factor averaging needs the same modules",
                w.source.display(),
                w.modules.len(),
                first.modules.len()
            )));
        }
        Ok(Self {
            format: Format::Peft,
            source: PathBuf::from("<average of adapter factors>"),
            modules,
            configs: BTreeMap::new(),
        })
    }

    /// ΔW = s·B·A of one module, `[d_out, d_in]` row-major.
    pub fn delta(&self, path: &str) -> Option<Vec<f32>> {
        let m = self.modules.get(path)?;
        let mut out = vec![0f32; m.d_out * m.d_in];
        for o in 0..m.d_out {
            for k in 0..m.rank {
                let coef = m.b[o * m.rank + k] * m.scaling as f32;
                let row = &m.a[k * m.d_in..(k + 1) * m.d_in];
                for (x, v) in out[o * m.d_in..(o + 1) * m.d_in].iter_mut().zip(row) {
                    *x += coef * v;
                }
            }
        }
        Some(out)
    }

    pub fn parameter_count(&self) -> usize {
        self.modules.values().map(|m| m.a.len() + m.b.len()).sum()
    }

    /// The PEFT config that reproduces this adapter's targets, ranks and scalings for one
    /// component: the file's own config when it has one, otherwise the most common rank and α
    /// with `rank_pattern` / `alpha_pattern` for the rest and the exact module paths as targets.
    pub fn peft_config(&self, component: &str) -> Result<LoraConfig, LoraError> {
        if let Some(config) = self.configs.get(component) {
            return Ok(config.clone());
        }
        let modules = self.component(component);
        if modules.is_empty() {
            return Err(LoraError::Config(format!(
                "the adapter has no module in component {component}"
            )));
        }
        let most_common = |values: Vec<String>| -> String {
            let mut counts: BTreeMap<String, usize> = BTreeMap::new();
            for v in values {
                *counts.entry(v).or_default() += 1;
            }
            counts
                .into_iter()
                .max_by_key(|(_, c)| *c)
                .map(|(v, _)| v)
                .expect("non-empty")
        };
        let r: usize = most_common(modules.iter().map(|(_, m)| m.rank.to_string()).collect())
            .parse()
            .expect("a number");
        let alpha_of = |m: &LoraModule| m.scaling * m.rank as f64;
        let alpha: f64 = most_common(
            modules
                .iter()
                .map(|(_, m)| alpha_of(m).to_string())
                .collect(),
        )
        .parse()
        .expect("a number");
        let paths: Vec<&str> = modules.iter().map(|(p, _)| *p).collect();
        let mut config = LoraConfig::new(r, alpha, &paths);
        config.init_lora_weights = serde_json::Value::Bool(true);
        for (p, m) in &modules {
            if m.rank != r {
                config.rank_pattern.0.push((p.to_string(), m.rank));
            }
            if alpha_of(m) != alpha {
                config.alpha_pattern.0.push((p.to_string(), alpha_of(m)));
            }
        }
        Ok(config)
    }

    /// Writes one component as a PEFT folder (`adapter_config.json` + `adapter_model.safetensors`)
    /// that `PeftModel.from_pretrained` / `load_lora_adapter` read unchanged.
    pub fn write_peft(&self, dir: &Path, component: &str) -> Result<(), LoraError> {
        let config = self.peft_config(component)?;
        std::fs::create_dir_all(dir).map_err(|source| LoraError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let tensors = self.tensors(component, "base_model.model.");
        let text = serde_json::to_string_pretty(&config).expect("serialisable config");
        let config_path = dir.join("adapter_config.json");
        std::fs::write(&config_path, text).map_err(|source| LoraError::Io {
            path: config_path,
            source,
        })?;
        write_file(&tensors, &dir.join("adapter_model.safetensors"), None)
    }

    /// Writes every component into one diffusers `pytorch_lora_weights.safetensors`, with the
    /// configs in `lora_adapter_metadata` as `StableDiffusion3Pipeline.save_lora_weights` does.
    pub fn write_diffusers(&self, file: &Path) -> Result<(), LoraError> {
        let mut tensors = BTreeMap::new();
        let mut metadata = serde_json::Map::new();
        for component in self.components() {
            tensors.extend(self.tensors(&component, &format!("{component}.")));
            let config = serde_json::to_value(self.peft_config(&component)?).expect("serialisable");
            for (k, v) in config.as_object().expect("a JSON object") {
                metadata.insert(format!("{component}.{k}"), v.clone());
            }
        }
        let metadata = HashMap::from([
            ("format".to_string(), "pt".to_string()),
            (
                "lora_adapter_metadata".to_string(),
                serde_json::to_string_pretty(&metadata).expect("serialisable"),
            ),
        ]);
        if let Some(dir) = file.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| LoraError::Io {
                path: dir.to_path_buf(),
                source,
            })?;
        }
        write_file(&tensors, file, Some(metadata))
    }

    fn tensors(&self, component: &str, prefix: &str) -> BTreeMap<String, Stored> {
        let mut tensors = BTreeMap::new();
        for (path, m) in self.component(component) {
            tensors.insert(
                format!("{prefix}{path}.lora_A.weight"),
                Stored {
                    shape: vec![m.rank, m.d_in],
                    values: m.a.clone(),
                },
            );
            tensors.insert(
                format!("{prefix}{path}.lora_B.weight"),
                Stored {
                    shape: vec![m.d_out, m.rank],
                    values: m.b.clone(),
                },
            );
        }
        tensors
    }
}

fn write_file(
    tensors: &BTreeMap<String, Stored>,
    path: &Path,
    metadata: Option<HashMap<String, String>>,
) -> Result<(), LoraError> {
    save_safetensors(tensors, path, metadata).map_err(|e| LoraError::Format {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

fn read_peft_config(path: &Path) -> Result<LoraConfig, LoraError> {
    let text = std::fs::read_to_string(path).map_err(|source| LoraError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    parse_peft_config(path, &text)
}

/// `adapter_config.json`'s text; `path` names it in errors.
fn parse_peft_config(path: &Path, text: &str) -> Result<LoraConfig, LoraError> {
    let config: LoraConfig = serde_json::from_str(&text).map_err(|e| LoraError::Format {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    config.validate().map_err(|e| LoraError::Format {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    Ok(config)
}

/// diffusers' `lora_adapter_metadata`: one flat JSON object with `<component>.<field>` keys.
fn diffusers_configs(
    path: &Path,
    metadata: &HashMap<String, String>,
) -> Result<BTreeMap<String, LoraConfig>, LoraError> {
    let Some(text) = metadata.get("lora_adapter_metadata") else {
        return Ok(BTreeMap::new());
    };
    let bad = |message: String| LoraError::Format {
        path: path.to_path_buf(),
        message: format!("lora_adapter_metadata: {message}"),
    };
    let flat: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
    let mut grouped: BTreeMap<String, serde_json::Map<String, serde_json::Value>> = BTreeMap::new();
    for (key, value) in flat {
        let (component, field) = key
            .split_once('.')
            .ok_or_else(|| bad(format!("key {key:?} has no component prefix")))?;
        grouped
            .entry(component.to_string())
            .or_default()
            .insert(field.to_string(), value);
    }
    grouped
        .into_iter()
        .map(|(component, fields)| {
            let config: LoraConfig = serde_json::from_value(serde_json::Value::Object(fields))
                .map_err(|e| bad(format!("{component}: {e}")))?;
            config
                .validate()
                .map_err(|e| bad(format!("{component}: {e}")))?;
            Ok((component, config))
        })
        .collect()
}

/// A torch state dict, read without executing pickled code.
fn read_torch(path: &Path) -> Result<BTreeMap<String, RawTensor>, LoraError> {
    let tensors = crate::model::torch_pt::read_state_dict(path)?;
    Ok(tensors
        .into_iter()
        .map(|(key, t)| {
            let raw = RawTensor {
                shape: t.shape,
                values: t.values,
            };
            (key, raw)
        })
        .collect())
}

fn read_safetensors(
    path: &Path,
) -> Result<(BTreeMap<String, RawTensor>, HashMap<String, String>), LoraError> {
    let format_error = |message: String| LoraError::Format {
        path: path.to_path_buf(),
        message,
    };
    let weights = Weights::open_file(path).map_err(|e| format_error(e.to_string()))?;
    read_all(path, weights)
}

/// Every tensor of an opened safetensors file, with its metadata; `path` names it in errors.
fn read_all(
    path: &Path,
    mut weights: Weights,
) -> Result<(BTreeMap<String, RawTensor>, HashMap<String, String>), LoraError> {
    let format_error = |message: String| LoraError::Format {
        path: path.to_path_buf(),
        message,
    };
    let mut raw = BTreeMap::new();
    for key in weights.keys() {
        let shape = weights.shape(&key).expect("listed key");
        let values = weights
            .read(&key, &shape)
            .map_err(|e| format_error(e.to_string()))?
            .expect("listed key");
        raw.insert(key, RawTensor { shape, values });
    }
    Ok((raw, weights.metadata().clone()))
}

enum Part {
    A,
    B,
    Alpha,
}

/// `X.lora_A.weight`, `X.lora_A.<adapter>.weight`, `X.alpha` → (`X` without a PEFT prefix, part).
fn split_key(key: &str) -> Option<(String, Part)> {
    let key = key.strip_prefix("base_model.model.").unwrap_or(key);
    if let Some(module) = key.strip_suffix(".alpha") {
        return Some((module.to_string(), Part::Alpha));
    }
    let body = key.strip_suffix(".weight")?;
    for (marker, part) in [(".lora_A", Part::A), (".lora_B", Part::B)] {
        if let Some(i) = body.rfind(marker) {
            let rest = &body[i + marker.len()..];
            // Nothing, or one `.adapter_name` segment after the marker.
            if rest.is_empty() || (rest.starts_with('.') && !rest[1..].contains('.')) {
                return Some((body[..i].to_string(), part));
            }
        }
    }
    None
}

/// Adds the default component unless the path already starts with one.
fn with_component(module: &str, default: &str) -> String {
    const COMPONENTS: [&str; 5] = [
        "transformer",
        "text_encoder",
        "text_encoder_2",
        "text_encoder_3",
        "unet",
    ];
    match module.split_once('.') {
        Some((first, _)) if COMPONENTS.contains(&first) => module.to_string(),
        _ => format!("{default}.{module}"),
    }
}

/// The common `(d_in, d_out)` of one module across adapters, or an error naming the adapter
/// whose shape differs.
fn same_shape(path: &str, terms: &[(&LoraModule, f64)]) -> Result<(usize, usize), LoraError> {
    let (first, _) = terms[0];
    for (m, _) in terms {
        if (m.d_in, m.d_out) != (first.d_in, first.d_out) {
            return Err(LoraError::Shape {
                adapter: "combined".into(),
                path: path.into(),
                message: format!(
                    "[{}, {}] in one adapter, [{}, {}] in another: adapters of different models?",
                    m.d_out, m.d_in, first.d_out, first.d_in
                ),
            });
        }
    }
    Ok((first.d_in, first.d_out))
}

#[cfg(test)]
mod tests {

    fn random_adapter(seed: u64, rank: usize, scaling: f64) -> LoraWeights {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let (d_in, d_out) = (6, 5);
        let mut values = |n: usize| (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        let module = LoraModule {
            rank,
            d_in,
            d_out,
            a: values(rank * d_in),
            b: values(d_out * rank),
            alpha: scaling * rank as f64,
            scaling,
        };
        LoraWeights {
            format: Format::Peft,
            source: PathBuf::from(format!("teacher{seed}")),
            modules: BTreeMap::from([("transformer.blocks.0.attn.to_q".to_string(), module)]),
            configs: BTreeMap::new(),
        }
    }

    #[test]
    fn summed_deltas_are_exact_and_factor_averages_are_not() {
        let path = "transformer.blocks.0.attn.to_q";
        let (t1, t2) = (random_adapter(1, 4, 2.0), random_adapter(2, 2, 0.5));
        let sum = LoraWeights::sum_of_deltas(&[(&t1, 0.5), (&t2, 0.5)]).unwrap();
        let m = &sum.modules[path];
        assert_eq!((m.rank, m.scaling), (6, 1.0));
        let (d1, d2, got) = (
            t1.delta(path).unwrap(),
            t2.delta(path).unwrap(),
            sum.delta(path).unwrap(),
        );
        for ((a, b), g) in d1.iter().zip(&d2).zip(&got) {
            assert!((0.5 * (a + b) - g).abs() < 1e-5, "{} vs {g}", 0.5 * (a + b));
        }
        // The config written for it reproduces scaling 1 at rank 6.
        let config = sum.peft_config("transformer").unwrap();
        assert_eq!((config.r, config.lora_alpha), (6, 6.0));

        let (u1, u2) = (random_adapter(3, 4, 2.0), random_adapter(4, 4, 2.0));
        let avg = LoraWeights::average_of_factors(&[(&u1, 1.0), (&u2, 1.0)]).unwrap();
        let exact = LoraWeights::sum_of_deltas(&[(&u1, 0.5), (&u2, 0.5)]).unwrap();
        let (approx, exact) = (avg.delta(path).unwrap(), exact.delta(path).unwrap());
        let err: f32 = approx
            .iter()
            .zip(&exact)
            .map(|(a, e)| (a - e).powi(2))
            .sum::<f32>()
            .sqrt();
        let norm: f32 = exact.iter().map(|e| e * e).sum::<f32>().sqrt();
        assert!(
            err / norm > 0.3,
            "mean(B)·mean(A) should be far from mean(B·A): {}",
            err / norm
        );
        // Different ranks cannot be factor-averaged; the error names the module.
        let err = LoraWeights::average_of_factors(&[(&u1, 1.0), (&t2, 1.0)]).unwrap_err();
        assert!(err.to_string().contains("to_q"), "{err}");
    }

    use super::*;

    #[test]
    fn a_peft_adapter_reads_the_same_from_bytes_as_from_its_folder() {
        let dir = std::env::temp_dir().join(format!("pf-lora-bytes-{}", std::process::id()));
        let adapter = random_adapter(5, 3, 2.0);
        let adapter = LoraWeights {
            modules: adapter
                .modules
                .into_iter()
                .map(|(k, m)| (k.replacen("transformer.", "transformer.transformer_", 1), m))
                .collect(),
            ..adapter
        };
        adapter.write_peft(&dir, "transformer").unwrap();
        let from_dir = LoraWeights::read(&dir).unwrap();
        let config = std::fs::read_to_string(dir.join("adapter_config.json")).unwrap();
        let bytes = std::fs::read(dir.join("adapter_model.safetensors")).unwrap();
        let from_bytes = LoraWeights::from_peft_bytes(&config, bytes.clone()).unwrap();
        assert_eq!(from_bytes.modules.len(), 1);
        for (path, m) in &from_dir.modules {
            let n = &from_bytes.modules[path];
            assert_eq!(
                (&n.a, &n.b, n.rank, n.scaling),
                (&m.a, &m.b, m.rank, m.scaling)
            );
        }
        // A cut file and a bad config are errors that name the file.
        let cut = LoraWeights::from_peft_bytes(&config, bytes[..bytes.len() / 2].to_vec());
        let err = cut.err().expect("a truncated file is an error").to_string();
        assert!(err.contains("adapter_model.safetensors"), "{err}");
        let err = LoraWeights::from_peft_bytes("{", bytes)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("adapter_config.json"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn keys_of_every_peft_style_layout_split_into_module_and_part() {
        let module = |k: &str| split_key(k).map(|(m, _)| m);
        assert_eq!(
            module("base_model.model.transformer_blocks.0.attn.to_q.lora_A.weight").as_deref(),
            Some("transformer_blocks.0.attn.to_q")
        );
        assert_eq!(
            module("transformer.transformer_blocks.0.attn.to_out.0.lora_B.weight").as_deref(),
            Some("transformer.transformer_blocks.0.attn.to_out.0")
        );
        assert_eq!(
            module("single_transformer_blocks.1.attn.to_out.lora_A.default.weight").as_deref(),
            Some("single_transformer_blocks.1.attn.to_out")
        );
        assert_eq!(
            module("transformer_blocks.0.attn.to_q.alpha").as_deref(),
            Some("transformer_blocks.0.attn.to_q")
        );
        assert!(split_key("transformer_blocks.0.attn.to_q.weight").is_none());
        assert_eq!(
            with_component("text_model.encoder.layers.0.mlp.fc1", "text_encoder"),
            "text_encoder.text_model.encoder.layers.0.mlp.fc1"
        );
    }
}
