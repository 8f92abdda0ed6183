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
