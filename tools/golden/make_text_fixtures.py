"""Golden fixtures for the text encoders: tiny random CLIP, T5 and Qwen3 models (transformers).

For each writes assets/golden/<name>/:
  config.json, model.safetensors   exactly what save_pretrained() writes
  io.safetensors                   input_ids (as f32), last_hidden_state, penultimate hidden state
                                   (hidden_states[-2], what SD3 feeds its transformer) and the
                                   pooled output (text_embeds with a projection, else pooler_output)

T5 (t5_tiny: v1.1 gated-gelu; t5_relu_tiny: v1.0 relu) writes the last hidden state of an
unmasked call, as diffusers calls it. Qwen3 (qwen3_tiny, a Qwen3ForCausalLM as FLUX.2-klein
loads it) writes every entry of `hidden_states` for right-padded prompts with their attention
mask, as the klein pipeline calls it.

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
from transformers import (  # noqa: E402
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    Qwen3Config,
    Qwen3ForCausalLM,
    T5Config,
    T5EncoderModel,
)


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
    perturb_norms(model, "layer_norm")
    out_dir = save_model(model, name)
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


def save_model(model, name: str) -> Path:
    out_dir = GOLDEN / name
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        for n in ["config.json", "model.safetensors"]:
            shutil.copyfile(Path(tmp) / n, out_dir / n)
    return out_dir


def perturb_norms(model, marker: str) -> None:
    """Non-trivial norm scales so a port that ignores them fails."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if marker in n:
                p.add_(0.25 * torch.randn_like(p))


def make_t5(name: str, feed_forward_proj: str, seed: int) -> None:
    torch.manual_seed(seed)
    cfg = T5Config(
        vocab_size=40,
        d_model=32,
        d_kv=8,
        d_ff=48,
        num_layers=3,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=20,
        feed_forward_proj=feed_forward_proj,
        dropout_rate=0.0,
    )
    model = T5EncoderModel(cfg).eval()
    perturb_norms(model, "layer_norm")
    out_dir = save_model(model, name)
    # 24 tokens: relative distances reach past max_distance, so every bucket rule runs.
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 40, (2, 24), generator=gen)
    ids[0, 15] = 1  # end of the first prompt, then padding (id 0), attended as diffusers does
    ids[0, 16:] = 0
    with torch.no_grad():
        out = model(input_ids=ids)
    save_io(
        out_dir / "io.safetensors",
        {"input_ids": ids.float(), "last_hidden_state": out.last_hidden_state},
        {"transformers": transformers.__version__, "class": "T5EncoderModel"},
    )
    print(name, tuple(out.last_hidden_state.shape))


def make_qwen3(name: str, seed: int) -> None:
    torch.manual_seed(seed)
    cfg = Qwen3Config(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        rms_norm_eps=1e-6,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    model = Qwen3ForCausalLM(cfg).eval()
    perturb_norms(model, "norm")
    out_dir = save_model(model, name)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 50, (2, 12), generator=gen)
    mask = torch.ones_like(ids)
    ids[0, 7:] = 0  # right padding, masked out
    mask[0, 7:] = 0
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    tensors = {"input_ids": ids.float(), "attention_mask": mask.float()}
    for i, h in enumerate(out.hidden_states):
        tensors[f"hidden_states.{i}"] = h
    save_io(
        out_dir / "io.safetensors",
        tensors,
        {"transformers": transformers.__version__, "class": "Qwen3ForCausalLM"},
    )
    print(name, len(out.hidden_states), tuple(out.hidden_states[-1].shape))


def t5_bucket_table() -> None:
    """Prints transformers' relative buckets for the Rust unit test's table."""
    from transformers.models.t5.modeling_t5 import T5Attention

    relative = torch.tensor([-200, -150, -100, -50, -9, -8, -7, -1, 0, 1, 7, 8, 9, 50, 100, 150, 200])
    buckets = T5Attention._relative_position_bucket(relative, True, 32, 128)
    print("t5 buckets", relative.tolist(), buckets.tolist())


if __name__ == "__main__":
    setup_torch()
    make("clip_text_tiny", "quick_gelu", 39, seed=11)
    make("clip_text_bigg_tiny", "gelu", 2, seed=12)
    make_t5("t5_tiny", "gated-gelu", seed=13)
    make_t5("t5_relu_tiny", "relu", seed=14)
    make_qwen3("qwen3_tiny", seed=15)
    t5_bucket_table()
