//! LoRA adapters: side paths on chosen linears, in every format users have.
//!
//! - [`LoraAdapter`] is the side path `s·w·(x·A)·B` a [`Linear`] carries; `A·B` is never formed in
//!   the forward, the base weight is untouched and can stay frozen.
//! - [`Linears`] walks every linear of a model (each knows its diffusers module path), so the
//!   operations below are written once for SD3, FLUX.1, FLUX.2 and the text encoders.
//! - [`LoraConfig`] is PEFT's `adapter_config.json` with PEFT's target-selection semantics.
//! - [`LoraWeights`] is an adapter read from any format (PEFT folder, diffusers
//!   `pytorch_lora_weights.safetensors`, kohya FLUX, torch `.pt` state dicts) and written back as
//!   PEFT or diffusers.
//!
//! Mirrors `peft/tuners/lora/layer.py` (forward `W x + s·B A x`, merge `W += s·B·A`) and
//! `diffusers/loaders/lora_pipeline.py` (file formats); transposes: our `A`, `B` are PEFT's
//! `lora_A.weight`ᵀ `[d_in, r]` and `lora_B.weight`ᵀ `[r, d_out]`.

mod adapter;
mod config;
mod format;
mod kohya;
mod sampling;

pub use adapter::LoraAdapter;
pub use config::{Init, LoraConfig, Targets};
pub use format::{Format, LoraModule, LoraWeights};
pub use sampling::{AdapterSampling, SAMPLING_FILE};

use burn::module::{Param, ParamId};
use burn::tensor::{Device, Tensor, TensorData};
use rand::SeedableRng;
use rand_distr::{Distribution as _, Normal, Uniform};

use crate::model::layers::Linear;
pub(crate) use crate::model::weights::list;

/// Errors naming the adapter, the offending module paths or keys, and the file.
#[derive(Debug, thiserror::Error)]
pub enum LoraError {
    #[error("{path}: {source}")]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Format {
        path: std::path::PathBuf,
        message: String,
    },
    #[error(
        "adapter `{adapter}`: {count} module(s) match no linear of the model (an adapter made for another model?): {paths}",
        count = paths.len(), paths = list(paths)
    )]
    NoSuchModule { adapter: String, paths: Vec<String> },
    #[error("adapter `{adapter}`: {path}: {message}")]
    Shape {
        adapter: String,
        path: String,
        message: String,
    },
    #[error(
        "adapter `{adapter}`: target_modules {targets} select no linear of the model (its linears are e.g. {examples})"
    )]
    NoTargets {
        adapter: String,
        targets: String,
        examples: String,
    },
    #[error("an adapter named `{0}` is already attached")]
    Duplicate(String),
    #[error("no adapter named `{0}` is attached")]
    Unknown(String),
    #[error("adapter config: {0}")]
    Config(String),
    #[error(transparent)]
    Torch(#[from] crate::model::torch_pt::PtError),
}

/// Every [`Linear`] of a model, visited in field order.
pub trait Linears {
    fn for_each_linear(&self, f: &mut dyn FnMut(&Linear));
    fn for_each_linear_mut(&mut self, f: &mut dyn FnMut(&mut Linear));
}

impl Linears for Linear {
    fn for_each_linear(&self, f: &mut dyn FnMut(&Linear)) {
        f(self)
    }
    fn for_each_linear_mut(&mut self, f: &mut dyn FnMut(&mut Linear)) {
        f(self)
    }
}

impl<T: Linears> Linears for Vec<T> {
    fn for_each_linear(&self, f: &mut dyn FnMut(&Linear)) {
        self.iter().for_each(|item| item.for_each_linear(f))
    }
    fn for_each_linear_mut(&mut self, f: &mut dyn FnMut(&mut Linear)) {
        self.iter_mut().for_each(|item| item.for_each_linear_mut(f))
    }
}

impl<T: Linears> Linears for Option<T> {
    fn for_each_linear(&self, f: &mut dyn FnMut(&Linear)) {
        if let Some(item) = self {
            item.for_each_linear(f)
        }
    }
    fn for_each_linear_mut(&mut self, f: &mut dyn FnMut(&mut Linear)) {
        if let Some(item) = self {
            item.for_each_linear_mut(f)
        }
    }
}

/// Implements [`Linears`] for a struct by listing the fields that hold linears. Put it next to the
/// struct; `tests/tests/suite/lora.rs` checks that the walk finds every linear burn's visitor finds.
#[macro_export]
macro_rules! linears {
    ($ty:ty: $($field:ident),+ $(,)?) => {
        impl $crate::lora::Linears for $ty {
            fn for_each_linear(&self, f: &mut dyn FnMut(&$crate::model::layers::Linear)) {
                $($crate::lora::Linears::for_each_linear(&self.$field, f);)+
            }
            fn for_each_linear_mut(&mut self, f: &mut dyn FnMut(&mut $crate::model::layers::Linear)) {
                $($crate::lora::Linears::for_each_linear_mut(&mut self.$field, f);)+
            }
        }
    };
}

/// The module paths of every linear, in walk order.
pub fn linear_paths(model: &(impl Linears + ?Sized)) -> Vec<String> {
    let mut paths = Vec::new();
    model.for_each_linear(&mut |l| paths.push(l.path.clone()));
    paths
}

/// Attaches an adapter read from a file to the linears its modules name. Every module must find
/// its linear with matching shapes; nothing is attached otherwise.
///
/// `modules` are component-relative (`transformer_blocks.0.attn.to_q`); see
/// [`LoraWeights::component`].
pub fn attach<'a>(
    model: &mut (impl Linears + ?Sized),
    name: &str,
    modules: impl IntoIterator<Item = (&'a str, &'a LoraModule)>,
    weight: f64,
    device: &Device,
) -> Result<usize, LoraError> {
    ensure_absent(model, name)?;
    let mut wanted: std::collections::BTreeMap<&str, &LoraModule> = modules.into_iter().collect();
    let mut problems = Vec::new();
    model.for_each_linear(&mut |l| {
        if let Some(m) = wanted.get(l.path.as_str())
            && (m.d_in != l.d_in() || m.d_out != l.d_out())
        {
            problems.push(LoraError::Shape {
                adapter: name.to_string(),
                path: l.path.clone(),
                message: format!(
                    "adapter is {} → {} (lora_A [{}, {}], lora_B [{}, {}]) but the linear is {} → {}",
                    m.d_in,
                    m.d_out,
                    m.rank,
                    m.d_in,
                    m.d_out,
                    m.rank,
                    l.d_in(),
                    l.d_out()
                ),
            });
        }
    });
    if let Some(problem) = problems.into_iter().next() {
        return Err(problem);
    }
    let mut attached = 0;
    model.for_each_linear_mut(&mut |l| {
        if let Some(m) = wanted.remove(l.path.as_str()) {
            l.lora.push(m.to_adapter(name, &l.path, weight, device));
            attached += 1;
        }
    });
    if !wanted.is_empty() {
        let paths: Vec<String> = wanted.keys().map(|p| p.to_string()).collect();
        remove(model, name);
        return Err(LoraError::NoSuchModule {
            adapter: name.to_string(),
            paths,
        });
    }
    Ok(attached)
}

/// Attaches a fresh, trainable adapter on the linears `config` selects (PEFT semantics), with
/// PEFT's initialisation: `B = 0` (so the model is unchanged), `A` gaussian N(0, 1/r) or
/// Kaiming-uniform (PEFT's default `init_lora_weights=True`). Returns the wrapped paths.
pub fn init_adapter(
    model: &mut (impl Linears + ?Sized),
    name: &str,
    config: &LoraConfig,
    seed: u64,
    device: &Device,
) -> Result<Vec<String>, LoraError> {
    ensure_absent(model, name)?;
    config.validate()?;
    let init = config.init()?;
    let paths = linear_paths(model);
    let selected: Vec<String> = paths
        .iter()
        .filter(|p| config.selects(p))
        .cloned()
        .collect();
    if selected.is_empty() {
        return Err(LoraError::NoTargets {
            adapter: name.to_string(),
            targets: config.targets_text(),
            examples: list(&paths.into_iter().take(12).collect::<Vec<_>>()),
        });
    }
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    model.for_each_linear_mut(&mut |l| {
        if !config.selects(&l.path) {
            return;
        }
        let (r, alpha) = (config.rank_for(&l.path), config.alpha_for(&l.path));
        let (d_in, d_out) = (l.d_in(), l.d_out());
        // PEFT draws lora_A [r, d_in]; stored transposed as [d_in, r].
        let a_peft: Vec<f32> = match init {
            Init::Gaussian => {
                let normal = Normal::new(0.0, 1.0 / r as f64).expect("finite std");
                (0..r * d_in)
                    .map(|_| normal.sample(&mut rng) as f32)
                    .collect()
            }
            Init::Kaiming => {
                // kaiming_uniform_(a=√5) on [r, d_in]: bound = 1/√d_in.
                let bound = 1.0 / (d_in as f64).sqrt();
                let uniform = Uniform::new(-bound, bound).expect("non-empty range");
                (0..r * d_in)
                    .map(|_| uniform.sample(&mut rng) as f32)
                    .collect()
            }
        };
        let module = LoraModule {
            rank: r,
            d_in,
            d_out,
            a: a_peft,
            b: vec![0.0; d_out * r],
            alpha,
            scaling: config.scaling(r, alpha),
        };
        l.lora.push(module.to_adapter(name, &l.path, 1.0, device));
    });
    Ok(selected)
}

fn ensure_absent(model: &(impl Linears + ?Sized), name: &str) -> Result<(), LoraError> {
    let mut present = false;
    model.for_each_linear(&mut |l| present |= l.lora.iter().any(|a| a.name == name));
    if present {
        Err(LoraError::Duplicate(name.to_string()))
    } else {
        Ok(())
    }
}

fn for_each_adapter_mut(
    model: &mut (impl Linears + ?Sized),
    name: &str,
    mut f: impl FnMut(&mut Linear, usize),
) -> Result<usize, LoraError> {
    let mut count = 0;
    model.for_each_linear_mut(&mut |l| {
        if let Some(i) = l.lora.iter().position(|a| a.name == name) {
            f(l, i);
            count += 1;
        }
    });
    if count == 0 {
        Err(LoraError::Unknown(name.to_string()))
    } else {
        Ok(count)
    }
}

/// Sets an adapter's multiplier (PEFT's `set_adapters(weights=…)`). A merged adapter is unmerged
/// and merged again so the base weight follows.
pub fn set_weight(
    model: &mut (impl Linears + ?Sized),
    name: &str,
    weight: f64,
) -> Result<usize, LoraError> {
    for_each_adapter_mut(model, name, |l, i| {
        let merged = l.lora[i].merged;
        if merged {
            unmerge_one(l, i);
        }
        l.lora[i].weight = weight;
        if merged {
            merge_one(l, i);
        }
    })
}

/// Switches every adapter on or off without touching a weight: the "same model with the adapter
/// off" that GRPO's KL term compares against. Merged adapters stay in the base weight.
pub fn set_enabled(model: &mut (impl Linears + ?Sized), enabled: bool) {
    model.for_each_linear_mut(&mut |l| l.lora.iter_mut().for_each(|a| a.enabled = enabled));
}

/// Puts `weights` (a PEFT component, e.g. an adapter's average) in the place of adapter `name`:
/// [`remove`] then [`attach`] at weight 1.
pub fn replace(
    model: &mut (impl Linears + ?Sized),
    name: &str,
    weights: &LoraWeights,
    device: &Device,
) -> Result<usize, LoraError> {
    remove(model, name);
    attach(model, name, weights.component("transformer"), 1.0, device)
}

/// Detaches an adapter (unmerging it first if it was merged). Returns how many linears had it.
pub fn remove(model: &mut (impl Linears + ?Sized), name: &str) -> usize {
    let mut count = 0;
    model.for_each_linear_mut(&mut |l| {
        if let Some(i) = l.lora.iter().position(|a| a.name == name) {
            if l.lora[i].merged {
                unmerge_one(l, i);
            }
            l.lora.remove(i);
            count += 1;
        }
    });
    count
}

/// Folds `s·w·A·B` into the base weight (PEFT's `merge_adapter`); the side path is then skipped.
pub fn merge(model: &mut (impl Linears + ?Sized), name: &str) -> Result<usize, LoraError> {
    for_each_adapter_mut(model, name, |l, i| {
        if !l.lora[i].merged {
            merge_one(l, i)
        }
    })
}

/// Subtracts a merged adapter from the base weight again.
pub fn unmerge(model: &mut (impl Linears + ?Sized), name: &str) -> Result<usize, LoraError> {
    for_each_adapter_mut(model, name, |l, i| {
        if l.lora[i].merged {
            unmerge_one(l, i)
        }
    })
}

/// Reads the adapter file or folder at `path`, attaches its transformer modules as `name` and
/// merges them into `model`'s weights: a teacher or a starting point with an adapter folded in.
pub fn merge_file(
    model: &mut (impl Linears + ?Sized),
    path: &std::path::Path,
    name: &str,
    device: &Device,
) -> Result<usize, LoraError> {
    let adapter = LoraWeights::read(path)?;
    attach(model, name, adapter.component("transformer"), 1.0, device)?;
    merge_and_unload(model, name)
}

/// Merges an adapter and forgets it: RTDMD's stacking step ("merge the cold-start LoRA, then
/// train a fresh one") and `lora merge` on the command line.
pub fn merge_and_unload(
    model: &mut (impl Linears + ?Sized),
    name: &str,
) -> Result<usize, LoraError> {
    let count = merge(model, name)?;
    model.for_each_linear_mut(&mut |l| l.lora.retain(|a| a.name != name));
    Ok(count)
}

fn merge_one(l: &mut Linear, i: usize) {
    let delta = l.lora[i].delta().detach();
    add_to_weight(l, delta);
    l.lora[i].merged = true;
}

fn unmerge_one(l: &mut Linear, i: usize) {
    let delta = l.lora[i].delta().detach();
    add_to_weight(l, delta.neg());
    l.lora[i].merged = false;
}

fn add_to_weight(l: &mut Linear, delta: Tensor<2>) {
    let require_grad = l.weight.val().is_require_grad();
    l.weight = Param::initialized(
        l.weight.id,
        (l.weight.val().detach() + delta)
            .detach()
            .set_require_grad(require_grad),
    );
}

/// Reads an attached adapter back out (for saving), in PEFT layout.
pub fn extract(
    model: &(impl Linears + ?Sized),
    name: &str,
) -> Result<Vec<(String, LoraModule)>, LoraError> {
    let mut modules = Vec::new();
    model.for_each_linear(&mut |l| {
        if let Some(a) = l.lora.iter().find(|a| a.name == name) {
            modules.push((l.path.clone(), LoraModule::from_adapter(a)));
        }
    });
    if modules.is_empty() {
        return Err(LoraError::Unknown(name.to_string()));
    }
    Ok(modules)
}

/// Names of the attached adapters with how many linears each wraps, in first-seen order.
pub fn adapters(model: &(impl Linears + ?Sized)) -> Vec<(String, usize)> {
    let mut found: Vec<(String, usize)> = Vec::new();
    model.for_each_linear(&mut |l| {
        for a in &l.lora {
            match found.iter_mut().find(|(n, _)| *n == a.name) {
                Some((_, count)) => *count += 1,
                None => found.push((a.name.clone(), 1)),
            }
        }
    });
    found
}

/// Adapters whose side path is live (attached and not merged): what saving the base weights
/// alone would lose.
pub fn unmerged(model: &(impl Linears + ?Sized)) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    model.for_each_linear(&mut |l| {
        for a in l.lora.iter().filter(|a| !a.merged) {
            if !names.contains(&a.name) {
                names.push(a.name.clone());
            }
        }
    });
    names
}

/// Freezes the whole model (base weights, norms, embeddings, other adapters) and makes only
/// adapter `name` trainable: what LoRA training optimises.
pub fn train_only<M: burn::module::Module + Linears>(model: M, name: &str) -> M {
    let mut model = model.freeze();
    model.for_each_linear_mut(&mut |l| {
        for a in l.lora.iter_mut().filter(|a| a.name == name) {
            a.a = a.a.clone().set_require_grad(true);
            a.b = a.b.clone().set_require_grad(true);
        }
    });
    model
}

/// FNV-1a over `name/path/factor`: the same parameter id in every process.
fn stable_id(name: &str, path: &str, factor: &str) -> ParamId {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in [name, "/", path, "/", factor].concat().bytes() {
        hash ^= byte as u64;
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    ParamId::from(hash)
}

impl LoraModule {
    /// The side path for the linear at `path`, transposing PEFT's factors to `[d_in, r]` and
    /// `[r, d_out]`. Parameter ids are derived from (adapter, path), so an adapter rebuilt from a
    /// checkpoint matches the optimizer state saved with it.
    pub fn to_adapter(&self, name: &str, path: &str, weight: f64, device: &Device) -> LoraAdapter {
        let a = Tensor::<2>::from_data(
            TensorData::new(self.a.clone(), [self.rank, self.d_in]),
            device,
        );
        let b = Tensor::<2>::from_data(
            TensorData::new(self.b.clone(), [self.d_out, self.rank]),
            device,
        );
        LoraAdapter {
            a: Param::initialized(stable_id(name, path, "lora_A"), a.transpose()),
            b: Param::initialized(stable_id(name, path, "lora_B"), b.transpose()),
            name: name.to_string(),
            alpha: self.alpha,
            scaling: self.scaling,
            weight,
            enabled: true,
            merged: false,
        }
    }

    /// Reads an attached adapter back in PEFT layout.
    pub fn from_adapter(adapter: &LoraAdapter) -> Self {
        let values = |t: Tensor<2>| -> Vec<f32> {
            t.into_data()
                .convert::<f32>()
                .try_to_vec()
                .expect("f32 tensor")
        };
        let a = adapter.a.val(); // [d_in, r]
        let b = adapter.b.val(); // [r, d_out]
        let [d_in, rank] = a.dims();
        let d_out = b.dims()[1];
        Self {
            rank,
            d_in,
            d_out,
            a: values(a.transpose()),
            b: values(b.transpose()),
            alpha: adapter.alpha,
            scaling: adapter.scaling,
        }
    }
}
