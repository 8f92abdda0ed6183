//! The KL autoencoder of SD3 / FLUX.1 (`AutoencoderKL`, 16 latent channels) and FLUX.2
//! (`AutoencoderKLFlux2`, 32 channels, quant convs, BatchNorm statistics over 2×2-patchified
//! latents). Mirrors diffusers `models/autoencoders/vae.py`: GroupNorm eps 1e-6, SiLU, asymmetric
//! (0, 1, 0, 1) padding before each stride-2 downsampling conv, nearest ×2 upsampling then a conv,
//! single-head mid-block attention.

use std::path::Path;

use burn::module::{Module, Param};
use burn::tensor::module::conv2d;
use burn::tensor::ops::{ConvOptions, PadMode};
use burn::tensor::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::layers::{Linear, sdpa, silu};
use super::weights::{LoadError, Weights};

/// The fields of diffusers' `AutoencoderKL` / `AutoencoderKLFlux2` configs that shape the model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VaeConfig {
    #[serde(rename = "_class_name", default)]
    pub class_name: String,
    pub in_channels: usize,
    pub out_channels: usize,
    pub latent_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub norm_num_groups: usize,
    #[serde(default = "yes")]
    pub mid_block_add_attention: bool,
    #[serde(default = "yes")]
    pub use_quant_conv: bool,
    #[serde(default = "yes")]
    pub use_post_quant_conv: bool,
    #[serde(default)]
    pub scaling_factor: Option<f64>,
    #[serde(default)]
    pub shift_factor: Option<f64>,
    /// FLUX.2: eps of the latent BatchNorm statistics.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_norm_eps: Option<f64>,
    /// diffusers' level types, one per entry of `block_out_channels`. diffusers builds one level
    /// per entry (a single level when absent), so [`Vae::save_dir`] always writes them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub down_block_types: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub up_block_types: Option<Vec<String>>,
}

fn yes() -> bool {
    true
}

const GROUP_NORM_EPS: f64 = 1e-6;

const DOWN_BLOCK: &str = "DownEncoderBlock2D";
const UP_BLOCK: &str = "UpDecoderBlock2D";

impl VaeConfig {
    /// The config with its level types spelled out, as diffusers needs them.
    pub fn with_block_types(mut self) -> Self {
        let levels = self.block_out_channels.len();
        self.down_block_types = Some(vec![DOWN_BLOCK.into(); levels]);
        self.up_block_types = Some(vec![UP_BLOCK.into(); levels]);
        self
    }

    pub fn is_flux2(&self) -> bool {
        self.class_name == "AutoencoderKLFlux2"
    }

    /// How many pixels a latent cell spans a side: 2 per stride-2 level.
    pub fn downscale(&self) -> usize {
        1 << self.block_out_channels.len().saturating_sub(1)
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.block_out_channels.is_empty() {
            return Err("block_out_channels is empty".into());
        }
        if let Some(c) = self
            .block_out_channels
            .iter()
            .find(|c| *c % self.norm_num_groups != 0)
        {
            return Err(format!(
                "block channel count {c} is not divisible by norm_num_groups {}",
                self.norm_num_groups
            ));
        }
        for (field, types, expected) in [
            ("down_block_types", &self.down_block_types, DOWN_BLOCK),
            ("up_block_types", &self.up_block_types, UP_BLOCK),
        ] {
            let Some(types) = types else { continue };
            if types.len() != self.block_out_channels.len() {
                return Err(format!(
                    "{field} has {} entries but block_out_channels has {}",
                    types.len(),
                    self.block_out_channels.len()
                ));
            }
            if let Some(other) = types.iter().find(|t| *t != expected) {
                return Err(format!(
                    "{field}: `{other}` is not supported (only `{expected}`)"
                ));
            }
        }
        Ok(())
    }
}

/// A 2-D convolution with PyTorch's weight layout `[out, in, k, k]`.
#[derive(Module, Debug)]
pub struct Conv2d {
    pub weight: Param<Tensor<4>>,
    pub bias: Param<Tensor<1>>,
    #[module(skip)]
    stride: usize,
    #[module(skip)]
    padding: usize,
}

impl Conv2d {
    fn load(
        w: &mut Weights,
        prefix: &str,
        c_in: usize,
        c_out: usize,
        k: usize,
        stride: usize,
        padding: usize,
        device: &Device,
    ) -> Result<Self, LoadError> {
        Ok(Self {
            weight: Param::from_tensor(w.tensor(
                &format!("{prefix}.weight"),
                [c_out, c_in, k, k],
                device,
            )?),
            bias: Param::from_tensor(w.tensor(&format!("{prefix}.bias"), [c_out], device)?),
            stride,
            padding,
        })
    }

    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let weight = self.weight.val();
        if (self.stride, self.padding) == (1, 1) && super::flex::conv::applies(&x, &weight) {
            return super::flex::conv::conv3x3(x, weight, self.bias.val());
        }
        let options = ConvOptions::new([self.stride; 2], [self.padding; 2], [1, 1], 1);
        conv2d(x, weight, Some(self.bias.val()), options)
    }
}

/// GroupNorm with affine parameters.
#[derive(Module, Debug)]
pub struct GroupNorm {
    pub weight: Param<Tensor<1>>,
    pub bias: Param<Tensor<1>>,
    #[module(skip)]
    groups: usize,
}

impl GroupNorm {
    fn load(
        w: &mut Weights,
        prefix: &str,
        channels: usize,
        groups: usize,
        device: &Device,
    ) -> Result<Self, LoadError> {
        Ok(Self {
            weight: Param::from_tensor(w.tensor(
                &format!("{prefix}.weight"),
                [channels],
                device,
            )?),
            bias: Param::from_tensor(w.tensor(&format!("{prefix}.bias"), [channels], device)?),
            groups,
        })
    }

    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let [b, c, h, w] = x.dims();
        // [b, c, h, w] → [b, groups, c/groups·h·w]
        let grouped: Tensor<3> = x.reshape([b, self.groups, c / self.groups * h * w]);
        let mean = grouped.clone().mean_dim(2);
        let centered = grouped - mean;
        let var = centered.clone().square().mean_dim(2);
        let normed: Tensor<4> =
            (centered / var.add_scalar(GROUP_NORM_EPS).sqrt()).reshape([b, c, h, w]);
        let weight: Tensor<4> = self.weight.val().reshape([1, c, 1, 1]);
        let bias: Tensor<4> = self.bias.val().reshape([1, c, 1, 1]);
        normed * weight + bias
    }
}

/// diffusers' `ResnetBlock2D` (no time embedding).
#[derive(Module, Debug)]
pub struct ResnetBlock {
    pub norm1: GroupNorm,
    pub conv1: Conv2d,
    pub norm2: GroupNorm,
    pub conv2: Conv2d,
    pub conv_shortcut: Option<Conv2d>,
}

impl ResnetBlock {
    fn load(
        w: &mut Weights,
        p: &str,
        c_in: usize,
        c_out: usize,
        groups: usize,
        device: &Device,
    ) -> Result<Self, LoadError> {
        Ok(Self {
            norm1: GroupNorm::load(w, &format!("{p}.norm1"), c_in, groups, device)?,
            conv1: Conv2d::load(w, &format!("{p}.conv1"), c_in, c_out, 3, 1, 1, device)?,
            norm2: GroupNorm::load(w, &format!("{p}.norm2"), c_out, groups, device)?,
            conv2: Conv2d::load(w, &format!("{p}.conv2"), c_out, c_out, 3, 1, 1, device)?,
            conv_shortcut: if c_in != c_out {
                Some(Conv2d::load(
                    w,
                    &format!("{p}.conv_shortcut"),
                    c_in,
                    c_out,
                    1,
                    1,
                    0,
                    device,
                )?)
            } else {
                None
            },
        })
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let h = self.conv1.forward(silu(self.norm1.forward(x.clone())));
        let h = self.conv2.forward(silu(self.norm2.forward(h)));
        let shortcut = match &self.conv_shortcut {
            Some(conv) => conv.forward(x),
            None => x,
        };
        shortcut + h
    }
}

/// Single-head self-attention over pixels with a residual (the mid block's).
#[derive(Module, Debug)]
pub struct PixelAttention {
    pub group_norm: GroupNorm,
    pub to_q: Linear,
    pub to_k: Linear,
    pub to_v: Linear,
    pub to_out_0: Linear,
}

impl PixelAttention {
    fn load(
        w: &mut Weights,
        p: &str,
        c: usize,
        groups: usize,
        device: &Device,
    ) -> Result<Self, LoadError> {
        let lin =
            |w: &mut Weights, n: &str| Linear::load(w, &format!("{p}.{n}"), c, c, true, device);
        Ok(Self {
            group_norm: GroupNorm::load(w, &format!("{p}.group_norm"), c, groups, device)?,
            to_q: lin(w, "to_q")?,
            to_k: lin(w, "to_k")?,
            to_v: lin(w, "to_v")?,
            to_out_0: lin(w, "to_out.0")?,
        })
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let [b, c, h, w] = x.dims();
        // [b, c, h, w] → [b, h·w, c]
        let tokens = self
            .group_norm
            .forward(x.clone())
            .reshape([b, c, h * w])
            .swap_dims(1, 2);
        let heads = |t: Tensor<3>| -> Tensor<4> { t.unsqueeze_dim(1) }; // [b, 1, hw, c]
        let out = sdpa(
            heads(self.to_q.forward(tokens.clone())),
            heads(self.to_k.forward(tokens.clone())),
            heads(self.to_v.forward(tokens)),
        );
        let out: Tensor<3> = self.to_out_0.forward(out.squeeze_dim(1));
        // [b, h·w, c] → [b, c, h, w]
        x + out.swap_dims(1, 2).reshape([b, c, h, w])
    }
}

/// `resnet → attention → resnet` at the lowest resolution.
#[derive(Module, Debug)]
pub struct MidBlock {
    pub resnets: Vec<ResnetBlock>,
    pub attention: Option<PixelAttention>,
}

impl MidBlock {
    fn load(
        w: &mut Weights,
        p: &str,
        c: usize,
        config: &VaeConfig,
        device: &Device,
    ) -> Result<Self, LoadError> {
        let g = config.norm_num_groups;
        Ok(Self {
            resnets: vec![
                ResnetBlock::load(w, &format!("{p}.resnets.0"), c, c, g, device)?,
                ResnetBlock::load(w, &format!("{p}.resnets.1"), c, c, g, device)?,
            ],
            attention: if config.mid_block_add_attention {
                Some(PixelAttention::load(
                    w,
                    &format!("{p}.attentions.0"),
                    c,
                    g,
                    device,
                )?)
            } else {
                None
            },
        })
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let mut x = self.resnets[0].forward(x);
        if let Some(attention) = &self.attention {
            x = attention.forward(x);
        }
        self.resnets[1].forward(x)
    }
}

/// A resolution level: resnets, then an optional resampling conv.
#[derive(Module, Debug)]
pub struct Level {
    pub resnets: Vec<ResnetBlock>,
    pub resample: Option<Conv2d>,
}

/// Image → latent moments (mean ⊕ logvar).
#[derive(Module, Debug)]
pub struct Encoder {
    pub conv_in: Conv2d,
    pub down_blocks: Vec<Level>,
    pub mid_block: MidBlock,
    pub conv_norm_out: GroupNorm,
    pub conv_out: Conv2d,
}

/// Latent → image.
#[derive(Module, Debug)]
pub struct Decoder {
    pub conv_in: Conv2d,
    pub mid_block: MidBlock,
    pub up_blocks: Vec<Level>,
    pub conv_norm_out: GroupNorm,
    pub conv_out: Conv2d,
}

impl Encoder {
    fn load(w: &mut Weights, c: &VaeConfig, device: &Device) -> Result<Self, LoadError> {
        let (ch, g, n) = (
            &c.block_out_channels,
            c.norm_num_groups,
            c.block_out_channels.len(),
        );
        let mut down_blocks = Vec::new();
        let mut c_in = ch[0];
        for (i, &c_out) in ch.iter().enumerate() {
            let p = format!("encoder.down_blocks.{i}");
            let resnets = (0..c.layers_per_block)
                .map(|j| {
                    ResnetBlock::load(
                        w,
                        &format!("{p}.resnets.{j}"),
                        if j == 0 { c_in } else { c_out },
                        c_out,
                        g,
                        device,
                    )
                })
                .collect::<Result<_, _>>()?;
            let resample = if i + 1 < n {
                Some(Conv2d::load(
                    w,
                    &format!("{p}.downsamplers.0.conv"),
                    c_out,
                    c_out,
                    3,
                    2,
                    0,
                    device,
                )?)
            } else {
                None
            };
            down_blocks.push(Level { resnets, resample });
            c_in = c_out;
        }
        Ok(Self {
            conv_in: Conv2d::load(w, "encoder.conv_in", c.in_channels, ch[0], 3, 1, 1, device)?,
            down_blocks,
            mid_block: MidBlock::load(w, "encoder.mid_block", ch[n - 1], c, device)?,
            conv_norm_out: GroupNorm::load(w, "encoder.conv_norm_out", ch[n - 1], g, device)?,
            conv_out: Conv2d::load(
                w,
                "encoder.conv_out",
                ch[n - 1],
                2 * c.latent_channels,
                3,
                1,
                1,
                device,
            )?,
        })
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let mut x = self.conv_in.forward(x);
        for level in &self.down_blocks {
            for resnet in &level.resnets {
                x = resnet.forward(x);
            }
            if let Some(conv) = &level.resample {
                // diffusers pads right and bottom only before the stride-2 conv
                x = conv.forward(x.pad((0, 1, 0, 1), PadMode::Constant(0.0)));
            }
        }
        let x = self.mid_block.forward(x);
        self.conv_out.forward(silu(self.conv_norm_out.forward(x)))
    }
}

impl Decoder {
    fn load(w: &mut Weights, c: &VaeConfig, device: &Device) -> Result<Self, LoadError> {
        let (g, n) = (c.norm_num_groups, c.block_out_channels.len());
        let reversed: Vec<usize> = c.block_out_channels.iter().rev().copied().collect();
        let mut up_blocks = Vec::new();
        let mut c_in = reversed[0];
        for (i, &c_out) in reversed.iter().enumerate() {
            let p = format!("decoder.up_blocks.{i}");
            let resnets = (0..=c.layers_per_block)
                .map(|j| {
                    ResnetBlock::load(
                        w,
                        &format!("{p}.resnets.{j}"),
                        if j == 0 { c_in } else { c_out },
                        c_out,
                        g,
                        device,
                    )
                })
                .collect::<Result<_, _>>()?;
            let resample = if i + 1 < n {
                Some(Conv2d::load(
                    w,
                    &format!("{p}.upsamplers.0.conv"),
                    c_out,
                    c_out,
                    3,
                    1,
                    1,
                    device,
                )?)
            } else {
                None
            };
            up_blocks.push(Level { resnets, resample });
            c_in = c_out;
        }
        Ok(Self {
            conv_in: Conv2d::load(
                w,
                "decoder.conv_in",
                c.latent_channels,
                reversed[0],
                3,
                1,
                1,
                device,
            )?,
            mid_block: MidBlock::load(w, "decoder.mid_block", reversed[0], c, device)?,
            up_blocks,
            conv_norm_out: GroupNorm::load(w, "decoder.conv_norm_out", reversed[n - 1], g, device)?,
            conv_out: Conv2d::load(
                w,
                "decoder.conv_out",
                reversed[n - 1],
                c.out_channels,
                3,
                1,
                1,
                device,
            )?,
        })
    }

    fn forward(&self, z: Tensor<4>) -> Tensor<4> {
        let mut x = self.mid_block.forward(self.conv_in.forward(z));
        for level in &self.up_blocks {
            for resnet in &level.resnets {
                x = resnet.forward(x);
            }
            if let Some(conv) = &level.resample {
                x = conv.forward(upsample_nearest2(x));
            }
        }
        self.conv_out.forward(silu(self.conv_norm_out.forward(x)))
    }
}

/// Nearest-neighbour ×2: `[b, c, h, w]` → `[b, c, 2h, 2w]`.
fn upsample_nearest2(x: Tensor<4>) -> Tensor<4> {
    let [b, c, h, w] = x.dims();
    // [b, c, h, 1, w, 1] → [b, c, h, 2, w, 2] → [b, c, 2h, 2w]
    let x: Tensor<6> = x.reshape([b, c, h, 1, w, 1]);
    x.expand([b, c, h, 2, w, 2]).reshape([b, c, 2 * h, 2 * w])
}

/// 2×2 patchify `[b, c, h, w]` → `[b, 4c, h/2, w/2]`, channel = c·4 + dy·2 + dx.
pub fn patchify2(x: Tensor<4>) -> Tensor<4> {
    let [b, c, h, w] = x.dims();
    // [b, c, h/2, 2, w/2, 2] → [b, c, 2, 2, h/2, w/2]
    let x: Tensor<6> = x.reshape([b, c, h / 2, 2, w / 2, 2]);
    x.permute([0, 1, 3, 5, 2, 4])
        .reshape([b, c * 4, h / 2, w / 2])
}

/// Inverse of [`patchify2`].
pub fn unpatchify2(x: Tensor<4>) -> Tensor<4> {
    let [b, c4, h, w] = x.dims();
    let c = c4 / 4;
    // [b, c, 2, 2, h, w] → [b, c, h, 2, w, 2]
    let x: Tensor<6> = x.reshape([b, c, 2, 2, h, w]);
    x.permute([0, 1, 4, 2, 5, 3]).reshape([b, c, h * 2, w * 2])
}

/// The autoencoder with its latent normalisation.
#[derive(Module, Debug)]
pub struct Vae {
    pub encoder: Encoder,
    pub decoder: Decoder,
    pub quant_conv: Option<Conv2d>,
    pub post_quant_conv: Option<Conv2d>,
    /// FLUX.2's BatchNorm running mean / std over patchified latents `[4·latent]`.
    pub bn_mean: Option<Param<Tensor<1>>>,
    pub bn_std: Option<Param<Tensor<1>>>,
    #[module(skip)]
    pub config: VaeConfig,
}

impl Vae {
    pub fn load(config: VaeConfig, mut w: Weights, device: &Device) -> Result<Self, LoadError> {
        let l2 = 2 * config.latent_channels;
        let (bn_mean, bn_std) = if config.is_flux2() {
            let n = 4 * config.latent_channels;
            let mean = w.tensor("bn.running_mean", [n], device)?;
            let var = w.tensor("bn.running_var", [n], device)?;
            w.skip("bn.num_batches_tracked");
            let eps = config.batch_norm_eps.unwrap_or(1e-4);
            (
                Some(Param::from_tensor(mean)),
                Some(Param::from_tensor(var.add_scalar(eps).sqrt())),
            )
        } else {
            (None, None)
        };
        let vae = Self {
            encoder: Encoder::load(&mut w, &config, device)?,
            decoder: Decoder::load(&mut w, &config, device)?,
            quant_conv: if config.use_quant_conv {
                Some(Conv2d::load(&mut w, "quant_conv", l2, l2, 1, 1, 0, device)?)
            } else {
                None
            },
            post_quant_conv: if config.use_post_quant_conv {
                Some(Conv2d::load(
                    &mut w,
                    "post_quant_conv",
                    config.latent_channels,
                    config.latent_channels,
                    1,
                    1,
                    0,
                    device,
                )?)
            } else {
                None
            },
            bn_mean,
            bn_std,
            config,
        };
        w.finish()?;
        Ok(vae)
    }

    /// Raw decoder: VAE-space latent `[b, latent, h, w]` → image `[b, out, 8h… , …]` in ≈[−1, 1].
    pub fn decode_raw(&self, z: Tensor<4>) -> Tensor<4> {
        let z = match &self.post_quant_conv {
            Some(conv) => conv.forward(z),
            None => z,
        };
        self.decoder.forward(z)
    }

    /// Raw encoder: image → latent mean (the pipelines' "argmax" of the posterior).
    pub fn encode_mean(&self, image: Tensor<4>) -> Tensor<4> {
        self.encode_moments(image).0
    }

    /// Raw encoder: image → the posterior's mean and log-variance, each `[b, latent, h/f, w/f]`.
    pub fn encode_moments(&self, image: Tensor<4>) -> (Tensor<4>, Tensor<4>) {
        let moments = self.encoder.forward(image);
        let moments = match &self.quant_conv {
            Some(conv) => conv.forward(moments),
            None => moments,
        };
        let c = self.config.latent_channels;
        (moments.clone().narrow(1, 0, c), moments.narrow(1, c, c))
    }

    /// A fresh, untrained autoencoder (parameters from [`super::init`], seeded).
    pub fn init(config: VaeConfig, seed: u64, device: &Device) -> Result<Self, LoadError> {
        config.validate().map_err(|message| LoadError::Config {
            path: "<new VAE config>".into(),
            message,
        })?;
        if config.is_flux2() {
            return Err(LoadError::Config {
                path: "<new VAE config>".into(),
                message: "a fresh AutoencoderKLFlux2 has no BatchNorm statistics to start from"
                    .into(),
            });
        }
        Self::load(config, Weights::initializer(seed), device)
    }

    /// Writes `config.json` and `diffusion_pytorch_model.safetensors` in diffusers'
    /// `AutoencoderKL` layout (the inverse of [`load_dir`]).
    pub fn save_dir(&self, dir: &Path) -> Result<(), LoadError> {
        let mut config = serde_json::to_value(self.config.clone().with_block_types())
            .expect("config serialises");
        if self.config.class_name.is_empty() {
            config["_class_name"] = "AutoencoderKL".into();
        }
        let tensors = super::export::checkpoint_tensors(self, &Default::default())
            .into_iter()
            .map(|(key, tensor)| (diffusers_vae_key(&key), tensor))
            .collect();
        super::export::save_component(
            dir,
            &config,
            "diffusion_pytorch_model.safetensors",
            &tensors,
            None,
        )
    }

    /// FLUX.2's BatchNorm mean and std, broadcastable over patchified latents: `[1, 4·latent, 1, 1]`.
    fn bn_statistics(&self) -> Option<(Tensor<4>, Tensor<4>)> {
        let (mean, std) = (self.bn_mean.as_ref()?, self.bn_std.as_ref()?);
        let n = mean.val().dims()[0];
        // [n] → [1, n, 1, 1]
        Some((
            mean.val().reshape([1, n, 1, 1]),
            std.val().reshape([1, n, 1, 1]),
        ))
    }

    /// Transformer-space latent → image: SD3 / FLUX.1 `z / scale + shift`; FLUX.2 BatchNorm
    /// de-normalisation on 2×2 patches then unpatchify.
    pub fn decode(&self, latent: Tensor<4>) -> Tensor<4> {
        let z = match self.bn_statistics() {
            Some((mean, std)) => unpatchify2(latent * std + mean),
            None => latent
                .div_scalar(self.config.scaling_factor.unwrap_or(1.0))
                .add_scalar(self.config.shift_factor.unwrap_or(0.0)),
        };
        self.decode_raw(z)
    }

    /// Image → transformer-space latent (inverse of [`Vae::decode`]'s normalisation).
    pub fn encode(&self, image: Tensor<4>) -> Tensor<4> {
        let mean = self.encode_mean(image);
        match self.bn_statistics() {
            Some((bn_mean, bn_std)) => (patchify2(mean) - bn_mean) / bn_std,
            None => mean
                .sub_scalar(self.config.shift_factor.unwrap_or(0.0))
                .mul_scalar(self.config.scaling_factor.unwrap_or(1.0)),
        }
    }
}

/// Our field path → diffusers' key: levels resample through `downsamplers.0.conv` (encoder) or
/// `upsamplers.0.conv` (decoder); the mid block's attention is `attentions.0`.
fn diffusers_vae_key(key: &str) -> String {
    let resample = if key.starts_with("encoder.") {
        ".downsamplers.0.conv."
    } else {
        ".upsamplers.0.conv."
    };
    key.replace(".resample.", resample)
        .replace(".attention.", ".attentions.0.")
}

impl super::Family for Vae {
    type Config = VaeConfig;

    fn validate(config: &VaeConfig) -> Result<(), String> {
        config.validate()
    }

    fn from_weights(config: VaeConfig, w: Weights, device: &Device) -> Result<Self, LoadError> {
        Self::load(config, w, device)
    }
}

/// Loads a diffusers `vae/` folder (see [`super::Family::load_dir`]).
pub fn load_dir(dir: &Path, device: &Device) -> Result<Vae, LoadError> {
    <Vae as super::Family>::load_dir(dir, device)
}

#[cfg(test)]
mod tests {
    use crate::train::vae::shapes_vae_config;

    #[test]
    fn block_types_are_checked_against_the_levels() {
        let good = shapes_vae_config();
        assert_eq!(good.down_block_types.as_ref().map(Vec::len), Some(3));
        good.validate().unwrap();
        let mut short = good.clone();
        short.up_block_types = Some(vec!["UpDecoderBlock2D".into()]);
        let err = short.validate().unwrap_err();
        assert!(err.contains("up_block_types has 1 entries"), "{err}");
        let mut other = good.clone();
        other.down_block_types = Some(vec!["AttnDownEncoderBlock2D".into(); 3]);
        let err = other.validate().unwrap_err();
        assert!(
            err.contains("down_block_types: `AttnDownEncoderBlock2D`"),
            "{err}"
        );
        let mut absent = good;
        absent.down_block_types = None;
        absent.up_block_types = None;
        absent.validate().unwrap();
    }
}
