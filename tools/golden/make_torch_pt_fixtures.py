"""torch.save fixtures for the Rust state-dict reader (`core/src/model/torch_pt.rs`).

Writes small `torch.save` files to `assets/golden/torch_pt/`, in the zip layout torch has written
since 1.6 unless named otherwise, plus `expected.json`:

  flat_f32.pt          {str: f32 tensor}: 2-D, 1-D, 0-d, empty, and a 320-element one (BININT2 numel)
  f16.pt, bf16.pt      the same kind of dict in float16 / bfloat16 (values exactly representable in f32)
  f64.pt               float64 tensors (the reader rounds to f32 like `.float()`)
  non_contiguous.pt    views sharing one storage: the base, its transpose, a strided slice with a
                       storage offset, a row, and a stride-0 `expand`
  nested.pt            {"epoch": 3, "state_dict": {...}, "generator_ema": {"inner": {...}}, ...}:
                       flattened with `.`-joined keys, ints / strings / floats / lists skipped
  lora_module.pt       `state_dict()` of an nn.Module with peft LoRA layers injected (keys
                       `transformer_blocks.0.attn.to_q.lora_A.default.weight`, an OrderedDict with
                       `_metadata`, i.e. a BUILD opcode)
  protocol4.pt         flat_f32's dict saved with pickle_protocol=4 (FRAME, MEMOIZE, STACK_GLOBAL,
                       SHORT_BINUNICODE)
  parameter.pt         {"w": nn.Parameter}: `torch._utils._rebuild_parameter`
  deflated.pt          flat_f32.pt with its zip entries re-compressed with deflate
  evil.pt              a dict holding an object whose __reduce__ is (os.system, ("echo pwned",))
                       (pickled as the global `posix system`); evil_protocol4.pt the same with
                       protocol 4 (STACK_GLOBAL). Nothing in this script runs the payload.
  int_tensor.pt        a dict with an int64 tensor (not a float tensor)
  not_a_dict.pt        a list of tensors at the top level
  missing_storage.pt   flat_f32.pt without the zip entry of storage 0
  short_storage.pt     flat_f32.pt with storage 0 cut to 4 bytes
  truncated.pt         the first 60 % of flat_f32.pt
  legacy.pt            flat_f32's linear.weight saved with _use_new_zipfile_serialization=False

`expected.json`: for every readable file, its tensors in file order as {key, shape, values} with
the values converted to float32 (exact in JSON: Python writes the shortest repr of the double);
for every broken file, the substrings its error message must contain.

Run:  /work/venv/bin/python tools/golden/make_torch_pt_fixtures.py   (~9 s, reruns byte-identical)
"""

from __future__ import annotations

import io
import json
import os
import pickle
import pickletools
import shutil
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import GOLDEN, dir_size, setup_torch  # noqa: E402

OUT = GOLDEN / "torch_pt"


class Evil:
    """What a malicious checkpoint carries: unpickling it in Python would run a shell command."""

    def __reduce__(self):
        return (os.system, ("echo pwned",))


def flat_dict(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {
        "linear.weight": torch.randn(3, 4).to(dtype),
        "linear.bias": torch.randn(3).to(dtype),
        "scale": torch.tensor(2.5, dtype=dtype),
        "empty": torch.zeros(0, 3, dtype=dtype),
        "table": torch.randn(20, 16).to(dtype),
    }


def shared_views() -> dict[str, torch.Tensor]:
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6) * 0.5 - 3.0
    views = {
        "base": base,
        "transposed": base.t(),  # [6, 4], stride (1, 6)
        "slice": base[1:3, ::2],  # [2, 3], offset 6, stride (6, 2)
        "row": base[2],  # [6], offset 12
        "expanded": base[3, :2].expand(3, 2),  # [3, 2], offset 18, stride (0, 1)
    }
    assert all(v.untyped_storage().data_ptr() == base.untyped_storage().data_ptr() for v in views.values())
    assert not views["transposed"].is_contiguous() and not views["slice"].is_contiguous()
    return views


class Attention(torch.nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.to_q = torch.nn.Linear(dim, dim)
        self.to_k = torch.nn.Linear(dim, dim)


class Block(torch.nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.attn = Attention(dim)


class TinyTransformer(torch.nn.Module):
    def __init__(self, dim: int = 6, depth: int = 2):
        super().__init__()
        self.transformer_blocks = torch.nn.ModuleList(Block(dim) for _ in range(depth))


def lora_module_state() -> OrderedDict:
    from peft import LoraConfig, inject_adapter_in_model

    model = TinyTransformer()
    model = inject_adapter_in_model(LoraConfig(r=2, lora_alpha=4, target_modules=["to_q", "to_k"]), model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # peft initialises B to zero; make every value distinct
                p.normal_()
    sd = model.state_dict()
    assert "transformer_blocks.0.attn.to_q.lora_A.default.weight" in sd, list(sd)
    assert hasattr(sd, "_metadata")
    return sd


def nested_dict() -> dict:
    return {
        "epoch": 3,
        "name": "run-7",
        "lr": 1e-4,
        "done": True,
        "nothing": None,
        "history": [0.5, 0.25],
        "state_dict": {"layer.weight": torch.randn(2, 3), "layer.bias": torch.randn(2)},
        "generator_ema": {"inner": {"deep": torch.randn(4)}, "step": 10},
    }


def flatten(obj, prefix: str = "") -> list[tuple[str, torch.Tensor]]:
    """What the reader must return: tensors in insertion order with `.`-joined keys."""
    out = []
    for k, v in obj.items():
        key = f"{prefix}{k}"
        if isinstance(v, torch.Tensor):
            out.append((key, v))
        elif isinstance(v, dict):
            out.extend(flatten(v, key + "."))
    return out


def expectation(obj) -> list[dict]:
    return [
        {"key": k, "shape": list(v.shape), "values": v.detach().to(torch.float32).flatten().tolist()}
        for k, v in flatten(obj)
    ]


def write_expected(path: Path, readable: dict[str, list[dict]], errors: dict[str, list[str]]) -> None:
    """JSON with one tensor per line (an indented dump would put every value on its own line)."""
    files = ",\n".join(
        f"    {json.dumps(name)}: [\n" + ",\n".join(f"      {json.dumps(t)}" for t in tensors) + "\n    ]"
        for name, tensors in readable.items()
    )
    errs = ",\n".join(f"    {json.dumps(name)}: {json.dumps(subs)}" for name, subs in errors.items())
    path.write_text(f'{{\n  "readable": {{\n{files}\n  }},\n  "errors": {{\n{errs}\n  }}\n}}\n')
    json.loads(path.read_text())


def pin_legacy_storage_keys(path: Path) -> None:
    """The legacy format names storages by their address (`str(storage._cdata)`) and writes them in
    the order of those names; with one storage, renaming it to a same-length string of zeros makes
    reruns byte-identical (the BINUNICODE lengths are unchanged)."""
    data = path.read_bytes()
    stream = io.BytesIO(data)
    for _ in range(4):  # magic number, protocol version, sys info, the object (skipped unexecuted)
        for _op in pickletools.genops(stream):
            pass
    [key] = pickle.load(stream)  # a plain list of str
    assert data.count(key.encode()) == 2, key
    data = data.replace(key.encode(), b"0" * len(key))
    path.write_bytes(data)


def rewrite_zip(src: Path, dst: Path, edit) -> None:
    """Copies a zip entry by entry; `edit(name, data)` returns the new data, or None to drop it."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = edit(info.filename, zin.read(info.filename))
            if data is not None:
                zout.writestr(info, data)


def main() -> None:
    setup_torch()
    torch.manual_seed(0)
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    readable: dict[str, list[dict]] = {}

    def save(name: str, obj, **kwargs) -> Path:
        path = OUT / name
        torch.save(obj, str(path), **kwargs)
        return path

    def save_readable(name: str, obj, **kwargs) -> Path:
        path = save(name, obj, **kwargs)
        readable[name] = expectation(obj)
        return path

    flat = flat_dict(torch.float32)
    flat_path = save_readable("flat_f32.pt", flat)
    save_readable("f16.pt", flat_dict(torch.float16))
    save_readable("bf16.pt", flat_dict(torch.bfloat16))
    save_readable("f64.pt", {"a": torch.randn(2, 3, dtype=torch.float64), "b": torch.tensor([1e-40, 1e30, 1 / 3], dtype=torch.float64)})
    save_readable("non_contiguous.pt", shared_views())
    save_readable("nested.pt", nested_dict())
    save_readable("lora_module.pt", lora_module_state())
    save_readable("protocol4.pt", flat, pickle_protocol=4)
    save_readable("parameter.pt", {"w": torch.nn.Parameter(torch.randn(2, 2))})

    readable["deflated.pt"] = readable["flat_f32.pt"]
    with zipfile.ZipFile(flat_path) as zin, zipfile.ZipFile(OUT / "deflated.pt", "w") as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            info.compress_type = zipfile.ZIP_DEFLATED
            zout.writestr(info, data)

    save("evil.pt", {"weight": torch.ones(2), "payload": Evil()})
    save("evil_protocol4.pt", {"weight": torch.ones(2), "payload": Evil()}, pickle_protocol=4)
    save("int_tensor.pt", {"weight": torch.ones(2), "ids": torch.arange(4)})
    save("not_a_dict.pt", [torch.ones(2)])
    legacy = {"linear.weight": flat["linear.weight"]}
    pin_legacy_storage_keys(save("legacy.pt", legacy, _use_new_zipfile_serialization=False))
    assert torch.equal(torch.load(OUT / "legacy.pt", weights_only=True)["linear.weight"], legacy["linear.weight"])
    rewrite_zip(flat_path, OUT / "missing_storage.pt", lambda n, d: None if n.endswith("/data/0") else d)
    rewrite_zip(flat_path, OUT / "short_storage.pt", lambda n, d: d[:4] if n.endswith("/data/0") else d)
    data = flat_path.read_bytes()
    (OUT / "truncated.pt").write_bytes(data[: len(data) * 6 // 10])

    errors = {
        "evil.pt": ["refuses to execute pickled code", "posix.system"],
        "evil_protocol4.pt": ["refuses to execute pickled code", "posix.system"],
        "int_tensor.pt": ["ids", "LongStorage", "not a float tensor"],
        "not_a_dict.pt": ["top-level object", "not a dict"],
        "missing_storage.pt": ["linear.weight", "data/0", "missing"],
        "short_storage.pt": ["linear.weight", "data/0", "too small"],
        "truncated.pt": ["truncated"],
        "legacy.pt": ["legacy torch.save format (torch < 1.6) is not supported, re-save with torch>=1.6"],
    }
    write_expected(OUT / "expected.json", readable, errors)
    for p in OUT.iterdir():
        p.chmod(0o644)
    print(f"wrote {len(list(OUT.iterdir()))} files, {dir_size(OUT):,} bytes, to {OUT}")


if __name__ == "__main__":
    main()
