//! The denoising network of a pipeline, whichever family it is.

use burn::module::Module;
use burn::tensor::Tensor;

use crate::lora::Linears;
use crate::model::flux1::Flux1Transformer;
use crate::model::flux2::Flux2Transformer;
use crate::model::layers::Linear;
use crate::model::sd3::Sd3Transformer;
use crate::sample::pipeline::{Conditioning, Denoiser};

/// SD3 / SD3.5 MMDiT (also the bundled Shapes model), FLUX.1 or FLUX.2.
#[derive(Module, Debug)]
pub enum Transformer {
    Sd3(Sd3Transformer),
    Flux1(Flux1Transformer),
    Flux2(Flux2Transformer),
}

impl Transformer {
    /// Channels of the latent the sampler works on: SD3's `in_channels`; FLUX.1's VAE latent
    /// (`in_channels / 4`, the transformer packs 2×2 patches itself); FLUX.2's patchified
    /// latent (`in_channels`).
    pub fn latent_channels(&self) -> usize {
        match self {
            Self::Sd3(t) => t.config.in_channels,
            Self::Flux1(t) => t.config.in_channels / 4,
            Self::Flux2(t) => t.config.in_channels,
        }
    }

    /// The SD3 transformer, if this is one.
    pub fn as_sd3(&self) -> Option<&Sd3Transformer> {
        match self {
            Self::Sd3(t) => Some(t),
            _ => None,
        }
    }

    /// Whether FLUX's guidance embedding is present (guidance-distilled models).
    pub fn guidance_embeds(&self) -> bool {
        match self {
            Self::Sd3(_) => false,
            Self::Flux1(t) => t.config.guidance_embeds,
            Self::Flux2(t) => t.config.guidance_embeds,
        }
    }

    /// Parameter count.
    pub fn parameters(&self) -> usize {
        self.num_params()
    }
}

impl Linears for Transformer {
    fn for_each_linear(&self, f: &mut dyn FnMut(&Linear)) {
        match self {
            Self::Sd3(t) => t.for_each_linear(f),
            Self::Flux1(t) => t.for_each_linear(f),
            Self::Flux2(t) => t.for_each_linear(f),
        }
    }

    fn for_each_linear_mut(&mut self, f: &mut dyn FnMut(&mut Linear)) {
        match self {
            Self::Sd3(t) => t.for_each_linear_mut(f),
            Self::Flux1(t) => t.for_each_linear_mut(f),
            Self::Flux2(t) => t.for_each_linear_mut(f),
        }
    }
}

impl Denoiser for Transformer {
    fn velocity(&self, x: Tensor<4>, sigma: f64, cond: &Conditioning) -> Tensor<4> {
        match self {
            Self::Sd3(t) => t.velocity(x, sigma, cond),
            Self::Flux1(t) => t.velocity(x, sigma, cond),
            Self::Flux2(t) => t.velocity(x, sigma, cond),
        }
    }
}
