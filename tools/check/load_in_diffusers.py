"""Checks that a portaflow pipeline folder (e.g. the bundled model, or a pretraining checkpoint)
loads in diffusers / transformers with no missing or unexpected keys, and prints one forward
of each component on fixed inputs.

Run:  /work/venv/bin/python tools/check/load_in_diffusers.py assets/models/shapes-base
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from diffusers import SD3Transformer2DModel
from transformers import CLIPTextModelWithProjection, PreTrainedTokenizerFast


def main(folder: Path) -> None:
    transformer, info = SD3Transformer2DModel.from_pretrained(folder / "transformer", output_loading_info=True)
    bad = {k: v for k, v in info.items() if v}
    assert not bad, f"transformer: {bad}"
    text, info = CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder", output_loading_info=True)
    bad = {k: v for k, v in info.items() if v}
    assert not bad, f"text encoder: {bad}"
    tok = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer" / "tokenizer.json"), pad_token="<pad>")
    ids = tok(["a photo of a red circle"], padding="max_length", max_length=16)["input_ids"]
    index = json.loads((folder / "model_index.json").read_text())
    size = index.get("pixel_resolution") or transformer.config.sample_size
    with torch.no_grad():
        out = text(torch.tensor(ids), output_hidden_states=True)
        x = torch.zeros(1, transformer.config.in_channels, size, size)
        v = transformer(
            hidden_states=x,
            encoder_hidden_states=out.hidden_states[-2],
            pooled_projections=out.text_embeds,
            timestep=torch.tensor([500.0]),
        ).sample
    print(f"ok: ids {ids[0][:8]}…, pooled norm {out.text_embeds.norm():.4f}, velocity mean {v.mean():.5f} std {v.std():.5f}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
