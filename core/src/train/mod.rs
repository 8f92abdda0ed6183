//! Training: rectified-flow pretraining of the bundled model and Flow-GRPO on LoRA adapters.

pub mod grpo;
pub mod pretrain;
