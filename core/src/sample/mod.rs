//! Sampling: noise schedules (pure f64) and sampler steps that also return what RL needs.

pub mod pipeline;
pub mod schedule;
pub mod select;
pub mod step;
