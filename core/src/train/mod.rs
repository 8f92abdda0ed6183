//! Training: rectified-flow pretraining of the bundled model (and, next, GRPO and its family).

pub mod pretrain;
