// portaflow's browser demo: fetch the model files listed in manifest.json (with progress, size and
// SHA-256 checks), hand them to the wasm engine, generate on WebGPU or the CPU fallback.
import init, { Engine, model_files, optional_model_files } from "./pkg/portaflow_web.js";

const $ = (id) => document.getElementById(id);
const status = (text) => { $("status").textContent = text; };
const fail = (text) => { $("error").hidden = false; $("error").textContent = text; };
const clearError = () => { $("error").hidden = true; $("error").textContent = ""; };

// A Rust panic becomes a message here, not only a console line.
window.portaflowPanic = (message) => fail(`The engine stopped: ${message}`);
window.addEventListener("unhandledrejection", (e) => fail(`Unexpected error: ${e.reason}`));

const hex = (buffer) => [...new Uint8Array(buffer)].map((b) => b.toString(16).padStart(2, "0")).join("");

// Fetches one file with progress; checks its size and hash against the manifest.
async function fetchChecked(file, onBytes) {
  const response = await fetch(`model/${file.name}`);
  if (!response.ok) throw new Error(`${file.name}: the server answered ${response.status}`);
  const reader = response.body.getReader();
  const bytes = new Uint8Array(file.size);
  let at = 0;
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    if (at + value.length > file.size) throw new Error(`${file.name}: larger than the manifest's ${file.size} bytes`);
    bytes.set(value, at);
    at += value.length;
    onBytes(value.length);
  }
  if (at !== file.size) throw new Error(`${file.name}: the download stopped at ${at} of ${file.size} bytes`);
  const digest = hex(await crypto.subtle.digest("SHA-256", bytes));
  if (digest !== file.sha256) throw new Error(`${file.name}: corrupt (SHA-256 ${digest.slice(0, 12)}…, expected ${file.sha256.slice(0, 12)}…)`);
  return bytes;
}

async function main() {
  if ("serviceWorker" in navigator) {
    // Offline once loaded: the worker keeps the page, the engine and the model.
    navigator.serviceWorker.register("sw.js").catch((e) => console.warn("no offline cache:", e));
  }
  status("starting the engine…");
  await init();
  const engine = await Engine.start(navigator.gpu ? "webgpu" : "cpu");
  const reason = engine.fallback_reason() ?? (navigator.gpu ? null : "this browser has no WebGPU");
  $("device").textContent = `Running on ${engine.device()}` + (reason ? ` — ${reason}` : "");

  const manifest = await (await fetch("manifest.json")).json();
  const wanted = new Set(model_files());
  for (const name of wanted) {
    if (!manifest.files.some((f) => f.name === name)) throw new Error(`manifest.json lists no ${name}`);
  }
  const optional = new Set(optional_model_files());
  const files = manifest.files.filter((f) => wanted.has(f.name) || optional.has(f.name));
  const total = files.reduce((n, f) => n + f.size, 0);
  let received = 0;
  const show = () => {
    $("progress").value = received / total;
    $("progress-text").textContent = `${(received / 1e6).toFixed(1)} / ${(total / 1e6).toFixed(1)} MB`;
  };
  for (const file of files) {
    const bytes = await fetchChecked(file, (n) => { received += n; show(); });
    engine.add_file(file.name, bytes);
  }
  engine.load();
  const student = engine.has_student();
  if (student) {
    // The distilled student samples at its own steps without CFG (one model call per step).
    $("steps").value = engine.student_steps();
    $("cfg").value = 1;
    $("sampler").value = engine.student_sampler();
  }
  const what = student ? `${manifest.model} + its ${engine.student_steps()}-step student` : manifest.model;
  $("progress-text").textContent = `${what} loaded (${(total / 1e6).toFixed(1)} MB, checked)`;
  const side = engine.resolution();
  $("image").width = side;
  $("image").height = side;
  $("generate").disabled = false;
  status("ready");
  document.body.dataset.state = "ready";

  $("form").addEventListener("submit", async (event) => {
    event.preventDefault();
    clearError();
    $("generate").disabled = true;
    document.body.dataset.state = "generating";
    status("generating…");
    // Let the browser paint the status: the engine holds the thread while it records the steps.
    await new Promise((resolve) => requestAnimationFrame(() => setTimeout(resolve, 0)));
    const start = performance.now();
    try {
      const rgba = await engine.generate(
        $("prompt").value, Number($("seed").value) >>> 0, Number($("steps").value),
        Number($("cfg").value), $("sampler").value);
      const seconds = (performance.now() - start) / 1000;
      $("image").getContext("2d").putImageData(new ImageData(new Uint8ClampedArray(rgba), side, side), 0, 0);
      window.portaflowLastImage = rgba;
      status(`${seconds.toFixed(2)} s on ${engine.device()}`);
      document.body.dataset.seconds = seconds;
      document.body.dataset.state = "done";
    } catch (e) {
      fail(String(e.message ?? e));
      status("");
      document.body.dataset.state = "error";
    } finally {
      $("generate").disabled = false;
    }
  });
}

main().catch((e) => {
  fail(`Could not start: ${e.message ?? e}`);
  status("");
  document.body.dataset.state = "error";
});
