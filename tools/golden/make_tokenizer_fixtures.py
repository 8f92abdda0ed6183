"""Golden fixtures for the tokenizers of real pipeline folders: tiny vocabularies trained here with
HF `tokenizers`, saved the way the model repositories hold them, and the ids transformers gives
when a diffusers pipeline calls them.

Writes assets/golden/tokenizers/:
  clip/          vocab.json + merges.txt + tokenizer_config.json only (SD3 / FLUX.1 CLIP folders on
                 the Hub have no tokenizer.json); pad token `<|endoftext|>` as CLIP-L
  clip_bang/     the same vocabulary padding with "!" (SD3's tokenizer_2, OpenCLIP bigG)
  t5/            tokenizer.json (+ config) of a Unigram T5 tokenizer
  qwen3/         tokenizer.json (+ config with Qwen3's chat template) of a byte-level BPE
  expected.json  per folder: the call (max_length, chat template or not) and for each prompt the
                 input_ids and attention_mask transformers returns

The calls mirror the pipelines: CLIP `padding="max_length", max_length=77, truncation=True`
(StableDiffusion3Pipeline._get_clip_prompt_embeds); T5 the same with max_sequence_length;
Qwen3 `apply_chat_template(add_generation_prompt=True, enable_thinking=False)` then the same
(Flux2KleinPipeline._get_qwen3_prompt_embeds).

Run:  /work/venv/bin/python tools/golden/make_tokenizer_fixtures.py
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import GOLDEN  # noqa: E402

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers  # noqa: E402
from transformers import AutoTokenizer, CLIPTokenizer, Qwen2Tokenizer, T5Tokenizer  # noqa: E402

OUT = GOLDEN / "tokenizers"

CORPUS = [
    "a photo of a red circle",
    "a blue square left of a green triangle",
    "three purple triangles above two orange circles",
    "A photo of an astronaut riding a horse on the moon, highly detailed, 8k",
    "the number \"37\" written in black ink",
    "Cats and dogs; cats & DOGS!!  Spaces\tand\nnewlines don't matter, or do they?",
    "portrait of a woman with blue eyes, soft light, 35mm",
] * 20

PROMPTS = [
    "a photo of a red circle",
    "",
    "A photo of an ASTRONAUT riding a horse, 8k!",
    "  spaced   out\tprompt\nwith newlines ",
    "don't you'll we've it's",
    "unseen wörds like zebra-quokka and émigré",
    " ".join(["a red circle left of a blue square"] * 12),  # longer than 77 tokens: truncated
]

# The tail of Qwen3's chat template that a single user message with a generation prompt and
# enable_thinking=False exercises.
QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)


def train_clip_bpe() -> tuple[dict[str, int], list[str]]:
    tok = Tokenizer(models.BPE(continuing_subword_prefix="", end_of_word_suffix="</w>", unk_token="<|endoftext|>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(
                Regex(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""),
                behavior="removed",
                invert=True,
            ),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=700,
        special_tokens=["<|startoftext|>", "<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return model["vocab"], merges


def save_clip(name: str, vocab: dict[str, int], merges: list[str], pad: str) -> Path:
    folder = OUT / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "CLIPTokenizer",
                "bos_token": "<|startoftext|>",
                "eos_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>",
                "pad_token": pad,
                "model_max_length": 77,
            },
            indent=2,
        )
    )
    return folder


def make_t5() -> Path:
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)]
    )
    trainer = trainers.UnigramTrainer(vocab_size=300, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>", show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    vocab = [(p, s) for p, s in json.loads(tok.to_str())["model"]["vocab"]]
    t5 = T5Tokenizer(vocab=vocab, extra_ids=4)
    folder = OUT / "t5"
    with tempfile.TemporaryDirectory() as tmp:
        t5.save_pretrained(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        for f in ["tokenizer.json", "tokenizer_config.json"]:
            shutil.copyfile(Path(tmp) / f, folder / f)
    return folder


def make_qwen3() -> Path:
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=500, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(CORPUS, trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    vocab = {k: v for k, v in model["vocab"].items() if k not in specials}
    vocab = {k: i for i, k in enumerate(sorted(vocab, key=vocab.get))}
    pairs = [tuple(m.split(" ")) for m in merges]
    qwen = Qwen2Tokenizer(vocab=vocab, merges=pairs, pad_token="<|endoftext|>", eos_token="<|im_end|>")
    qwen.add_special_tokens({"additional_special_tokens": specials})
    qwen.chat_template = QWEN3_CHAT_TEMPLATE
    folder = OUT / "qwen3"
    with tempfile.TemporaryDirectory() as tmp:
        qwen.save_pretrained(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        for f in Path(tmp).iterdir():
            if f.name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
                shutil.copyfile(f, folder / f.name)
    return folder


def expected_for(tokenizer, max_length: int, chat: bool) -> dict:
    rows = []
    for prompt in PROMPTS:
        text = prompt
        if chat:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True, enable_thinking=False
            )
        enc = tokenizer(text, padding="max_length", max_length=max_length, truncation=True)
        rows.append({"prompt": prompt, "input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    return {"max_length": max_length, "chat_template": chat, "encodings": rows}


def main() -> None:
    if OUT.exists():
        shutil.rmtree(OUT)
    vocab, merges = train_clip_bpe()
    save_clip("clip", vocab, merges, "<|endoftext|>")
    save_clip("clip_bang", vocab, merges, "!")
    make_t5()
    make_qwen3()
    expected = {
        "clip": expected_for(CLIPTokenizer.from_pretrained(OUT / "clip"), 77, False),
        "clip_bang": expected_for(CLIPTokenizer.from_pretrained(OUT / "clip_bang"), 77, False),
        "t5": expected_for(AutoTokenizer.from_pretrained(OUT / "t5"), 32, False),
        "qwen3": expected_for(AutoTokenizer.from_pretrained(OUT / "qwen3"), 48, True),
    }
    (OUT / "expected.json").write_text(json.dumps(expected, indent=1, ensure_ascii=False))
    for name, e in expected.items():
        first = e["encodings"][0]["input_ids"]
        print(name, sum(first != 0 for first in first), first[:12])


if __name__ == "__main__":
    main()
