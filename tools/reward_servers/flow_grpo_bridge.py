"""Bridge portaflow's JSON reward protocol to flow_grpo's rewards: GenEval and OCR.

- `reward = "geneval"`: flow_grpo's GenEval scorer (yifan123/reward-server, `app_geneval.py`:
  Mask2Former + CLIP, port 18085) takes a Python pickle of {"images": [JPEG bytes], "meta_datas":
  [GenEval lines], "only_strict": bool} and answers a pickle with "scores" (partial credit) and
  "strict_rewards". This server forwards GenEval prompts in that framing.
- `reward = "ocr"`: flow_grpo's OCR reward (`flow_grpo/ocr.py`), computed here with PaddleOCR
  (`pip install paddlepaddle paddleocr==2.9.1`, loaded on first use): the target is the text
  between the first double quotes, recognised = every detected line joined, both without spaces
  and lowercased; 1 − Levenshtein / len(target), 1 when the target is inside the recognised text.

This server speaks `portaflow-reward/1` (README, "Remote rewards") to the trainer, so
`reward = "remote"` with `name = "geneval"` or `"ocr"` trains on flow_grpo's own rewards
(`configs/grpo-sd3.5m-geneval.toml`, `configs/grpo-sd3.5m-ocr.toml`). Prompts of the other
task are left unjudged (null).

    pip install pillow numpy
    python3 tools/reward_servers/flow_grpo_bridge.py --port 18080 \
        --upstream http://127.0.0.1:18085 &
    portaflow --device vulkan train grpo --config configs/grpo-sd3.5m-geneval.toml --out runs/geneval

Errors of the upstream server (flow_grpo answers 500 with a traceback) come back as 502 with its
text, which portaflow retries with backoff like any 5xx.
"""
import argparse
import base64
import io
import json
import pickle
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from PIL import Image

# flow_grpo's client sends batches of 64 (`rewards.py::geneval_score`).
BATCH = 64


def jpeg(png_base64):
    """The PNG as JPEG bytes at PIL's default quality, as flow_grpo's client encodes."""
    image = Image.open(io.BytesIO(base64.b64decode(png_base64))).convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG")
    return buffer.getvalue()


def levenshtein(a, b):
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        previous, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + (ca != cb))
    return row[-1]


def ocr_reward(prompt, recognised):
    """flow_grpo's `OcrScorer`: (reward, exact read) for one prompt and its recognised text."""
    parts = prompt.split('"')
    target = (parts[1] if len(parts) > 2 else "").replace(" ", "").lower()
    if not target:
        return None
    recognised = recognised.replace(" ", "").lower()
    distance = 0 if target in recognised else min(levenshtein(recognised, target), len(target))
    return 1.0 - distance / len(target), distance == 0


_paddle = None


def recognise(png_base64):
    """Every line PaddleOCR reads with confidence > 0, joined (flow_grpo's settings)."""
    global _paddle
    import numpy as np

    if _paddle is None:
        from paddleocr import PaddleOCR

        _paddle = PaddleOCR(use_angle_cls=False, lang="en", use_gpu=False, show_log=False)
    image = Image.open(io.BytesIO(base64.b64decode(png_base64))).convert("RGB")
    try:
        result = _paddle.ocr(np.asarray(image), cls=False)
        return "".join(text for line in (result[0] or []) for _, (text, conf) in [line] if conf > 0)
    except Exception:
        return ""  # flow_grpo scores an OCR failure 0


def score_ocr(request, read=recognise):
    scores = [None] * len(request["metadata"])
    success = [None] * len(request["metadata"])
    for i, meta in enumerate(request["metadata"]):
        if meta.get("task") != "digits":
            continue
        judged = ocr_reward(meta["prompt"], read(request["images"][i]))
        if judged is not None:
            scores[i], success[i] = judged
    return {"scores": scores, "success": success}


def score(request, upstream, timeout):
    if request.get("reward") == "ocr":
        return score_ocr(request)
    metadata = request["metadata"]
    judged = [i for i, m in enumerate(metadata) if m.get("task") == "shapes"]
    scores = [None] * len(metadata)
    success = [None] * len(metadata)
    for start in range(0, len(judged), BATCH):
        chunk = judged[start : start + BATCH]
        body = pickle.dumps(
            {
                "images": [jpeg(request["images"][i]) for i in chunk],
                # The GenEval line without portaflow's task tag.
                "meta_datas": [
                    {k: v for k, v in metadata[i].items() if k != "task"} for i in chunk
                ],
                "only_strict": True,
            }
        )
        post = urllib.request.Request(upstream, data=body, method="POST")
        with urllib.request.urlopen(post, timeout=timeout) as response:
            answer = pickle.loads(response.read())
        for i, s, strict in zip(chunk, answer["scores"], answer["strict_rewards"]):
            scores[i] = float(s)
            success[i] = bool(strict > 0.5)
    return {"scores": scores, "success": success}


class Bridge(BaseHTTPRequestHandler):
    upstream = ""
    timeout = 120.0

    def do_POST(self):
        try:
            request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        except (ValueError, TypeError) as e:
            return self.reply(400, f"not a portaflow-reward/1 request: {e}")
        try:
            return self.reply(200, score(request, self.upstream, self.timeout))
        except urllib.error.HTTPError as e:
            text = e.read().decode("utf-8", "replace")[-2000:]
            return self.reply(502, f"{self.upstream} answered {e.code}: {text}")
        except (urllib.error.URLError, OSError) as e:
            return self.reply(502, f"{self.upstream}: {e}")
        except (KeyError, IndexError) as e:
            return self.reply(400, f"request lacks {e}")

    def reply(self, status, payload):
        body = (json.dumps(payload) if status == 200 else str(payload)).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json" if status == 200 else "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=18080)
    parser.add_argument("--upstream", default="http://127.0.0.1:18085")
    parser.add_argument("--timeout", type=float, default=120.0)
    args = parser.parse_args()
    Bridge.upstream = args.upstream
    Bridge.timeout = args.timeout
    ThreadingHTTPServer((args.host, args.port), Bridge).serve_forever()
