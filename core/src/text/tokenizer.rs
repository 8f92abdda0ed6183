//! Prompt tokenization through the HF `tokenizers` crate: any `tokenizer.json` loads, a CLIP
//! folder holding only `vocab.json` + `merges.txt` (as SD3 / FLUX.1 repositories do) is built
//! exactly as transformers' `CLIPTokenizer` builds it, and the bundled Shapes model's word-level
//! tokenizer is built here from the world's vocabulary.
//!
//! Sequences are `[start] tokens [end] [pad]…` padded to the encoder's context length. For the
//! bundled model a prompt longer than that is an error; a diffusers folder's tokenizer truncates
//! as diffusers' pipelines ask (`truncation=True`), with a warning.

use std::path::Path;

use tokenizers::models::ModelWrapper;
use tokenizers::normalizers::utils::Lowercase;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::whitespace::Whitespace;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, Tokenizer, TruncationParams};

use super::TextError;

/// Special tokens of the bundled tokenizer (CLIP's names; the end token doubles as the pooling
/// position, as in CLIP).
pub const PAD: &str = "<pad>";
pub const UNK: &str = "<unk>";
pub const START: &str = "<|startoftext|>";
pub const END: &str = "<|endoftext|>";

/// A tokenizer with the context length of the encoder it feeds.
#[derive(Clone)]
pub struct PromptTokenizer {
    pub tokenizer: Tokenizer,
    pub max_length: usize,
    pub pad_id: u32,
    /// Cut long prompts to `max_length` (keeping the end marker) instead of failing.
    pub truncate: bool,
}

/// Token ids and attention masks (`true` = a real token, `false` = padding).
#[derive(Clone, Debug, PartialEq)]
pub struct Encoded {
    pub ids: Vec<Vec<u32>>,
    pub mask: Vec<Vec<bool>>,
}

impl PromptTokenizer {
    /// Loads `tokenizer.json`; `pad` names the padding token (CLIP-L pads with its end token).
    pub fn from_file(path: &Path, max_length: usize, pad: &str) -> Result<Self, TextError> {
        let tokenizer = Tokenizer::from_file(path).map_err(|e| TextError::Tokenizer {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        Self::with_pad(tokenizer, &path.display().to_string(), max_length, pad)
    }

    /// A `tokenizer.json` already in memory; `name` is what errors call it.
    pub fn from_bytes(
        name: &str,
        json: &[u8],
        max_length: usize,
        pad: &str,
    ) -> Result<Self, TextError> {
        let tokenizer = Tokenizer::from_bytes(json).map_err(|e| TextError::Tokenizer {
            path: name.to_string(),
            message: e.to_string(),
        })?;
        Self::with_pad(tokenizer, name, max_length, pad)
    }

    fn with_pad(
        tokenizer: Tokenizer,
        name: &str,
        max_length: usize,
        pad: &str,
    ) -> Result<Self, TextError> {
        let err = |message: String| TextError::Tokenizer {
            path: name.to_string(),
            message,
        };
        let pad_id = tokenizer
            .token_to_id(pad)
            .ok_or_else(|| err(format!("no padding token `{pad}` in the vocabulary")))?;
        Ok(Self {
            tokenizer,
            max_length,
            pad_id,
            truncate: false,
        })
    }

    /// Loads a transformers tokenizer folder as a diffusers pipeline calls it
    /// (`padding="max_length", truncation=True`): `tokenizer.json` if present, else a CLIP BPE
    /// from `vocab.json` + `merges.txt`; the padding token from `tokenizer_config.json` (or
    /// `special_tokens_map.json`).
    pub fn from_folder(dir: &Path, max_length: usize) -> Result<Self, TextError> {
        let err = |path: &Path, message: String| TextError::Tokenizer {
            path: path.display().to_string(),
            message,
        };
        let json = dir.join("tokenizer.json");
        let (vocab, merges) = (dir.join("vocab.json"), dir.join("merges.txt"));
        let tokenizer = if json.exists() {
            let mut tokenizer =
                Tokenizer::from_file(&json).map_err(|e| err(&json, e.to_string()))?;
            // A saved tokenizer.json may carry the padding / truncation of its last call;
            // transformers sets both per call, and so does `encode_with_mask`.
            tokenizer.with_padding(None);
            tokenizer
                .with_truncation(None)
                .map_err(|e| err(&json, e.to_string()))?;
            tokenizer
        } else if vocab.exists() && merges.exists() {
            clip_bpe(&vocab, &merges)?
        } else {
            return Err(err(
                dir,
                "no tokenizer.json, and no vocab.json + merges.txt (a sentencepiece-only folder must be re-saved with a fast tokenizer)".into(),
            ));
        };
        // transformers registers every configured special token as an added token, so it is
        // matched whole in prompt text (SD3's bigG tokenizer pads with "!": a "!" in a prompt
        // becomes that token).
        let mut tokenizer = tokenizer;
        for key in ["bos_token", "eos_token", "unk_token", "pad_token"] {
            if let Some(token) = special_token(dir, key)? {
                tokenizer.add_special_tokens(&[AddedToken::from(token, true)]);
            }
        }
        let pad = special_token(dir, "pad_token")?.ok_or_else(|| {
            err(
                dir,
                "no pad_token in tokenizer_config.json or special_tokens_map.json".into(),
            )
        })?;
        let pad_id = tokenizer.token_to_id(&pad).ok_or_else(|| {
            err(
                dir,
                format!("the padding token `{pad}` is not in the vocabulary"),
            )
        })?;
        Ok(Self {
            tokenizer,
            max_length,
            pad_id,
            truncate: true,
        })
    }

    /// Token ids of each prompt, with start/end markers, padded to `max_length`.
    pub fn encode(&self, prompts: &[String]) -> Result<Vec<Vec<u32>>, TextError> {
        Ok(self.encode_with_mask(prompts)?.ids)
    }

    /// Ids and attention masks of each prompt, padded to `max_length`. Truncation keeps the
    /// special tokens the post-processor adds, as HF's `truncation=True` does.
    pub fn encode_with_mask(&self, prompts: &[String]) -> Result<Encoded, TextError> {
        let mut encoded = Encoded {
            ids: Vec::with_capacity(prompts.len()),
            mask: Vec::with_capacity(prompts.len()),
        };
        for prompt in prompts {
            let full = self
                .tokenizer
                .encode(prompt.as_str(), true)
                .map_err(|e| TextError::Encode(e.to_string()))?;
            let mut ids = full.get_ids().to_vec();
            if ids.len() > self.max_length {
                if !self.truncate {
                    return Err(TextError::TooLong {
                        prompt: prompt.clone(),
                        tokens: ids.len(),
                        max: self.max_length,
                    });
                }
                tracing::warn!(
                    "prompt is {} tokens; the text encoder takes {}, the rest is cut off: {prompt:?}",
                    ids.len(),
                    self.max_length
                );
                ids = self.truncated(prompt)?;
            }
            let real = ids.len();
            ids.resize(self.max_length, self.pad_id);
            encoded.ids.push(ids);
            encoded
                .mask
                .push((0..self.max_length).map(|i| i < real).collect());
        }
        Ok(encoded)
    }

    /// The prompt cut to `max_length` tokens including the added special tokens.
    fn truncated(&self, prompt: &str) -> Result<Vec<u32>, TextError> {
        let mut tokenizer = self.tokenizer.clone();
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: self.max_length,
                ..Default::default()
            }))
            .map_err(|e| TextError::Encode(e.to_string()))?;
        let encoding = tokenizer
            .encode(prompt, true)
            .map_err(|e| TextError::Encode(e.to_string()))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Words of `prompt` the vocabulary does not know (they become the unknown token).
    pub fn unknown_words(&self, prompt: &str) -> Vec<String> {
        let Ok(encoding) = self.tokenizer.encode(prompt, false) else {
            return Vec::new();
        };
        let unk = self.tokenizer.token_to_id(UNK);
        encoding
            .get_ids()
            .iter()
            .zip(encoding.get_offsets())
            .filter(|(id, _)| Some(**id) == unk)
            .map(|(_, &(a, b))| prompt[a..b].to_string())
            .collect()
    }
}

/// A special token's text from `tokenizer_config.json` or `special_tokens_map.json` (a plain
/// string or an `AddedToken` object with `content`).
fn special_token(dir: &Path, key: &str) -> Result<Option<String>, TextError> {
    for file in ["tokenizer_config.json", "special_tokens_map.json"] {
        let path = dir.join(file);
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        let value: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| TextError::Tokenizer {
                path: path.display().to_string(),
                message: format!("not JSON: {e}"),
            })?;
        match &value[key] {
            serde_json::Value::String(s) => return Ok(Some(s.clone())),
            serde_json::Value::Object(o) => {
                if let Some(serde_json::Value::String(s)) = o.get("content") {
                    return Ok(Some(s.clone()));
                }
            }
            _ => {}
        }
    }
    Ok(None)
}

/// transformers' `CLIPTokenizer` pipeline over a `vocab.json` + `merges.txt` pair: NFC,
/// whitespace runs to one space, lower case; CLIP's split regex then byte-level; BPE with the
/// `</w>` end-of-word suffix; `<|startoftext|> … <|endoftext|>` around every prompt.
fn clip_bpe(vocab_path: &Path, merges_path: &Path) -> Result<Tokenizer, TextError> {
    let err = |path: &Path, message: String| TextError::Tokenizer {
        path: path.display().to_string(),
        message,
    };
    let read = |path: &Path| std::fs::read_to_string(path).map_err(|e| err(path, e.to_string()));
    let vocab: std::collections::BTreeMap<String, u32> =
        serde_json::from_str(&read(vocab_path)?)
            .map_err(|e| err(vocab_path, format!("not a vocabulary: {e}")))?;
    let merges: Vec<[String; 2]> = read(merges_path)?
        .lines()
        .filter(|line| !line.starts_with("#version") && !line.trim().is_empty())
        .map(|line| {
            let (a, b) = line
                .split_once(' ')
                .ok_or_else(|| err(merges_path, format!("not a merge: {line:?}")))?;
            Ok([a.to_string(), b.to_string()])
        })
        .collect::<Result<_, TextError>>()?;
    let id = |token: &str| {
        vocab
            .get(token)
            .copied()
            .ok_or_else(|| err(vocab_path, format!("no `{token}` token")))
    };
    let (start, end) = (id(START)?, id(END)?);
    let added = |token: &str, id: u32| {
        serde_json::json!({"id": id, "content": token, "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true})
    };
    let json = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [added(START, start), added(END, end)],
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "NFC"},
            {"type": "Replace", "pattern": {"Regex": "\\s+"}, "content": " "},
            {"type": "Lowercase"}]},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": CLIP_SPLIT}, "behavior": "Removed", "invert": true},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}]},
        "post_processor": {"type": "RobertaProcessing", "sep": [END, end], "cls": [START, start],
            "trim_offsets": false, "add_prefix_space": false},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": END, "continuing_subword_prefix": "",
            "end_of_word_suffix": "</w>", "fuse_unk": false, "byte_fallback": false,
            "ignore_merges": false, "vocab": vocab, "merges": merges},
    });
    json.to_string()
        .parse::<Tokenizer>()
        .map_err(|e| err(vocab_path, format!("cannot build the CLIP tokenizer: {e}")))
}

/// CLIP's pre-tokenisation pattern (transformers `CLIPTokenizer`).
const CLIP_SPLIT: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// A word-level tokenizer over `words`: lower-cased, split on whitespace and punctuation, digits
/// one by one (so `"37"` is `"`, `3`, `7`, `"`). Ids: pad 0, unknown 1, the words in order, then
/// start and end (end is the largest id, as in CLIP, so both of transformers' pooling rules pick
/// it).
pub fn word_level(words: &[String]) -> Result<Tokenizer, TextError> {
    let mut vocab = std::collections::BTreeMap::new();
    for token in [PAD, UNK]
        .iter()
        .map(|s| s.to_string())
        .chain(words.iter().cloned())
    {
        let next = vocab.len() as u32;
        vocab.entry(token).or_insert(next);
    }
    let start_id = vocab.len() as u32;
    vocab.insert(START.to_string(), start_id);
    vocab.insert(END.to_string(), start_id + 1);
    // The builder wants the crate's private hash-map type; its serde form is public.
    let model: ModelWrapper = serde_json::from_value(serde_json::json!({
        "type": "WordLevel",
        "vocab": vocab,
        "unk_token": UNK,
    }))
    .map_err(|e| TextError::Encode(e.to_string()))?;
    let mut tokenizer = Tokenizer::new(model);
    tokenizer.with_normalizer(Some(Lowercase));
    tokenizer.with_pre_tokenizer(Some(Sequence::new(vec![
        Whitespace {}.into(),
        Digits::new(true).into(),
    ])));
    let template = TemplateProcessing::builder()
        .try_single(format!("{START} $A {END}"))
        .map_err(|e| TextError::Encode(e.to_string()))?
        .special_tokens(vec![(START, start_id), (END, start_id + 1)])
        .build()
        .map_err(|e| TextError::Encode(e.to_string()))?;
    tokenizer.with_post_processor(Some(template));
    tokenizer.add_special_tokens(&[
        AddedToken::from(PAD, true),
        AddedToken::from(UNK, true),
        AddedToken::from(START, true),
        AddedToken::from(END, true),
    ]);
    Ok(tokenizer)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shapes_tokenizer(max_length: usize) -> PromptTokenizer {
        let words: Vec<String> = ["a", "photo", "of", "red", "circle", "the", "number", "\""]
            .iter()
            .map(|s| s.to_string())
            .chain((0..10).map(|d| d.to_string()))
            .collect();
        let tokenizer = word_level(&words).unwrap();
        // One folder per call: tests run in parallel and would read each other's half-written file.
        static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("pf-tok-{}-{call}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tokenizer.json");
        tokenizer.save(&path, false).unwrap();
        PromptTokenizer::from_file(&path, max_length, PAD).unwrap()
    }

    #[test]
    fn word_level_round_trips_through_tokenizer_json() {
        let t = shapes_tokenizer(12);
        let ids = t.encode(&["A photo of a RED circle".into()]).unwrap();
        // pad 0, unk 1, words 2.., start = 20, end = 21
        assert_eq!(ids[0], vec![20, 2, 3, 4, 2, 5, 6, 21, 0, 0, 0, 0]);
        let ids = t.encode(&["the number \"37\"".into()]).unwrap();
        assert_eq!(&ids[0][..8], &[20, 7, 8, 9, 13, 17, 9, 21]);
        assert_eq!(t.encode(&[String::new()]).unwrap()[0][..3], [20, 21, 0]);
        assert_eq!(t.unknown_words("a blue circle"), vec!["blue".to_string()]);
    }

    #[test]
    fn too_long_prompts_are_an_error() {
        let t = shapes_tokenizer(6);
        let err = t
            .encode(&["a photo of a red circle".into()])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("8 tokens") && err.contains("at most 6"),
            "{err}"
        );
    }
}
