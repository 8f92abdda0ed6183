//! Saving models in their checkpoint layout (diffusers / transformers keys), the inverse of the
//! loaders: module field paths are renamed by a short table, `Linear` weights are transposed back
//! to `[d_out, d_in]`, and tensors stored with another shape (patchify convolutions) are given it.

use std::collections::BTreeMap;
use std::path::Path;

use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::Tensor;
use safetensors::{Dtype, tensor::TensorView};

use super::weights::LoadError;

/// Field-path segments that differ from checkpoint keys: ours → theirs.
const RENAMES: [(&str, &str); 6] = [
    ("to_out_0", "to_out.0"),
    ("net_0_proj", "net.0.proj"),
    ("net_2", "net.2"),
    (
        "time_text_embed_timestep_embedder",
        "time_text_embed.timestep_embedder",
    ),
    (
        "time_text_embed_text_embedder",
        "time_text_embed.text_embedder",
    ),
    ("encoder_layers", "encoder.layers"),
];

/// `Linear` fields that diffusers wraps in a module (`norm1.linear`).
const WRAPPED_LINEARS: [&str; 3] = ["norm1", "norm1_context", "norm_out"];

/// One tensor in checkpoint layout.
pub struct Stored {
    pub shape: Vec<usize>,
    pub values: Vec<f32>,
}

struct Collector<'a> {
    path: Vec<String>,
    /// The struct type owning each entered field (`Struct:Linear`, …).
    owners: Vec<String>,
    reshape: &'a BTreeMap<String, Vec<usize>>,
    out: BTreeMap<String, Stored>,
}

impl Collector<'_> {
    fn key(&self) -> String {
        let last = self.path.len().saturating_sub(1);
        self.path
            .iter()
            .enumerate()
            .map(|(i, segment)| {
                let renamed = RENAMES
                    .iter()
                    .find(|(ours, _)| ours == segment)
                    .map_or(segment.as_str(), |(_, theirs)| theirs);
                // The Linear is the parent of the last segment (`weight` / `bias`).
                let owner_is_linear = self.owners.get(last).is_some_and(|o| o == "Struct:Linear");
                if i + 1 == last && owner_is_linear && WRAPPED_LINEARS.contains(&segment.as_str()) {
                    format!("{renamed}.linear")
                } else {
                    renamed.to_string()
                }
            })
            .collect::<Vec<_>>()
            .join(".")
    }
}

impl ModuleVisitor for Collector<'_> {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.path.push(name.to_string());
        self.owners.push(container_type.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
        self.owners.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        // LoRA side paths are not base weights: they are saved as adapters (`crate::lora`).
        if self.owners.iter().any(|o| o == "Struct:LoraAdapter") {
            return;
        }
        let key = self.key();
        let tensor = param.val();
        let mut shape = tensor.dims().to_vec();
        let mut values: Vec<f32> = tensor
            .into_data()
            .convert::<f32>()
            .try_into_vec::<f32>()
            .expect("f32 parameter");
        let in_linear = self.owners.last().is_some_and(|o| o == "Struct:Linear");
        if in_linear && D == 2 {
            // [d_in, d_out] → [d_out, d_in]
            let (d_in, d_out) = (shape[0], shape[1]);
            let mut transposed = vec![0.0; values.len()];
            for i in 0..d_in {
                for o in 0..d_out {
                    transposed[o * d_in + i] = values[i * d_out + o];
                }
            }
            values = transposed;
            shape = vec![d_out, d_in];
        }
        if let Some(stored) = self.reshape.get(&key) {
            assert_eq!(stored.iter().product::<usize>(), values.len(), "{key}");
            shape = stored.clone();
        }
        self.out.insert(key, Stored { shape, values });
    }
}

/// Every parameter of `module` under its checkpoint key; `reshape` gives the stored shape of
/// tensors kept in another layout (e.g. `pos_embed.proj.weight` → `[d, c, p, p]`).
pub fn checkpoint_tensors(
    module: &impl Module,
    reshape: &BTreeMap<String, Vec<usize>>,
) -> BTreeMap<String, Stored> {
    let mut collector = Collector {
        path: Vec::new(),
        owners: Vec::new(),
        reshape,
        out: BTreeMap::new(),
    };
    module.visit(&mut collector);
    collector.out
}

/// Writes f32 tensors to a safetensors file.
pub fn save_safetensors(
    tensors: &BTreeMap<String, Stored>,
    path: &Path,
    metadata: Option<std::collections::HashMap<String, String>>,
) -> Result<(), LoadError> {
    let bytes: Vec<(String, Vec<u8>, Vec<usize>)> = tensors
        .iter()
        .map(|(k, t)| {
            let b = t.values.iter().flat_map(|v| v.to_le_bytes()).collect();
            (k.clone(), b, t.shape.clone())
        })
        .collect();
    let views: Vec<(String, TensorView)> = bytes
        .iter()
        .map(|(k, b, s)| {
            let view = TensorView::new(Dtype::F32, s.clone(), b).expect("consistent tensor");
            (k.clone(), view)
        })
        .collect();
    safetensors::serialize_to_file(views, metadata, path).map_err(|e| LoadError::Io {
        path: path.to_path_buf(),
        source: std::io::Error::other(e.to_string()),
    })
}

/// Writes a component folder: `config.json` (pretty JSON) and the weights file `weights_file`.
pub fn save_component(
    dir: &Path,
    config: &serde_json::Value,
    weights_file: &str,
    tensors: &BTreeMap<String, Stored>,
    metadata: Option<std::collections::HashMap<String, String>>,
) -> Result<(), LoadError> {
    let io = |source| LoadError::Io {
        path: dir.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    let text = serde_json::to_string_pretty(config).expect("json");
    std::fs::write(dir.join("config.json"), text).map_err(io)?;
    save_safetensors(tensors, &dir.join(weights_file), metadata)
}

/// A float precision a checkpoint can be stored in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreDtype {
    F32,
    F16,
    BF16,
}

impl std::str::FromStr for StoreDtype {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" => Ok(Self::F32),
            "f16" | "float16" | "fp16" => Ok(Self::F16),
            "bf16" | "bfloat16" => Ok(Self::BF16),
            other => Err(format!(
                "unknown dtype {other:?}: expected f32, f16 or bf16"
            )),
        }
    }
}

impl StoreDtype {
    fn safetensors(self) -> Dtype {
        match self {
            Self::F32 => Dtype::F32,
            Self::F16 => Dtype::F16,
            Self::BF16 => Dtype::BF16,
        }
    }

    /// `value` rounded to this precision, as little-endian bytes and read back as f32.
    fn encode(self, value: f32, out: &mut Vec<u8>) -> f32 {
        match self {
            Self::F32 => {
                out.extend_from_slice(&value.to_le_bytes());
                value
            }
            Self::F16 => {
                let v = half::f16::from_f32(value);
                out.extend_from_slice(&v.to_le_bytes());
                v.to_f32()
            }
            Self::BF16 => {
                let v = half::bf16::from_f32(value);
                out.extend_from_slice(&v.to_le_bytes());
                v.to_f32()
            }
        }
    }
}

/// What a precision conversion did to one file.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DtypeReport {
    /// Float tensors rewritten in the new precision.
    pub converted: usize,
    /// Tensors already in it, or not floats (kept byte for byte).
    pub kept: usize,
    pub bytes_before: u64,
    pub bytes_after: u64,
    /// Largest |rounded − original| over all converted values.
    pub max_abs_error: f32,
    /// Largest |rounded − original| / ‖tensor‖∞ over the tensors: the error relative to the
    /// scale of the tensor it sits in.
    pub max_rel_error: f32,
    /// Non-zero values that became zero (below the format's smallest subnormal).
    pub flushed_to_zero: usize,
}

/// Rewrites the float tensors of the safetensors file `src` in precision `dtype` into `dst`,
/// keeping names, shapes, order-independent content and the header metadata. Refuses values the
/// format cannot hold (f16 overflows above 65504) naming the tensor, rather than writing `inf`.
pub fn convert_safetensors_dtype(
    src: &Path,
    dst: &Path,
    dtype: StoreDtype,
) -> Result<DtypeReport, LoadError> {
    use safetensors::SafeTensors;
    let io = |path: &Path, source| LoadError::Io {
        path: path.to_path_buf(),
        source,
    };
    let bytes = std::fs::read(src).map_err(|e| io(src, e))?;
    let format = |e: safetensors::SafeTensorError| LoadError::Format {
        path: src.to_path_buf(),
        message: e.to_string(),
    };
    let (_, header) = SafeTensors::read_metadata(&bytes).map_err(format)?;
    let file = SafeTensors::deserialize(&bytes).map_err(format)?;
    let mut report = DtypeReport {
        bytes_before: bytes.len() as u64,
        ..DtypeReport::default()
    };
    let mut out: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, view) in file.tensors() {
        let source = view.dtype();
        let values = match source {
            _ if source == dtype.safetensors() => None,
            _ => super::weights::float_values(source, view.data()),
        };
        let Some(values) = values else {
            report.kept += 1;
            out.push((name, source, view.shape().to_vec(), view.data().to_vec()));
            continue;
        };
        let scale = values.iter().fold(0f32, |m, v| m.max(v.abs()));
        let mut data = Vec::with_capacity(values.len() * 4);
        for &value in &values {
            let rounded = dtype.encode(value, &mut data);
            if value.is_finite() && !rounded.is_finite() {
                return Err(LoadError::Config {
                    path: src.to_path_buf(),
                    message: format!(
                        "{name}: value {value} does not fit in {dtype:?} (it would become {rounded})"
                    ),
                });
            }
            let error = (rounded - value).abs();
            report.max_abs_error = report.max_abs_error.max(error);
            if scale > 0.0 {
                report.max_rel_error = report.max_rel_error.max(error / scale);
            }
            if value != 0.0 && rounded == 0.0 {
                report.flushed_to_zero += 1;
            }
        }
        report.converted += 1;
        out.push((name, dtype.safetensors(), view.shape().to_vec(), data));
    }
    let views: Vec<(String, TensorView)> = out
        .iter()
        .map(|(name, dtype, shape, data)| {
            let view = TensorView::new(*dtype, shape.clone(), data).expect("consistent tensor");
            (name.clone(), view)
        })
        .collect();
    let tmp = dst.with_extension("safetensors.tmp");
    safetensors::serialize_to_file(views, header.metadata().clone(), &tmp)
        .map_err(|e| io(&tmp, std::io::Error::other(e.to_string())))?;
    std::fs::rename(&tmp, dst).map_err(|e| io(dst, e))?;
    report.bytes_after = std::fs::metadata(dst).map_err(|e| io(dst, e))?.len();
    Ok(report)
}

/// Copies the model folder `src` to `dst` (created; must not exist yet, so nothing is
/// overwritten), rewriting every `.safetensors` file in precision `dtype` and copying the rest
/// as is. Returns each weights file's report, by path relative to the folder.
pub fn convert_folder_dtype(
    src: &Path,
    dst: &Path,
    dtype: StoreDtype,
) -> Result<Vec<(std::path::PathBuf, DtypeReport)>, LoadError> {
    let io = |path: &Path, source| LoadError::Io {
        path: path.to_path_buf(),
        source,
    };
    if !src.is_dir() {
        return Err(io(
            src,
            std::io::Error::new(std::io::ErrorKind::NotFound, "not a model folder"),
        ));
    }
    if dst.exists() {
        return Err(io(
            dst,
            std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "already exists; choose a new output folder",
            ),
        ));
    }
    let mut reports = Vec::new();
    let mut pending = vec![std::path::PathBuf::new()];
    while let Some(relative) = pending.pop() {
        let from = src.join(&relative);
        std::fs::create_dir_all(dst.join(&relative)).map_err(|e| io(dst, e))?;
        let mut entries: Vec<_> = std::fs::read_dir(&from)
            .map_err(|e| io(&from, e))?
            .collect::<Result<_, _>>()
            .map_err(|e| io(&from, e))?;
        entries.sort_by_key(|entry| entry.file_name());
        for entry in entries {
            let name = relative.join(entry.file_name());
            let (path, target) = (src.join(&name), dst.join(&name));
            if path.is_dir() {
                pending.push(name);
            } else if path.extension().is_some_and(|e| e == "safetensors") {
                reports.push((name, convert_safetensors_dtype(&path, &target, dtype)?));
            } else {
                std::fs::copy(&path, &target).map_err(|e| io(&path, e))?;
            }
        }
    }
    Ok(reports)
}

#[cfg(test)]
mod dtype_tests {
    use super::*;

    /// A fresh scratch folder per test.
    fn scratch(test: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("pf-dtype-{}-{test}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn write(path: &Path, name: &str, values: &[f32]) {
        let tensors = BTreeMap::from([(
            name.to_string(),
            Stored {
                shape: vec![values.len()],
                values: values.to_vec(),
            },
        )]);
        let metadata = std::collections::HashMap::from([("format".into(), "pt".into())]);
        save_safetensors(&tensors, path, Some(metadata)).unwrap();
    }

    #[test]
    fn f16_conversion_rounds_reports_and_keeps_metadata() {
        let dir = scratch("f16_conversion");
        let (src, dst) = (dir.join("a.safetensors"), dir.join("b.safetensors"));
        write(&src, "w", &[1.0, -0.5, 1.0e-3 + 1.0e-7, 1.0e-9, 300.0]);
        let report = convert_safetensors_dtype(&src, &dst, StoreDtype::F16).unwrap();
        assert_eq!((report.converted, report.kept), (1, 0));
        assert_eq!(
            report.flushed_to_zero, 1,
            "1e-9 is below f16's smallest subnormal"
        );
        assert!(report.max_abs_error > 0.0 && report.max_abs_error < 0.2);
        assert!(report.max_rel_error < 1.0 / 1024.0, "{report:?}");
        let bytes = std::fs::read(&dst).unwrap();
        let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let view = file.tensor("w").unwrap();
        assert_eq!(view.dtype(), Dtype::F16);
        assert_eq!(view.shape(), &[5]);
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        assert_eq!(header.metadata().as_ref().unwrap()["format"], "pt");
        // Converting again is a no-op: the tensor is already f16.
        let again = dir.join("c.safetensors");
        let report = convert_safetensors_dtype(&dst, &again, StoreDtype::F16).unwrap();
        assert_eq!((report.converted, report.kept), (0, 1));
    }

    #[test]
    fn f16_overflow_is_refused_naming_the_tensor() {
        let dir = scratch("f16_overflow");
        let (src, dst) = (dir.join("a.safetensors"), dir.join("b.safetensors"));
        write(&src, "big.weight", &[1.0, 70000.0]);
        let err = convert_safetensors_dtype(&src, &dst, StoreDtype::F16).unwrap_err();
        assert!(err.to_string().contains("big.weight"), "{err}");
        assert!(!dst.exists());
        // bf16 has f32's range.
        convert_safetensors_dtype(&src, &dst, StoreDtype::BF16).unwrap();
    }

    #[test]
    fn truncated_input_and_existing_output_are_named() {
        let dir = scratch("truncated");
        let src = dir.join("a.safetensors");
        write(&src, "w", &[1.0; 64]);
        let bytes = std::fs::read(&src).unwrap();
        std::fs::write(&src, &bytes[..bytes.len() - 10]).unwrap();
        let err = convert_safetensors_dtype(&src, &dir.join("b.safetensors"), StoreDtype::F16)
            .unwrap_err();
        assert!(err.to_string().contains("a.safetensors"), "{err}");
        let err = convert_folder_dtype(&dir, &dir, StoreDtype::F16).unwrap_err();
        assert!(err.to_string().contains("already exists"), "{err}");
    }
}
