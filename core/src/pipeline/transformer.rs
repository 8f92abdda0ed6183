//! The denoising network of a pipeline, whichever family it is.

use burn::module::Module;
use burn::tensor::{Int, Tensor};

use crate::lora::Linears;
use crate::model::flex::activations;
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

    /// `cond` with `guidance_scale` as its embedded scale where this model takes one
    /// (guidance-distilled FLUX); other models ignore the field.
    pub fn with_embedded_guidance(
        &self,
        mut cond: Conditioning,
        guidance_scale: f64,
    ) -> Conditioning {
        if self.guidance_embeds() {
            cond.guidance = Some(guidance_scale);
        }
        cond
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

impl Transformer {
    fn forward(&self, x: Tensor<4>, sigma: f64, cond: &Conditioning) -> Tensor<4> {
        match self {
            Self::Sd3(t) => t.velocity(x, sigma, cond),
            Self::Flux1(t) => t.velocity(x, sigma, cond),
            Self::Flux2(t) => t.velocity(x, sigma, cond),
        }
    }

    /// The velocity with the batch cut into `chunks` parts whose forwards run on their own
    /// threads (joined in order). On Flex most ops other than the matmuls use one core, so a
    /// batch forward keeps about 1.4 of 2 cores busy; two halves keep about 1.7.
    pub fn velocity_in_chunks(
        &self,
        x: Tensor<4>,
        sigma: f64,
        cond: &Conditioning,
        chunks: usize,
    ) -> Tensor<4> {
        let batch = x.dims()[0];
        let chunks = chunks.clamp(1, batch.max(1));
        if chunks == 1 {
            return self.forward(x, sigma, cond);
        }
        let device = x.device();
        let parts: Vec<(Tensor<4>, Conditioning)> = (0..chunks)
            .map(|k| {
                let (lo, hi) = (k * batch / chunks, (k + 1) * batch / chunks);
                let rows = Tensor::<1, Int>::arange(lo as i64..hi as i64, &device);
                // x rows [lo, hi): [hi − lo, c, h, w]; the conditioning's same rows.
                (x.clone().narrow(0, lo, hi - lo), cond.select(&rows))
            })
            .collect();
        let outputs: Vec<Tensor<4>> = std::thread::scope(|scope| {
            let mut parts = parts.into_iter();
            let (x0, c0) = parts.next().expect("two chunks or more");
            let others: Vec<_> = parts
                .map(|(x, c)| scope.spawn(move || self.forward(x, sigma, &c)))
                .collect();
            let mut outputs = vec![self.forward(x0, sigma, &c0)];
            outputs.extend(
                others
                    .into_iter()
                    .map(|h| h.join().expect("velocity thread")),
            );
            outputs
        });
        Tensor::cat(outputs, 0)
    }
}

/// How many threads a forward of `x` runs on: the cores (at most the batch) for an untracked f32
/// tensor on Flex in a native build; 1 otherwise (GPU backends, autodiff, the browser).
fn cpu_chunks(x: &Tensor<4>) -> usize {
    if cfg!(target_arch = "wasm32") || x.is_autodiff() || !activations::applies(x) {
        return 1;
    }
    // Asked once: on Linux it reads the cgroup quota files, too slow for every forward.
    static CORES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    let cores = *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    cores.min(x.dims()[0])
}

impl Denoiser for Transformer {
    fn velocity(&self, x: Tensor<4>, sigma: f64, cond: &Conditioning) -> Tensor<4> {
        let chunks = cpu_chunks(&x);
        self.velocity_in_chunks(x, sigma, cond, chunks)
    }
}
