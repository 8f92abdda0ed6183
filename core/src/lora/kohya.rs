//! kohya / sd-scripts FLUX.1 LoRAs (`lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`, …)
//! onto the diffusers tree, as `diffusers/loaders/lora_conversion_utils.py::
//! _convert_kohya_flux_lora_to_diffusers` does: fused BFL projections (`img_attn_qkv`, single-block
//! `linear1`) become one module per diffusers linear sharing `lora_down` with `lora_up` split by
//! rows; the final layer's modulation swaps its (shift, scale) halves; α/r is the scaling (α = r
//! when absent). diffusers folds α into the factors; we keep it as the scaling, the same ΔW.

use std::collections::BTreeMap;
use std::path::Path;

use super::format::LoraModule;
use super::{LoraError, list};

/// How one kohya module name maps onto diffusers linears.
enum Target {
    One(String),
    /// A fused projection split by output rows into these linears; `hidden` is the count of
    /// `d`-sized parts of the last linear (FLUX single blocks: q, k, v of `d`, mlp of `4d`).
    Split(Vec<String>, usize),
    /// `norm_out.linear`: BFL's (shift, scale) is diffusers' (scale, shift).
    SwapHalves(String),
}

fn target(name: &str) -> Option<Target> {
    use Target::*;
    let double = |rest: &str, i: &str| -> Option<Target> {
        let p = format!("transformer.transformer_blocks.{i}");
        Some(match rest {
            "img_attn_proj" => One(format!("{p}.attn.to_out.0")),
            "img_attn_qkv" => Split(
                ["to_q", "to_k", "to_v"]
                    .map(|n| format!("{p}.attn.{n}"))
                    .to_vec(),
                1,
            ),
            "img_mlp_0" => One(format!("{p}.ff.net.0.proj")),
            "img_mlp_2" => One(format!("{p}.ff.net.2")),
            "img_mod_lin" => One(format!("{p}.norm1.linear")),
            "txt_attn_proj" => One(format!("{p}.attn.to_add_out")),
            "txt_attn_qkv" => Split(
                ["add_q_proj", "add_k_proj", "add_v_proj"]
                    .map(|n| format!("{p}.attn.{n}"))
                    .to_vec(),
                1,
            ),
            "txt_mlp_0" => One(format!("{p}.ff_context.net.0.proj")),
            "txt_mlp_2" => One(format!("{p}.ff_context.net.2")),
            "txt_mod_lin" => One(format!("{p}.norm1_context.linear")),
            _ => return None,
        })
    };
    let single = |rest: &str, i: &str| -> Option<Target> {
        let p = format!("transformer.single_transformer_blocks.{i}");
        Some(match rest {
            "linear1" => Split(
                ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"]
                    .map(|n| format!("{p}.{n}"))
                    .to_vec(),
                4,
            ),
            "linear2" => One(format!("{p}.proj_out")),
            "modulation_lin" => One(format!("{p}.norm.linear")),
            _ => return None,
        })
    };
    if let Some(rest) = name.strip_prefix("lora_unet_double_blocks_") {
        let (i, rest) = rest.split_once('_')?;
        return double(rest, i);
    }
    if let Some(rest) = name.strip_prefix("lora_unet_single_blocks_") {
        let (i, rest) = rest.split_once('_')?;
        return single(rest, i);
    }
    let t = |p: &str| Some(One(format!("transformer.{p}")));
    match name {
        "lora_unet_img_in" => t("x_embedder"),
        "lora_unet_txt_in" => t("context_embedder"),
        "lora_unet_time_in_in_layer" => t("time_text_embed.timestep_embedder.linear_1"),
        "lora_unet_time_in_out_layer" => t("time_text_embed.timestep_embedder.linear_2"),
        "lora_unet_vector_in_in_layer" => t("time_text_embed.text_embedder.linear_1"),
        "lora_unet_vector_in_out_layer" => t("time_text_embed.text_embedder.linear_2"),
        "lora_unet_guidance_in_in_layer" => t("time_text_embed.guidance_embedder.linear_1"),
        "lora_unet_guidance_in_out_layer" => t("time_text_embed.guidance_embedder.linear_2"),
        "lora_unet_final_layer_linear" => t("proj_out"),
        "lora_unet_final_layer_adaLN_modulation_1" => {
            Some(SwapHalves("transformer.norm_out.linear".into()))
        }
        _ => text_encoder(name).map(One),
    }
}

/// `lora_te1_text_model_encoder_layers_0_self_attn_q_proj` →
/// `text_encoder.text_model.encoder.layers.0.self_attn.q_proj` (CLIP-L of FLUX.1).
fn text_encoder(name: &str) -> Option<String> {
    let rest = name
        .strip_prefix("lora_te1_")
        .or_else(|| name.strip_prefix("lora_te_"))?;
    let rest = rest.strip_prefix("text_model_encoder_layers_")?;
    let (i, module) = rest.split_once('_')?;
    i.parse::<usize>().ok()?;
    let module = match module {
        "self_attn_q_proj" => "self_attn.q_proj",
        "self_attn_k_proj" => "self_attn.k_proj",
        "self_attn_v_proj" => "self_attn.v_proj",
        "self_attn_out_proj" => "self_attn.out_proj",
        "mlp_fc1" => "mlp.fc1",
        "mlp_fc2" => "mlp.fc2",
        _ => return None,
    };
    Some(format!(
        "text_encoder.text_model.encoder.layers.{i}.{module}"
    ))
}

pub(super) fn convert(
    path: &Path,
    mut raw: BTreeMap<String, super::format::RawTensor>,
) -> Result<BTreeMap<String, LoraModule>, LoraError> {
    let bad = |message: String| LoraError::Format {
        path: path.to_path_buf(),
        message,
    };
    let names: Vec<String> = raw
        .keys()
        .filter_map(|k| k.strip_suffix(".lora_down.weight").map(str::to_string))
        .collect();
    let mut modules = BTreeMap::new();
    let mut unknown = Vec::new();
    for name in names {
        let Some(target) = target(&name) else {
            unknown.push(name);
            continue;
        };
        let down = raw
            .remove(&format!("{name}.lora_down.weight"))
            .expect("listed");
        let up = raw
            .remove(&format!("{name}.lora_up.weight"))
            .ok_or_else(|| bad(format!("{name}.lora_down.weight has no lora_up.weight")))?;
        let alpha = raw.remove(&format!("{name}.alpha"));
        let (&[rank, d_in], &[rows, rank_up]) = (down.shape.as_slice(), up.shape.as_slice()) else {
            return Err(bad(format!(
                "{name}: lora_down {:?} / lora_up {:?} must be 2-D",
                down.shape, up.shape
            )));
        };
        if rank != rank_up {
            return Err(bad(format!(
                "{name}: lora_down has rank {rank} but lora_up has rank {rank_up}"
            )));
        }
        let alpha = alpha
            .and_then(|a| a.values.first().copied())
            .map_or(rank as f64, f64::from);
        let module = |b: Vec<f32>, d_out: usize| LoraModule {
            rank,
            d_in,
            d_out,
            a: down.values.clone(),
            b,
            alpha,
            scaling: alpha / rank as f64,
        };
        match target {
            Target::One(p) => {
                modules.insert(p, module(up.values.clone(), rows));
            }
            Target::SwapHalves(p) => {
                // [out, r] rows: (shift, scale) → (scale, shift)
                let half = rows / 2 * rank;
                let b = [&up.values[half..], &up.values[..half]].concat();
                modules.insert(p, module(b, rows));
            }
            Target::Split(paths, last_parts) => {
                let parts = paths.len() - 1 + last_parts;
                if rows % parts != 0 {
                    return Err(bad(format!(
                        "{name}: lora_up has {rows} rows, not a multiple of the {parts} parts of a fused projection"
                    )));
                }
                let (d, count) = (rows / parts, paths.len());
                let mut start = 0;
                for (j, p) in paths.into_iter().enumerate() {
                    let len = if j + 1 == count { d * last_parts } else { d };
                    let b = up.values[start * rank..(start + len) * rank].to_vec();
                    modules.insert(p, module(b, len));
                    start += len;
                }
            }
        }
    }
    unknown.extend(raw.keys().filter(|k| !k.ends_with(".alpha")).cloned());
    if !unknown.is_empty() {
        return Err(bad(format!(
            "{} kohya key(s) have no FLUX.1 diffusers counterpart: {}",
            unknown.len(),
            list(&unknown)
        )));
    }
    if modules.is_empty() {
        return Err(bad("no lora_down / lora_up pairs found".into()));
    }
    Ok(modules)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kohya_names_map_to_diffusers_paths() {
        let Some(Target::Split(paths, 4)) = target("lora_unet_single_blocks_3_linear1") else {
            panic!("linear1 is a 4-way split");
        };
        assert_eq!(paths[3], "transformer.single_transformer_blocks.3.proj_mlp");
        let Some(Target::One(p)) = target("lora_unet_double_blocks_12_txt_mlp_2") else {
            panic!()
        };
        assert_eq!(p, "transformer.transformer_blocks.12.ff_context.net.2");
        assert_eq!(
            text_encoder("lora_te1_text_model_encoder_layers_11_mlp_fc2").as_deref(),
            Some("text_encoder.text_model.encoder.layers.11.mlp.fc2")
        );
        assert!(target("lora_unet_double_blocks_0_img_attn_norm").is_none());
    }
}
