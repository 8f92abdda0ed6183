//! Original single-file layouts (Stability AI's SD3, Black Forest Labs' FLUX.1 / FLUX.2) mapped
//! onto the diffusers module tree, as data: one rename table per format, plus the fused tensors
//! they split and the modulations whose (shift, scale) halves they swap. Verified against
//! diffusers' own `single_file_utils` converters by the golden fixtures.

use super::weights::{Alias, Weights};

/// How one original tensor becomes diffusers tensors.
#[derive(Clone, Copy, Debug)]
enum Map {
    /// Same values, new name.
    Rename(&'static str),
    /// Rows split into consecutive parts of the given widths (in units of the model width `d`).
    Split(&'static [(&'static str, usize)]),
    /// Same values with the (shift, scale) halves swapped into (scale, shift).
    Swap(&'static str),
}

/// A rule: `{i}` in either name stands for a block index; `.weight` / `.bias` (and BFL's norm
/// `.scale` → `.weight`) are appended by the mapper.
type Rule = (&'static str, Map);

const QKV: &[(&str, usize)] = &[("attn.to_q", 1), ("attn.to_k", 1), ("attn.to_v", 1)];
const ADD_QKV: &[(&str, usize)] = &[
    ("attn.add_q_proj", 1),
    ("attn.add_k_proj", 1),
    ("attn.add_v_proj", 1),
];
const ATTN2_QKV: &[(&str, usize)] = &[("attn2.to_q", 1), ("attn2.to_k", 1), ("attn2.to_v", 1)];
const FLUX1_LINEAR1: &[(&str, usize)] = &[
    ("attn.to_q", 1),
    ("attn.to_k", 1),
    ("attn.to_v", 1),
    ("proj_mlp", 4),
];

/// SAI SD3 / SD3.5 (`model.diffusion_model.` prefix stripped first).
const SAI_SD3: &[Rule] = &[
    ("pos_embed", Map::Rename("pos_embed.pos_embed")),
    ("x_embedder.proj", Map::Rename("pos_embed.proj")),
    (
        "t_embedder.mlp.0",
        Map::Rename("time_text_embed.timestep_embedder.linear_1"),
    ),
    (
        "t_embedder.mlp.2",
        Map::Rename("time_text_embed.timestep_embedder.linear_2"),
    ),
    (
        "y_embedder.mlp.0",
        Map::Rename("time_text_embed.text_embedder.linear_1"),
    ),
    (
        "y_embedder.mlp.2",
        Map::Rename("time_text_embed.text_embedder.linear_2"),
    ),
    ("context_embedder", Map::Rename("context_embedder")),
    ("joint_blocks.{i}.x_block.attn.qkv", Map::Split(QKV)),
    (
        "joint_blocks.{i}.x_block.attn.proj",
        Map::Rename("attn.to_out.0"),
    ),
    (
        "joint_blocks.{i}.x_block.attn.ln_q",
        Map::Rename("attn.norm_q"),
    ),
    (
        "joint_blocks.{i}.x_block.attn.ln_k",
        Map::Rename("attn.norm_k"),
    ),
    ("joint_blocks.{i}.x_block.attn2.qkv", Map::Split(ATTN2_QKV)),
    (
        "joint_blocks.{i}.x_block.attn2.proj",
        Map::Rename("attn2.to_out.0"),
    ),
    (
        "joint_blocks.{i}.x_block.attn2.ln_q",
        Map::Rename("attn2.norm_q"),
    ),
    (
        "joint_blocks.{i}.x_block.attn2.ln_k",
        Map::Rename("attn2.norm_k"),
    ),
    (
        "joint_blocks.{i}.x_block.adaLN_modulation.1",
        Map::Rename("norm1.linear"),
    ),
    (
        "joint_blocks.{i}.x_block.mlp.fc1",
        Map::Rename("ff.net.0.proj"),
    ),
    ("joint_blocks.{i}.x_block.mlp.fc2", Map::Rename("ff.net.2")),
    (
        "joint_blocks.{i}.context_block.attn.qkv",
        Map::Split(ADD_QKV),
    ),
    (
        "joint_blocks.{i}.context_block.attn.proj",
        Map::Rename("attn.to_add_out"),
    ),
    (
        "joint_blocks.{i}.context_block.attn.ln_q",
        Map::Rename("attn.norm_added_q"),
    ),
    (
        "joint_blocks.{i}.context_block.attn.ln_k",
        Map::Rename("attn.norm_added_k"),
    ),
    // The last block's context modulation is an AdaLN-continuous in diffusers: swapped there.
    (
        "joint_blocks.{i}.context_block.adaLN_modulation.1",
        Map::Rename("norm1_context.linear"),
    ),
    (
        "joint_blocks.{i}.context_block.mlp.fc1",
        Map::Rename("ff_context.net.0.proj"),
    ),
    (
        "joint_blocks.{i}.context_block.mlp.fc2",
        Map::Rename("ff_context.net.2"),
    ),
    ("final_layer.linear", Map::Rename("proj_out")),
    (
        "final_layer.adaLN_modulation.1",
        Map::Swap("norm_out.linear"),
    ),
];

/// BFL FLUX.1.
const BFL_FLUX1: &[Rule] = &[
    ("img_in", Map::Rename("x_embedder")),
    ("txt_in", Map::Rename("context_embedder")),
    (
        "time_in.in_layer",
        Map::Rename("time_text_embed.timestep_embedder.linear_1"),
    ),
    (
        "time_in.out_layer",
        Map::Rename("time_text_embed.timestep_embedder.linear_2"),
    ),
    (
        "vector_in.in_layer",
        Map::Rename("time_text_embed.text_embedder.linear_1"),
    ),
    (
        "vector_in.out_layer",
        Map::Rename("time_text_embed.text_embedder.linear_2"),
    ),
    (
        "guidance_in.in_layer",
        Map::Rename("time_text_embed.guidance_embedder.linear_1"),
    ),
    (
        "guidance_in.out_layer",
        Map::Rename("time_text_embed.guidance_embedder.linear_2"),
    ),
    ("double_blocks.{i}.img_mod.lin", Map::Rename("norm1.linear")),
    (
        "double_blocks.{i}.txt_mod.lin",
        Map::Rename("norm1_context.linear"),
    ),
    ("double_blocks.{i}.img_attn.qkv", Map::Split(QKV)),
    (
        "double_blocks.{i}.img_attn.proj",
        Map::Rename("attn.to_out.0"),
    ),
    (
        "double_blocks.{i}.img_attn.norm.query_norm",
        Map::Rename("attn.norm_q"),
    ),
    (
        "double_blocks.{i}.img_attn.norm.key_norm",
        Map::Rename("attn.norm_k"),
    ),
    ("double_blocks.{i}.txt_attn.qkv", Map::Split(ADD_QKV)),
    (
        "double_blocks.{i}.txt_attn.proj",
        Map::Rename("attn.to_add_out"),
    ),
    (
        "double_blocks.{i}.txt_attn.norm.query_norm",
        Map::Rename("attn.norm_added_q"),
    ),
    (
        "double_blocks.{i}.txt_attn.norm.key_norm",
        Map::Rename("attn.norm_added_k"),
    ),
    ("double_blocks.{i}.img_mlp.0", Map::Rename("ff.net.0.proj")),
    ("double_blocks.{i}.img_mlp.2", Map::Rename("ff.net.2")),
    (
        "double_blocks.{i}.txt_mlp.0",
        Map::Rename("ff_context.net.0.proj"),
    ),
    (
        "double_blocks.{i}.txt_mlp.2",
        Map::Rename("ff_context.net.2"),
    ),
    ("single_blocks.{i}.linear1", Map::Split(FLUX1_LINEAR1)),
    ("single_blocks.{i}.linear2", Map::Rename("proj_out")),
    (
        "single_blocks.{i}.modulation.lin",
        Map::Rename("norm.linear"),
    ),
    (
        "single_blocks.{i}.norm.query_norm",
        Map::Rename("attn.norm_q"),
    ),
    (
        "single_blocks.{i}.norm.key_norm",
        Map::Rename("attn.norm_k"),
    ),
    ("final_layer.linear", Map::Rename("proj_out")),
    (
        "final_layer.adaLN_modulation.1",
        Map::Swap("norm_out.linear"),
    ),
];

/// BFL FLUX.2 (no biases).
const BFL_FLUX2: &[Rule] = &[
    ("img_in", Map::Rename("x_embedder")),
    ("txt_in", Map::Rename("context_embedder")),
    (
        "time_in.in_layer",
        Map::Rename("time_guidance_embed.timestep_embedder.linear_1"),
    ),
    (
        "time_in.out_layer",
        Map::Rename("time_guidance_embed.timestep_embedder.linear_2"),
    ),
    (
        "guidance_in.in_layer",
        Map::Rename("time_guidance_embed.guidance_embedder.linear_1"),
    ),
    (
        "guidance_in.out_layer",
        Map::Rename("time_guidance_embed.guidance_embedder.linear_2"),
    ),
    (
        "double_stream_modulation_img.lin",
        Map::Rename("double_stream_modulation_img.linear"),
    ),
    (
        "double_stream_modulation_txt.lin",
        Map::Rename("double_stream_modulation_txt.linear"),
    ),
    (
        "single_stream_modulation.lin",
        Map::Rename("single_stream_modulation.linear"),
    ),
    ("double_blocks.{i}.img_attn.qkv", Map::Split(QKV)),
    (
        "double_blocks.{i}.img_attn.proj",
        Map::Rename("attn.to_out.0"),
    ),
    (
        "double_blocks.{i}.img_attn.norm.query_norm",
        Map::Rename("attn.norm_q"),
    ),
    (
        "double_blocks.{i}.img_attn.norm.key_norm",
        Map::Rename("attn.norm_k"),
    ),
    ("double_blocks.{i}.txt_attn.qkv", Map::Split(ADD_QKV)),
    (
        "double_blocks.{i}.txt_attn.proj",
        Map::Rename("attn.to_add_out"),
    ),
    (
        "double_blocks.{i}.txt_attn.norm.query_norm",
        Map::Rename("attn.norm_added_q"),
    ),
    (
        "double_blocks.{i}.txt_attn.norm.key_norm",
        Map::Rename("attn.norm_added_k"),
    ),
    ("double_blocks.{i}.img_mlp.0", Map::Rename("ff.linear_in")),
    ("double_blocks.{i}.img_mlp.2", Map::Rename("ff.linear_out")),
    (
        "double_blocks.{i}.txt_mlp.0",
        Map::Rename("ff_context.linear_in"),
    ),
    (
        "double_blocks.{i}.txt_mlp.2",
        Map::Rename("ff_context.linear_out"),
    ),
    (
        "single_blocks.{i}.linear1",
        Map::Rename("attn.to_qkv_mlp_proj"),
    ),
    ("single_blocks.{i}.linear2", Map::Rename("attn.to_out")),
    (
        "single_blocks.{i}.norm.query_norm",
        Map::Rename("attn.norm_q"),
    ),
    (
        "single_blocks.{i}.norm.key_norm",
        Map::Rename("attn.norm_k"),
    ),
    ("final_layer.linear", Map::Rename("proj_out")),
    (
        "final_layer.adaLN_modulation.1",
        Map::Swap("norm_out.linear"),
    ),
];

/// A single-file checkpoint layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// diffusers names already.
    Diffusers,
    /// Stability AI SD3 / SD3.5 (`model.diffusion_model.joint_blocks…`).
    SaiSd3,
    /// Black Forest Labs FLUX.1 (`double_blocks…`, `single_blocks….linear1`).
    BflFlux1,
    /// Black Forest Labs FLUX.2 (`double_stream_modulation_img.lin`).
    BflFlux2,
}

/// Recognises the layout of a checkpoint from its key names.
pub fn detect(weights: &Weights) -> Layout {
    let keys = weights.keys();
    let has = |needle: &str| keys.iter().any(|k| k.contains(needle));
    if has("model.diffusion_model.joint_blocks.") || has("joint_blocks.0.x_block") {
        Layout::SaiSd3
    } else if has("double_stream_modulation_img.lin.") {
        Layout::BflFlux2
    } else if has("double_blocks.0.img_attn.qkv") {
        Layout::BflFlux1
    } else {
        Layout::Diffusers
    }
}

/// Makes an original-layout checkpoint readable under diffusers names (`d` = model width).
/// A no-op for [`Layout::Diffusers`].
pub fn alias_to_diffusers(weights: &mut Weights, layout: Layout, d: usize) {
    let (rules, prefix, blocks): (&[Rule], &str, &[(&str, &str)]) = match layout {
        Layout::Diffusers => return,
        Layout::SaiSd3 => (
            SAI_SD3,
            "model.diffusion_model.",
            &[("joint_blocks.", "transformer_blocks.")],
        ),
        Layout::BflFlux1 => (
            BFL_FLUX1,
            "",
            &[
                ("double_blocks.", "transformer_blocks."),
                ("single_blocks.", "single_transformer_blocks."),
            ],
        ),
        Layout::BflFlux2 => (
            BFL_FLUX2,
            "",
            &[
                ("double_blocks.", "transformer_blocks."),
                ("single_blocks.", "single_transformer_blocks."),
            ],
        ),
    };
    let last_joint_block = weights
        .keys()
        .iter()
        .filter_map(|k| {
            k.strip_prefix(prefix)?
                .strip_prefix("joint_blocks.")?
                .split('.')
                .next()?
                .parse::<usize>()
                .ok()
        })
        .max();
    for key in weights.keys() {
        let Some(name) = key.strip_prefix(prefix) else {
            continue;
        };
        let (stem, suffix) = match name.rsplit_once('.') {
            Some((stem, "scale")) => (stem, "weight"),
            Some((stem, suffix @ ("weight" | "bias"))) => (stem, suffix),
            _ => (name, ""),
        };
        for (pattern, map) in rules {
            let Some((index, target_block)) = match_rule(stem, pattern, blocks) else {
                continue;
            };
            let full = |target: &str| {
                let base = match &target_block {
                    Some(block) => format!("{block}{index}.{target}"),
                    None => target.to_string(),
                };
                if suffix.is_empty() {
                    base
                } else {
                    format!("{base}.{suffix}")
                }
            };
            match *map {
                Map::Rename(target) => {
                    let swap = layout == Layout::SaiSd3
                        && stem.ends_with("context_block.adaLN_modulation.1")
                        && Some(index) == last_joint_block;
                    weights.alias(
                        full(target),
                        Alias {
                            source: key.clone(),
                            rows: None,
                            swap_halves: swap,
                        },
                    );
                }
                Map::Swap(target) => weights.alias(
                    full(target),
                    Alias {
                        source: key.clone(),
                        rows: None,
                        swap_halves: true,
                    },
                ),
                Map::Split(parts) => {
                    let mut start = 0;
                    for &(target, width) in parts {
                        weights.alias(
                            full(target),
                            Alias {
                                source: key.clone(),
                                rows: Some((start, width * d)),
                                swap_halves: false,
                            },
                        );
                        start += width * d;
                    }
                }
            }
            break;
        }
    }
}

/// Whether `stem` matches `pattern` (`{i}` = a block index); returns the index and the diffusers
/// block prefix for block rules.
fn match_rule(
    stem: &str,
    pattern: &str,
    blocks: &[(&str, &str)],
) -> Option<(usize, Option<String>)> {
    let Some((before, after)) = pattern.split_once("{i}") else {
        return (stem == pattern).then_some((0, None));
    };
    let rest = stem.strip_prefix(before)?;
    let (digits, tail) = rest.split_once('.')?;
    let index: usize = digits.parse().ok()?;
    if format!(".{tail}") != after {
        return None;
    }
    let block = blocks
        .iter()
        .find(|(original, _)| before == *original)
        .map(|(_, ours)| ours.to_string())?;
    Some((index, Some(block)))
}
