//! The Shapes world: a synthetic text-to-image task small enough to pretrain and RL-train on a
//! CPU, whose rewards are exact (our GenEval): scenes and their anti-aliased renderer, GenEval-
//! format prompts and the committed prompt sets, scenes composed to satisfy a prompt, the
//! detector and GenEval / Flow-GRPO scoring with its dense (soft) counterpart, and the digits (OCR) task.

pub mod compose;
pub mod dense;
pub mod detect;
pub mod digits;
pub mod geneval;
pub mod prompt;
pub mod prompt_sets;
pub mod render;
pub mod scene;
