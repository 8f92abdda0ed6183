//! Initialisation of fresh models, stated as a rule on diffusers / transformers key names so the
//! loader that reads a checkpoint also builds an untrained model (see [`Weights::initializer`]).
//!
//! | key                                                  | values                          |
//! |------------------------------------------------------|---------------------------------|
//! | `*.bias`, or any 1-D tensor named `*bias*`           | 0                               |
//! | other 1-D tensors (LayerNorm / RMSNorm scales)       | 1                               |
//! | AdaLN modulations (`*norm1.linear.weight`, `*norm1_context.linear.weight`, `norm_out.linear.weight`) and `proj_out.weight` | 0 (DiT's adaLN-Zero: every block starts as the identity) |
//! | `*embedding.weight`                                  | N(0, 0.02²)                     |
//! | other weights `[d_out, d_in, …]`                     | Xavier uniform ±√(6/(fan_in+fan_out)) |
//!
//! [`Weights::initializer`]: super::weights::Weights::initializer

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

/// Draws initial values key by key from one seeded stream (so a seed fixes the whole model).
pub struct Initializer {
    rng: ChaCha8Rng,
}

/// Modulation and output projections that DiT initialises to zero.
const ZERO_INIT_SUFFIXES: [&str; 4] = [
    "norm1.linear.weight",
    "norm1_context.linear.weight",
    "norm_out.linear.weight",
    "proj_out.weight",
];

impl Initializer {
    pub fn new(seed: u64) -> Self {
        Self {
            rng: ChaCha8Rng::seed_from_u64(seed),
        }
    }

    /// Initial values of parameter `key` with shape `shape` (row-major, checkpoint layout).
    pub fn values(&mut self, key: &str, shape: &[usize]) -> Vec<f32> {
        let count: usize = shape.iter().product();
        if shape.len() == 1 {
            let value = if key.ends_with("bias") { 0.0 } else { 1.0 };
            return vec![value; count];
        }
        if ZERO_INIT_SUFFIXES.iter().any(|s| key.ends_with(s)) {
            return vec![0.0; count];
        }
        if key.ends_with("embedding.weight") {
            let normal = Normal::new(0.0f32, 0.02).expect("valid std");
            return (0..count).map(|_| normal.sample(&mut self.rng)).collect();
        }
        let fan_out = shape[0];
        let fan_in: usize = shape[1..].iter().product();
        let bound = (6.0 / (fan_in + fan_out) as f32).sqrt();
        (0..count)
            .map(|_| self.rng.random_range(-bound..bound))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rule_follows_the_table() {
        let mut init = Initializer::new(0);
        assert!(init.values("a.bias", &[4]).iter().all(|&v| v == 0.0));
        assert!(
            init.values("a.norm_q.weight", &[4])
                .iter()
                .all(|&v| v == 1.0)
        );
        assert!(
            init.values("transformer_blocks.0.norm1.linear.weight", &[6, 2])
                .iter()
                .all(|&v| v == 0.0)
        );
        let w = init.values("a.to_q.weight", &[64, 32]);
        let bound = (6.0f32 / 96.0).sqrt();
        assert!(w.iter().all(|v| v.abs() <= bound));
        let mean_sq = w.iter().map(|v| v * v).sum::<f32>() / w.len() as f32;
        // uniform(−b, b) has variance b²/3
        assert!((mean_sq - bound * bound / 3.0).abs() < 0.1 * bound * bound);
        let e = init.values("token_embedding.weight", &[100, 100]);
        let std = (e.iter().map(|v| v * v).sum::<f32>() / e.len() as f32).sqrt();
        assert!((std - 0.02).abs() < 0.002, "{std}");
    }

    #[test]
    fn a_seed_fixes_the_values() {
        let a = Initializer::new(7).values("x.weight", &[8, 8]);
        let b = Initializer::new(7).values("x.weight", &[8, 8]);
        let c = Initializer::new(8).values("x.weight", &[8, 8]);
        assert_eq!(a, b);
        assert_ne!(a, c);
    }
}
