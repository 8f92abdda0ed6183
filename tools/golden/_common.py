"""Shared helpers for the golden-fixture scripts (tools/golden/*.py).

Everything here runs on the CPU in float32. No network access, no model hub:
every model is built from a config in code and given seeded random weights.
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
import shutil
import tempfile
from pathlib import Path

import diffusers
import safetensors
import torch
from safetensors.torch import save_file

REPO_ROOT = Path(__file__).resolve().parents[2]
GOLDEN = REPO_ROOT / "assets" / "golden"


def setup_torch() -> None:
    """Deterministic float32 CPU execution."""
    torch.set_default_dtype(torch.float32)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)  # bit-identical reruns; the models are tiny anyway


def versions() -> dict[str, str]:
    return {
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "safetensors": safetensors.__version__,
    }


ADALN_CLASSES = (
    "AdaLayerNormZero",
    "AdaLayerNormZeroSingle",
    "SD35AdaLayerNormZeroX",
    "AdaLayerNormContinuous",
    "Flux2Modulation",
)


@torch.no_grad()
def randomize_for_parity(model: torch.nn.Module, adaln_gain: float = 3.0, norm_noise: float = 0.25) -> dict:
    """Re-draw the weights so that every path of the network matters in the output.

    With diffusers' default init the AdaLN-Zero modulations of a tiny model are ~0.02, so every
    block is nearly the identity and a port with e.g. swapped shift/scale chunks or a broken
    attention would still match to 1e-3. Here (using the global torch RNG, seeded by the caller):
      * every nn.Linear weight ~ N(0, 1/fan_in), bias ~ N(0, 0.1^2);
      * the Linear inside every AdaLN / modulation module gets weight ~ N(0, (adaln_gain^2)/fan_in)
        and bias ~ N(0, 0.5^2), so shift/scale/gate are O(1);
      * every parameter that is still constant (RMSNorm / GroupNorm weights = 1, biases = 0)
        gets N(0, norm_noise^2) added.
    Convolutions keep PyTorch's default init. Returns a summary for the fixture metadata."""
    adaln_linears = set()
    for name, m in model.named_modules():
        if type(m).__name__ in ADALN_CLASSES:
            for sub_name, sub in m.named_modules():
                if isinstance(sub, torch.nn.Linear):
                    adaln_linears.add(f"{name}.{sub_name}" if sub_name else name)
    n_lin = 0
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):
            fan_in = m.weight.shape[1]
            gain = adaln_gain if name in adaln_linears else 1.0
            m.weight.normal_(0.0, gain / fan_in**0.5)
            if m.bias is not None:
                m.bias.normal_(0.0, 0.5 if name in adaln_linears else 0.1)
            n_lin += 1
    touched = []
    for name, p in model.named_parameters():
        if p.numel() > 0 and torch.all(p == p.reshape(-1)[0]):
            p.add_(norm_noise * torch.randn_like(p))
            touched.append(name)
    return {"linears": n_lin, "adaln_linears": len(adaln_linears), "perturbed_constant_params": len(touched)}


def save_model(model, out_dir: Path) -> None:
    """save_pretrained() into a temp dir and copy config.json and the f32 safetensors
    exactly as diffusers writes them."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        names = sorted(os.listdir(tmp))
        assert names == ["config.json", "diffusion_pytorch_model.safetensors"], names
        for n in names:
            shutil.copyfile(Path(tmp) / n, out_dir / n)


def save_io(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    out = {}
    for k, v in tensors.items():
        assert isinstance(v, torch.Tensor), k
        out[k] = v.detach().to(torch.float32).contiguous().clone()
    md = {**versions(), **meta}
    # One metadata key only: safetensors stores metadata in a hash map, so several keys would
    # come out in a random order and the file would not be byte-reproducible.
    save_file(out, str(path), metadata={"golden": json.dumps(md, sort_keys=True)})
    path.chmod(0o644)


class Recorder:
    """Forward hooks that record module outputs as `intermediate.<module name>[.<i>]`."""

    def __init__(self, model: torch.nn.Module, names: list[str]):
        self.store: dict[str, torch.Tensor] = {}
        self.handles = []
        modules = dict(model.named_modules())
        for n in names:
            self.handles.append(modules[n].register_forward_hook(self._hook(n)))

    def _hook(self, name):
        def fn(_module, _inp, out):
            if isinstance(out, torch.Tensor):
                self.store[f"intermediate.{name}"] = out.detach().clone()
            elif isinstance(out, (tuple, list)):
                for i, o in enumerate(out):
                    if isinstance(o, torch.Tensor):
                        self.store[f"intermediate.{name}.{i}"] = o.detach().clone()
            else:
                raise TypeError(f"{name}: unexpected output {type(out)}")

        return fn

    def remove(self):
        for h in self.handles:
            h.remove()


def describe(tensors: dict[str, torch.Tensor]) -> str:
    lines = []
    for k, v in tensors.items():
        lines.append(f"    {k:55s} {str(list(v.shape)):18s} std={v.float().std().item():.4f}")
    return "\n".join(lines)


def dir_size(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
