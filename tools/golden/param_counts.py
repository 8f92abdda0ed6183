"""Parameter counts of the REAL model configs, instantiated on the meta device (no memory, no download).

Writes assets/golden/param_counts.json:
  {preset: {"config": <config.json as save_pretrained writes it>, "parameters": N,
            "persistent_buffers": M, "state_dict_keys": K, "source": "..."}}
and prints a table. The Rust presets (core/src/model/*/config.rs) can be checked against it.

Run:  /work/venv/bin/python tools/golden/param_counts.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import GOLDEN, versions, write_json  # noqa: E402

from diffusers import FluxTransformer2DModel, Flux2Transformer2DModel, SD3Transformer2DModel  # noqa: E402

SFU = "diffusers/loaders/single_file_utils.py"
SD3_SCRIPT = "huggingface/diffusers scripts/convert_sd3_to_diffusers.py (repo only, not in the wheel)"
FLUX2_SCRIPT = (
    "huggingface/diffusers scripts/convert_flux2_to_diffusers.py get_flux2_transformer_config "
    "(repo only, not in the wheel; read at commit 207bae7a5e772ce97e6a446cdf16fba5b9acca24)"
)

SD3_COMMON = dict(
    sample_size=128,
    patch_size=2,
    in_channels=16,
    attention_head_dim=64,
    joint_attention_dim=4096,
    pooled_projection_dim=2048,
    out_channels=16,
)

PRESETS = {
    "sd3-medium": (
        SD3Transformer2DModel,
        dict(SD3_COMMON, num_layers=24, num_attention_heads=24, caption_projection_dim=1536, pos_embed_max_size=192),
        f"{SD3_SCRIPT}: sample_size=128, patch_size=2, in_channels=16, joint_attention_dim=4096, heads=num_layers, "
        "caption_projection_dim=context_embedder.weight.shape[0], pos_embed_max_size=sqrt(pos_embed.shape[1]); "
        f"{SFU} infer_diffusers_model_type: 'sd3' = joint_blocks.0.context_block.adaLN_modulation.1.bias of 9216 "
        "(= 6 x 1536, so 24 heads x 64) and pos_embed.shape[1] == 36864 (= 192^2); depth 24 from ECOSYSTEM.md 5.2 "
        "(heads = layers); pooled_projection_dim 2048 = CLIP-L 768 + CLIP-G 1280 (class default).",
    ),
    "sd3.5-medium": (
        SD3Transformer2DModel,
        dict(
            SD3_COMMON,
            num_layers=24,
            num_attention_heads=24,
            caption_projection_dim=1536,
            pos_embed_max_size=384,
            dual_attention_layers=tuple(range(13)),
            qk_norm="rms_norm",
        ),
        f"{SFU} infer_diffusers_model_type: 'sd35_medium' = adaLN bias 9216 (24 x 64) and pos_embed.shape[1] == "
        "147456 (= 384^2); transformer_sd3.py __init__ comment: dual_attention_layers (0..12) for sd3.5; "
        f"{SD3_SCRIPT}: qk_norm='rms_norm' when ln_q keys exist ('sd3.5 2b use pos_embed_max_size=384').",
    ),
    "sd3.5-large": (
        SD3Transformer2DModel,
        dict(
            SD3_COMMON,
            num_layers=38,
            num_attention_heads=38,
            caption_projection_dim=2432,
            pos_embed_max_size=192,
            qk_norm="rms_norm",
        ),
        f"{SFU} CHECKPOINT_KEY_NAMES['sd35_large'] = joint_blocks.37.x_block.mlp.fc1.weight (38 layers); "
        f"{SD3_SCRIPT}: heads = num_layers, caption_projection_dim = 64 x 38 = 2432, "
        "'sd3.0 and sd3.5 8b use 192', qk_norm rms_norm (ln_q keys), no attn2 keys -> no dual attention.",
    ),
    "flux.1-dev": (
        FluxTransformer2DModel,
        dict(guidance_embeds=True),
        "FluxTransformer2DModel class defaults (transformer_flux.py __init__: patch 1, in 64, 19 double, 38 single, "
        "24 x 128, joint 4096, pooled 768, axes (16, 56, 56)) + guidance_embeds=True; "
        f"{SFU} convert_flux_transformer_checkpoint_to_diffusers: inner_dim = 3072, mlp_ratio 4.0, guidance_in keys "
        "present for dev; infer_diffusers_model_type -> 'flux-dev' when guidance_in keys exist.",
    ),
    "flux.1-schnell": (
        FluxTransformer2DModel,
        dict(guidance_embeds=False),
        "FluxTransformer2DModel class defaults + guidance_embeds=False ('flux-schnell' in "
        f"{SFU} infer_diffusers_model_type: no guidance_in keys).",
    ),
    "flux.2-klein-4b": (
        Flux2Transformer2DModel,
        dict(
            patch_size=1,
            in_channels=128,
            num_layers=5,
            num_single_layers=20,
            attention_head_dim=128,
            num_attention_heads=24,
            joint_attention_dim=7680,
            timestep_guidance_channels=256,
            mlp_ratio=3.0,
            axes_dims_rope=(32, 32, 32, 32),
            rope_theta=2000,
            eps=1e-6,
            guidance_embeds=False,
        ),
        f"{FLUX2_SCRIPT} 'klein-4b'; joint_attention_dim 7680 = 3 x 2560 (Qwen3-4B hidden states of layers 9, 18, 27 "
        "stacked, pipeline_flux2_klein.py _get_qwen3_prompt_embeds); ECOSYSTEM.md 5.4.",
    ),
    "flux.2-klein-9b": (
        Flux2Transformer2DModel,
        dict(
            patch_size=1,
            in_channels=128,
            num_layers=8,
            num_single_layers=24,
            attention_head_dim=128,
            num_attention_heads=32,
            joint_attention_dim=12288,
            timestep_guidance_channels=256,
            mlp_ratio=3.0,
            axes_dims_rope=(32, 32, 32, 32),
            rope_theta=2000,
            eps=1e-6,
            guidance_embeds=False,
        ),
        f"{FLUX2_SCRIPT} 'klein-9b'; joint_attention_dim 12288 = 3 x 4096 (Qwen3-8B hidden size); ECOSYSTEM.md 5.4.",
    ),
    "flux.2-dev": (
        Flux2Transformer2DModel,
        dict(),
        "Flux2Transformer2DModel class defaults (= the 'flux2-dev' config of " + FLUX2_SCRIPT + ", guidance_embeds=True).",
    ),
}


def count(cls, cfg: dict) -> dict:
    with torch.device("meta"):
        model = cls(**cfg)
    config = json.loads(model.to_json_string())
    params = sum(p.numel() for p in model.parameters())
    sd = model.state_dict()
    pnames = {n for n, _ in model.named_parameters()}
    buffers = sum(v.numel() for k, v in sd.items() if k not in pnames)
    return {
        "config": config,
        "parameters": params,
        "persistent_buffers": buffers,
        "state_dict_keys": len(sd),
    }


def main() -> None:
    out = {"_generated_by": "tools/golden/param_counts.py", "_versions": versions()}
    rows = []
    for name, (cls, cfg, source) in PRESETS.items():
        r = count(cls, cfg)
        r["source"] = source
        out[name] = r
        c = r["config"]
        hidden = c["num_attention_heads"] * c["attention_head_dim"]
        rows.append((name, cls.__name__, hidden, r["parameters"], r["persistent_buffers"], r["state_dict_keys"]))
    path = GOLDEN / "param_counts.json"
    write_json(path, out)
    print(f"{'preset':18s} {'class':24s} {'hidden':>6s} {'parameters':>15s} {'(B)':>7s} {'buffers':>10s} {'keys':>5s}")
    for n, c, h, p, b, k in rows:
        print(f"{n:18s} {c:24s} {h:6d} {p:15,d} {p / 1e9:7.3f} {b:10,d} {k:5d}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
