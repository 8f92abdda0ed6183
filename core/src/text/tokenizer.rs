//! Prompt tokenization through the HF `tokenizers` crate: any `tokenizer.json` loads, and the
//! bundled Shapes model's word-level tokenizer is built here from the world's vocabulary.
//!
//! Sequences are `[start] tokens [end] [pad]…` padded to the encoder's context length. A prompt
//! longer than that is an error, never silently truncated.

use std::path::Path;

use tokenizers::models::ModelWrapper;
use tokenizers::normalizers::utils::Lowercase;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::whitespace::Whitespace;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, Tokenizer};

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
}

impl PromptTokenizer {
    /// Loads `tokenizer.json`; `pad` names the padding token (CLIP-L pads with its end token).
    pub fn from_file(path: &Path, max_length: usize, pad: &str) -> Result<Self, TextError> {
        let err = |message: String| TextError::Tokenizer {
            path: path.display().to_string(),
            message,
        };
        let tokenizer = Tokenizer::from_file(path).map_err(|e| err(e.to_string()))?;
        let pad_id = tokenizer
            .token_to_id(pad)
            .ok_or_else(|| err(format!("no padding token `{pad}` in the vocabulary")))?;
        Ok(Self {
            tokenizer,
            max_length,
            pad_id,
        })
    }

    /// Token ids of each prompt, with start/end markers, padded to `max_length`.
    pub fn encode(&self, prompts: &[String]) -> Result<Vec<Vec<u32>>, TextError> {
        prompts
            .iter()
            .map(|prompt| {
                let encoding = self
                    .tokenizer
                    .encode(prompt.as_str(), true)
                    .map_err(|e| TextError::Encode(e.to_string()))?;
                let mut ids = encoding.get_ids().to_vec();
                if ids.len() > self.max_length {
                    return Err(TextError::TooLong {
                        prompt: prompt.clone(),
                        tokens: ids.len(),
                        max: self.max_length,
                    });
                }
                ids.resize(self.max_length, self.pad_id);
                Ok(ids)
            })
            .collect()
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
        let dir = std::env::temp_dir().join(format!("pf-tok-{}", std::process::id()));
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
