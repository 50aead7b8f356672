// The hub's pages: times in the browser's time zone (shown, and sent with the frame
// search), the queue's live refresh, and the review item's overlay controls and keys. No framework, nothing loaded from elsewhere.
"use strict";

function localTimes(root) {
  for (const t of root.querySelectorAll("time[data-ms]")) {
    const ms = Number(t.dataset.ms);
    if (ms > 0) t.textContent = new Date(ms).toLocaleString();
  }
}

function pollQueue(body) {
  const url = body.dataset.poll;
  let last = body.innerHTML;
  setInterval(async () => {
    try {
      const r = await fetch(url, { credentials: "same-origin", cache: "no-store" });
      if (r.redirected || !r.ok) return;
      const html = await r.text();
      if (html !== last) {
        body.innerHTML = html;
        last = html;
        localTimes(body);
        const n = r.headers.get("x-queue-count");
        const count = document.getElementById("queue-count");
        if (count && n !== null) count.textContent = n;
      }
    } catch (e) { /* the hub is away for a moment: try again at the next tick */ }
  }, 4000);
}

function reviewItem() {
  const overlay = document.getElementById("overlay");
  const opacity = document.getElementById("opacity");
  if (overlay && opacity) {
    const set = () => { overlay.style.opacity = String(Number(opacity.value) / 100); };
    opacity.addEventListener("input", set);
    set();
  }
  for (const radio of document.querySelectorAll("input[name=map]")) {
    radio.addEventListener("change", () => { if (overlay) overlay.src = radio.value; });
  }
  const zoom = document.getElementById("zoom");
  const stage = document.getElementById("stage");
  const canvas = document.getElementById("canvas");
  if (zoom && canvas) {
    zoom.addEventListener("input", () => { canvas.style.width = zoom.value + "%"; });
  }
  if (stage) {
    let drag = null;
    stage.addEventListener("mousedown", (e) => { drag = { x: e.clientX, y: e.clientY, l: stage.scrollLeft, t: stage.scrollTop }; });
    window.addEventListener("mouseup", () => { drag = null; });
    stage.addEventListener("mousemove", (e) => {
      if (!drag) return;
      stage.scrollLeft = drag.l - (e.clientX - drag.x);
      stage.scrollTop = drag.t - (e.clientY - drag.y);
    });
  }
  const form = document.getElementById("label-form");
  document.addEventListener("keydown", (e) => {
    if (e.ctrlKey || e.metaKey || e.altKey) return;
    const target = e.target;
    if (target && (target.tagName === "INPUT" || target.tagName === "TEXTAREA")) return;
    if (e.key === "j" || e.key === "k") {
      const a = document.getElementById(e.key === "j" ? "next" : "prev");
      if (a) { e.preventDefault(); window.location.href = a.href; }
      return;
    }
    if (!form) return;
    const button = form.querySelector("button[data-key='" + e.key + "']");
    if (button) {
      e.preventDefault();
      if (button.disabled) {
        const why = document.getElementById("why-not");
        if (why) why.scrollIntoView();
        return;
      }
      form.requestSubmit(button);
    }
  });
}

document.addEventListener("DOMContentLoaded", () => {
  localTimes(document);
  for (const tz of document.querySelectorAll("input[data-tz=browser]")) {
    tz.value = String(new Date().getTimezoneOffset());
  }
  const body = document.getElementById("queue-rows");
  if (body) pollQueue(body);
  if (document.getElementById("label-form")) reviewItem();
});
