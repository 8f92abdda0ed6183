"""Round trip: adapters portaflow wrote load in peft and diffusers unchanged and give the output
portaflow computed.

Reads assets/golden/lora/roundtrip/ (written by
`PORTAFLOW_WRITE_ROUNDTRIP=1 cargo test --workspace --test suite lora::roundtrip`):
  adapter/                          PEFT folder, loaded with peft's `PeftModel.from_pretrained`
  pytorch_lora_weights.safetensors  diffusers file, loaded with `load_lora_adapter`
  portaflow_output.safetensors      portaflow's output of sd3_tiny + adapter on sd3_tiny's inputs
and writes peft_output.safetensors (`peft`, `diffusers`) that the Rust test compares against.

Run:  /work/venv/bin/python tools/check/load_lora_in_peft.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "golden"))
import torch  # noqa: E402
from _common import GOLDEN, setup_torch  # noqa: E402
from diffusers import SD3Transformer2DModel  # noqa: E402
from peft import PeftModel  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

ROUNDTRIP = GOLDEN / "lora" / "roundtrip"


def forward(model, io) -> torch.Tensor:
    with torch.no_grad():
        return model(
            hidden_states=io["hidden_states"],
            encoder_hidden_states=io["encoder_hidden_states"],
            pooled_projections=io["pooled_projections"],
            timestep=io["timestep"],
        ).sample


def main() -> None:
    setup_torch()
    io = load_file(GOLDEN / "sd3_tiny" / "io.safetensors")
    ours = load_file(ROUNDTRIP / "portaflow_output.safetensors")["output"]

    base = SD3Transformer2DModel.from_pretrained(GOLDEN / "sd3_tiny").eval()
    peft_model = PeftModel.from_pretrained(base, ROUNDTRIP / "adapter").eval()
    wrapped = sorted(n for n, m in peft_model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A)
    peft_out = forward(peft_model, io)

    plain = SD3Transformer2DModel.from_pretrained(GOLDEN / "sd3_tiny").eval()
    # A file path alone makes diffusers skip the safetensors branch and with it the
    # `lora_adapter_metadata` (α falls back to r); the folder plus weight_name reads both.
    plain.load_lora_adapter(
        str(ROUNDTRIP), weight_name="pytorch_lora_weights.safetensors", prefix="transformer", adapter_name="x"
    )
    diffusers_out = forward(plain, io)

    base_out = forward(SD3Transformer2DModel.from_pretrained(GOLDEN / "sd3_tiny").eval(), io)
    scale = ours.abs().max().clamp(min=1.0)
    for name, out in [("peft", peft_out), ("diffusers", diffusers_out)]:
        rel = ((out - ours).abs().max() / scale).item()
        print(f"{name}: {len(wrapped)} wrapped modules, max |theirs - portaflow| / scale = {rel:.2e}")
        assert rel < 1e-4, f"{name} disagrees with portaflow"
    print(f"adapter effect: max |adapted - base| = {(ours - base_out).abs().max().item():.3e}")
    save_file({"peft": peft_out.contiguous(), "diffusers": diffusers_out.contiguous()}, ROUNDTRIP / "peft_output.safetensors")
    print(f"wrote {ROUNDTRIP / 'peft_output.safetensors'}")


if __name__ == "__main__":
    main()
