"""Golden fixtures for LoRA adapter parity (peft / diffusers / kohya / raw torch state dicts).

Reads the committed tiny transformers (assets/golden/{sd3_tiny,sd35_tiny,flux1_tiny,flux2_tiny}: weights
and the forward inputs of their io.safetensors, so make_transformer_fixtures.py must have run) and
writes assets/golden/lora/<case>/:

  case.json              what to load (files, formats, weights), base_change, the exact modules every
                         adapter wraps with their r / alpha / scaling, notes
  expected.safetensors   `output` (+ `output_<variant>`): the transformer output, f32, on the model's
                         io.safetensors inputs, with the adapters active as case.json lists them
  adapter files          PEFT folders, diffusers pytorch_lora_weights.safetensors, kohya, torch .pt

Cases:
  sd3_flowgrpo    Flow-GRPO's SD3 LoRA (PeftModel.save_pretrained) + the same weights as a diffusers
                  file with lora_adapter_metadata + a different adapter as a diffusers file without
                  metadata (alpha defaults to r)
  sd35_patterns   PEFT target selection: regex target_modules; list + exclude_modules +
                  layers_to_transform/layers_pattern + rank_pattern + alpha_pattern + rsLoRA;
                  two adapters active together with weights 1.0 / 0.5 (diffusers set_adapters)
  flux1_boxflow   BoxFlow-GRPO's FLUX.1 LoRA (attention + feed-forwards) as a PEFT folder, plus a
                  kohya (sd-scripts) FLUX file converted by diffusers' own converter
  flux2_rtdmd     RTDMD's FLUX.2 LoRA: two LoRA-only torch.save state dicts (`*.lora_A.default.weight`),
                  cold start f32, rtdmd bf16; expected = cold start merged into the base, rtdmd on top

Every adapter starts from peft's `init_lora_weights="gaussian"`, then lora_A and lora_B are redrawn
from a seeded generator (B is zero after init, so otherwise the adapter would do nothing).
Every written file is loaded back through peft / diffusers and must reproduce its expected output.

Run:  /work/venv/bin/python tools/golden/make_lora_fixtures.py
"""

from __future__ import annotations

import os
import sys

# peft writes set-valued config fields (target_modules, exclude_modules) as list(set), whose order
# depends on Python's string hash seed. Re-exec with a fixed seed so reruns are byte-identical.
if os.environ.get("PYTHONHASHSEED") != "0":
    os.environ["PYTHONHASHSEED"] = "0"
    os.execv(sys.executable, [sys.executable, *sys.argv])

import contextlib  # noqa: E402
import inspect  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
from collections import OrderedDict  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import GOLDEN, dir_size, setup_torch, versions  # noqa: E402

import diffusers.loaders.lora_conversion_utils as lcu  # noqa: E402
import diffusers.loaders.lora_pipeline as lora_pipeline  # noqa: E402
import peft  # noqa: E402
from diffusers import (  # noqa: E402
    FluxPipeline,
    FluxTransformer2DModel,
    Flux2Transformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from diffusers.training_utils import _collate_lora_metadata  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict  # noqa: E402
from peft.tuners.lora import LoraLayer  # noqa: E402
from peft.tuners.tuners_utils import BaseTunerLayer  # noqa: E402

LORA = GOLDEN / "lora"
TOL = 1e-6  # reload checks: max |diff| against the stored expectation
CHANGE_RANGE = (0.05, 0.50)  # accepted relative L2 change of the output caused by an adapter

MODELS = {
    "sd3_tiny": (SD3Transformer2DModel, ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep")),
    "sd35_tiny": (SD3Transformer2DModel, ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep")),
    "flux1_tiny": (
        FluxTransformer2DModel,
        ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "img_ids", "txt_ids", "guidance"),
    ),
    "flux2_tiny": (Flux2Transformer2DModel, ("hidden_states", "encoder_hidden_states", "timestep", "img_ids", "txt_ids")),
}


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------

def load_base(model: str):
    cls, _ = MODELS[model]
    return cls.from_pretrained(GOLDEN / model, torch_dtype=torch.float32).eval()


def model_inputs(model: str) -> tuple[dict, torch.Tensor]:
    """The forward kwargs exactly as make_transformer_fixtures.py passed them, and the base output."""
    io = load_file(GOLDEN / model / "io.safetensors")
    _, names = MODELS[model]
    kwargs = {k: io[k] for k in names}
    if model == "flux2_tiny":
        kwargs["guidance"] = None  # klein: the pipeline passes guidance=None
    return kwargs, io["output"]


def forward(model, kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(**kwargs, return_dict=False)[0]


def rel_change(out: torch.Tensor, base: torch.Tensor) -> float:
    return ((out - base).norm() / base.norm()).item()


def check_change(label: str, out: torch.Tensor, base: torch.Tensor) -> float:
    c = rel_change(out, base)
    print(f"    {label:44s} relative L2 change vs base = {c:.4f}")
    assert CHANGE_RANGE[0] <= c <= CHANGE_RANGE[1], f"{label}: change {c:.4f} out of range {CHANGE_RANGE}"
    return round(c, 6)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def assert_close(label: str, got: torch.Tensor, want: torch.Tensor, tol: float = TOL) -> float:
    d = max_diff(got, want)
    print(f"    reload {label:50s} max|diff| = {d:.3e}")
    assert d < tol, f"{label}: max diff {d} >= {tol}"
    return d


def lora_layers(model, adapter: str):
    """(module path, LoraLayer) for every module that carries `adapter`, in named_modules order.
    Paths are relative to the diffusers transformer (a PeftModel's base_model.model. prefix is cut)."""
    out = []
    for name, mod in model.named_modules():
        if isinstance(mod, LoraLayer) and adapter in mod.lora_A:
            out.append((name.removeprefix("base_model.model."), mod))
    return out


@torch.no_grad()
def randomize_lora(model, adapter: str, seed: int, gain: float) -> None:
    """Redraw lora_A ~ N(0, 1/fan_in) and lora_B ~ N(0, gain^2 / r), module by module in
    named_modules order, from one seeded generator: delta W = s * B A then has entries of std
    ~ s * gain / sqrt(fan_in), i.e. (s * gain) times the base Linear init of _common.randomize_for_parity."""
    g = torch.Generator().manual_seed(seed)
    layers = lora_layers(model, adapter)
    assert layers, f"adapter {adapter} wraps nothing"
    for _, mod in layers:
        a = mod.lora_A[adapter].weight
        b = mod.lora_B[adapter].weight
        r, fan_in = a.shape
        a.copy_(torch.randn(a.shape, generator=g) / math.sqrt(fan_in))
        b.copy_(torch.randn(b.shape, generator=g) * gain / math.sqrt(r))


@torch.no_grad()
def copy_lora(src, src_adapter: str, dst, dst_adapter: str) -> None:
    s = lora_layers(src, src_adapter)
    d = lora_layers(dst, dst_adapter)
    assert [n for n, _ in s] == [n for n, _ in d], "different wrapped modules"
    for (_, ms), (_, md) in zip(s, d):
        md.lora_A[dst_adapter].weight.copy_(ms.lora_A[src_adapter].weight)
        md.lora_B[dst_adapter].weight.copy_(ms.lora_B[src_adapter].weight)


def module_table(model, adapter: str) -> list[dict]:
    """What peft built: every wrapped module with its rank, alpha, rsLoRA flag and scaling
    (at adapter weight 1.0; a multi-adapter weight w multiplies the scaling)."""
    rows = []
    for name, mod in lora_layers(model, adapter):
        a = mod.lora_A[adapter].weight
        b = mod.lora_B[adapter].weight
        r = mod.r[adapter]
        alpha = mod.lora_alpha[adapter]
        rs = bool(mod.use_rslora.get(adapter, False))
        rows.append(
            {
                "module": name,
                "in_features": a.shape[1],
                "out_features": b.shape[0],
                "r": r,
                "alpha": alpha,
                "use_rslora": rs,
                "scaling": alpha / math.sqrt(r) if rs else alpha / r,
            }
        )
    return rows


def summarize(rows: list[dict]) -> str:
    ranks = sorted({r["r"] for r in rows})
    alphas = sorted({r["alpha"] for r in rows})
    scal = sorted({round(r["scaling"], 6) for r in rows})
    return f"{len(rows)} modules, r {ranks}, alpha {alphas}, scaling {scal}"


def fresh_dir(p: Path) -> Path:
    if p.exists():
        shutil.rmtree(p)
    p.mkdir(parents=True)
    return p


def save_peft_folder(peft_model: PeftModel, out_dir: Path) -> None:
    """PeftModel.save_pretrained, keeping adapter_config.json and adapter_model.safetensors
    byte-for-byte (the generated README.md model card is dropped)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        peft_model.save_pretrained(tmp)
        names = sorted(os.listdir(tmp))
        assert {"adapter_config.json", "adapter_model.safetensors"} <= set(names), names
        for n in ("adapter_config.json", "adapter_model.safetensors"):
            shutil.copyfile(Path(tmp) / n, out_dir / n)


def safetensors_header(path: Path) -> OrderedDict:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + n], object_pairs_hook=OrderedDict)


def canonicalize_metadata(path: Path) -> None:
    """safetensors keeps `__metadata__` in a Rust HashMap, so a file with several metadata keys
    (diffusers writes `format` and `lora_adapter_metadata`) comes out with a random key order.
    Rewrite only the header with the metadata keys sorted; tensors, offsets and header length are
    unchanged (asserted by re-serialising the original header first)."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    hdr_bytes = raw[8 : 8 + n]
    body = hdr_bytes.rstrip(b" ")
    header = json.loads(body, object_pairs_hook=OrderedDict)
    dump = lambda h: json.dumps(h, separators=(",", ":"), ensure_ascii=False).encode()  # noqa: E731
    assert dump(header) == body, f"{path}: header not reproducible by json.dumps"
    meta = header.get("__metadata__")
    if not meta or len(meta) < 2:
        return
    new = OrderedDict([("__metadata__", OrderedDict(sorted(meta.items())))])
    new.update((k, v) for k, v in header.items() if k != "__metadata__")
    enc = dump(new)
    assert len(enc) == len(body)
    path.write_bytes(raw[:8] + enc + b" " * (n - len(enc)) + raw[8 + n :])
    again = safetensors_header(path)
    plain = lambda h: json.loads(json.dumps(h))  # noqa: E731  (OrderedDict == is order-sensitive)
    assert plain(again) == plain(header) and list(again["__metadata__"]) == sorted(meta)


def save_expected(path: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    out = {k: v.detach().to(torch.float32).contiguous().clone() for k, v in tensors.items()}
    md = {**versions(), "peft": peft.__version__, **meta}
    save_file(out, str(path), metadata={"golden": json.dumps(md, sort_keys=True)})  # one key: reproducible


def file_facts(path: Path) -> dict:
    """First keys in file order and the metadata, for the README / report."""
    if path.suffix == ".safetensors":
        h = safetensors_header(path)
        meta = h.pop("__metadata__", None)
        keys = list(h.keys())
        dtypes = sorted({v["dtype"] for v in h.values()})
    else:
        sd = torch.load(path, map_location="cpu", weights_only=True)
        meta = None
        keys = list(sd.keys())
        dtypes = sorted({str(v.dtype).removeprefix("torch.") for v in sd.values()})
    return {"keys": len(keys), "first_keys": keys[:3], "dtypes": dtypes, "metadata": meta}


@contextlib.contextmanager
def capture_diffusers_log():
    """Collect what diffusers logs (warnings about dropped / unexpected keys) while loading."""
    records: list[str] = []

    class H(logging.Handler):
        def emit(self, record):
            records.append(f"{record.levelname}: {record.getMessage()}")

    h = H(level=logging.INFO)
    lg = logging.getLogger("diffusers")
    old = lg.level
    lg.addHandler(h)
    lg.setLevel(logging.INFO)
    try:
        yield records
    finally:
        lg.removeHandler(h)
        lg.setLevel(old)


def strip_peft_prefix(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    assert all(k.startswith("base_model.model.") for k in sd)
    return {k.removeprefix("base_model.model."): v for k, v in sd.items()}


def load_peft_folder_into(model, folder: Path, adapter: str) -> None:
    """Attach a PEFT folder to a plain diffusers model under `adapter` (diffusers add_adapter +
    peft set_peft_model_state_dict), so several folders can be combined with set_adapters."""
    cfg = LoraConfig.from_pretrained(str(folder))
    model.add_adapter(cfg, adapter_name=adapter)
    sd = strip_peft_prefix(load_file(folder / "adapter_model.safetensors"))
    res = set_peft_model_state_dict(model, sd, adapter_name=adapter)
    unexpected = [k for k in res.unexpected_keys if "lora" in k]
    missing = [k for k in res.missing_keys if "lora" in k and f".{adapter}." in k]
    assert not unexpected and not missing, (unexpected, missing)


def _json(o, ind: int = 0) -> str:
    """JSON with containers of scalars kept on one line when short (one wrapped module per line)."""
    pad = "  " * ind
    flat = json.dumps(o)
    if not isinstance(o, (dict, list)) or not o:
        return flat
    values = o.values() if isinstance(o, dict) else o
    if all(not isinstance(v, (dict, list)) for v in values) and len(flat) <= 170:
        return flat
    if isinstance(o, dict):
        items = [f"{pad}  {json.dumps(k)}: {_json(v, ind + 1)}" for k, v in o.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    items = [f"{pad}  {_json(v, ind + 1)}" for v in o]
    return "[\n" + ",\n".join(items) + "\n" + pad + "]"


def finish_case(out_dir: Path, case: dict, expected: dict[str, torch.Tensor], files: list[str]) -> None:
    save_expected(out_dir / "expected.safetensors", expected, {"case": out_dir.name, "model": case["model"]})
    case["expected_keys"] = list(expected.keys())
    case["file_facts"] = {f: file_facts(out_dir / f) for f in files}
    case["generated_by"] = {"script": "tools/golden/make_lora_fixtures.py", **versions(), "peft": peft.__version__}
    (out_dir / "case.json").write_text(_json(case) + "\n")
    print(f"  {out_dir.name}: {dir_size(out_dir)} bytes")


# --------------------------------------------------------------------------------------------
# 1. SD3 / Flow-GRPO
# --------------------------------------------------------------------------------------------

# flow_grpo/scripts/train_sd3.py (yifan123/flow_grpo): get_peft_model(transformer, LoraConfig(
#   r=32, lora_alpha=64, init_lora_weights="gaussian", target_modules=...)), saved with
#   unwrap_model(transformer).save_pretrained(<ckpt>/lora)
FLOWGRPO_SD3_TARGETS = [
    "attn.add_k_proj",
    "attn.add_q_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "attn.to_k",
    "attn.to_out.0",
    "attn.to_q",
    "attn.to_v",
]


def case_sd3_flowgrpo() -> None:
    name, model = "sd3_flowgrpo", "sd3_tiny"
    print(f"== {name}")
    out_dir = fresh_dir(LORA / name)
    kwargs, base_out = model_inputs(model)

    def cfg(r, alpha):
        return LoraConfig(r=r, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(FLOWGRPO_SD3_TARGETS))

    # --- the Flow-GRPO adapter: a PeftModel, saved with save_pretrained
    base = load_base(model)
    assert torch.equal(forward(base, kwargs), base_out), "base model does not reproduce io.safetensors:output"
    pm = get_peft_model(base, cfg(4, 8))
    randomize_lora(pm, "default", seed=101, gain=0.1)
    output = forward(pm, kwargs)
    change = check_change("output (r4 alpha8, peft)", output, base_out)
    modules = module_table(pm, "default")
    print(f"    adapter: {summarize(modules)}")
    save_peft_folder(pm, out_dir / "adapter")

    # --- the same weights as a diffusers training script writes them (train_dreambooth_lora_sd3.py):
    # transformer.add_adapter(config) ... get_peft_model_state_dict(transformer) +
    # _collate_lora_metadata({"transformer": transformer}) -> Pipeline.save_lora_weights
    t2 = load_base(model)
    t2.add_adapter(cfg(4, 8))
    copy_lora(pm, "default", t2, "default")
    assert torch.equal(forward(t2, kwargs), output)
    with tempfile.TemporaryDirectory() as tmp:
        StableDiffusion3Pipeline.save_lora_weights(
            tmp,
            transformer_lora_layers=get_peft_model_state_dict(t2),
            **_collate_lora_metadata({"transformer": t2}),
        )
        assert os.listdir(tmp) == ["pytorch_lora_weights.safetensors"], os.listdir(tmp)
        shutil.copyfile(Path(tmp) / "pytorch_lora_weights.safetensors", out_dir / "pytorch_lora_weights.safetensors")
    canonicalize_metadata(out_dir / "pytorch_lora_weights.safetensors")

    # --- a different adapter (r4, alpha4), keys only: no lora_adapter_metadata
    t3 = load_base(model)
    t3.add_adapter(cfg(4, 4))
    randomize_lora(t3, "default", seed=102, gain=0.2)
    inmem_nm = forward(t3, kwargs)
    with tempfile.TemporaryDirectory() as tmp:
        StableDiffusion3Pipeline.save_lora_weights(
            tmp,
            transformer_lora_layers=get_peft_model_state_dict(t3),
            weight_name="pytorch_lora_weights_no_metadata.safetensors",
        )
        shutil.copyfile(
            Path(tmp) / "pytorch_lora_weights_no_metadata.safetensors",
            out_dir / "pytorch_lora_weights_no_metadata.safetensors",
        )
    # its expectation comes from diffusers' own loading path (alpha default is diffusers' choice)
    t4 = load_base(model)
    with capture_diffusers_log() as log_nm:
        t4.load_lora_adapter(
            str(out_dir),
            weight_name="pytorch_lora_weights_no_metadata.safetensors",
            prefix="transformer",
            adapter_name="no_metadata",
        )
    output_nm = forward(t4, kwargs)
    modules_nm = module_table(t4, "no_metadata")
    print(f"    no-metadata adapter as diffusers loads it: {summarize(modules_nm)}")
    change_nm = check_change("output_no_metadata", output_nm, base_out)
    d_inmem = max_diff(output_nm, inmem_nm)
    print(f"    no-metadata: diffusers-loaded vs trained-in-memory (alpha 4 = r) max|diff| = {d_inmem:.3e}")

    # --- reload checks
    r1 = PeftModel.from_pretrained(load_base(model), str(out_dir / "adapter")).eval()
    assert_close("adapter/ (PeftModel.from_pretrained)", forward(r1, kwargs), output)
    assert module_table(r1, "default") == modules
    r2 = load_base(model)
    with capture_diffusers_log() as log_md:
        r2.load_lora_adapter(
            str(out_dir), weight_name="pytorch_lora_weights.safetensors", prefix="transformer", adapter_name="flowgrpo"
        )
    assert_close("pytorch_lora_weights.safetensors (load_lora_adapter)", forward(r2, kwargs), output)
    assert module_table(r2, "flowgrpo") == modules, "metadata did not restore alpha"
    r3 = load_base(model)
    sd, meta = StableDiffusion3Pipeline.lora_state_dict(
        str(out_dir), weight_name="pytorch_lora_weights_no_metadata.safetensors", return_lora_metadata=True
    )
    assert meta is None
    StableDiffusion3Pipeline.load_lora_into_transformer(sd, transformer=r3, adapter_name="nm", metadata=meta)
    assert_close("pytorch_lora_weights_no_metadata.safetensors", forward(r3, kwargs), output_nm)

    case = {
        "model": model,
        "description": "Flow-GRPO's SD3 LoRA (r=4, lora_alpha=8, init gaussian then redrawn). The same weights "
        "in two formats: a PEFT folder as Flow-GRPO saves it (PeftModel.save_pretrained) and a diffusers "
        "pytorch_lora_weights.safetensors with lora_adapter_metadata (StableDiffusion3Pipeline.save_lora_weights, "
        "as diffusers' train_dreambooth_lora_sd3.py writes it). Both give `output`.",
        "adapters": [{"file": "adapter", "format": "peft", "weight": 1.0}],
        "base_change": change,
        "equivalent_adapters": [
            {"file": "pytorch_lora_weights.safetensors", "format": "diffusers", "weight": 1.0, "expected": "output"}
        ],
        "variants": {
            "output_no_metadata": {
                "adapters": [
                    {"file": "pytorch_lora_weights_no_metadata.safetensors", "format": "diffusers", "weight": 1.0}
                ],
                "base_change": change_nm,
                "description": "A different adapter (trained as r=4, lora_alpha=4), saved with keys only: the "
                "safetensors metadata is just {format: pt}. Expected output computed by diffusers' own loader "
                "(load_lora_adapter), which, without metadata and without network alphas, sets lora_alpha = r "
                "(scaling 1.0, get_peft_kwargs in diffusers/utils/peft_utils.py).",
                "max_diff_vs_in_memory_alpha4": d_inmem,
            }
        },
        "lora_config": {"r": 4, "lora_alpha": 8, "target_modules": FLOWGRPO_SD3_TARGETS, "init_lora_weights": "gaussian"},
        "wrapped_modules": {"adapter": modules, "pytorch_lora_weights_no_metadata.safetensors": modules_nm},
        "notes": [
            "sd3_tiny's last block is context_pre_only: it has no attn.to_add_out, so the 8 targets wrap 8 + 7 = 15 "
            "Linear modules.",
            "PEFT folder keys: base_model.model.<module>.lora_A.weight / .lora_B.weight (adapter name removed), "
            "metadata {format: pt}; adapter_config.json holds r, lora_alpha, target_modules, rank_pattern, "
            "alpha_pattern, use_rslora, ... (and inference_mode: true, written by save_pretrained).",
            "diffusers file keys: transformer.<module>.lora_A.weight / .lora_B.weight; metadata "
            "`lora_adapter_metadata` is a JSON string of the full LoraConfig.to_dict() with every key prefixed "
            "`transformer.` (e.g. `transformer.r`, `transformer.lora_alpha`), json.dumps(indent=2, sort_keys=True).",
            "The order of the two safetensors metadata keys is random in what safetensors writes (Rust HashMap); "
            "the committed file has them sorted (header rewritten, bytes otherwise as diffusers wrote them).",
        ],
        "diffusers_log": {"load_with_metadata": log_md, "load_no_metadata": log_nm},
    }
    finish_case(
        out_dir,
        case,
        {"output": output, "output_no_metadata": output_nm},
        [
            "adapter/adapter_model.safetensors",
            "pytorch_lora_weights.safetensors",
            "pytorch_lora_weights_no_metadata.safetensors",
        ],
    )


# --------------------------------------------------------------------------------------------
# 2. SD3.5 / PEFT selection semantics
# --------------------------------------------------------------------------------------------

SD35_REGEX = r".*\.attn2?\.(to_q|to_v|add_k_proj)"
SD35_LIST_TARGETS = [
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "add_k_proj",
    "add_v_proj",
    "ff.net.0.proj",
    "ff.net.2",
    "transformer_blocks.0.ff_context.net.2",
]
SD35_EXCLUDE = ["add_v_proj", "transformer_blocks.1.attn.to_v"]


def sd35_regex_config() -> LoraConfig:
    return LoraConfig(r=2, lora_alpha=3, init_lora_weights="gaussian", target_modules=SD35_REGEX)


def sd35_lists_config() -> LoraConfig:
    return LoraConfig(
        r=4,
        lora_alpha=2,
        init_lora_weights="gaussian",
        target_modules=list(SD35_LIST_TARGETS),
        exclude_modules=list(SD35_EXCLUDE),
        layers_to_transform=[1],
        layers_pattern="transformer_blocks",
        rank_pattern={"attn.to_k": 6},
        alpha_pattern={"ff.net.0.proj": 3},
        use_rslora=True,
    )


def case_sd35_patterns() -> None:
    name, model = "sd35_patterns", "sd35_tiny"
    print(f"== {name}")
    out_dir = fresh_dir(LORA / name)
    kwargs, base_out = model_inputs(model)

    t = load_base(model)
    assert torch.equal(forward(t, kwargs), base_out)
    t.add_adapter(sd35_regex_config(), adapter_name="regex")
    t.add_adapter(sd35_lists_config(), adapter_name="lists")
    randomize_lora(t, "regex", seed=201, gain=0.15)
    randomize_lora(t, "lists", seed=202, gain=0.12)
    mod_regex = module_table(t, "regex")
    mod_lists = module_table(t, "lists")
    print(f"    regex: {summarize(mod_regex)}")
    print(f"    lists: {summarize(mod_lists)}")

    t.set_adapters("regex")
    output_regex = forward(t, kwargs)
    t.set_adapters("lists")
    output_lists = forward(t, kwargs)
    t.set_adapters(["regex", "lists"], weights=[1.0, 0.5])
    output = forward(t, kwargs)
    c_regex = check_change("output_regex", output_regex, base_out)
    c_lists = check_change("output_lists", output_lists, base_out)
    change = check_change("output (regex 1.0 + lists 0.5)", output, base_out)
    # the effective multi-adapter scalings, straight from the LoRA layers
    eff = {}
    for adapter in ("regex", "lists"):
        eff[adapter] = {n: m.scaling[adapter] for n, m in lora_layers(t, adapter)}

    # each adapter as a PEFT folder: a PeftModel on a fresh base with the same config and weights
    for adapter, mk in (("regex", sd35_regex_config), ("lists", sd35_lists_config)):
        pm = get_peft_model(load_base(model), mk())
        copy_lora(t, adapter, pm, "default")
        save_peft_folder(pm, out_dir / f"adapter_{adapter}")

    # reload checks
    for adapter, want, mods in (("regex", output_regex, mod_regex), ("lists", output_lists, mod_lists)):
        r = PeftModel.from_pretrained(load_base(model), str(out_dir / f"adapter_{adapter}")).eval()
        assert_close(f"adapter_{adapter}/ (PeftModel.from_pretrained)", forward(r, kwargs), want)
        assert module_table(r, "default") == mods
    r = load_base(model)
    load_peft_folder_into(r, out_dir / "adapter_regex", "regex")
    load_peft_folder_into(r, out_dir / "adapter_lists", "lists")
    r.set_adapters(["regex", "lists"], weights=[1.0, 0.5])
    assert_close("both folders, set_adapters([1.0, 0.5])", forward(r, kwargs), output)

    all_linear = [n for n, m in load_base(model).named_modules() if isinstance(m, torch.nn.Linear)]
    case = {
        "model": model,
        "description": "PEFT target selection and per-module rank/alpha resolution. adapter_regex: target_modules "
        "is a regex string (re.fullmatch against every module path). adapter_lists: target_modules list "
        "(suffix match: path == t or path ends with '.' + t), exclude_modules (same suffix rule, applied "
        "first), layers_to_transform=[1] with layers_pattern='transformer_blocks', rank_pattern and "
        "alpha_pattern overriding one module each, and use_rslora=True (scaling = alpha / sqrt(r)). "
        "`output` = both active through diffusers set_adapters(['regex', 'lists'], weights=[1.0, 0.5]).",
        "adapters": [
            {"file": "adapter_regex", "format": "peft", "weight": 1.0},
            {"file": "adapter_lists", "format": "peft", "weight": 0.5},
        ],
        "base_change": change,
        "variants": {
            "output_regex": {"adapters": [{"file": "adapter_regex", "format": "peft", "weight": 1.0}], "base_change": c_regex},
            "output_lists": {"adapters": [{"file": "adapter_lists", "format": "peft", "weight": 1.0}], "base_change": c_lists},
        },
        "lora_config": {
            "adapter_regex": {"r": 2, "lora_alpha": 3, "target_modules": SD35_REGEX},
            "adapter_lists": {
                "r": 4,
                "lora_alpha": 2,
                "target_modules": SD35_LIST_TARGETS,
                "exclude_modules": SD35_EXCLUDE,
                "layers_to_transform": [1],
                "layers_pattern": "transformer_blocks",
                "rank_pattern": {"attn.to_k": 6},
                "alpha_pattern": {"ff.net.0.proj": 3},
                "use_rslora": True,
            },
        },
        "wrapped_modules": {"adapter_regex": mod_regex, "adapter_lists": mod_lists},
        "effective_scaling_in_output": {
            "formula": "weight * alpha / r (rsLoRA: weight * alpha / sqrt(r)); diffusers set_adapters -> LoraLayer.set_scale",
            "adapter_regex": eff["regex"],
            "adapter_lists": eff["lists"],
        },
        "all_linear_modules": all_linear,
        "notes": [
            "Regex: peft uses re.fullmatch(target_modules, path) (peft/utils/other.py match_target_against_key); "
            "attn2 (the SD3.5 dual-attention block 0) matches, add_q_proj / to_k do not.",
            "layers_to_transform: the layer index is the first number after the layers_pattern segment, "
            "re.match(r'(?:^|.*?\\.)transformer_blocks\\.(?P<idx>\\d+)\\.', path) (tuners_utils.py "
            "check_target_module_exists).",
            "PEFT quirk kept on purpose: a target that equals the FULL module path "
            "('transformer_blocks.0.ff_context.net.2') is accepted by the `path in target_modules` branch, which "
            "skips the layers_to_transform filter, so that block-0 module IS wrapped although "
            "layers_to_transform=[1].",
            "exclude_modules is checked before the targets: 'add_v_proj' (suffix) and "
            "'transformer_blocks.1.attn.to_v' (full path) are not wrapped.",
            "rank_pattern / alpha_pattern keys are regexes matched as re.match(rf'(.*\\.)?({key})$', path), "
            "first matching key wins (peft/utils/other.py get_pattern_key); 'attn.to_k' -> r=6 only for "
            "transformer_blocks.1.attn.to_k; 'ff.net.0.proj' -> alpha=3.",
            "With use_rslora the alpha_pattern / rank_pattern values go through alpha/sqrt(r) too.",
            "Multi-adapter forward (peft LoraLayer.forward): base(x) + sum over active adapters in order "
            "[regex, lists] of lora_B(lora_A(x)) * scaling, scaling already multiplied by the adapter weight.",
            "adapter_config.json stores target_modules as the regex string for adapter_regex and as a list for "
            "adapter_lists (peft turns the list into a set; its order in the file is hash-seed dependent, the "
            "script pins PYTHONHASHSEED=0).",
        ],
    }
    finish_case(
        out_dir,
        case,
        {"output": output, "output_regex": output_regex, "output_lists": output_lists},
        ["adapter_regex/adapter_model.safetensors", "adapter_lists/adapter_model.safetensors"],
    )


# --------------------------------------------------------------------------------------------
# 3. FLUX.1 / BoxFlow-GRPO + kohya
# --------------------------------------------------------------------------------------------

BOXFLOW_TARGETS = [
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "add_q_proj",
    "add_k_proj",
    "add_v_proj",
    "to_add_out",
    "ff.net.0.proj",
    "ff.net.2",
    "ff_context.net.0.proj",
    "ff_context.net.2",
]


def kohya_flux_converter(dim: int):
    """diffusers' _convert_kohya_flux_lora_to_diffusers splits single_blocks.N.linear1 with the
    hard-coded real FLUX.1 sizes `dims=[3072, 3072, 3072, 12288]` (asserting they sum to the up
    weight's rows), so it cannot convert any narrower model. Rebuild the very same function from
    the installed source with that one literal replaced by the tiny model's [dim, dim, dim, 4*dim]."""
    fn = lcu._convert_kohya_flux_lora_to_diffusers
    src = inspect.getsource(fn)
    needle = "dims=[3072, 3072, 3072, 12288],"
    assert src.count(needle) == 1, "diffusers changed _convert_kohya_flux_lora_to_diffusers"
    src = src.replace(needle, "dims=_LINEAR1_DIMS,")
    ns = dict(vars(lcu))
    ns["_LINEAR1_DIMS"] = [dim, dim, dim, 4 * dim]
    exec(compile(src, inspect.getsourcefile(fn), "exec"), ns)
    return ns[fn.__name__]


@contextlib.contextmanager
def patched_kohya_converter(dim: int):
    orig = lora_pipeline._convert_kohya_flux_lora_to_diffusers
    lora_pipeline._convert_kohya_flux_lora_to_diffusers = kohya_flux_converter(dim)
    try:
        yield
    finally:
        lora_pipeline._convert_kohya_flux_lora_to_diffusers = orig


def make_kohya_flux(model) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Random LoRA tensors in kohya sd-scripts' FLUX.1 naming (networks/lora_flux.py) for the tiny
    model: `lora_unet_<bfl module with . -> _>.{lora_down.weight, lora_up.weight, alpha}`."""
    cfg = model.config
    dim = cfg.num_attention_heads * cfg.attention_head_dim
    mlp = 4 * dim
    g = torch.Generator().manual_seed(301)
    sd: dict[str, torch.Tensor] = {}
    plan: list[dict] = []

    # (kohya module, in, out, rank, alpha (None = no .alpha key), sparse qkv split, gain)
    mods = []
    for i in range(cfg.num_layers):
        p = f"lora_unet_double_blocks_{i}_"
        mods += [
            (p + "img_attn_qkv", dim, 3 * dim, 4, 2.0, False, 0.5),  # dense: lora_down shared by q, k, v
            (p + "img_attn_proj", dim, dim, 4, 2.0, False, 0.5),
            (p + "img_mlp_0", dim, mlp, 4, 2.0, False, 0.5),
            (p + "img_mlp_2", mlp, dim, 4, 1.0, False, 0.5),  # scale 1/4 < 1/2: split 0.5 * 0.5
            (p + "img_mod_lin", dim, 6 * dim, 2, 4.0, False, 0.15),  # scale 2
            (p + "txt_attn_qkv", dim, 3 * dim, 6, 3.0, True, 0.5),  # sparse: rank 3 x 2, block-diagonal up
            (p + "txt_attn_proj", dim, dim, 4, 2.0, False, 0.5),
            (p + "txt_mlp_0", dim, mlp, 4, 2.0, False, 0.5),
            (p + "txt_mlp_2", mlp, dim, 4, 2.0, False, 0.5),
            (p + "txt_mod_lin", dim, 6 * dim, 4, None, False, 0.15),  # no alpha key: alpha = rank
        ]
    for i in range(cfg.num_single_layers):
        p = f"lora_unet_single_blocks_{i}_"
        mods += [
            (p + "linear1", dim, 3 * dim + mlp, 4, 2.0, False, 0.5),  # q, k, v, proj_mlp
            (p + "linear2", dim + mlp, dim, 4, 3.0 if i == 1 else 2.0, False, 0.5),  # 3/4: not a power of 2
            (p + "modulation_lin", dim, 3 * dim, 4, 2.0, False, 0.15),
        ]
    for key, fin, fout, r, alpha, sparse, gain in mods:
        down = torch.randn(r, fin, generator=g) / math.sqrt(fin)
        up = torch.randn(fout, r, generator=g) * gain / math.sqrt(r)
        if sparse:  # sd-scripts' split_qkv layout: each of q, k, v has its own rank r/3 block
            rr, d = r // 3, fout // 3
            mask = torch.zeros(fout, r)
            for j in range(3):
                mask[j * d : (j + 1) * d, j * rr : (j + 1) * rr] = 1.0
            up = up * mask
        sd[f"{key}.lora_down.weight"] = down
        sd[f"{key}.lora_up.weight"] = up
        if alpha is not None:
            sd[f"{key}.alpha"] = torch.tensor(alpha, dtype=torch.float32)  # 0-dim, as sd-scripts saves it
        plan.append(
            {
                "kohya": key,
                "down": [r, fin],
                "up": [fout, r],
                "alpha": alpha,
                "scale_alpha_over_rank": (alpha if alpha is not None else r) / r,
                "sparse_block_diagonal_up": sparse,
            }
        )
    return sd, plan


def probe_kohya_drops(model, dim: int) -> dict:
    """Which kohya keys diffusers converts but then silently does not load: non-block modules come
    out of the converter without the `transformer.` prefix and load_lora_adapter(prefix='transformer')
    filters them away."""
    g = torch.Generator().manual_seed(0)
    probe = {}
    for key, fin, fout in (
        ("lora_unet_final_layer_linear", dim, model.config.in_channels),
        ("lora_unet_final_layer_adaLN_modulation_1", dim, 2 * dim),
        ("lora_unet_img_in", model.config.in_channels, dim),
        ("lora_unet_double_blocks_0_img_attn_proj", dim, dim),
    ):
        probe[f"{key}.lora_down.weight"] = torch.randn(2, fin, generator=g)
        probe[f"{key}.lora_up.weight"] = torch.randn(fout, 2, generator=g)
        probe[f"{key}.alpha"] = torch.tensor(1.0)
    with tempfile.TemporaryDirectory() as tmp, patched_kohya_converter(dim):
        save_file(probe, f"{tmp}/probe.safetensors")
        conv = FluxPipeline.lora_state_dict(f"{tmp}/probe.safetensors")
    m = load_base("flux1_tiny")
    with capture_diffusers_log() as log:
        m.load_lora_adapter(conv, prefix="transformer", adapter_name="probe")
    wrapped = [n for n, _ in lora_layers(m, "probe")]
    converted = sorted(conv.keys())
    assert wrapped == ["transformer_blocks.0.attn.to_out.0"], wrapped
    assert "proj_out.lora_A.weight" in conv and "x_embedder.lora_A.weight" in conv, converted
    assert torch.equal(conv["proj_out.lora_A.weight"], probe["lora_unet_final_layer_linear.lora_down.weight"])
    return {"probe_kohya_keys": sorted({k.split(".")[0] for k in probe}), "converted_keys": converted,
            "wrapped_after_load": wrapped, "diffusers_log": log}


def case_flux1_boxflow() -> None:
    name, model = "flux1_boxflow", "flux1_tiny"
    print(f"== {name}")
    out_dir = fresh_dir(LORA / name)
    kwargs, base_out = model_inputs(model)

    def cfg():
        return LoraConfig(r=8, lora_alpha=16, init_lora_weights="gaussian", target_modules=list(BOXFLOW_TARGETS))

    base = load_base(model)
    assert torch.equal(forward(base, kwargs), base_out)
    dim = base.config.num_attention_heads * base.config.attention_head_dim
    pm = get_peft_model(base, cfg())
    randomize_lora(pm, "default", seed=300, gain=0.1)
    output = forward(pm, kwargs)
    change = check_change("output (r8 alpha16, peft)", output, base_out)
    modules = module_table(pm, "default")
    print(f"    adapter: {summarize(modules)}")
    save_peft_folder(pm, out_dir / "adapter")

    # kohya file: expected output through diffusers' detection + conversion + load_lora_adapter
    ksd, plan = make_kohya_flux(load_base(model))
    save_file(
        ksd,
        str(out_dir / "kohya.safetensors"),
        metadata={"ss_network_module": "networks.lora_flux", "ss_network_dim": "4", "ss_network_alpha": "2.0"},
    )
    canonicalize_metadata(out_dir / "kohya.safetensors")
    with patched_kohya_converter(dim), capture_diffusers_log() as log_conv:
        converted = FluxPipeline.lora_state_dict(str(out_dir / "kohya.safetensors"))
    tk = load_base(model)
    with capture_diffusers_log() as log_load:
        tk.load_lora_adapter(converted, prefix="transformer", adapter_name="kohya")
    output_kohya = forward(tk, kwargs)
    c_kohya = check_change("output_kohya (diffusers conversion)", output_kohya, base_out)
    modules_kohya = module_table(tk, "kohya")
    print(f"    kohya as diffusers loads it: {summarize(modules_kohya)}")
    loaded = {f"transformer.{n}.lora_{ab}.weight" for n, _ in lora_layers(tk, "kohya") for ab in "AB"}
    dropped_after_conversion = sorted(set(converted) - loaded)
    assert not dropped_after_conversion, dropped_after_conversion
    # diffusers' converted state dict, for testing a converter directly (keys transformer.<path>.lora_A/B.weight)
    save_file({k: v.clone().contiguous() for k, v in converted.items()}, str(out_dir / "kohya_converted_diffusers.safetensors"),
              metadata={"format": "pt"})

    # reload checks
    r1 = PeftModel.from_pretrained(load_base(model), str(out_dir / "adapter")).eval()
    assert_close("adapter/ (PeftModel.from_pretrained)", forward(r1, kwargs), output)
    assert module_table(r1, "default") == modules
    r2 = load_base(model)
    with patched_kohya_converter(dim):
        sd2 = FluxPipeline.lora_state_dict(str(out_dir / "kohya.safetensors"))
    r2.load_lora_adapter(sd2, prefix="transformer", adapter_name="kohya")
    assert_close("kohya.safetensors (lora_state_dict + load_lora_adapter)", forward(r2, kwargs), output_kohya)
    r3 = load_base(model)
    r3.load_lora_adapter(str(out_dir), weight_name="kohya_converted_diffusers.safetensors", prefix="transformer",
                         adapter_name="conv")
    assert_close("kohya_converted_diffusers.safetensors", forward(r3, kwargs), output_kohya)
    probe = probe_kohya_drops(load_base(model), dim)

    single_attn = [m["module"] for m in modules if m["module"].startswith("single_transformer_blocks")]
    case = {
        "model": model,
        "description": "BoxFlow-GRPO's FLUX.1 LoRA target set (attention to_q/k/v/out.0, add_q/k/v_proj, to_add_out, "
        "plus the four feed-forward Linears), r=8, lora_alpha=16, as a PEFT folder; and a kohya sd-scripts FLUX.1 "
        "LoRA (kohya.safetensors) whose expectation `output_kohya` comes from diffusers' own conversion "
        "(FluxPipeline.lora_state_dict detects kohya by '.lora_down.weight' keys and converts; then "
        "transformer.load_lora_adapter).",
        "adapters": [{"file": "adapter", "format": "peft", "weight": 1.0}],
        "base_change": change,
        "variants": {
            "output_kohya": {
                "adapters": [{"file": "kohya.safetensors", "format": "kohya", "weight": 1.0}],
                "base_change": c_kohya,
                "equivalent_adapters": [
                    {"file": "kohya_converted_diffusers.safetensors", "format": "diffusers", "weight": 1.0}
                ],
            }
        },
        "lora_config": {"r": 8, "lora_alpha": 16, "target_modules": BOXFLOW_TARGETS, "init_lora_weights": "gaussian"},
        "wrapped_modules": {"adapter": modules, "kohya.safetensors (after diffusers conversion)": modules_kohya},
        "kohya_modules": plan,
        "kohya_conversion_patch": "diffusers 0.42.1 _convert_kohya_flux_lora_to_diffusers splits linear1 with the "
        "hard-coded dims=[3072, 3072, 3072, 12288] and asserts they sum to lora_up rows, so it raises "
        "AssertionError for any FLUX.1 narrower than 3072. The script re-execs the installed function's source "
        f"with that literal replaced by [{dim}, {dim}, {dim}, {4 * dim}] (asserting it occurs exactly once); "
        "nothing else is changed.",
        "notes": [
            "PEFT suffix matching: to_q/to_k/to_v also wrap the single blocks' attn.to_q/k/v "
            f"({len(single_attn)} modules: {', '.join(single_attn)}); the single blocks have no to_out, and "
            "proj_mlp / proj_out are not targeted.",
            "kohya conversion (diffusers lora_conversion_utils.py _convert_sd_scripts_to_ai_toolkit): "
            "scale = alpha / rank (alpha defaults to rank when the .alpha key is missing) is folded into the "
            "weights: lora_A = lora_down * scale_down, lora_B = lora_up * scale_up with scale_down = scale, "
            "scale_up = 1, then while scale_down * 2 < scale_up: scale_down *= 2, scale_up /= 2 (only for "
            "scale < 1/2). The loaded adapter then has lora_alpha = r, i.e. scaling 1.0 everywhere.",
            "Fused qkv / linear1: if rank % n_splits == 0 and lora_up is exactly zero off the block diagonal "
            "(sd-scripts split_qkv layout), lora_down is chunked by rows and each split gets its rank/n block "
            "(txt_attn_qkv here: rank 6 -> three rank-2 adapters on add_q/k/v_proj); otherwise (img_attn_qkv, "
            "linear1) every split gets the full lora_down and its row slice of lora_up.",
            "linear1 splits into attn.to_q, attn.to_k, attn.to_v, proj_mlp with sizes [dim, dim, dim, 4*dim]; "
            "linear2 -> proj_out; modulation_lin -> norm.linear; img_mod_lin -> norm1.linear; "
            "txt_mod_lin -> norm1_context.linear; img/txt_attn_proj -> attn.to_out.0 / attn.to_add_out; "
            "img/txt_mlp_0/2 -> ff(_context).net.0.proj / net.2.",
            "Mixed ranks after conversion (2 for add_q/k/v_proj and norm1.linear, 4 elsewhere): diffusers builds "
            "LoraConfig(r=most common rank, rank_pattern for the rest, lora_alpha=r, alpha_pattern=rank_pattern) "
            "so every module keeps scaling 1.0.",
            "Silently dropped by diffusers (probed in the script, not in kohya.safetensors): "
            "lora_unet_final_layer_linear, lora_unet_final_layer_adaLN_modulation_1, lora_unet_img_in, "
            "lora_unet_txt_in, lora_unet_time_in_*, lora_unet_vector_in_*, lora_unet_guidance_in_* are converted to "
            "keys WITHOUT the 'transformer.' prefix (proj_out..., norm_out.linear..., x_embedder...), and "
            "load_lora_adapter(prefix='transformer') filters them out without a warning. Their .alpha is also "
            "ignored ('TODO: alphas' in the converter). Unknown lora_unet_* keys raise "
            "'Incompatible keys detected'. kohya.safetensors therefore holds only block keys.",
            "kohya.safetensors: f32 tensors, .alpha as 0-dim f32; a few sd-scripts-style ss_* metadata keys "
            "(sorted; diffusers ignores them).",
        ],
        "diffusers_kohya_drop_probe": probe,
        "diffusers_log": {"convert": log_conv, "load": log_load},
    }
    finish_case(
        out_dir,
        case,
        {"output": output, "output_kohya": output_kohya},
        ["adapter/adapter_model.safetensors", "kohya.safetensors", "kohya_converted_diffusers.safetensors"],
    )


# --------------------------------------------------------------------------------------------
# 4. FLUX.2 / RTDMD
# --------------------------------------------------------------------------------------------

RTDMD_BASE_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                      "to_qkv_mlp_proj"]


def rtdmd_lora_state(model) -> dict[str, torch.Tensor]:
    # rtdmd/utils/checkpoint.py _filter_lora_state_dict: {k: v for k, v in state_dict.items() if "lora_A" in k or "lora_B" in k}
    return {k: v for k, v in model.state_dict().items() if "lora_A" in k or "lora_B" in k}


def torch_save(sd: dict[str, torch.Tensor], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().clone() for k, v in sd.items()}, str(path))


def load_rtdmd_pt(model, path: Path) -> None:
    """rtdmd/utils/lora.py inject_lora: model.load_state_dict(torch.load(path), strict=False)."""
    sd = torch.load(str(path), map_location="cpu", weights_only=True)
    res = model.load_state_dict(sd, strict=False)
    assert not res.unexpected_keys, res.unexpected_keys
    assert not [k for k in res.missing_keys if "lora_" in k], "LoRA keys missing"


@torch.no_grad()
def merge_all(model) -> int:
    n = 0
    for m in model.modules():
        if isinstance(m, BaseTunerLayer):
            m.merge()
            n += 1
    return n


def case_flux2_rtdmd() -> None:
    name, model = "flux2_rtdmd", "flux2_tiny"
    print(f"== {name}")
    out_dir = fresh_dir(LORA / name)
    kwargs, base_out = model_inputs(model)
    n_single = load_base(model).config.num_single_layers
    targets = RTDMD_BASE_TARGETS + [f"single_transformer_blocks.{i}.attn.to_out" for i in range(n_single)]

    def cfg():
        # rtdmd/utils/lora.py inject_lora; configs/rtdmd/flux2_4b.yaml (rank 32, alpha 64 there)
        return LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian", target_modules=list(targets), use_rslora=False)

    # --- cold start: add_adapter ("default"), trained weights, saved LoRA-only as f32 .pt
    tc = load_base(model)
    assert torch.equal(forward(tc, kwargs), base_out)
    tc.add_adapter(cfg())
    randomize_lora(tc, "default", seed=401, gain=0.12)
    output_cold = forward(tc, kwargs)
    c_cold = check_change("output_cold_start", output_cold, base_out)
    modules = module_table(tc, "default")
    print(f"    adapter: {summarize(modules)}")
    cold_sd = rtdmd_lora_state(tc)
    torch_save(cold_sd, out_dir / "cold_start" / "generator_ema.pt")

    # the cold start as a real PEFT folder (for a format-conversion test)
    pm = get_peft_model(load_base(model), cfg())
    copy_lora(tc, "default", pm, "default")
    save_peft_folder(pm, out_dir / "cold_start_peft")

    # --- rtdmd: RTDMD's merge_before_training path (rtdmd/utils/lora.py inject_lora):
    # add_adapter, load the cold start, merge it into the base weights, zero lora_B / re-init lora_A,
    # unmerge (a no-op on the weights: B = 0) so the same "default" adapter trains on top.
    tr = load_base(model)
    tr.add_adapter(cfg())
    load_rtdmd_pt(tr, out_dir / "cold_start" / "generator_ema.pt")
    n_merged = merge_all(tr)
    with torch.no_grad():
        for _, mod in lora_layers(tr, "default"):
            mod.lora_B["default"].weight.zero_()
    for m in tr.modules():
        if isinstance(m, BaseTunerLayer) and m.merged:
            m.unmerge()
    randomize_lora(tr, "default", seed=402, gain=0.12)
    with torch.no_grad():  # the run trains in bf16: the saved values are the bf16 ones
        for _, mod in lora_layers(tr, "default"):
            for w in (mod.lora_A["default"].weight, mod.lora_B["default"].weight):
                w.copy_(w.to(torch.bfloat16).to(torch.float32))
    output = forward(tr, kwargs)
    change = check_change("output (cold merged + rtdmd adapter)", output, base_out)
    torch_save({k: v.to(torch.bfloat16) for k, v in rtdmd_lora_state(tr).items()}, out_dir / "rtdmd" / "generator_ema.pt")
    # rtdmd alone on the plain base (for reference; not the deployment stacking)
    ta = load_base(model)
    ta.add_adapter(cfg())
    copy_lora(tr, "default", ta, "default")
    output_rtdmd_only = forward(ta, kwargs)
    c_rtdmd_only = check_change("output_rtdmd_only", output_rtdmd_only, base_out)

    # --- RTDMD inference (rtdmd/inference.py _merge_lora_into_base_transformer): both LoRAs merged into
    # the weights in order, W += (alpha/r) * (B.float() @ A.float()), no adapter layers at all
    ti = load_base(model)
    params = dict(ti.named_parameters())
    for pt in ("cold_start", "rtdmd"):
        sd = torch.load(str(out_dir / pt / "generator_ema.pt"), map_location="cpu", weights_only=True)
        pairs: dict[str, dict[str, torch.Tensor]] = {}
        for k, v in sd.items():
            ab = "A" if ".lora_A." in k else "B"
            base_key = k.split(f".lora_{ab}.")[0] + ".weight"
            pairs.setdefault(base_key, {})[ab] = v
        with torch.no_grad():
            for base_key, ab in pairs.items():
                params[base_key].add_((8 / 4) * (ab["B"].float() @ ab["A"].float()))
    output_inference = forward(ti, kwargs)
    d_inf = max_diff(output_inference, output)
    print(f"    RTDMD inference (both merged) vs output: max|diff| = {d_inf:.3e}")
    assert d_inf < 1e-4

    # --- reload checks
    r1 = load_base(model)
    r1.add_adapter(cfg())
    load_rtdmd_pt(r1, out_dir / "cold_start" / "generator_ema.pt")
    assert_close("cold_start/generator_ema.pt", forward(r1, kwargs), output_cold)
    r2 = PeftModel.from_pretrained(load_base(model), str(out_dir / "cold_start_peft")).eval()
    assert_close("cold_start_peft/ (PeftModel.from_pretrained)", forward(r2, kwargs), output_cold)
    assert module_table(r2, "default") == modules
    # stacked, merge-and-unload style: merge the cold start, drop the LoRA layers, add rtdmd fresh
    r3 = load_base(model)
    r3.add_adapter(cfg())
    load_rtdmd_pt(r3, out_dir / "cold_start" / "generator_ema.pt")
    r3.fuse_lora()  # diffusers' bake-in: peft merge() on every LoRA layer ...
    r3.unload_lora()  # ... then drop the LoRA layers, keeping the merged base weights
    assert not any(isinstance(m, BaseTunerLayer) for m in r3.modules())
    r3.add_adapter(cfg())
    load_rtdmd_pt(r3, out_dir / "rtdmd" / "generator_ema.pt")
    assert_close("cold merged (unloaded) + rtdmd/generator_ema.pt", forward(r3, kwargs), output)

    case = {
        "model": model,
        "description": "RTDMD's FLUX.2 LoRA (r=4, lora_alpha=8, scaling 2) in RTDMD's own checkpoint format: a "
        "torch.save'd dict of only the LoRA tensors of transformer.state_dict() after "
        "transformer.add_adapter(LoraConfig(...)) (adapter name 'default'). Two adapters: the cold start "
        "(f32) and the rtdmd one (saved in bf16). `output` = the cold start merged into the base weights "
        "(W += (alpha/r) * B @ A, peft merge), then the rtdmd adapter applied on top as a LoRA; "
        "`output_cold_start` = cold start alone (unmerged).",
        "adapters": [
            {"file": "cold_start/generator_ema.pt", "format": "torch_pt", "weight": 1.0, "apply": "merge"},
            {"file": "rtdmd/generator_ema.pt", "format": "torch_pt", "weight": 1.0, "apply": "adapter"},
        ],
        "base_change": change,
        "variants": {
            "output_cold_start": {
                "adapters": [{"file": "cold_start/generator_ema.pt", "format": "torch_pt", "weight": 1.0}],
                "base_change": c_cold,
                "equivalent_adapters": [{"file": "cold_start_peft", "format": "peft", "weight": 1.0}],
            },
            "output_rtdmd_only": {
                "adapters": [{"file": "rtdmd/generator_ema.pt", "format": "torch_pt", "weight": 1.0}],
                "base_change": c_rtdmd_only,
                "description": "the rtdmd adapter on the plain base model (not how RTDMD deploys it)",
            },
            "output_rtdmd_inference": {
                "adapters": [
                    {"file": "cold_start/generator_ema.pt", "format": "torch_pt", "weight": 1.0, "apply": "merge"},
                    {"file": "rtdmd/generator_ema.pt", "format": "torch_pt", "weight": 1.0, "apply": "merge"},
                ],
                "description": "rtdmd/inference.py _merge_lora_into_base_transformer: both merged into the f32 "
                "weights in order, W += (alpha/r) * (B.float() @ A.float()); same function as `output`, "
                "different rounding",
                "max_diff_vs_output": d_inf,
            },
        },
        "lora_config": {
            "r": 4,
            "lora_alpha": 8,
            "target_modules": targets,
            "init_lora_weights": "gaussian",
            "source": "not stored in the .pt files; RTDMD takes rank / lora_alpha / target_modules from its yaml "
            "(model.generator_lora) and inference falls back to lora_rank / lora_alpha",
        },
        "wrapped_modules": {"cold_start/generator_ema.pt": modules, "rtdmd/generator_ema.pt": modules},
        "merged_modules_in_output": n_merged,
        "notes": [
            "Keys are transformer.state_dict() names of the peft-wrapped modules: <module>.lora_A.default.weight / "
            "<module>.lora_B.default.weight (adapter name inside, no 'transformer.' or 'base_model.model.' "
            "prefix); no base_layer keys, no alpha, no config.",
            "RTDMD filters with `'lora_A' in k or 'lora_B' in k` (rtdmd/utils/checkpoint.py); the brief's "
            "`'lora' in k` gives the same keys here.",
            "Target matching: 'to_out.0' wraps transformer_blocks.N.attn.to_out.0 (a ModuleList item); the "
            "single blocks' attn.to_out is a plain Linear, matched by the full-path targets "
            "'single_transformer_blocks.N.attn.to_out'; 'to_qkv_mlp_proj' wraps the fused single-block input "
            "projection (out = 3*dim + 2*mlp_hidden).",
            "rtdmd/generator_ema.pt is bf16: the expectations use exactly those bf16 values upcast to f32 "
            "(the base model and all compute stay f32).",
            "RTDMD's own .pt files are LoRA-only resume files; its 'peft format' transformer/ folder writes the same "
            "'.default.' keys into adapter_model.safetensors with a hand-written adapter_config.json, which is not "
            "what peft writes. cold_start_peft/ is a real PeftModel.save_pretrained folder "
            "(base_model.model.<module>.lora_A.weight).",
        ],
    }
    finish_case(
        out_dir,
        case,
        {
            "output": output,
            "output_cold_start": output_cold,
            "output_rtdmd_only": output_rtdmd_only,
            "output_rtdmd_inference": output_inference,
        },
        ["cold_start/generator_ema.pt", "rtdmd/generator_ema.pt", "cold_start_peft/adapter_model.safetensors"],
    )


def main() -> None:
    setup_torch()
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    LORA.mkdir(parents=True, exist_ok=True)
    case_sd3_flowgrpo()
    case_sd35_patterns()
    case_flux1_boxflow()
    case_flux2_rtdmd()
    print(f"assets/golden/lora: {dir_size(LORA)} bytes")


if __name__ == "__main__":
    main()
