//! One LoRA adapter on one linear: the side path `s·w·(x·A)·B`.

use burn::module::{Module, Param};
use burn::tensor::Tensor;
use burn::tensor::module::linear;

/// A low-rank side path on a [`Linear`](crate::model::layers::Linear): `y += s·w·(x·A)·B` with
/// `s` = α/r (or α/√r for rsLoRA) and `w` the user's weight. The product `A·B` is never formed in
/// the forward, so training costs `O(r·(d_in + d_out))` per token instead of a `d_in×d_out`
/// temporary per step.
#[derive(Module, Debug)]
pub struct LoraAdapter {
    /// PEFT `lora_A.weight`ᵀ: `[d_in, r]`.
    pub a: Param<Tensor<2>>,
    /// PEFT `lora_B.weight`ᵀ: `[r, d_out]`.
    pub b: Param<Tensor<2>>,
    #[module(skip)]
    pub name: String,
    /// `lora_alpha` as configured (kept for saving).
    #[module(skip)]
    pub alpha: f64,
    /// α/r, or α/√r with rsLoRA.
    #[module(skip)]
    pub scaling: f64,
    /// The user's multiplier (`--lora DIR:weight`); PEFT's `set_adapters(weights=…)`.
    #[module(skip)]
    pub weight: f64,
    /// Switched off at run time (the KL reference of GRPO is the model with its adapter off).
    #[module(skip)]
    pub enabled: bool,
    /// Folded into the base weight: the side path is skipped until unmerged.
    #[module(skip)]
    pub merged: bool,
}

impl LoraAdapter {
    pub fn rank(&self) -> usize {
        self.a.val().dims()[1]
    }

    /// The factor the side path is multiplied by in the forward.
    pub fn effective_scale(&self) -> f64 {
        self.scaling * self.weight
    }

    /// Whether the forward adds this adapter's side path.
    pub fn is_active(&self) -> bool {
        self.enabled && !self.merged && self.weight != 0.0
    }

    /// The side path alone.
    ///
    /// # Shapes
    /// - `x`: `[..., d_in]` → `[..., d_out]`
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        // [..., d_in] → [..., r]: the scale goes on the narrow tensor.
        let down = linear(x, self.a.val(), None).mul_scalar(self.effective_scale());
        linear(down, self.b.val(), None)
    }

    /// `s·w·A·B`: what merging adds to the base weight (stored `[d_in, d_out]`).
    pub fn delta(&self) -> Tensor<2> {
        self.a
            .val()
            .matmul(self.b.val())
            .mul_scalar(self.effective_scale())
    }
}
