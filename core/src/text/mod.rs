//! Text side: tokenizers (HF `tokenizers`, loaded from `tokenizer.json`) and text encoders whose
//! parameter paths equal transformers' keys. The CLIP text model here serves both the bundled
//! Shapes model and SD3's CLIP-L / bigG encoders; T5 is SD3's and FLUX.1's long encoder; Qwen3 is
//! FLUX.2-klein's.

pub mod clip;
pub mod qwen3;
pub mod t5;
pub mod tokenizer;

/// Errors of the text side; each names the file or prompt at fault.
#[derive(Debug, thiserror::Error)]
pub enum TextError {
    #[error("{path}: cannot read tokenizer ({message})")]
    Tokenizer { path: String, message: String },
    #[error(
        "prompt {prompt:?} is {tokens} tokens with start/end markers; the text encoder takes at most {max}"
    )]
    TooLong {
        prompt: String,
        tokens: usize,
        max: usize,
    },
    #[error("tokenizer: {0}")]
    Encode(String),
}
