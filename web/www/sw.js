// Offline once loaded: on install the worker stores the page, the engine and the model files the
// manifest lists; afterwards every same-origin GET goes to the network first and falls back to
// that cache (the page still checks each model file's size and hash before use).
const CACHE = "portaflow-v1";
const PAGE = ["./", "index.html", "app.js", "style.css", "manifest.json",
  "pkg/portaflow_web.js", "pkg/portaflow_web_bg.wasm"];

self.addEventListener("install", (event) => event.waitUntil((async () => {
  const manifest = await (await fetch("manifest.json", { cache: "no-store" })).json();
  const cache = await caches.open(CACHE);
  await cache.addAll([...PAGE, ...manifest.files.map((f) => `model/${f.name}`)]);
  await self.skipWaiting();
})()));

self.addEventListener("activate", (event) => event.waitUntil(self.clients.claim()));

self.addEventListener("fetch", (event) => {
  const request = event.request;
  if (request.method !== "GET" || new URL(request.url).origin !== self.location.origin) return;
  event.respondWith((async () => {
    try {
      const response = await fetch(request);
      if (response.ok) await (await caches.open(CACHE)).put(request, response.clone());
      return response;
    } catch (offline) {
      const cached = await caches.match(request);
      if (cached) return cached;
      throw offline;
    }
  })());
});
