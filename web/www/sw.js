// Offline once loaded: every same-origin GET is answered from the cache when the network fails,
// and cached when it succeeds (the model files are checked by the page before use).
const CACHE = "portaflow-v1";
self.addEventListener("install", () => self.skipWaiting());
self.addEventListener("activate", (event) => event.waitUntil(self.clients.claim()));
self.addEventListener("fetch", (event) => {
  const request = event.request;
  if (request.method !== "GET" || new URL(request.url).origin !== self.location.origin) return;
  event.respondWith((async () => {
    const cache = await caches.open(CACHE);
    try {
      const response = await fetch(request);
      if (response.ok) await cache.put(request, response.clone());
      return response;
    } catch (offline) {
      const cached = await cache.match(request);
      if (cached) return cached;
      throw offline;
    }
  })());
});
