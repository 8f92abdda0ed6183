"""Golden fixtures for the text encoders: tiny random CLIP text models (transformers).

For each writes assets/golden/<name>/:
  config.json, model.safetensors   exactly what save_pretrained() writes
  io.safetensors                   input_ids (as f32), last_hidden_state, penultimate hidden state
                                   (hidden_states[-2], what SD3 feeds its transformer) and the
                                   pooled output (text_embeds with a projection, else pooler_output)

Variants: CLIP-L style (quick_gelu, projection, end token = largest id) and OpenCLIP bigG style
(gelu, projection, transformers' legacy eos_token_id = 2 → pooled at the largest id).

Run:  /work/venv/bin/python tools/golden/make_text_fixtures.py
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import GOLDEN, save_io, setup_torch  # noqa: E402

import transformers  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModelWithProjection  # noqa: E402


def make(name: str, hidden_act: str, eos_token_id: int, seed: int) -> None:
    torch.manual_seed(seed)
    cfg = CLIPTextConfig(
        vocab_size=40,
        hidden_size=32,
        intermediate_size=64,
        projection_dim=24,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=12,
        hidden_act=hidden_act,
        layer_norm_eps=1e-5,
        bos_token_id=38,
        eos_token_id=eos_token_id,
        pad_token_id=0,
    )
    model = CLIPTextModelWithProjection(cfg).eval()
    with torch.no_grad():
        # Non-trivial norms so a port that ignores them fails.
        for n, p in model.named_parameters():
            if "layer_norm" in n:
                p.add_(0.25 * torch.randn_like(p))
    out_dir = GOLDEN / name
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        for n in ["config.json", "model.safetensors"]:
            shutil.copyfile(Path(tmp) / n, out_dir / n)
    # Two prompts: start, words, end, padding; different lengths so pooling positions differ.
    ids = torch.tensor(
        [
            [38, 5, 17, 3, 22, 39, 0, 0, 0, 0],
            [38, 11, 2, 30, 7, 9, 14, 25, 39, 0],
        ]
    )
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
    save_io(
        out_dir / "io.safetensors",
        {
            "input_ids": ids.float(),
            "last_hidden_state": out.last_hidden_state,
            "penultimate_hidden_state": out.hidden_states[-2],
            "text_embeds": out.text_embeds,
        },
        {"transformers": transformers.__version__, "class": "CLIPTextModelWithProjection"},
    )
    print(name, {k: tuple(v.shape) for k, v in {"last": out.last_hidden_state, "pooled": out.text_embeds}.items()})


if __name__ == "__main__":
    setup_torch()
    make("clip_text_tiny", "quick_gelu", 39, seed=11)
    make("clip_text_bigg_tiny", "gelu", 2, seed=12)
