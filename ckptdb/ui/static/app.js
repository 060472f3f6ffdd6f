// ckptdb ui: the metric chart (uPlot), the dry-run plan, and live updates by polling /api/marker.
(function () {
  "use strict";
  const STYLES = [  // series after the line: [label, states, fill, stroke, size]
    ["kept", ["committed"], "#1f77b4", "#1f77b4", 8],
    ["deleted", ["deleted", "deleting"], "#ffffff", "#9a9a9a", 7],
    ["corrupt / missing", ["corrupt", "missing"], "#d62728", "#d62728", 11],
  ];

  function drawChart() {
    const el = document.getElementById("chart");
    const data = document.getElementById("curve-data");
    if (!el || !data || typeof uPlot === "undefined") return;
    const curve = JSON.parse(data.textContent);
    const pts = curve.points;
    if (window.ckptdbChart && window.ckptdbChart.uplot) window.ckptdbChart.uplot.destroy();
    el.innerHTML = "";
    if (!pts.length) {
      el.innerHTML = '<p class="muted">no checkpoint of this run has a finite ' + curve.metric + " score</p>";
      window.ckptdbChart = { uplot: null, points: pts, metric: curve.metric };
      return;
    }
    const xs = pts.map((p) => p.step);
    const series = [{ label: "step" }, { label: curve.metric, stroke: "rgba(76,114,176,0.5)", width: 1.5, points: { show: false } }];
    const cols = [xs, pts.map((p) => p.value)];
    for (const [label, states, fill, stroke, size] of STYLES) {
      cols.push(pts.map((p) => (states.includes(p.state) ? p.value : null)));
      series.push({ label, stroke, width: 0, paths: () => null, points: { show: true, size, fill, stroke, width: 1.5 } });
    }
    cols.push(pts.map((p) => (p.pins.length ? p.value : null)));
    series.push({ label: "pinned", stroke: "#7a5c00", width: 0, paths: () => null,
                  points: { show: true, size: 15, fill: "#f2b705", stroke: "#7a5c00", width: 1.5 } });
    const hover = document.getElementById("chart-hover");
    const opts = {
      width: Math.max(320, el.clientWidth || 900), height: 320,
      scales: { x: { time: false } },
      axes: [{ label: "step" }, { label: curve.metric }],
      series,
      legend: { show: false },
      cursor: { points: { size: 10 } },
      hooks: {
        setCursor: [(u) => {
          const i = u.cursor.idx;
          if (i == null || !hover) return;
          const p = pts[i];
          hover.textContent = "step " + p.step + " · " + curve.metric + " = " + p.value + " · " + p.state +
            (p.pins.length ? " · pinned: " + p.pins.join(", ") : "");
        }],
      },
    };
    const u = new uPlot(opts, cols, el);
    window.ckptdbChart = { uplot: u, points: pts, metric: curve.metric };
  }

  function loadPlan(policy) {
    const box = document.getElementById("plan");
    if (!box) return;
    const url = box.dataset.src + (policy ? "?policy=" + encodeURIComponent(policy) : "");
    fetch(url, { headers: { accept: "text/html" } })
      .then((r) => r.text())
      .then((html) => { box.innerHTML = html; box.dataset.loaded = policy || ""; })
      .catch((e) => { box.textContent = "could not load the plan: " + e; });
  }

  function initPlan() {
    const form = document.getElementById("plan-form");
    const box = document.getElementById("plan");
    if (!form || !box) return;
    loadPlan(box.dataset.policy);
    form.addEventListener("submit", (ev) => {
      ev.preventDefault();
      const policy = form.elements.policy.value.trim();
      const u = new URL(location.href);
      if (policy) u.searchParams.set("policy", policy); else u.searchParams.delete("policy");
      history.replaceState(null, "", u);
      loadPlan(policy);
    });
  }

  function poll() {
    const body = document.body;
    if (body.dataset.live !== "1") return;
    const status = document.getElementById("live-status");
    const every = parseInt(body.dataset.pollMs || "2000", 10);
    let busy = false;
    async function tick() {
      if (busy || document.hidden) return;
      busy = true;
      try {
        const r = await fetch("/api/marker", { cache: "no-store" });
        const { marker } = await r.json();
        if (marker !== body.dataset.marker) {
          const html = await (await fetch(location.href, { cache: "no-store" })).text();
          const doc = new DOMParser().parseFromString(html, "text/html");
          for (const el of document.querySelectorAll("[data-live-id]")) {
            const fresh = doc.querySelector('[data-live-id="' + el.dataset.liveId + '"]');
            if (fresh) el.innerHTML = fresh.innerHTML;
          }
          body.dataset.marker = doc.body.dataset.marker || marker;
          drawChart();
          const box = document.getElementById("plan");
          if (box) loadPlan(box.dataset.loaded || "");
          if (status) status.textContent = "updated " + new Date().toLocaleTimeString();
        } else if (status) {
          status.textContent = "live";
        }
      } catch (e) {
        if (status) status.textContent = "offline";
      } finally {
        busy = false;
      }
    }
    setInterval(tick, every);
  }

  drawChart();
  initPlan();
  poll();
  window.addEventListener("resize", () => {
    const c = window.ckptdbChart;
    const el = document.getElementById("chart");
    if (c && c.uplot && el) c.uplot.setSize({ width: Math.max(320, el.clientWidth), height: 320 });
  });
})();
