//! `SD3Transformer2DModel` configuration: diffusers' `config.json`, read verbatim.

use serde::{Deserialize, Serialize};

/// The fields of diffusers' `SD3Transformer2DModel` config (unknown fields such as
/// `_class_name` are ignored).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Sd3Config {
    /// Latent size the model was trained at (sets the pos-embed scale: base = sample / patch).
    #[serde(default = "default_sample_size")]
    pub sample_size: usize,
    pub patch_size: usize,
    pub in_channels: usize,
    pub num_layers: usize,
    pub attention_head_dim: usize,
    pub num_attention_heads: usize,
    pub joint_attention_dim: usize,
    pub caption_projection_dim: usize,
    pub pooled_projection_dim: usize,
    pub out_channels: usize,
    /// Side of the stored pos-embed grid, in patches; inputs are cropped from its centre.
    pub pos_embed_max_size: usize,
    /// Blocks with a second, image-only attention (SD3.5-medium: 0…12).
    #[serde(default)]
    pub dual_attention_layers: Vec<usize>,
    /// `"rms_norm"` for SD3.5 (per-head qk-norm), absent for SD3.
    #[serde(default)]
    pub qk_norm: Option<String>,
}

fn default_sample_size() -> usize {
    128
}

impl Sd3Config {
    /// Model width (heads × head_dim).
    pub fn inner_dim(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }

    pub fn has_qk_norm(&self) -> bool {
        self.qk_norm.as_deref() == Some("rms_norm")
    }

    /// Checks the config is internally consistent.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(norm) = &self.qk_norm {
            if norm != "rms_norm" {
                return Err(format!(
                    "qk_norm `{norm}` is not supported (only \"rms_norm\")"
                ));
            }
        }
        if self.caption_projection_dim != self.inner_dim() {
            return Err(format!(
                "caption_projection_dim {} must equal num_attention_heads × attention_head_dim = {}",
                self.caption_projection_dim,
                self.inner_dim()
            ));
        }
        if let Some(bad) = self
            .dual_attention_layers
            .iter()
            .find(|&&l| l >= self.num_layers)
        {
            return Err(format!(
                "dual_attention_layers names layer {bad}, but there are {} layers",
                self.num_layers
            ));
        }
        if self.patch_size == 0 || self.num_layers == 0 || self.attention_head_dim == 0 {
            return Err("patch_size, num_layers and attention_head_dim must be positive".into());
        }
        Ok(())
    }

    /// Number of parameters (the pos-embed buffer excluded), as diffusers counts them.
    pub fn parameter_count(&self) -> usize {
        let d = self.inner_dim();
        let hd = self.attention_head_dim;
        let lin = |i: usize, o: usize| i * o + o;
        let p2c = self.patch_size * self.patch_size;
        let mut n = d * self.in_channels * p2c + d; // pos_embed.proj
        n += lin(256, d) + lin(d, d); // timestep embedder
        n += lin(self.pooled_projection_dim, d) + lin(d, d); // pooled embedder
        n += lin(self.joint_attention_dim, d); // context embedder
        for i in 0..self.num_layers {
            let last = i + 1 == self.num_layers;
            let dual = self.dual_attention_layers.contains(&i);
            n += lin(d, if dual { 9 * d } else { 6 * d });
            n += lin(d, if last { 2 * d } else { 6 * d });
            n += 4 * lin(d, d) + 3 * lin(d, d); // to_q/k/v/out + add_q/k/v
            if !last {
                n += lin(d, d); // to_add_out
            }
            if self.has_qk_norm() {
                n += 4 * hd;
            }
            if dual {
                n += 4 * lin(d, d) + if self.has_qk_norm() { 2 * hd } else { 0 };
            }
            n += lin(d, 4 * d) + lin(4 * d, d);
            if !last {
                n += lin(d, 4 * d) + lin(4 * d, d);
            }
        }
        n += lin(d, 2 * d); // norm_out
        n += lin(d, p2c * self.out_channels);
        n
    }

    /// Stable Diffusion 3 medium (diffusers conversion of `sd3_medium.safetensors`).
    pub fn sd3_medium() -> Self {
        Self {
            sample_size: 128,
            patch_size: 2,
            in_channels: 16,
            num_layers: 24,
            attention_head_dim: 64,
            num_attention_heads: 24,
            joint_attention_dim: 4096,
            caption_projection_dim: 1536,
            pooled_projection_dim: 2048,
            out_channels: 16,
            pos_embed_max_size: 192,
            dual_attention_layers: vec![],
            qk_norm: None,
        }
    }

    /// Stable Diffusion 3.5 medium: qk-norm, dual attention in blocks 0–12, 384² pos-embed.
    pub fn sd3_5_medium() -> Self {
        Self {
            pos_embed_max_size: 384,
            dual_attention_layers: (0..=12).collect(),
            qk_norm: Some("rms_norm".into()),
            ..Self::sd3_medium()
        }
    }

    /// Stable Diffusion 3.5 large: 38 layers × 38 heads, qk-norm.
    pub fn sd3_5_large() -> Self {
        Self {
            num_layers: 38,
            num_attention_heads: 38,
            caption_projection_dim: 2432,
            qk_norm: Some("rms_norm".into()),
            ..Self::sd3_medium()
        }
    }
}
