//! Reading `torch.save`d state dicts (`.pt` / `.pth` / `.bin`) without executing pickled code.
//!
//! Since torch 1.6 `torch.save` writes a zip archive (torch/serialization.py `_save`):
//! `<archive>/data.pkl` pickles the object, each tensor's storage is the raw little-endian entry
//! `<archive>/data/<key>`, next to `byteorder` and `version`. A pickle is a program for a stack
//! machine that may import and call any Python function, so `data.pkl` is run here by a small
//! unpickler that knows only the opcodes torch emits (protocols 2–5) and only the globals a
//! tensor dict needs:
//!
//! | global | becomes |
//! | --- | --- |
//! | `collections.OrderedDict` | a dict (its attributes, e.g. `_metadata`, are dropped) |
//! | `torch._utils._rebuild_tensor_v2` / `_rebuild_tensor` | a view (storage, offset, size, stride) |
//! | `torch._utils._rebuild_parameter` | the parameter's tensor |
//! | `torch.*Storage` (`FloatStorage`, `HalfStorage`, `BFloat16Storage`, `DoubleStorage`, …) | a storage type |
//! | `torch.float32` / `float16` / `bfloat16` / `float64` | inert values |
//!
//! Any other global (`posix.system`, `builtins.eval`, …) stops the read with
//! [`PtError::ForbiddenGlobal`] at the opcode that names it, before anything could call it.
//! Nested dicts are flattened with `.`-joined keys; values that are not tensors (ints, strings,
//! floats, lists) are skipped. Float tensors (f32, f16, bf16, f64) are returned as contiguous f32;
//! a tensor of another dtype is an error. The pre-1.6 format is recognised and refused.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use zip::ZipArchive;
use zip::result::ZipError;

/// A tensor read from a state dict: row-major, contiguous, converted to f32.
#[derive(Clone, Debug, PartialEq)]
pub struct PtTensor {
    pub shape: Vec<usize>,
    pub values: Vec<f32>,
}

/// Why a `torch.save` file could not be read; every message names the file.
#[derive(Debug, thiserror::Error)]
pub enum PtError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path}: legacy torch.save format (torch < 1.6) is not supported, re-save with torch>=1.6 \
         (`torch.save(torch.load(f, weights_only=True), f)`)"
    )]
    Legacy { path: PathBuf },
    #[error("{path}: not a torch.save file (neither a zip archive nor a legacy pickle)")]
    NotZip { path: PathBuf },
    #[error("{path}: truncated or corrupt zip archive ({message}); is the download complete?")]
    Truncated { path: PathBuf, message: String },
    #[error("{path}: the zip archive has no data.pkl entry; not a torch.save file")]
    MissingPickle { path: PathBuf },
    #[error(
        "{path}: storages are big-endian (saved on a big-endian machine); re-save on a little-endian one"
    )]
    BigEndian { path: PathBuf },
    #[error("{path}: {key}: storage entry {entry} is missing from the archive")]
    MissingStorage {
        path: PathBuf,
        key: String,
        entry: String,
    },
    #[error(
        "{path}: {key}: storage entry {entry} is too small: it holds {available} elements, size \
         {shape:?} with stride {stride:?} from offset {offset} reads up to element {last}"
    )]
    StorageTooSmall {
        path: PathBuf,
        key: String,
        entry: String,
        available: usize,
        shape: Vec<usize>,
        stride: Vec<usize>,
        offset: usize,
        last: usize,
    },
    #[error("{path}: data.pkl: unknown pickle opcode 0x{opcode:02x} ({shown:?}) at byte {offset}", shown = *opcode as char)]
    UnknownOpcode {
        path: PathBuf,
        opcode: u8,
        offset: usize,
    },
    #[error(
        "{path}: data.pkl wants to call `{module}.{name}`: portaflow refuses to execute pickled \
         code and reads only tensors, storages and dicts (do not torch.load this file with \
         weights_only=False unless you trust it)"
    )]
    ForbiddenGlobal {
        path: PathBuf,
        module: String,
        name: String,
    },
    #[error(
        "{path}: {key}: not a float tensor (stored as torch.{storage}; float32, float16, bfloat16 \
         and float64 are read)"
    )]
    NotFloat {
        path: PathBuf,
        key: String,
        storage: String,
    },
    #[error(
        "{path}: data.pkl: the top-level object is {found}, not a dict (a state dict is expected)"
    )]
    NotADict { path: PathBuf, found: &'static str },
    #[error("{path}: data.pkl: {message}")]
    Pickle { path: PathBuf, message: String },
}

/// Reads every float tensor of a `torch.save`d dict, keys in file order (nested dicts flattened
/// with `.`), without executing any pickled code.
pub fn read_state_dict(path: &Path) -> Result<Vec<(String, PtTensor)>, PtError> {
    let mut archive = open_archive(path)?;
    let pickle_name = archive
        .file_names()
        .find(|n| *n == "data.pkl" || n.ends_with("/data.pkl"))
        .map(str::to_string)
        .ok_or_else(|| PtError::MissingPickle {
            path: path.to_path_buf(),
        })?;
    let prefix = &pickle_name[..pickle_name.len() - "data.pkl".len()];
    if read_entry(path, &mut archive, &format!("{prefix}byteorder"))?.as_deref() == Some(b"big") {
        return Err(PtError::BigEndian {
            path: path.to_path_buf(),
        });
    }
    let pickle = read_entry(path, &mut archive, &pickle_name)?.expect("listed entry");
    let root = unpickle(path, &pickle)?;
    let Value::Dict(dict) = root else {
        return Err(PtError::NotADict {
            path: path.to_path_buf(),
            found: root.kind(),
        });
    };
    let mut views = Vec::new();
    flatten(path, &dict.borrow(), "", 0, &mut views)?;

    // Views of one storage usually follow each other: keep the last storage read.
    let mut cached: Option<(String, Vec<u8>)> = None;
    let mut tensors = Vec::with_capacity(views.len());
    for (key, view) in views {
        let width = view.dtype.width().ok_or_else(|| PtError::NotFloat {
            path: path.to_path_buf(),
            key: key.clone(),
            storage: view.dtype.storage_name(),
        })?;
        let entry = format!("{prefix}data/{}", view.storage_key);
        if cached.as_ref().is_none_or(|(name, _)| *name != entry) {
            let bytes =
                read_entry(path, &mut archive, &entry)?.ok_or_else(|| PtError::MissingStorage {
                    path: path.to_path_buf(),
                    key: key.clone(),
                    entry: entry.clone(),
                })?;
            cached = Some((entry.clone(), bytes));
        }
        let bytes = &cached.as_ref().expect("just read").1;
        let available = bytes.len() / width;
        if let Some(last) = view.last_element().filter(|&last| last >= available) {
            return Err(PtError::StorageTooSmall {
                path: path.to_path_buf(),
                key,
                entry,
                available,
                shape: view.shape,
                stride: view.stride,
                offset: view.offset,
                last,
            });
        }
        let values = view.gather(bytes);
        tensors.push((
            key,
            PtTensor {
                shape: view.shape,
                values,
            },
        ));
    }
    Ok(tensors)
}

/// `80 02 8a 0a` + the LONG1 magic number 0x1950a86a20f9469cfc6c that starts a legacy file.
const LEGACY_MAGIC: [u8; 14] = [
    0x80, 0x02, 0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19,
];

fn open_archive(path: &Path) -> Result<ZipArchive<BufReader<File>>, PtError> {
    let io = |source| PtError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::open(path).map_err(io)?;
    let mut head = Vec::new();
    file.by_ref().take(14).read_to_end(&mut head).map_err(io)?;
    file.rewind().map_err(io)?;
    if head == LEGACY_MAGIC {
        return Err(PtError::Legacy {
            path: path.to_path_buf(),
        });
    }
    ZipArchive::new(BufReader::new(file)).map_err(|e| match e {
        _ if head.starts_with(b"PK") => PtError::Truncated {
            path: path.to_path_buf(),
            message: e.to_string(),
        },
        ZipError::Io(source) => io(source),
        _ => PtError::NotZip {
            path: path.to_path_buf(),
        },
    })
}

/// An entry's bytes, `None` when the archive has no such entry.
fn read_entry(
    path: &Path,
    archive: &mut ZipArchive<BufReader<File>>,
    name: &str,
) -> Result<Option<Vec<u8>>, PtError> {
    let truncated = |e: &dyn std::fmt::Display| PtError::Truncated {
        path: path.to_path_buf(),
        message: format!("{name}: {e}"),
    };
    let mut entry = match archive.by_name(name) {
        Ok(entry) => entry,
        Err(ZipError::FileNotFound) => return Ok(None),
        Err(e) => return Err(truncated(&e)),
    };
    let mut bytes = Vec::new();
    entry.read_to_end(&mut bytes).map_err(|e| truncated(&e))?;
    Ok(Some(bytes))
}

/// Deepest dict nesting flattened (a pickle can make a dict that contains itself).
const MAX_DEPTH: usize = 32;

fn flatten(
    path: &Path,
    entries: &[(Value, Value)],
    prefix: &str,
    depth: usize,
    out: &mut Vec<(String, View)>,
) -> Result<(), PtError> {
    if depth > MAX_DEPTH {
        return Err(PtError::Pickle {
            path: path.to_path_buf(),
            message: format!("dicts nested deeper than {MAX_DEPTH} levels under {prefix:?}"),
        });
    }
    for (key, value) in entries {
        let key = match key {
            Value::Str(s) => format!("{prefix}{s}"),
            Value::Int(i) => format!("{prefix}{i}"),
            _ => continue,
        };
        match value {
            Value::Tensor(view) => out.push((key, view.clone())),
            Value::Dict(inner) => {
                flatten(path, &inner.borrow(), &format!("{key}."), depth + 1, out)?
            }
            _ => {}
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Tensors: a strided view of a storage
// ---------------------------------------------------------------------------------------------

/// A storage's element type, from its `torch.<Name>Storage` class.
#[derive(Clone, Debug, PartialEq)]
enum Dtype {
    F32,
    F16,
    Bf16,
    F64,
    /// Any other storage class (`LongStorage`, `BoolStorage`, …), by name.
    Other(String),
}

impl Dtype {
    fn from_storage(name: &str) -> Self {
        match name {
            "FloatStorage" => Dtype::F32,
            "HalfStorage" => Dtype::F16,
            "BFloat16Storage" => Dtype::Bf16,
            "DoubleStorage" => Dtype::F64,
            other => Dtype::Other(other.to_string()),
        }
    }

    fn storage_name(&self) -> String {
        match self {
            Dtype::F32 => "FloatStorage".into(),
            Dtype::F16 => "HalfStorage".into(),
            Dtype::Bf16 => "BFloat16Storage".into(),
            Dtype::F64 => "DoubleStorage".into(),
            Dtype::Other(name) => name.clone(),
        }
    }

    /// Bytes per element of a float dtype; `None` for the others.
    fn width(&self) -> Option<usize> {
        match self {
            Dtype::F32 => Some(4),
            Dtype::F16 | Dtype::Bf16 => Some(2),
            Dtype::F64 => Some(8),
            Dtype::Other(_) => None,
        }
    }

    /// Element `i` of a little-endian storage of a float dtype, as f32.
    fn decode(&self, bytes: &[u8], i: usize) -> f32 {
        let at = |w: usize| &bytes[i * w..(i + 1) * w];
        match self {
            Dtype::F32 => f32::from_le_bytes(at(4).try_into().expect("4 bytes")),
            Dtype::F16 => half::f16::from_le_bytes(at(2).try_into().expect("2 bytes")).to_f32(),
            Dtype::Bf16 => half::bf16::from_le_bytes(at(2).try_into().expect("2 bytes")).to_f32(),
            Dtype::F64 => f64::from_le_bytes(at(8).try_into().expect("8 bytes")) as f32,
            Dtype::Other(_) => unreachable!("only float storages are decoded"),
        }
    }
}

/// `_rebuild_tensor_v2(storage, offset, size, stride, …)`: which elements of which storage.
#[derive(Clone, Debug, PartialEq)]
struct View {
    dtype: Dtype,
    storage_key: String,
    offset: usize,
    shape: Vec<usize>,
    stride: Vec<usize>,
}

impl View {
    /// The largest storage index the view reads; `None` when it has no elements.
    /// Saturates: a file can claim any size.
    fn last_element(&self) -> Option<usize> {
        if self.shape.contains(&0) {
            return None;
        }
        Some(
            self.shape
                .iter()
                .zip(&self.stride)
                .fold(self.offset, |acc, (&n, &s)| {
                    acc.saturating_add((n - 1).saturating_mul(s))
                }),
        )
    }

    /// The view's elements in row-major order; the storage must hold `last_element()`.
    fn gather(&self, bytes: &[u8]) -> Vec<f32> {
        let count = self.shape.iter().product();
        let mut values = Vec::with_capacity(count);
        let mut index = vec![0usize; self.shape.len()];
        for _ in 0..count {
            let at = self.offset
                + index
                    .iter()
                    .zip(&self.stride)
                    .map(|(i, s)| i * s)
                    .sum::<usize>();
            values.push(self.dtype.decode(bytes, at));
            // Odometer: advance the last axis, carrying into earlier ones.
            for axis in (0..index.len()).rev() {
                index[axis] += 1;
                if index[axis] < self.shape[axis] {
                    break;
                }
                index[axis] = 0;
            }
        }
        values
    }
}

// ---------------------------------------------------------------------------------------------
// The restricted unpickler
// ---------------------------------------------------------------------------------------------

/// What a pickle can build here. Dicts and lists are shared (`Rc`) because the memo hands out
/// the same object that later opcodes fill.
#[derive(Clone, Debug)]
enum Value {
    None,
    Bool,
    Int(i64),
    Float,
    Str(String),
    Tuple(Vec<Value>),
    List(Rc<RefCell<Vec<Value>>>),
    Dict(Rc<RefCell<Vec<(Value, Value)>>>),
    Global(Global),
    Storage { dtype: Dtype, key: String },
    Tensor(View),
}

impl Value {
    fn kind(&self) -> &'static str {
        match self {
            Value::None => "None",
            Value::Bool => "a bool",
            Value::Int(_) => "an int",
            Value::Float => "a float",
            Value::Str(_) => "a string",
            Value::Tuple(_) => "a tuple",
            Value::List(_) => "a list",
            Value::Dict(_) => "a dict",
            Value::Global(_) => "a class or function",
            Value::Storage { .. } => "a storage",
            Value::Tensor(_) => "a tensor",
        }
    }

    fn usize(&self) -> Option<usize> {
        match self {
            Value::Int(i) => usize::try_from(*i).ok(),
            _ => None,
        }
    }

    fn usizes(&self) -> Option<Vec<usize>> {
        match self {
            Value::Tuple(items) => items.iter().map(Value::usize).collect(),
            _ => None,
        }
    }
}

/// The only globals a pickle may name.
#[derive(Clone, Debug, PartialEq)]
enum Global {
    OrderedDict,
    RebuildTensor,
    RebuildParameter,
    StorageType(Dtype),
    /// `torch.float32` and friends: inert.
    TorchDtype,
}

fn resolve_global(path: &Path, module: &str, name: &str) -> Result<Global, PtError> {
    Ok(match (module, name) {
        ("collections", "OrderedDict") => Global::OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2" | "_rebuild_tensor") => Global::RebuildTensor,
        ("torch._utils", "_rebuild_parameter") => Global::RebuildParameter,
        ("torch", "float32" | "float16" | "bfloat16" | "float64") => Global::TorchDtype,
        ("torch", storage) if storage.ends_with("Storage") => {
            Global::StorageType(Dtype::from_storage(storage))
        }
        _ => {
            return Err(PtError::ForbiddenGlobal {
                path: path.to_path_buf(),
                module: module.to_string(),
                name: name.to_string(),
            });
        }
    })
}

/// Pickle opcodes (CPython Lib/pickle.py), those this reader runs.
mod op {
    pub const PROTO: u8 = 0x80;
    pub const FRAME: u8 = 0x95;
    pub const STOP: u8 = b'.';
    pub const POP: u8 = b'0';
    pub const MARK: u8 = b'(';
    pub const EMPTY_DICT: u8 = b'}';
    pub const EMPTY_LIST: u8 = b']';
    pub const EMPTY_TUPLE: u8 = b')';
    pub const BINPUT: u8 = b'q';
    pub const LONG_BINPUT: u8 = b'r';
    pub const MEMOIZE: u8 = 0x94;
    pub const BINGET: u8 = b'h';
    pub const LONG_BINGET: u8 = b'j';
    pub const BINUNICODE: u8 = b'X';
    pub const SHORT_BINUNICODE: u8 = 0x8c;
    pub const BINUNICODE8: u8 = 0x8d;
    pub const BININT: u8 = b'J';
    pub const BININT1: u8 = b'K';
    pub const BININT2: u8 = b'M';
    pub const LONG1: u8 = 0x8a;
    pub const BINFLOAT: u8 = b'G';
    pub const NEWTRUE: u8 = 0x88;
    pub const NEWFALSE: u8 = 0x89;
    pub const NONE: u8 = b'N';
    pub const TUPLE: u8 = b't';
    pub const TUPLE1: u8 = 0x85;
    pub const TUPLE2: u8 = 0x86;
    pub const TUPLE3: u8 = 0x87;
    pub const GLOBAL: u8 = b'c';
    pub const STACK_GLOBAL: u8 = 0x93;
    pub const REDUCE: u8 = b'R';
    pub const NEWOBJ: u8 = 0x81;
    pub const BUILD: u8 = b'b';
    pub const BINPERSID: u8 = b'Q';
    pub const SETITEM: u8 = b's';
    pub const SETITEMS: u8 = b'u';
    pub const APPEND: u8 = b'a';
    pub const APPENDS: u8 = b'e';
}

/// Runs a pickle and returns the object it builds; see the module doc for what is allowed.
fn unpickle(path: &Path, data: &[u8]) -> Result<Value, PtError> {
    Unpickler {
        path,
        data,
        pos: 0,
        opcode_at: 0,
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
    }
    .run()
}

struct Unpickler<'a> {
    path: &'a Path,
    data: &'a [u8],
    pos: usize,
    /// Where the running opcode starts (for error messages).
    opcode_at: usize,
    stack: Vec<Value>,
    /// Stack lengths at each MARK.
    marks: Vec<usize>,
    memo: HashMap<usize, Value>,
}

impl<'a> Unpickler<'a> {
    fn run(mut self) -> Result<Value, PtError> {
        loop {
            self.opcode_at = self.pos;
            let opcode = self.take(1)?[0];
            match opcode {
                op::PROTO => {
                    self.take(1)?;
                }
                op::FRAME => {
                    self.take(8)?;
                }
                op::STOP => return self.pop(),
                op::POP => {
                    self.pop()?;
                }
                op::MARK => self.marks.push(self.stack.len()),
                op::EMPTY_DICT => self.stack.push(Value::Dict(Rc::default())),
                op::EMPTY_LIST => self.stack.push(Value::List(Rc::default())),
                op::EMPTY_TUPLE => self.stack.push(Value::Tuple(Vec::new())),
                op::BINPUT => {
                    let i = self.take(1)?[0] as usize;
                    self.put(i)?;
                }
                op::LONG_BINPUT => {
                    let i = self.u32()? as usize;
                    self.put(i)?;
                }
                op::MEMOIZE => self.put(self.memo.len())?,
                op::BINGET => {
                    let i = self.take(1)?[0] as usize;
                    self.get(i)?;
                }
                op::LONG_BINGET => {
                    let i = self.u32()? as usize;
                    self.get(i)?;
                }
                op::BINUNICODE => {
                    let n = self.u32()? as usize;
                    self.string(n)?;
                }
                op::SHORT_BINUNICODE => {
                    let n = self.take(1)?[0] as usize;
                    self.string(n)?;
                }
                op::BINUNICODE8 => {
                    let n = u64::from_le_bytes(self.array()?);
                    self.string(usize::try_from(n).unwrap_or(usize::MAX))?;
                }
                op::BININT => {
                    let i = i32::from_le_bytes(self.array()?);
                    self.stack.push(Value::Int(i.into()));
                }
                op::BININT1 => {
                    let i = self.take(1)?[0];
                    self.stack.push(Value::Int(i.into()));
                }
                op::BININT2 => {
                    let i = u16::from_le_bytes(self.array()?);
                    self.stack.push(Value::Int(i.into()));
                }
                op::LONG1 => {
                    let n = self.take(1)?[0] as usize;
                    let i = long(self.take(n)?)
                        .ok_or_else(|| self.malformed("an integer larger than 64 bits".into()))?;
                    self.stack.push(Value::Int(i));
                }
                op::BINFLOAT => {
                    self.take(8)?; // a float value: skipped like every non-tensor
                    self.stack.push(Value::Float);
                }
                op::NEWTRUE | op::NEWFALSE => self.stack.push(Value::Bool),
                op::NONE => self.stack.push(Value::None),
                op::TUPLE => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::Tuple(items));
                }
                op::TUPLE1 | op::TUPLE2 | op::TUPLE3 => {
                    let n = (opcode - op::TUPLE1 + 1) as usize;
                    let start = self.stack.len().checked_sub(n).ok_or_else(|| {
                        self.malformed(format!("TUPLE{n} on a stack of {}", self.stack.len()))
                    })?;
                    let items = self.stack.split_off(start);
                    self.stack.push(Value::Tuple(items));
                }
                op::GLOBAL => {
                    let module = self.line()?;
                    let name = self.line()?;
                    let global = resolve_global(self.path, &module, &name)?;
                    self.stack.push(Value::Global(global));
                }
                op::STACK_GLOBAL => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    let (Value::Str(module), Value::Str(name)) = (module, name) else {
                        return Err(self.malformed("STACK_GLOBAL on non-strings".into()));
                    };
                    let global = resolve_global(self.path, &module, &name)?;
                    self.stack.push(Value::Global(global));
                }
                op::REDUCE | op::NEWOBJ => {
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    let value = self.call(callable, args)?;
                    self.stack.push(value);
                }
                op::BUILD => {
                    // The state of an object built above: for an OrderedDict, its attributes.
                    self.pop()?;
                    if self.stack.is_empty() {
                        return Err(self.malformed("BUILD without an object".into()));
                    }
                }
                op::BINPERSID => {
                    let pid = self.pop()?;
                    let storage = self.storage(pid)?;
                    self.stack.push(storage);
                }
                op::SETITEM => {
                    let value = self.pop()?;
                    let key = self.pop()?;
                    self.top_dict()?.borrow_mut().push((key, value));
                }
                op::SETITEMS => {
                    let items = self.pop_mark()?;
                    if items.len() % 2 != 0 {
                        return Err(self.malformed("SETITEMS with an odd item count".into()));
                    }
                    let dict = self.top_dict()?;
                    let mut items = items.into_iter();
                    while let (Some(key), Some(value)) = (items.next(), items.next()) {
                        dict.borrow_mut().push((key, value));
                    }
                }
                op::APPEND => {
                    let value = self.pop()?;
                    self.top_list()?.borrow_mut().push(value);
                }
                op::APPENDS => {
                    let items = self.pop_mark()?;
                    self.top_list()?.borrow_mut().extend(items);
                }
                _ => {
                    return Err(PtError::UnknownOpcode {
                        path: self.path.to_path_buf(),
                        opcode,
                        offset: self.opcode_at,
                    });
                }
            }
        }
    }

    fn malformed(&self, message: String) -> PtError {
        PtError::Pickle {
            path: self.path.to_path_buf(),
            message: format!("{message} at byte {}", self.opcode_at),
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], PtError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&end| end <= self.data.len());
        let Some(end) = end else {
            return Err(self.malformed("the pickle ends in the middle of an opcode".into()));
        };
        let bytes = &self.data[self.pos..end];
        self.pos = end;
        Ok(bytes)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], PtError> {
        Ok(self.take(N)?.try_into().expect("N bytes"))
    }

    fn u32(&mut self) -> Result<u32, PtError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn string(&mut self, n: usize) -> Result<(), PtError> {
        let bytes = self.take(n)?;
        let s = std::str::from_utf8(bytes)
            .map_err(|_| self.malformed("a string that is not UTF-8".into()))?;
        self.stack.push(Value::Str(s.to_string()));
        Ok(())
    }

    /// A `\n`-terminated line (the arguments of GLOBAL).
    fn line(&mut self) -> Result<String, PtError> {
        let rest = &self.data[self.pos..];
        let n = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or_else(|| self.malformed("GLOBAL without a newline".into()))?;
        let line = std::str::from_utf8(&rest[..n])
            .map_err(|_| self.malformed("GLOBAL with a name that is not UTF-8".into()))?;
        self.pos += n + 1;
        Ok(line.to_string())
    }

    fn pop(&mut self) -> Result<Value, PtError> {
        if self
            .marks
            .last()
            .is_some_and(|&mark| mark >= self.stack.len())
        {
            return Err(self.malformed("an opcode pops past a MARK".into()));
        }
        self.stack
            .pop()
            .ok_or_else(|| self.malformed("an opcode pops an empty stack".into()))
    }

    fn pop_mark(&mut self) -> Result<Vec<Value>, PtError> {
        let mark = self
            .marks
            .pop()
            .ok_or_else(|| self.malformed("no MARK to pop to".into()))?;
        Ok(self.stack.split_off(mark))
    }

    fn put(&mut self, i: usize) -> Result<(), PtError> {
        let top = self.stack.last().cloned();
        let top = top.ok_or_else(|| self.malformed("memoizing an empty stack".into()))?;
        self.memo.insert(i, top);
        Ok(())
    }

    fn get(&mut self, i: usize) -> Result<(), PtError> {
        let value = self.memo.get(&i).cloned();
        let value = value.ok_or_else(|| self.malformed(format!("memo {i} is empty")))?;
        self.stack.push(value);
        Ok(())
    }

    fn top_dict(&self) -> Result<Rc<RefCell<Vec<(Value, Value)>>>, PtError> {
        match self.stack.last() {
            Some(Value::Dict(dict)) => Ok(dict.clone()),
            other => Err(self.malformed(format!(
                "setting an item on {}",
                other.map_or("nothing", Value::kind)
            ))),
        }
    }

    fn top_list(&self) -> Result<Rc<RefCell<Vec<Value>>>, PtError> {
        match self.stack.last() {
            Some(Value::List(list)) => Ok(list.clone()),
            other => Err(self.malformed(format!(
                "appending to {}",
                other.map_or("nothing", Value::kind)
            ))),
        }
    }

    /// REDUCE / NEWOBJ: `callable(*args)` for the allowed globals.
    fn call(&self, callable: Value, args: Value) -> Result<Value, PtError> {
        let Value::Tuple(args) = args else {
            return Err(self.malformed(format!("call arguments are {}", args.kind())));
        };
        match callable {
            Value::Global(Global::OrderedDict) if args.is_empty() => Ok(Value::Dict(Rc::default())),
            Value::Global(Global::RebuildTensor) => {
                let (Some(Value::Storage { dtype, key }), Some(offset), Some(shape), Some(stride)) = (
                    args.first(),
                    args.get(1).and_then(Value::usize),
                    args.get(2).and_then(Value::usizes),
                    args.get(3).and_then(Value::usizes),
                ) else {
                    return Err(self.malformed("_rebuild_tensor with unexpected arguments".into()));
                };
                if shape.len() != stride.len() {
                    return Err(self.malformed(format!("size {shape:?} with stride {stride:?}")));
                }
                Ok(Value::Tensor(View {
                    dtype: dtype.clone(),
                    storage_key: key.clone(),
                    offset,
                    shape,
                    stride,
                }))
            }
            Value::Global(Global::RebuildParameter) => match args.into_iter().next() {
                Some(tensor @ Value::Tensor(_)) => Ok(tensor),
                _ => Err(self.malformed("_rebuild_parameter without a tensor".into())),
            },
            other => Err(self.malformed(format!("cannot call {other:?}"))),
        }
    }

    /// BINPERSID: `("storage", storage type, key, location, numel)` names a storage entry.
    fn storage(&self, pid: Value) -> Result<Value, PtError> {
        if let Value::Tuple(items) = &pid {
            if let [
                Value::Str(tag),
                Value::Global(Global::StorageType(dtype)),
                Value::Str(key),
                ..,
            ] = items.as_slice()
            {
                if tag == "storage" {
                    return Ok(Value::Storage {
                        dtype: dtype.clone(),
                        key: key.clone(),
                    });
                }
            }
        }
        Err(self.malformed(format!("unexpected persistent id {pid:?}")))
    }
}

/// LONG1's little-endian two's-complement integer, if it fits in an i64.
fn long(bytes: &[u8]) -> Option<i64> {
    if bytes.len() > 8 {
        return None;
    }
    let fill = if bytes.last().is_some_and(|b| b & 0x80 != 0) {
        0xff
    } else {
        0
    };
    let mut full = [fill; 8];
    full[..bytes.len()].copy_from_slice(bytes);
    Some(i64::from_le_bytes(full))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path() -> &'static Path {
        Path::new("test.pt")
    }

    /// `BINUNICODE s`
    fn s(text: &str) -> Vec<u8> {
        let mut out = vec![op::BINUNICODE];
        out.extend((text.len() as u32).to_le_bytes());
        out.extend(text.as_bytes());
        out
    }

    fn global(module: &str, name: &str) -> Vec<u8> {
        format!("c{module}\n{name}\n").into_bytes()
    }

    fn cat(parts: &[&[u8]]) -> Vec<u8> {
        parts.concat()
    }

    /// The pickle torch writes for `{"w": <f32 tensor [2, 3], stride (1, 2), offset 1>}`.
    fn state_dict_pickle() -> Vec<u8> {
        cat(&[
            &[op::PROTO, 2, op::EMPTY_DICT, op::BINPUT, 0, op::MARK],
            &s("w"),
            &global("torch._utils", "_rebuild_tensor_v2"),
            &[op::MARK, op::MARK],
            &s("storage"),
            &global("torch", "FloatStorage"),
            &s("0"),
            &s("cpu"),
            &[op::BININT1, 7, op::TUPLE, op::BINPERSID],
            &[op::BININT1, 1, op::BININT1, 2, op::BININT1, 3, op::TUPLE2],
            &[op::BININT1, 1, op::BININT1, 2, op::TUPLE2, op::NEWFALSE],
            &global("collections", "OrderedDict"),
            &[op::EMPTY_TUPLE, op::REDUCE, op::TUPLE, op::REDUCE],
            &s("step"),
            &[op::BININT1, 9, op::SETITEMS, op::STOP],
        ])
    }

    fn flat(value: Value) -> Vec<(String, View)> {
        let Value::Dict(dict) = value else {
            panic!("not a dict: {value:?}")
        };
        let mut out = Vec::new();
        flatten(path(), &dict.borrow(), "", 0, &mut out).unwrap();
        out
    }

    #[test]
    fn hand_written_state_dict_gives_a_strided_view() {
        let views = flat(unpickle(path(), &state_dict_pickle()).unwrap());
        let want = View {
            dtype: Dtype::F32,
            storage_key: "0".into(),
            offset: 1,
            shape: vec![2, 3],
            stride: vec![1, 2],
        };
        assert_eq!(
            views,
            vec![("w".to_string(), want)],
            "the int `step` is skipped"
        );
    }

    #[test]
    fn gather_honours_offset_and_stride() {
        let storage: Vec<u8> = (0..8).flat_map(|i| (i as f32).to_le_bytes()).collect();
        let view = View {
            dtype: Dtype::F32,
            storage_key: "0".into(),
            offset: 1,
            shape: vec![2, 3],
            stride: vec![1, 2],
        };
        assert_eq!(view.last_element(), Some(6));
        // element [i, j] = storage[1 + i + 2 j]
        assert_eq!(view.gather(&storage), vec![1.0, 3.0, 5.0, 2.0, 4.0, 6.0]);
        let broadcast = View {
            shape: vec![2, 2],
            stride: vec![0, 1],
            offset: 4,
            ..view
        };
        assert_eq!(broadcast.gather(&storage), vec![4.0, 5.0, 4.0, 5.0]);
    }

    #[test]
    fn half_precision_and_f64_decode_to_f32() {
        let f16 = half::f16::from_f32(-1.5).to_le_bytes();
        let bf16 = half::bf16::from_f32(3.0e38).to_le_bytes();
        assert_eq!(Dtype::F16.decode(&f16, 0), -1.5);
        assert_eq!(
            Dtype::Bf16.decode(&bf16, 0),
            half::bf16::from_f32(3.0e38).to_f32()
        );
        assert_eq!(
            Dtype::F64.decode(&(1.0f64 / 3.0).to_le_bytes(), 0),
            1.0f32 / 3.0
        );
    }

    #[test]
    fn forbidden_globals_are_refused_where_they_are_named() {
        for (module, name) in [
            ("os", "system"),
            ("posix", "system"),
            ("builtins", "eval"),
            ("__builtin__", "exec"),
            ("subprocess", "Popen"),
            ("torch", "load"),
            ("torch._utils", "_rebuild_from_type_v2"),
        ] {
            // No REDUCE follows: naming the global is enough to stop.
            let by_global = cat(&[&[op::PROTO, 2], &global(module, name), &[op::STOP]]);
            let by_stack = cat(&[
                &[op::PROTO, 4],
                &s(module),
                &s(name),
                &[op::STACK_GLOBAL, op::STOP],
            ]);
            for pickle in [by_global, by_stack] {
                match unpickle(path(), &pickle) {
                    Err(e @ PtError::ForbiddenGlobal { .. }) => {
                        let message = e.to_string();
                        assert!(message.contains(&format!("`{module}.{name}`")), "{message}");
                        assert!(
                            message.contains("refuses to execute pickled code"),
                            "{message}"
                        );
                    }
                    other => panic!("{module}.{name}: expected ForbiddenGlobal, got {other:?}"),
                }
            }
        }
    }

    #[test]
    fn unknown_opcode_names_the_byte_and_offset() {
        // INST (protocol 0 object creation) is not among the opcodes torch emits.
        let e = unpickle(path(), b"\x80\x02i").unwrap_err();
        assert_eq!(
            e.to_string(),
            "test.pt: data.pkl: unknown pickle opcode 0x69 ('i') at byte 2"
        );
    }

    #[test]
    fn integers_decode_like_python() {
        let cases: [(&[u8], i64); 8] = [
            (b"J\xfb\xff\xff\xff", -5),
            (b"K\xc8", 200),
            (b"M\xff\xff", 65535),
            (b"\x8a\x00", 0),
            (b"\x8a\x01\xff", -1),
            (b"\x8a\x03\x00\x80\x00", 32768),
            (b"\x8a\x05\x00\x00\x00\x00\x01", 1 << 32),
            (b"\x8a\x08\xff\xff\xff\xff\xff\xff\xff\x7f", i64::MAX),
        ];
        for (bytes, want) in cases {
            let value = unpickle(path(), &cat(&[bytes, b"."])).unwrap();
            assert!(
                matches!(value, Value::Int(i) if i == want),
                "{bytes:?}: {value:?}"
            );
        }
        let too_big = unpickle(path(), b"\x8a\x09\x00\x00\x00\x00\x00\x00\x00\x00\x01.");
        assert!(
            matches!(too_big, Err(PtError::Pickle { .. })),
            "{too_big:?}"
        );
    }

    #[test]
    fn memo_hands_out_the_same_dict_that_later_opcodes_fill() {
        // top = {}; inner = {}; top["a"] = inner; inner["b"] = t  (filled after it was stored)
        let pickle = cat(&[
            &[op::EMPTY_DICT, op::BINPUT, 0],
            &s("a"),
            &[op::EMPTY_DICT, op::BINPUT, 1, op::SETITEM, op::BINGET, 1],
            &s("b"),
            &global("torch._utils", "_rebuild_tensor_v2"),
            &[op::MARK, op::MARK],
            &s("storage"),
            &global("torch", "HalfStorage"),
            &s("3"),
            &s("cpu"),
            &[op::BININT1, 1, op::TUPLE, op::BINPERSID],
            &[
                op::BININT1,
                0,
                op::EMPTY_TUPLE,
                op::EMPTY_TUPLE,
                op::TUPLE,
                op::REDUCE,
            ],
            &[op::SETITEM, op::POP, op::STOP],
        ]);
        let views = flat(unpickle(path(), &pickle).unwrap());
        assert_eq!(views.len(), 1);
        assert_eq!(views[0].0, "a.b");
        assert_eq!(views[0].1.dtype, Dtype::F16);
        assert_eq!(views[0].1.shape, Vec::<usize>::new(), "a 0-d tensor");
    }

    #[test]
    fn a_dict_that_contains_itself_is_an_error_not_a_hang() {
        let pickle = cat(&[
            &[op::EMPTY_DICT, op::BINPUT, 0],
            &s("me"),
            &[op::BINGET, 0, op::SETITEM, op::STOP],
        ]);
        let Value::Dict(dict) = unpickle(path(), &pickle).unwrap() else {
            panic!()
        };
        let e = flatten(path(), &dict.borrow(), "", 0, &mut Vec::new()).unwrap_err();
        assert!(e.to_string().contains("nested deeper than 32"), "{e}");
        dict.borrow_mut().clear(); // break the cycle
    }

    #[test]
    fn every_truncation_of_a_pickle_is_an_error_not_a_panic() {
        let pickle = state_dict_pickle();
        for n in 0..pickle.len() {
            assert!(unpickle(path(), &pickle[..n]).is_err(), "cut at {n}");
        }
    }

    #[test]
    fn malformed_stacks_are_errors() {
        for bad in [
            &b"."[..],                                 // STOP on an empty stack
            b"(.",                                     // STOP right after MARK
            b"K\x01K\x02s.",                           // SETITEM on an int
            b"}(K\x01u.",                              // SETITEMS with an odd count
            b"h\x05.",                                 // empty memo slot
            b"\x85.",                                  // TUPLE1 on an empty stack
            b"t.",                                     // TUPLE without MARK
            b"}q\x00Q.",                               // a persistent id that is not a storage
            b"ccollections\nOrderedDict\nK\x01\x85R.", // OrderedDict with arguments
        ] {
            let result = unpickle(path(), bad);
            assert!(
                matches!(result, Err(PtError::Pickle { .. })),
                "{bad:?}: {result:?}"
            );
        }
    }
}
