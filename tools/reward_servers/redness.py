"""A reward server in a dozen lines of Python: the image's mean redness, R − (G + B)/2, times 10.

An example of the `portaflow-reward/1` protocol (README, "Remote rewards") and a sanity check of
the RL loop: a dense reward every prompt agrees on, which GRPO must raise within minutes.

    pip install numpy pillow
    python3 tools/reward_servers/redness.py &          # serves http://127.0.0.1:8765/
    portaflow --device cpu train grpo --config tools/reward_servers/redness.toml --out runs/red
"""
import base64
import io
import json
from http.server import BaseHTTPRequestHandler, HTTPServer

import numpy as np
from PIL import Image


class Redness(BaseHTTPRequestHandler):
    def do_POST(self):
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        scores = []
        for png in request["images"]:
            rgb = Image.open(io.BytesIO(base64.b64decode(png))).convert("RGB")
            x = np.asarray(rgb, dtype=np.float32) / 255  # [h, w, 3]
            scores.append(float((x[..., 0] - (x[..., 1] + x[..., 2]) / 2).mean()) * 10)
        body = json.dumps({"scores": scores}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


if __name__ == "__main__":
    HTTPServer(("127.0.0.1", 8765), Redness).serve_forever()
