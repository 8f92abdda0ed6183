//! Few-step generators (issue 10): RTDMD's AC-DMD cold start and Flow-OPD's on-policy
//! distillation. This module holds their exact per-step objectives (ALGORITHMS.md §3.2, §5),
//! each tested against the formula; the training loops build on them.

pub mod acdmd;
pub mod objectives;
