// End-to-end test of the browser demo: serves web/dist, drives headless Chromium (Debian's
// /usr/bin/chromium) through the page on WebGPU (SwiftShader) and on the CPU fallback, and
// compares the images with the native engine's for the same prompt, seed and sampler.
// Run `web/build.sh` and `cargo build --bin portaflow` first; then `node web/test/e2e.mjs`.
import { execFileSync } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";
import { PNG } from "pngjs";
import { serve } from "../serve.mjs";

const repo = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../..");
const portaflow = process.env.PORTAFLOW_BIN ?? path.join(repo, "target/debug/portaflow");
const browserPath = process.env.CHROMIUM ?? "/usr/bin/chromium";
// When web/build.sh shipped the few-step student, the page and the native engine both sample it
// as its sampling.json says (without one: RTDMD's 4 CPS steps), no CFG; otherwise the base model
// with CFG.
const manifest = JSON.parse(fs.readFileSync(path.join(repo, "web/dist/manifest.json"), "utf8"));
const student = manifest.files.some((f) => f.name.startsWith("student/"))
  ? (process.env.STUDENT ?? path.join(repo, "assets/models/shapes-4nfe")) : null;
const cardPath = path.join(repo, "web/dist/model/student/sampling.json");
const card = !student ? null : fs.existsSync(cardPath) ? JSON.parse(fs.readFileSync(cardPath, "utf8"))
  : { sampler: "cps", eta: 0.9, sigmas: [1, 0.75, 0.5, 0.25] };
const settings = {
  prompt: "a photo of a blue square", seed: 7, steps: card ? card.sigmas.length : 4,
  cfg: student ? 1 : 4, sampler: card ? card.sampler : "cps",
};
// 8-bit levels: WebGPU and the CPU round differently in the last float bits.
const TOLERANCE = 3;

const check = (ok, message) => {
  if (!ok) throw new Error(message);
  console.log(`ok: ${message}`);
};

function nativeImage() {
  const out = path.join(os.tmpdir(), `portaflow-e2e-native-${process.pid}.png`);
  execFileSync(portaflow, ["--device", "cpu", "generate", "--prompt", settings.prompt,
    "--seed", String(settings.seed), "--steps", String(settings.steps), "--cfg", String(settings.cfg),
    "--sampler", card && card.eta !== undefined ? `${card.sampler}:${card.eta}` : settings.sampler,
    // The student samples at its σ list (what the page uses for it at its step count).
    ...(student ? ["--lora", student, "--sigmas", card.sigmas.join(",")] : []), "-o", out],
  { stdio: "inherit" });
  const png = PNG.sync.read(fs.readFileSync(out));
  fs.rmSync(out);
  return png;
}

async function generate(page, prompt = settings.prompt) {
  await page.fill("#prompt", prompt);
  await page.fill("#seed", String(settings.seed));
  await page.fill("#steps", String(settings.steps));
  await page.fill("#cfg", String(settings.cfg));
  await page.selectOption("#sampler", settings.sampler);
  // The engine records the whole sampling loop before it first yields: on SwiftShader the page's
  // thread is busy for a while, and Playwright's click waits for it.
  await page.click("#generate", { timeout: 600_000 });
  await page.waitForFunction(() => ["done", "error"].includes(document.body.dataset.state), null,
    { timeout: 600_000 });
  return page.evaluate(() => ({
    state: document.body.dataset.state,
    seconds: Number(document.body.dataset.seconds),
    error: document.getElementById("error").textContent,
    rgba: window.portaflowLastImage ? Array.from(window.portaflowLastImage) : null,
  }));
}

function compare(rgba, png, label) {
  let max = 0, sum = 0;
  for (let p = 0; p < png.width * png.height; p++) {
    for (let c = 0; c < 3; c++) {
      const d = Math.abs(rgba[p * 4 + c] - png.data[p * 4 + c]);
      max = Math.max(max, d);
      sum += d;
    }
  }
  const mean = sum / (png.width * png.height * 3);
  check(max <= TOLERANCE, `${label}: the page's image equals the native engine's (max |Δ| ${max}, mean ${mean.toFixed(4)} levels)`);
  return { max, mean };
}

async function openPage(browser, url, log) {
  const page = await browser.newPage();
  page.on("console", (m) => log.push(`${m.type()}: ${m.text()}`));
  page.on("pageerror", (e) => log.push(`pageerror: ${e.message}`));
  await page.goto(url);
  await page.waitForFunction(() => ["ready", "error"].includes(document.body.dataset.state), null,
    { timeout: 600_000 });
  const state = await page.evaluate(() => document.body.dataset.state);
  if (state !== "ready") {
    throw new Error(`the page did not load: ${await page.textContent("#error")}\n${log.join("\n")}`);
  }
  return page;
}

const server = await serve(0);
const url = `http://localhost:${server.address().port}/`;
const results = {};
const native = nativeImage();
try {
  for (const [name, args] of [
    ["webgpu", ["--enable-unsafe-webgpu", "--use-webgpu-adapter=swiftshader", "--use-angle=swiftshader"]],
    ["cpu", ["--disable-features=WebGPU"]],
  ]) {
    const browser = await chromium.launch({ executablePath: browserPath, headless: true, args });
    const log = [];
    try {
      const page = await openPage(browser, url, log);
      const device = await page.textContent("#device");
      console.log(`${name}: ${device}`);
      check(name === "webgpu" ? device.includes("WebGPU") : device.includes("CPU"),
        `${name}: the page says which device runs`);
      if (student) {
        const loaded = await page.textContent("#progress-text");
        const [cfg, steps, sampler] = await Promise.all(
          ["#cfg", "#steps", "#sampler"].map((id) => page.inputValue(id)));
        check(loaded.includes(`${settings.steps}-step student`) && cfg === "1"
          && steps === String(settings.steps) && sampler === settings.sampler,
          `${name}: the student is loaded and the page samples it as its card says, without CFG (${loaded}; ${sampler}, ${steps} steps)`);
      }
      const first = await generate(page);
      check(first.state === "done", `${name}: generated (${first.error})`);
      const again = await generate(page);
      results[name] = { device, seconds_first: first.seconds, seconds: again.seconds,
        ...compare(again.rgba, native, name) };

      if (name === "cpu") {
        // Offline once loaded: the service worker has stored page, engine and model.
        await page.evaluate(() => navigator.serviceWorker.ready);
        await page.context().setOffline(true);
        await page.reload();
        await page.waitForFunction(() => ["ready", "error"].includes(document.body.dataset.state),
          null, { timeout: 600_000 });
        const offline = await generate(page);
        check(offline.state === "done", `offline after the first visit: the page loads and generates (${offline.error})`);
        compare(offline.rgba, native, "offline");
      }

      if (name === "webgpu") {
        const long = await generate(page, "a photo of a red circle left of a blue square above a green triangle below a purple circle");
        check(long.state === "error" && long.error.includes("at most 16"),
          `an over-long prompt gets a message: ${long.error}`);
        // A corrupt weight file is refused by its hash, a truncated one by its size.
        for (const [what, mangle, expect] of [
          ["corrupt", (b) => { b[b.length - 1] ^= 0xff; return b; }, "corrupt"],
          ["truncated", (b) => b.subarray(0, b.length >> 1), "download stopped"],
        ]) {
          // Without the service worker, whose fetches Playwright's routing would not see.
          const context = await browser.newContext({ serviceWorkers: "block" });
          const broken = await context.newPage();
          await broken.route("**/model/transformer/diffusion_pytorch_model.safetensors", async (route) => {
            const response = await route.fetch();
            await route.fulfill({ response, body: Buffer.from(mangle(Buffer.from(await response.body()))) });
          });
          await broken.goto(url);
          await broken.waitForFunction(() => document.body.dataset.state === "error", null, { timeout: 120_000 });
          const message = await broken.textContent("#error");
          check(message.includes(expect), `a ${what} weight file gets a message: ${message}`);
          await context.close();
        }
      }
    } catch (e) {
      console.error(log.join("\n"));
      throw e;
    } finally {
      await browser.close();
    }
  }
} finally {
  server.close();
}
console.log(JSON.stringify(results, null, 2));
