"""Scenes of the Shapes test prompts drawn by another renderer (Pillow), in GenEval's folder layout.

`portaflow eval --images DIR` must score images from any software the same way it scores ours.
This script draws, for every line of a GenEval-format prompt file, scenes that satisfy the prompt
and scenes that break it (a shape, count, colour or relation changed), with its own placement,
shape proportions, palettes, backgrounds, resolutions (64–256 px) and anti-aliasing (none, box or Lanczos
down-sampling). None of it comes from portaflow's renderer. The Rust test
`pipeline::eval::tests::foreign_renders_score_as_drawn` checks that the detector's verdicts agree
with how each image was drawn.

    /work/venv/bin/python tools/golden/make_foreign_renders.py

Layout: `assets/golden/foreign_renders/<style>/<index:05>/metadata.jsonl` and
`.../samples/<k:05>.png`; samples `0 .. per_prompt-1` satisfy the prompt, the next `per_prompt`
break it (`truth.json` says so and lists the styles).
"""

import json
import math
import random
import shutil
from pathlib import Path

from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ROOT / "assets" / "prompts" / "shapes_test.jsonl"
OUT = ROOT / "assets" / "golden" / "foreign_renders"
PER_PROMPT = 2
SHAPES = ["circle", "square", "triangle"]
COLORS = ["red", "green", "blue", "yellow", "purple", "orange"]

# Palettes other software uses for these names: CSS named colours and matplotlib's "tab" set
# (which has no yellow; gold stands in).
CSS = {
    "red": (255, 0, 0),
    "green": (0, 128, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "purple": (128, 0, 128),
    "orange": (255, 165, 0),
}
TAB = {
    "red": (214, 39, 40),
    "green": (44, 160, 44),
    "blue": (31, 119, 180),
    "yellow": (255, 215, 0),
    "purple": (148, 103, 189),
    "orange": (255, 127, 14),
}

# name, side in pixels, drawing scale (1: Pillow's aliased drawing), down-sampling filter,
# palette, background, equilateral triangles
STYLES = [
    ("pil_aliased_64", 64, 1, None, CSS, (255, 255, 255), False),
    ("pil_lanczos_64", 64, 4, Image.LANCZOS, TAB, (238, 238, 236), True),
    ("pil_box_128", 128, 4, Image.BOX, CSS, (245, 242, 232), True),
    ("pil_aliased_256", 256, 1, None, TAB, (255, 255, 255), False),
]

OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def clearly(a, relation, b):
    """`a` stands in `relation` to `b` with a margin (centres in image units, y down)."""
    dx, dy = a["cx"] - b["cx"], a["cy"] - b["cy"]
    gap = a["r"] + b["r"]
    return {
        "left of": -dx > gap and -dx > abs(dy),
        "right of": dx > gap and dx > abs(dy),
        "above": -dy > gap and -dy > abs(dx),
        "below": dy > gap and dy > abs(dx),
    }[relation]


def place(rng, wants, relations):
    """Objects for `wants` [(shape, colour)] without overlap; `relations` [(i, relation, j)] hold."""
    for _ in range(2000):
        objects = []
        for shape, color in wants:
            r = rng.uniform(0.085, 0.15)
            for _ in range(100):
                cx, cy = rng.uniform(r + 0.02, 1 - r - 0.02), rng.uniform(r + 0.02, 1 - r - 0.02)
                if all(math.hypot(o["cx"] - cx, o["cy"] - cy) > 1.5 * (o["r"] + r) for o in objects):
                    objects.append({"shape": shape, "color": color, "cx": cx, "cy": cy, "r": r})
                    break
            else:
                break
        if len(objects) == len(wants) and all(clearly(objects[i], rel, objects[j]) for i, rel, j in relations):
            return objects
    raise RuntimeError(f"no placement for {wants} {relations}")


def scene(rng, spec, broken):
    """The objects of a scene for `spec`; with `broken`, one change that makes it wrong."""
    clauses = [dict(c) for c in spec["include"]]
    tag = spec["tag"]
    flipped = None
    if broken:
        if tag == "single_object":
            clauses[0]["class"] = rng.choice([s for s in SHAPES if s != clauses[0]["class"]])
        elif tag == "two_object":
            used = {c["class"] for c in clauses}
            clauses[1]["class"] = rng.choice([s for s in SHAPES if s not in used])
        elif tag == "counting":
            n = clauses[0]["count"]
            clauses[0]["count"] = rng.choice([n - 1, n + 1] if n > 1 else [n + 1])
        elif tag == "colors":
            clauses[0]["color"] = rng.choice([c for c in COLORS if c != clauses[0]["color"]])
        elif tag == "position":
            flipped = True
        elif tag == "color_attr":
            a, b = clauses[0]["color"], clauses[1]["color"]
            if a != b:
                clauses[0]["color"], clauses[1]["color"] = b, a
            else:
                clauses[1]["color"] = rng.choice([c for c in COLORS if c != b])
        else:
            raise ValueError(f"unknown tag {tag}")
    wants, first = [], []
    for c in clauses:
        first.append(len(wants))
        color = c.get("color")
        for _ in range(c["count"]):
            wants.append((c["class"], color or rng.choice(COLORS)))
    relations = []
    for k, c in enumerate(clauses):
        if "position" in c:
            relation, target = c["position"]
            if flipped:
                relation = OPPOSITE[relation]
            for i in range(c["count"]):
                for j in range(clauses[target]["count"]):
                    relations.append((first[k] + i, relation, first[target] + j))
    return place(rng, wants, relations)


def draw(objects, style):
    _, side, scale, resample, palette, background, equilateral = style
    big = side * scale
    image = Image.new("RGB", (big, big), background)
    pen = ImageDraw.Draw(image)
    for o in objects:
        cx, cy, r = o["cx"] * big, o["cy"] * big, o["r"] * big
        fill = palette[o["color"]]
        if o["shape"] == "circle":
            pen.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif o["shape"] == "square":
            h = 0.85 * r
            pen.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
        elif equilateral:
            # Circumradius r, apex up.
            pen.polygon(
                [(cx + r * math.cos(a), cy - r * math.sin(a)) for a in (math.pi / 2, 7 * math.pi / 6, 11 * math.pi / 6)],
                fill=fill,
            )
        else:
            pen.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    if scale > 1:
        image = image.resize((side, side), resample)
    return image


def main():
    specs = [json.loads(line) for line in PROMPTS.read_text().splitlines() if line.strip()]
    if OUT.exists():
        shutil.rmtree(OUT)
    rng = random.Random(20261205)
    for style in STYLES:
        for index, spec in enumerate(specs):
            folder = OUT / style[0] / f"{index:05}"
            (folder / "samples").mkdir(parents=True)
            (folder / "metadata.jsonl").write_text(json.dumps(spec) + "\n")
            for k in range(2 * PER_PROMPT):
                objects = scene(rng, spec, broken=k >= PER_PROMPT)
                draw(objects, style).save(folder / "samples" / f"{k:05}.png", optimize=True)
    truth = {
        "prompts": str(PROMPTS.relative_to(ROOT)),
        "styles": [s[0] for s in STYLES],
        "correct_samples": list(range(PER_PROMPT)),
        "broken_samples": list(range(PER_PROMPT, 2 * PER_PROMPT)),
    }
    (OUT / "truth.json").write_text(json.dumps(truth, indent=1) + "\n")
    print(f"{len(STYLES)} styles x {len(specs)} prompts x {2 * PER_PROMPT} images -> {OUT}")


if __name__ == "__main__":
    main()
