// loraplex web app, admin part: train from an uploaded file, watch jobs, live server, adapters.
// Everything goes through /ui/api/admin/* and /admin/* with the signed-in (admin) key; charts are
// uPlot (vendored). Shown only to admin keys; the server checks again on every call.
"use strict";

(() => {
  const { $, t, api, showError } = window.lp;
  let upload = null; // {filename, content_b64, ok}
  let timer = null;
  const charts = {};

  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) {
      if (k.startsWith("on")) node[k] = v; else node.setAttribute(k, v);
    }
    node.append(...children.filter((c) => c !== null && c !== undefined));
    return node;
  }

  function chart(id, container, title, series, data) {
    // One uPlot per container, rebuilt when the series change, otherwise fed new data.
    const width = Math.max(280, Math.min(container.clientWidth || 600, 900));
    const key = `${id}:${series.map((s) => s.label).join(",")}`;
    if (charts[id] && charts[id].key === key) { charts[id].plot.setData(data); return; }
    if (charts[id]) charts[id].plot.destroy();
    container.replaceChildren();
    const opts = { title, width, height: 220, series: [{}, ...series], scales: { x: { time: series.timeAxis !== false } } };
    charts[id] = { key, plot: new window.uPlot(opts, data, container) };
  }

  const COLORS = ["#2f6fdf", "#d9822b", "#0a7a2f", "#b3261e", "#7b3fbf", "#2b9fb0", "#8c6d1f", "#555"];

  // ------------------------------------------------------------ training

  async function fileChosen(file) {
    $("train-errors").replaceChildren();
    $("train-start").disabled = true;
    upload = null;
    if (!file) return;
    const bytes = new Uint8Array(await file.arrayBuffer());
    let bin = "";
    for (let i = 0; i < bytes.length; i += 0x8000) bin += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
    upload = { filename: file.name, content_b64: btoa(bin) };
    try {
      const r = await api("/ui/api/admin/train/check", { method: "POST", body: JSON.stringify(upload) });
      const res = await r.json();
      $("train-check").textContent = t("admin.records", { n: res.records, format: res.format, e: res.errors.length });
      for (const e of res.errors.slice(0, 200)) {
        $("train-errors").append(el("li", {}, `${e.source}${e.field ? ` [${e.field}]` : ""}: ${e.reason}`));
      }
      $("train-start").disabled = res.errors.length > 0 || res.records === 0;
      if (!$("train-name").value) $("train-name").value = file.name.replace(/\.[^.]+$/, "").toLowerCase().replace(/[^a-z0-9._-]+/g, "-").slice(0, 60);
    } catch (e) {
      $("train-check").textContent = "";
      showError(e.message);
    }
  }

  async function startTraining(ev) {
    ev.preventDefault();
    if (!upload) return;
    const base = $("train-base").value === "__other" ? $("train-base-other").value.trim() : $("train-base").value;
    const settings = {
      base,
      name: $("train-name").value.trim(),
      description: $("train-description").value.trim(),
      epochs: $("train-epochs").value ? Number($("train-epochs").value) : null,  // empty: the recipe's default
      learning_rate: Number($("train-lr").value),
      rank: Number($("train-rank").value),
      eval_ratio: Number($("train-eval").value),
      batch_size: Number($("train-batch").value),
    };
    try {
      $("train-start").disabled = true;
      await api("/ui/api/admin/train/jobs", { method: "POST", body: JSON.stringify({ ...upload, settings }) });
      showError("");
      await refreshJobs();
    } catch (e) {
      showError(e.message);
      $("train-start").disabled = false;
    }
  }

  async function openReport(id) {
    // The report needs the key, which a plain link cannot send: fetch it and open it as a blob.
    const r = await api(`/ui/api/admin/train/jobs/${id}/report`);
    const url = URL.createObjectURL(new Blob([await r.text()], { type: "text/html" }));
    window.open(url, "_blank");
  }

  let lastDone = null;
  async function refreshJobs() {
    const jobs = (await (await api("/ui/api/admin/train/jobs")).json()).data;
    const box = $("jobs");
    for (const id of Object.keys(charts).filter((k) => k.startsWith("job-"))) { charts[id].plot.destroy(); delete charts[id]; }
    box.replaceChildren();
    for (const j of jobs) {
      const progress = j.total_steps ? `${j.step}/${j.total_steps}` : `${j.step}`;
      const card = el("div", { class: "job", "data-status": j.status, id: `job-${j.id}` },
        el("div", {}, el("span", { class: "status" }, j.status), ` · ${j.name} · step ${progress}`,
          j.adapter ? ` → ${j.adapter}` : "", j.error ? el("div", { class: "error-note" }, j.error) : null),
        j.report ? el("button", { class: "report", onclick: () => openReport(j.id) }, t("admin.report")) : null,
        el("div", { class: "chart", id: `job-chart-${j.id}` }));
      box.append(card);
      if (j.loss.length > 1) {
        const xs = j.loss.map((p) => p[0]);
        const evalAt = Object.fromEntries(j.eval_loss.map((p) => [p[0], p[1]]));
        const series = [{ label: "loss", stroke: COLORS[0] }, { label: "eval loss", stroke: COLORS[1], points: { show: true } }];
        series.timeAxis = false;
        chart(`job-${j.id}`, card.querySelector(".chart"), j.name, series, [xs, j.loss.map((p) => p[1]), xs.map((x) => evalAt[x] ?? null)]);
      }
    }
    const done = jobs.filter((j) => j.status === "done").map((j) => j.id).join();
    if (lastDone !== null && done !== lastDone) { await window.lp.loadModels(); await refreshAdapters(); }
    lastDone = done;
    return jobs.some((j) => ["queued", "training", "evaluating"].includes(j.status));
  }

  // ------------------------------------------------------------ live server and adapters

  async function refreshLive() {
    const live = await (await api("/ui/api/admin/live")).json();
    const loaded = live.loaded.map((a) => a.key).join(", ") || "-";
    $("live-stats").textContent = t("admin.running", { r: live.running, max: live.max_batch, q: live.queued, loaded });
    const ok = live.requests.filter((r) => r.status < 400);
    if (ok.length) {
      const series = [{ label: "TTFT ms", stroke: COLORS[0], points: { show: true }, width: 0 },
        { label: "latency ms", stroke: COLORS[1], points: { show: true }, width: 0 }];
      chart("live", $("live-chart"), "TTFT / latency (15 min)", series,
        [ok.map((r) => r.time), ok.map((r) => r.ttft_ms), ok.map((r) => r.latency_ms)]);
    }
  }

  async function moveAlias(name, alias, version) {
    if (!confirm(t("admin.confirm_move", { alias: `${name}@${alias}`, version: `${name}@v${version}` }))) return;
    try {
      await api("/admin/aliases", { method: "POST", body: JSON.stringify({ name, alias, version }) });
      await refreshAdapters();
      await window.lp.loadModels();
    } catch (e) { showError(e.message); }
  }

  async function rollback(name, alias) {
    if (!confirm(t("admin.confirm_rollback", { alias: `${name}@${alias}` }))) return;
    try {
      await api("/admin/aliases", { method: "POST", body: JSON.stringify({ name, alias, rollback: true }) });
      await refreshAdapters();
    } catch (e) { showError(e.message); }
  }

  async function refreshAdapters() {
    const adapters = (await (await api("/ui/api/admin/adapters")).json()).data;
    const table = el("table", {}, el("tr", {}, ...["version", "created", "size", "base", "eval", "feedback up", "requests", "tokens", "aliases"].map((h) => el("th", {}, h))));
    for (const a of adapters) {
      for (const v of a.versions) {
        const aliases = Object.entries(a.aliases).filter(([, to]) => to === `v${v.version}`).map(([al]) => al);
        const aliasCell = el("td", {}, aliases.join(", "));
        const aliasInput = el("input", { size: "6", value: "prod", "aria-label": `alias for ${v.id}` });
        aliasCell.append(" ", aliasInput, el("button", { class: "move", onclick: () => moveAlias(a.name, aliasInput.value.trim(), v.version) }, t("admin.move")));
        for (const al of aliases) aliasCell.append(el("button", { class: "rollback", onclick: () => rollback(a.name, al) }, `${t("admin.rollback")} ${al}`));
        table.append(el("tr", { "data-id": v.id },
          el("td", {}, v.id), el("td", {}, (v.created_at || "").slice(0, 16)), el("td", {}, `${(v.bytes / 1e6).toFixed(1)} MB`),
          el("td", {}, v.base || "-"), el("td", {}, v.eval_score == null ? "-" : v.eval_score.toFixed(3)),
          el("td", {}, v.up_ratio == null ? "-" : `${Math.round(v.up_ratio * 100)}% of ${v.ratings}`),
          el("td", {}, String(v.requests)), el("td", {}, String(v.tokens)), aliasCell));
      }
    }
    $("admin-adapters").replaceChildren(table);
    const usage = await (await api("/ui/api/admin/usage?hours=24")).json();
    const names = Object.keys(usage.series);
    if (names.length) {
      const xs = Array.from({ length: usage.buckets }, (_, i) => usage.start + (i + 0.5) * usage.width_s);
      const series = names.map((n, i) => ({ label: n, stroke: COLORS[i % COLORS.length] }));
      chart("usage", $("usage-chart"), "requests per adapter (24 h)", series, [xs, ...names.map((n) => usage.series[n].requests)]);
      chart("tokens", $("tokens-chart"), "tokens per adapter (24 h)", series, [xs, ...names.map((n) => usage.series[n].tokens)]);
    }
  }

  async function tick() {
    if ($("admin-view").hidden) return;
    try {
      const running = await refreshJobs();
      await refreshLive();
      timer = setTimeout(tick, running ? 1500 : 4000);
    } catch (e) {
      showError(e.message);
      timer = setTimeout(tick, 8000);
    }
  }

  async function loadBases() {
    const bases = await (await api("/ui/api/admin/bases")).json();
    const select = $("train-base");
    if (select.options.length) return;
    for (const b of bases.choices) {
      select.append(el("option", { value: b }, `${b} (${t(b === bases.served ? "admin.served" : "admin.not_served")})`));
    }
    select.append(el("option", { value: "__other" }, t("admin.other")));
    select.onchange = () => { $("train-base-other-label").hidden = select.value !== "__other"; };
  }

  window.addEventListener("lp:tab", async (ev) => {
    clearTimeout(timer);
    if (ev.detail !== "admin") return;
    try { await loadBases(); await refreshAdapters(); } catch (e) { showError(e.message); }
    tick();
  });
  window.addEventListener("DOMContentLoaded", () => {
    $("train-file").onchange = (e) => fileChosen(e.target.files[0]);
    $("train-form").onsubmit = startTraining;
  });
})();
