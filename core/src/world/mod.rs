//! The Shapes world: a synthetic text-to-image task small enough to pretrain and RL-train on a
//! CPU, whose rewards are exact (our GenEval). Scenes, an anti-aliased renderer, and (next) GenEval
//! prompts and the detector that scores images.

pub mod compose;
pub mod detect;
pub mod digits;
pub mod geneval;
pub mod prompt;
pub mod prompt_sets;
pub mod render;
pub mod scene;
