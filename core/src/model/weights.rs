//! Reading checkpoint tensors: safetensors files (single or sharded), memory-mapped or already in
//! memory (the browser fetches them), any float dtype cast to f32, with key-coverage bookkeeping so a load can prove it used every tensor and
//! found every parameter.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use burn::tensor::{Device, Tensor, TensorData};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

/// Errors while loading weights: every one names the file and, where it applies, the key.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a valid safetensors file ({message}); truncated or corrupt?")]
    Format { path: PathBuf, message: String },
    #[error("{path}: {message}")]
    Config { path: PathBuf, message: String },
    #[error("{key}: expected shape {expected:?}, found {found:?} in {path}")]
    Shape {
        key: String,
        expected: Vec<usize>,
        found: Vec<usize>,
        path: PathBuf,
    },
    #[error(
        "{key}: dtype {found} in {path} is not a float type this loader reads (F32, F16, BF16, F64)"
    )]
    DType {
        key: String,
        found: String,
        path: PathBuf,
    },
    #[error("{count} parameter(s) missing from {path}: {keys}", count = keys.len(), keys = list(keys))]
    Missing { keys: Vec<String>, path: PathBuf },
    #[error("{count} tensor(s) in {path} match no parameter of the model: {keys}", count = keys.len(), keys = list(keys))]
    Unused { keys: Vec<String>, path: PathBuf },
}

/// The little-endian values of a float tensor as f32 (F32, F16, BF16, F64); `None` for other
/// dtypes.
pub(crate) fn float_values(dtype: Dtype, bytes: &[u8]) -> Option<Vec<f32>> {
    Some(match dtype {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::F64 => bytes
            .chunks_exact(8)
            .map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes")) as f32)
            .collect(),
        _ => return None,
    })
}

/// The first keys of a list for an error message, with a count of the rest.
pub(crate) fn list(keys: &[String]) -> String {
    const SHOWN: usize = 12;
    let mut text = keys
        .iter()
        .take(SHOWN)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if keys.len() > SHOWN {
        text.push_str(&format!(", … ({} more)", keys.len() - SHOWN));
    }
    text
}

/// Checks what `SafeTensors::read_metadata` checks, but names the tensor and the numbers: every
/// tensor's byte range must match its shape × dtype, lie inside the file and overlap no other.
/// Anything else malformed is left to `read_metadata` (it rejects gaps, bad JSON, a short header).
fn check_header(path: &Path, bytes: &[u8]) -> Result<(), LoadError> {
    #[derive(serde::Deserialize)]
    struct Info {
        dtype: Dtype,
        shape: Vec<usize>,
        data_offsets: (usize, usize),
    }
    let lie = |message: String| LoadError::Format {
        path: path.to_path_buf(),
        message,
    };
    let Some(len) = bytes.get(..8) else {
        return Ok(()); // too short for a header length: read_metadata says so
    };
    let header_len = u64::from_le_bytes(len.try_into().expect("8 bytes")) as usize;
    let Some(header) = bytes.get(8..8usize.saturating_add(header_len)) else {
        return Ok(());
    };
    let Ok(header) = serde_json::from_slice::<BTreeMap<String, serde_json::Value>>(header) else {
        return Ok(());
    };
    let data_len = bytes.len() - 8 - header_len;
    let mut ranges = Vec::new();
    for (key, value) in header.into_iter().filter(|(k, _)| k != "__metadata__") {
        let info: Info = serde_json::from_value(value).map_err(|e| {
            lie(format!(
                "{key}: header entry is not a tensor description ({e})"
            ))
        })?;
        let (start, end) = info.data_offsets;
        let expected = info
            .shape
            .iter()
            .try_fold(info.dtype.bitsize(), |bits, &d| bits.checked_mul(d))
            .map(|bits| bits.div_ceil(8))
            .ok_or_else(|| lie(format!("{key}: shape {:?} overflows", info.shape)))?;
        let found = end.checked_sub(start).ok_or_else(|| {
            lie(format!(
                "{key}: data_offsets [{start}, {end}] end before they start"
            ))
        })?;
        if found != expected {
            return Err(lie(format!(
                "{key}: shape {:?} of {:?} needs {expected} bytes, data_offsets [{start}, {end}] give {found}",
                info.shape, info.dtype
            )));
        }
        if end > data_len {
            return Err(lie(format!(
                "{key}: data_offsets [{start}, {end}] reach past the end of the data ({data_len} bytes)"
            )));
        }
        ranges.push((start, end, key));
    }
    ranges.sort();
    for pair in ranges.windows(2) {
        let ((s0, e0, k0), (s1, e1, k1)) = (&pair[0], &pair[1]);
        if s1 < e0 {
            return Err(lie(format!(
                "{k1} (bytes {s1}..{e1}) overlaps {k0} (bytes {s0}..{e0})"
            )));
        }
    }
    Ok(())
}

struct Entry {
    file: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    start: usize,
    end: usize,
}

/// A tensor seen under another name: rows of a stored tensor (a fused qkv split into q, k, v),
/// optionally with its two halves swapped (BFL/SAI store final modulations as shift, scale).
#[derive(Clone, Debug, PartialEq)]
pub struct Alias {
    pub source: String,
    /// First-dimension rows `[start, start + len)`; `None` for the whole tensor.
    pub rows: Option<(usize, usize)>,
    pub swap_halves: bool,
}

/// A safetensors file's bytes: mapped from disk, or owned (fetched by the browser).
enum Bytes {
    Mapped(Mmap),
    Owned(Vec<u8>),
}

impl std::ops::Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Bytes::Mapped(m) => m,
            Bytes::Owned(v) => v,
        }
    }
}

/// The tensors of one checkpoint (one or more safetensors files).
pub struct Weights {
    files: Vec<(PathBuf, Bytes)>,
    entries: HashMap<String, Entry>,
    aliases: HashMap<String, Alias>,
    used: BTreeSet<String>,
    missing: BTreeSet<String>,
    /// What `describe` prints as the source (the file, or the folder of a sharded checkpoint).
    source: PathBuf,
    /// For a fresh model: parameters not stored are drawn by this rule instead of being missing.
    init: Option<super::init::Initializer>,
    /// The `__metadata__` string map of every file, merged.
    metadata: HashMap<String, String>,
}

impl Weights {
    /// Opens safetensors files; a key found in two files is an error.
    pub fn open(paths: &[PathBuf], source: PathBuf) -> Result<Self, LoadError> {
        let mut files = Vec::new();
        for path in paths {
            let io = |source| LoadError::Io {
                path: path.clone(),
                source,
            };
            let file = File::open(path).map_err(io)?;
            // SAFETY: the file is opened read-only; modifying a checkpoint while it is being loaded
            // is outside what any loader can defend against.
            let mmap = unsafe { Mmap::map(&file) }.map_err(io)?;
            files.push((path.clone(), Bytes::Mapped(mmap)));
        }
        Self::index(files, source)
    }

    /// A safetensors file already in memory; `name` is what errors call it.
    pub fn from_bytes(name: &str, bytes: Vec<u8>) -> Result<Self, LoadError> {
        Self::index(
            vec![(PathBuf::from(name), Bytes::Owned(bytes))],
            PathBuf::from(name),
        )
    }

    fn index(files: Vec<(PathBuf, Bytes)>, source: PathBuf) -> Result<Self, LoadError> {
        let mut entries = HashMap::new();
        let mut file_metadata = HashMap::new();
        for (index, (path, bytes)) in files.iter().enumerate() {
            check_header(path, bytes)?;
            let (header_len, metadata) =
                SafeTensors::read_metadata(bytes).map_err(|e| LoadError::Format {
                    path: path.clone(),
                    message: e.to_string(),
                })?;
            let data_start = 8 + header_len;
            if let Some(map) = metadata.metadata() {
                file_metadata.extend(map.clone());
            }
            for (name, info) in metadata.tensors() {
                let (start, end) = info.data_offsets;
                if data_start + end > bytes.len() {
                    return Err(LoadError::Format {
                        path: path.clone(),
                        message: format!(
                            "tensor {name} ends at byte {} but the file has {}",
                            data_start + end,
                            bytes.len()
                        ),
                    });
                }
                let entry = Entry {
                    file: index,
                    dtype: info.dtype,
                    shape: info.shape.clone(),
                    start: data_start + start,
                    end: data_start + end,
                };
                if entries.insert(name.clone(), entry).is_some() {
                    return Err(LoadError::Format {
                        path: path.clone(),
                        message: format!("tensor {name} appears in two shards"),
                    });
                }
            }
        }
        Ok(Self {
            files,
            entries,
            aliases: HashMap::new(),
            used: BTreeSet::new(),
            missing: BTreeSet::new(),
            source,
            init: None,
            metadata: file_metadata,
        })
    }

    /// No stored tensors: every parameter is drawn from the initialisation rule of
    /// [`super::init`] (seeded), so a fresh model is built by the same code that loads one.
    pub fn initializer(seed: u64) -> Self {
        Self {
            files: Vec::new(),
            entries: HashMap::new(),
            aliases: HashMap::new(),
            used: BTreeSet::new(),
            missing: BTreeSet::new(),
            source: PathBuf::from(format!("<initialised, seed {seed}>")),
            init: Some(super::init::Initializer::new(seed)),
            metadata: HashMap::new(),
        }
    }

    /// Opens one safetensors file.
    pub fn open_file(path: &Path) -> Result<Self, LoadError> {
        Self::open(&[path.to_path_buf()], path.to_path_buf())
    }

    /// Opens a diffusers component folder: `<stem>.safetensors`, or the shards listed in
    /// `<stem>.safetensors.index.json`.
    pub fn open_dir(dir: &Path, stem: &str) -> Result<Self, LoadError> {
        let single = dir.join(format!("{stem}.safetensors"));
        let index = dir.join(format!("{stem}.safetensors.index.json"));
        if single.exists() {
            return Self::open(&[single], dir.to_path_buf());
        }
        let text = std::fs::read_to_string(&index).map_err(|source| LoadError::Io {
            path: index.clone(),
            source,
        })?;
        #[derive(serde::Deserialize)]
        struct Index {
            weight_map: BTreeMap<String, String>,
        }
        let parsed: Index = serde_json::from_str(&text).map_err(|e| LoadError::Config {
            path: index.clone(),
            message: format!("not a shard index: {e}"),
        })?;
        let shards: BTreeSet<&String> = parsed.weight_map.values().collect();
        let paths: Vec<PathBuf> = shards.into_iter().map(|f| dir.join(f)).collect();
        let weights = Self::open(&paths, dir.to_path_buf())?;
        for key in parsed.weight_map.keys() {
            if !weights.entries.contains_key(key) {
                return Err(LoadError::Config {
                    path: index,
                    message: format!("lists {key}, which no shard holds"),
                });
            }
        }
        Ok(weights)
    }

    /// Whether the checkpoint has `key` (stored or aliased).
    pub fn contains(&self, key: &str) -> bool {
        self.entries.contains_key(key) || self.aliases.contains_key(key)
    }

    /// Makes `key` readable as a view of a stored tensor. Stored tensors behind aliases count as
    /// used once any alias of them is read.
    pub fn alias(&mut self, key: String, alias: Alias) {
        self.aliases.insert(key, alias);
    }

    /// The safetensors `__metadata__` entries (e.g. diffusers' `lora_adapter_metadata`).
    pub fn metadata(&self) -> &HashMap<String, String> {
        &self.metadata
    }

    /// All keys, sorted.
    pub fn keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = self.entries.keys().cloned().collect();
        keys.sort();
        keys
    }

    /// Shape of `key`, if present.
    pub fn shape(&self, key: &str) -> Option<Vec<usize>> {
        if let Some(alias) = self.aliases.get(key) {
            let mut shape = self.entries.get(&alias.source)?.shape.clone();
            if let Some((_, len)) = alias.rows {
                shape[0] = len;
            }
            return Some(shape);
        }
        self.entries.get(key).map(|e| e.shape.clone())
    }

    /// The values of `key` as f32 with the expected shape, marking it used. A missing key is
    /// recorded (see [`Weights::finish`]) and yields `None`.
    pub fn read(&mut self, key: &str, expected: &[usize]) -> Result<Option<Vec<f32>>, LoadError> {
        if let Some(alias) = self.aliases.get(key).cloned() {
            return self.read_alias(key, &alias, expected);
        }
        let Some(entry) = self.entries.get(key) else {
            if let Some(init) = &mut self.init {
                return Ok(Some(init.values(key, expected)));
            }
            self.missing
                .insert(format!("{key} (expected {expected:?})"));
            return Ok(None);
        };
        let path = &self.files[entry.file].0;
        if entry.shape != expected {
            return Err(LoadError::Shape {
                key: key.into(),
                expected: expected.to_vec(),
                found: entry.shape.clone(),
                path: path.clone(),
            });
        }
        let bytes = &self.files[entry.file].1[entry.start..entry.end];
        let values: Vec<f32> = match float_values(entry.dtype, bytes) {
            Some(values) => values,
            None => {
                return Err(LoadError::DType {
                    key: key.into(),
                    found: format!("{:?}", entry.dtype),
                    path: path.clone(),
                });
            }
        };
        let expected_len: usize = expected.iter().product();
        if values.len() != expected_len {
            return Err(LoadError::Format {
                path: path.clone(),
                message: format!("{key}: {} values for shape {expected:?}", values.len()),
            });
        }
        self.used.insert(key.to_string());
        Ok(Some(values))
    }

    fn read_alias(
        &mut self,
        key: &str,
        alias: &Alias,
        expected: &[usize],
    ) -> Result<Option<Vec<f32>>, LoadError> {
        let Some(stored) = self.entries.get(&alias.source).map(|e| e.shape.clone()) else {
            self.missing
                .insert(format!("{key} (from {})", alias.source));
            return Ok(None);
        };
        let row: usize = stored[1..].iter().product();
        let (start, len) = alias.rows.unwrap_or((0, stored[0]));
        let mut shape = stored.clone();
        shape[0] = len;
        let path = self.files[self.entries[&alias.source].file].0.clone();
        if start + len > stored[0] || shape != expected {
            return Err(LoadError::Shape {
                key: format!("{key} (rows {start}..{} of {})", start + len, alias.source),
                expected: expected.to_vec(),
                found: shape,
                path,
            });
        }
        let Some(all) = self.read(&alias.source, &stored)? else {
            return Ok(None);
        };
        let mut values = all[start * row..(start + len) * row].to_vec();
        if alias.swap_halves {
            let half = values.len() / 2;
            values.rotate_left(half);
        }
        Ok(Some(values))
    }

    /// A tensor of the expected shape on `device` (zeros when missing; the miss is recorded).
    pub fn tensor<const D: usize>(
        &mut self,
        key: &str,
        shape: [usize; D],
        device: &Device,
    ) -> Result<Tensor<D>, LoadError> {
        let values = self
            .read(key, &shape)?
            .unwrap_or_else(|| vec![0.0; shape.iter().product()]);
        Ok(Tensor::from_data(TensorData::new(values, shape), device))
    }

    /// Marks `key` as deliberately ignored (e.g. BatchNorm's `num_batches_tracked`).
    pub fn skip(&mut self, key: &str) {
        if self.entries.contains_key(key) {
            self.used.insert(key.to_string());
        }
    }

    /// Fails if a parameter was missing or a tensor was never used.
    pub fn finish(self) -> Result<(), LoadError> {
        if !self.missing.is_empty() {
            return Err(LoadError::Missing {
                keys: self.missing.into_iter().collect(),
                path: self.source,
            });
        }
        let mut unused: Vec<String> = self
            .entries
            .iter()
            .filter(|(k, _)| !self.used.contains(*k))
            .map(|(k, e)| format!("{k} ({:?} {:?})", e.dtype, e.shape))
            .collect();
        if !unused.is_empty() {
            unused.sort();
            return Err(LoadError::Unused {
                keys: unused,
                path: self.source,
            });
        }
        Ok(())
    }
}
