// loraplex web app: chat with an assistant, compare versions, rate answers.
// Plain browser JavaScript, no build step: it talks to the server's public API like any client
// (/v1/models, streamed /v1/chat/completions, /v1/feedback) plus /ui/api/conversations for
// history kept per API key. Markdown is rendered by marked and sanitised by DOMPurify (vendored).
"use strict";

const $ = (id) => document.getElementById(id);
const STRINGS = {
  en: {
    "signin.label": "API key", "signin.button": "Sign in", "signout": "Sign out", "tab.chat": "Chat",
    "tab.compare": "Compare", "picker.label": "Assistant", "chat.new": "New chat", "compare.none": "(no third)",
    "settings.title": "Settings", "settings.system": "System prompt for this assistant",
    "settings.temperature": "Temperature", "settings.max_tokens": "Max tokens",
    "input.placeholder": "Ask something (Enter to send, Shift+Enter for a new line)", "input.send": "Send",
    "input.stop": "Stop", "msg.copy": "Copy", "msg.copied": "Copied", "msg.retry": "Retry", "msg.up": "Good", "msg.down": "Bad",
    "fb.comment": "What was wrong? (optional)", "fb.correction": "The right answer (optional)",
    "fb.send": "Send feedback", "fb.thanks": "Thanks, feedback saved.", "sidebar.toggle": "Conversations",
    "base": "base model", "compare.vote": "This one is better", "compare.voted": "Vote saved",
    "err.network": "Connection lost. Your message is kept; press Retry when the server is back.",
    "err.stopped": "(stopped)", "err.too_long": "That message is {n} characters; the limit here is {max}.",
    "err.key": "That key was refused: {msg}", "new.title": "New conversation", "delete": "Delete",
    "confirm.delete": "Delete this conversation?", "tab.admin": "Admin", "admin.train": "Train a new version",
    "admin.file": "Data file (JSONL, JSON, CSV, TSV or dialogue text)", "admin.name": "Adapter name",
    "admin.description": "Description", "admin.epochs": "Epochs", "admin.advanced": "Advanced",
    "admin.lr": "Learning rate", "admin.rank": "LoRA rank", "admin.eval_ratio": "Held out for eval",
    "admin.batch": "Batch size", "admin.start": "Start training", "admin.live": "Live server",
    "admin.adapters": "Adapters", "admin.records": "{n} records ({format}), {e} invalid",
    "admin.report": "Eval report", "admin.move": "Move", "admin.rollback": "Roll back",
    "admin.confirm_move": "Point {alias} at {version}?", "admin.confirm_rollback": "Move {alias} back to its previous version?",
    "admin.running": "running {r} of {max} rows, {q} queued; loaded: {loaded}", "admin.base": "Base model",
    "admin.base_other": "HF directory or .gguf path on the server", "admin.served": "served here",
    "admin.not_served": "not served by this server", "admin.other": "other...",
    "sources": "Sources", "sources.none": "Nothing in the knowledge base matched; answered without it.",
    "assistant": "assistant", "knowledge": "knowledge base",
  },
  zh: {
    "signin.label": "API 密钥", "signin.button": "登录", "signout": "退出", "tab.chat": "对话",
    "tab.compare": "对比", "picker.label": "助手", "chat.new": "新对话", "compare.none": "（不选第三个）",
    "settings.title": "设置", "settings.system": "此助手的系统提示词", "settings.temperature": "温度",
    "settings.max_tokens": "最大生成长度", "input.placeholder": "输入问题（Enter 发送，Shift+Enter 换行）",
    "input.send": "发送", "input.stop": "停止", "msg.copy": "复制", "msg.copied": "已复制", "msg.retry": "重试", "msg.up": "有帮助", "msg.down": "不对",
    "fb.comment": "哪里不对？（可选）", "fb.correction": "正确答案（可选）", "fb.send": "提交反馈",
    "fb.thanks": "谢谢，反馈已保存。", "sidebar.toggle": "对话列表", "base": "基础模型",
    "compare.vote": "这个更好", "compare.voted": "已记录",
    "err.network": "连接中断。你的消息已保留，服务恢复后点“重试”。", "err.stopped": "（已停止）",
    "err.too_long": "消息有 {n} 个字符，上限是 {max}。", "err.key": "密钥被拒绝：{msg}",
    "new.title": "新对话", "delete": "删除", "confirm.delete": "删除这个对话？", "tab.admin": "管理",
    "admin.train": "训练新版本", "admin.file": "数据文件（JSONL、JSON、CSV、TSV 或对话文本）", "admin.name": "适配器名称",
    "admin.description": "说明", "admin.epochs": "训练轮数", "admin.advanced": "高级设置", "admin.lr": "学习率",
    "admin.rank": "LoRA 秩", "admin.eval_ratio": "留作评估的比例", "admin.batch": "批大小", "admin.start": "开始训练",
    "admin.live": "服务器实时状态", "admin.adapters": "适配器", "admin.records": "{n} 条记录（{format}），{e} 条有误",
    "admin.report": "评估报告", "admin.move": "移动", "admin.rollback": "回滚",
    "admin.confirm_move": "把 {alias} 指向 {version}？", "admin.confirm_rollback": "把 {alias} 回滚到上一个版本？",
    "admin.running": "批中 {r}/{max} 行，排队 {q}；已加载：{loaded}", "admin.base": "基础模型",
    "admin.base_other": "服务器上的 HF 目录或 .gguf 路径", "admin.served": "本服务器在用",
    "admin.not_served": "本服务器不提供", "admin.other": "其他…",
    "sources": "来源", "sources.none": "知识库中没有找到相关内容，未使用参考资料。",
    "assistant": "助手", "knowledge": "知识库",
  },
};
const MAX_CHARS = 100000;

const state = {
  key: localStorage.getItem("lp.key") || "",
  lang: localStorage.getItem("lp.lang") || (navigator.language.startsWith("zh") ? "zh" : "en"),
  models: [],
  model: localStorage.getItem("lp.model") || "",
  conv: null, // {id, title, model, messages: [{role, content, id?, rating?, model?}]}
  list: [],
  busy: null, // AbortController of the answer being streamed
};

function t(key, vars = {}) {
  let s = (STRINGS[state.lang] || STRINGS.en)[key] || STRINGS.en[key] || key;
  for (const [k, v] of Object.entries(vars)) s = s.replace(`{${k}}`, v);
  return s;
}

function applyLanguage() {
  document.documentElement.lang = state.lang === "zh" ? "zh-CN" : "en";
  document.querySelectorAll("[data-i18n]").forEach((el) => { el.textContent = t(el.dataset.i18n); });
  document.querySelectorAll("[data-i18n-placeholder]").forEach((el) => { el.placeholder = t(el.dataset.i18nPlaceholder); });
  document.querySelectorAll("[data-i18n-label]").forEach((el) => { el.setAttribute("aria-label", t(el.dataset.i18nLabel)); });
  $("lang").textContent = state.lang === "zh" ? "English" : "中文";
}

// ---------------------------------------------------------------- HTTP

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function api(path, options = {}) {
  const headers = { "Content-Type": "application/json", ...(options.headers || {}) };
  if (state.key) headers.Authorization = `Bearer ${state.key}`;
  let r;
  try {
    r = await fetch(path, { ...options, headers });
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new ApiError(0, t("err.network"));
  }
  if (!r.ok) {
    let message = `${r.status} ${r.statusText}`;
    try { message = (await r.json()).error.message || message; } catch (_) { /* not JSON */ }
    throw new ApiError(r.status, message);
  }
  return r;
}

function showError(message) {
  const b = $("banner");
  b.textContent = message;
  b.hidden = !message;
}

// Server-sent events from a POST: EventSource cannot send a body, so the stream is read with
// fetch and split on the SSE framing ("data: ...\n\n") that the server writes.
async function* sse(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    let chunk;
    try {
      chunk = await reader.read();
    } catch (e) {
      if (e.name === "AbortError") throw e;
      throw new ApiError(0, t("err.network")); // the connection broke mid-answer
    }
    const { value, done } = chunk;
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.search(/\r?\n\r?\n/)) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut).replace(/^\r?\n\r?\n/, "");
      const data = block.split(/\r?\n/).filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("\n");
      if (data === "[DONE]") return;
      if (data) yield JSON.parse(data);
    }
  }
}

// One streamed answer: calls onDelta(textSoFar) and returns {text, id, finish, model}.
async function streamAnswer(model, messages, signal, onDelta) {
  const body = {
    model, messages, stream: true,
    temperature: Number($("temperature").value || 0),
    max_tokens: Number($("max-tokens").value || 256),
  };
  const r = await api("/v1/chat/completions", { method: "POST", body: JSON.stringify(body), signal });
  let text = "", id = null, finish = null, served = model, sources;
  for await (const event of sse(r)) {
    if (event.error) throw new ApiError(500, event.error.message);
    id = event.id || id;
    served = event.model || served;
    const choice = (event.choices || [])[0];
    if (!choice) continue;
    if (choice.delta && choice.delta.sources) sources = choice.delta.sources; // an assistant's passages, first chunk
    text += (choice.delta && choice.delta.content) || "";
    finish = choice.finish_reason || finish;
    onDelta(text);
  }
  return { text, id, finish, model: served, sources };
}

// ---------------------------------------------------------------- rendering

function markdown(text) {
  const html = window.marked ? window.marked.parse(text, { gfm: true, breaks: true }) : text;
  return window.DOMPurify ? window.DOMPurify.sanitize(html) : text.replace(/[&<>]/g, (c) => `&#${c.charCodeAt(0)};`);
}

function modelLabel(id) {
  const m = state.models.find((x) => x.id === id);
  if (!m) return id;
  if (m.kind === "assistant") return `${m.display_name || id} (${t("assistant")})`;
  return m.parent ? id : `${id} (${t("base")})`;
}

// An assistant's sources under its answer: numbered like the [n] the answer cites, each opening
// to the passage itself.
function sourceList(sources) {
  const box = document.createElement("div");
  box.className = "sources";
  if (!sources.length) {
    box.classList.add("muted");
    box.textContent = t("sources.none");
    return box;
  }
  const title = document.createElement("div");
  title.className = "sources-title";
  title.textContent = t("sources");
  const list = document.createElement("ol");
  for (const s of sources) {
    const item = document.createElement("li");
    item.value = s.index;
    const details = document.createElement("details");
    const summary = document.createElement("summary");
    summary.textContent = `${s.document} #${s.chunk + 1}`;
    const passage = document.createElement("p");
    passage.textContent = s.text;
    details.append(summary, passage);
    item.append(details);
    list.append(item);
  }
  box.append(title, list);
  return box;
}

function renderMessages() {
  const box = $("messages");
  box.replaceChildren();
  const msgs = state.conv ? state.conv.messages : [];
  msgs.forEach((m, i) => {
    if (m.role === "system") return;
    box.append(m.role === "user" ? userBubble(m) : assistantBubble(m, i, i === msgs.length - 1));
  });
  if (msgs.length && msgs[msgs.length - 1].role === "user" && !state.busy) {
    // A question left unanswered (the connection dropped before any reply): offer to ask again.
    const again = document.createElement("button");
    again.className = "retry";
    again.textContent = t("msg.retry");
    again.onclick = () => answer();
    box.append(again);
  }
  box.lastElementChild?.scrollIntoView({ block: "end" });
}

function userBubble(m) {
  const div = document.createElement("div");
  div.className = "msg user";
  div.textContent = m.content;
  return div;
}

function assistantBubble(m, index, last) {
  const node = $("tpl-assistant").content.firstElementChild.cloneNode(true);
  node.querySelectorAll("[data-i18n]").forEach((el) => { el.textContent = t(el.dataset.i18n); });
  node.querySelector(".who").textContent = m.model || "";
  node.querySelector(".content").innerHTML = markdown(m.content);
  if (Array.isArray(m.sources)) node.querySelector(".content").after(sourceList(m.sources));
  if (m.error) {
    const note = document.createElement("div");
    note.className = "error-note";
    note.textContent = m.error;
    node.querySelector(".content").after(note);
  }
  const retry = node.querySelector(".retry");
  retry.hidden = !last;
  retry.onclick = () => retryLast();
  node.querySelector(".copy").onclick = async (e) => {
    try { await navigator.clipboard.writeText(m.content); e.target.textContent = t("msg.copied"); } catch (_) { /* no clipboard */ }
  };
  const up = node.querySelector(".up"), down = node.querySelector(".down"), form = node.querySelector(".feedback");
  up.setAttribute("aria-pressed", String(m.rating === "up"));
  down.setAttribute("aria-pressed", String(m.rating === "down"));
  up.disabled = down.disabled = !m.id; // an answer that failed or was never saved has no id to rate
  up.onclick = () => sendFeedback(m, "up", {}, node);
  down.onclick = () => { form.hidden = !form.hidden; if (!form.hidden) form.querySelector("textarea").focus(); };
  form.onsubmit = (e) => {
    e.preventDefault();
    sendFeedback(m, "down", {
      comment: form.querySelector(".fb-comment").value.trim() || undefined,
      correction: form.querySelector(".fb-correction").value.trim() || undefined,
    }, node);
  };
  node.dataset.index = index;
  return node;
}

async function sendFeedback(m, rating, extra, node) {
  try {
    await api("/v1/feedback", { method: "POST", body: JSON.stringify({ id: m.id, rating, ...extra }) });
    m.rating = rating;
    await saveConversation();
    renderMessages();
    const last = $("messages").querySelector(`[data-index="${node.dataset.index}"]`);
    const note = document.createElement("div");
    note.className = "muted fb-thanks";
    note.textContent = t("fb.thanks");
    last?.append(note);
  } catch (e) {
    showError(e.message);
  }
}

// ---------------------------------------------------------------- conversations

function newConversation() {
  state.conv = { id: crypto.randomUUID(), title: t("new.title"), model: state.model, messages: [] };
  renderMessages();
  renderList();
}

async function saveConversation() {
  const c = state.conv;
  if (!c || !c.messages.length) return;
  const first = c.messages.find((m) => m.role === "user");
  if (first && c.title === t("new.title")) c.title = first.content.slice(0, 60);
  const messages = c.messages.map(({ role, content, id, rating, model, sources }) => ({ role, content, id, rating, model, sources }));
  await api(`/ui/api/conversations/${c.id}`, { method: "PUT", body: JSON.stringify({ title: c.title, model: c.model, messages }) });
  await loadList();
}

async function loadList() {
  const r = await api("/ui/api/conversations");
  state.list = (await r.json()).data;
  renderList();
}

function renderList() {
  const ul = $("conversations");
  ul.replaceChildren();
  for (const c of state.list) {
    const li = document.createElement("li");
    li.classList.toggle("active", state.conv && c.id === state.conv.id);
    const open = document.createElement("button");
    open.className = "open";
    open.textContent = c.title;
    const small = document.createElement("small");
    small.textContent = c.model;
    open.append(small);
    open.onclick = () => openConversation(c.id);
    const del = document.createElement("button");
    del.className = "del";
    del.textContent = "✕";
    del.setAttribute("aria-label", `${t("delete")}: ${c.title}`);
    del.onclick = async () => {
      if (!confirm(t("confirm.delete"))) return;
      await api(`/ui/api/conversations/${c.id}`, { method: "DELETE" });
      if (state.conv && state.conv.id === c.id) newConversation();
      await loadList();
    };
    li.append(open, del);
    ul.append(li);
  }
}

async function openConversation(id) {
  try {
    const r = await api(`/ui/api/conversations/${id}`);
    state.conv = await r.json();
    if (state.models.some((m) => m.id === state.conv.model)) selectModel(state.conv.model, false);
    renderMessages();
    renderList();
    $("sidebar").classList.remove("open");
  } catch (e) {
    showError(e.message);
  }
}

// ---------------------------------------------------------------- chat

function systemPrompt() {
  return localStorage.getItem(`lp.system.${state.model}`) || "";
}

async function ask(text) {
  if (text.length > MAX_CHARS) { showError(t("err.too_long", { n: text.length, max: MAX_CHARS })); return; }
  if (!state.conv || state.conv.model !== state.model) newConversation();
  state.conv.messages.push({ role: "user", content: text });
  renderMessages();
  try { await saveConversation(); } catch (_) { /* saved again after the answer */ }
  await answer();
}

async function retryLast() {
  const msgs = state.conv.messages;
  if (msgs.length && msgs[msgs.length - 1].role === "assistant") msgs.pop();
  renderMessages();
  await answer();
}

async function answer() {
  showError("");
  const c = state.conv;
  const history = c.messages.filter((m) => !m.error || m.role === "user").map(({ role, content }) => ({ role, content }));
  const system = systemPrompt();
  const messages = system ? [{ role: "system", content: system }, ...history] : history;
  const reply = { role: "assistant", content: "", model: state.model };
  c.messages.push(reply);
  renderMessages();
  const bubble = $("messages").lastElementChild.querySelector(".content");
  bubble.classList.add("streaming");
  const controller = new AbortController();
  setBusy(controller);
  try {
    const out = await streamAnswer(state.model, messages, controller.signal, (text) => {
      reply.content = text;
      bubble.innerHTML = markdown(text);
      bubble.scrollIntoView({ block: "end" });
    });
    Object.assign(reply, { content: out.text, id: out.id, model: out.model });
    if (out.sources) reply.sources = out.sources;
  } catch (e) {
    if (e.name === "AbortError") reply.content += ` ${t("err.stopped")}`;
    else reply.error = e.message;
    if (!reply.content && reply.error) c.messages.pop(); // keep the question, drop the empty answer
    if (reply.error) showError(reply.error);
  } finally {
    setBusy(null);
    renderMessages();
    try { await saveConversation(); } catch (e) { showError(e.message); }
  }
}

function setBusy(controller) {
  state.busy = controller;
  $("send").hidden = !!controller;
  $("stop").hidden = !controller;
}

// ---------------------------------------------------------------- compare

async function compare(text) {
  const picks = ["cmp-a", "cmp-b", "cmp-c"].map((id) => $(id).value).filter(Boolean);
  const cols = $("compare-cols");
  cols.replaceChildren();
  const messages = [{ role: "user", content: text }];
  const controller = new AbortController();
  setBusy(controller);
  const results = await Promise.all(picks.map(async (model) => {
    const col = document.createElement("div");
    col.className = "col";
    const h = document.createElement("h3");
    h.textContent = modelLabel(model);
    const body = document.createElement("div");
    body.className = "content streaming";
    const vote = document.createElement("button");
    vote.className = "vote";
    vote.textContent = t("compare.vote");
    vote.disabled = true;
    col.append(h, body, vote);
    cols.append(col);
    try {
      const out = await streamAnswer(model, messages, controller.signal, (s) => { body.innerHTML = markdown(s); });
      body.classList.remove("streaming");
      return { model, out, col, vote };
    } catch (e) {
      body.classList.remove("streaming");
      body.textContent = e.name === "AbortError" ? t("err.stopped") : e.message;
      return { model, out: null, col, vote };
    }
  }));
  setBusy(null);
  const answered = results.filter((r) => r.out && r.out.id);
  for (const r of answered) {
    r.vote.disabled = false;
    r.vote.onclick = async () => {
      // The vote is feedback: up for the chosen answer, down for the others, each naming the rival.
      const others = answered.filter((o) => o !== r);
      try {
        await api("/v1/feedback", { method: "POST", body: JSON.stringify({
          id: r.out.id, rating: "up", comment: `compare: preferred over ${others.map((o) => o.model).join(", ")}` }) });
        for (const o of others) {
          await api("/v1/feedback", { method: "POST", body: JSON.stringify({
            id: o.out.id, rating: "down", comment: `compare: ${r.model} preferred` }) });
        }
        answered.forEach((o) => { o.vote.disabled = true; });
        r.col.classList.add("winner");
        r.vote.textContent = t("compare.voted");
      } catch (e) {
        showError(e.message);
      }
    };
  }
}

// ---------------------------------------------------------------- models, sign-in, wiring

function selectModel(id, reset = true) {
  state.model = id;
  localStorage.setItem("lp.model", id);
  $("model-select").value = id;
  $("system-prompt").value = systemPrompt();
  const m = state.models.find((x) => x.id === id);
  const parts = m ? [m.description, m.knowledge ? `${t("knowledge")}: ${m.knowledge}` : "", m.parent ? `${t("base")}: ${m.parent}` : ""] : [];
  $("model-info").textContent = parts.filter(Boolean).join(" · ");
  // an assistant's own defaults fill the settings (still changeable)
  const defaults = (m && m.defaults) || {};
  if (defaults.temperature != null) $("temperature").value = defaults.temperature;
  if (defaults.max_tokens != null) $("max-tokens").value = defaults.max_tokens;
  if (reset) {
    // Each assistant keeps its own conversations: open its latest, or start one.
    const latest = state.list.find((c) => c.model === id);
    if (latest) openConversation(latest.id); else newConversation();
  }
}

async function loadModels() {
  const r = await api("/v1/models");
  state.models = (await r.json()).data.filter((m) => m.kind !== "embedding"); // chat models only
  const label = (m) => modelLabel(m.id) + (m.version ? ` · v${m.version}` : "") + (m.description ? ` · ${m.description}` : "");
  // assistants first: they are what most people pick
  state.models.sort((a, b) => (b.kind === "assistant") - (a.kind === "assistant"));
  // Compare also offers every stored version (NAME@vN), to put v3 next to v4.
  const versions = [];
  for (const m of state.models) {
    if (m.id.includes("@")) continue;
    for (const v of m.versions || []) versions.push({ id: v, version: Number(v.split("@v")[1]), description: m.description, parent: m.parent });
  }
  const fill = (select, list, withNone) => {
    const keep = select.value;
    select.replaceChildren();
    if (withNone) {
      const none = document.createElement("option");
      none.value = "";
      none.textContent = t("compare.none");
      select.append(none);
    }
    for (const m of list) {
      const o = document.createElement("option");
      o.value = m.id;
      o.textContent = label(m);
      select.append(o);
    }
    if (keep) select.value = keep;
  };
  const both = [...state.models, ...versions.filter((v) => !state.models.some((m) => m.id === v.id))];
  fill($("model-select"), state.models, false);
  fill($("cmp-a"), both, false);
  fill($("cmp-b"), both, false);
  fill($("cmp-c"), both, true);
  if (both.length > 1 && !$("cmp-b").dataset.touched) $("cmp-b").value = both[1].id;
}

async function start() {
  applyLanguage();
  try {
    const me = await (await api("/ui/api/me")).json();
    $("signout").hidden = !me.auth;
    $("tab-admin").hidden = !me.admin;
  } catch (e) {
    if (e.status === 401 || e.status === 403) {
      $("app").hidden = true;
      $("signin").hidden = false;
      const err = $("signin-error");
      err.hidden = !state.key;
      err.textContent = t("err.key", { msg: e.message });
      $("key-input").focus();
      return;
    }
    showError(e.message);
  }
  $("signin").hidden = true;
  $("app").hidden = false;
  await loadModels();
  await loadList();
  const initial = state.models.some((m) => m.id === state.model) ? state.model : state.models[0]?.id;
  selectModel(initial);
  $("input").focus();
}

function wire() {
  $("signin-form").onsubmit = (e) => {
    e.preventDefault();
    state.key = $("key-input").value.trim();
    localStorage.setItem("lp.key", state.key);
    start();
  };
  $("signout").onclick = () => { localStorage.removeItem("lp.key"); state.key = ""; location.reload(); };
  $("lang").onclick = () => {
    state.lang = state.lang === "zh" ? "en" : "zh";
    localStorage.setItem("lp.lang", state.lang);
    applyLanguage();
    renderMessages();
  };
  $("model-select").onchange = (e) => selectModel(e.target.value);
  $("system-prompt").onchange = (e) => localStorage.setItem(`lp.system.${state.model}`, e.target.value);
  $("new-chat").onclick = () => { newConversation(); $("input").focus(); };
  $("toggle-sidebar").onclick = () => $("sidebar").classList.toggle("open");
  const tab = (name) => {
    for (const v of ["chat", "compare", "admin"]) {
      $(`tab-${v}`).setAttribute("aria-selected", String(v === name));
      $(`${v}-view`).hidden = v !== name;
    }
    $("model-select").disabled = name !== "chat";
    $("composer").hidden = $("settings").hidden = name === "admin";
    window.dispatchEvent(new CustomEvent("lp:tab", { detail: name }));
  };
  $("tab-chat").onclick = () => tab("chat");
  $("tab-compare").onclick = () => tab("compare");
  $("tab-admin").onclick = () => tab("admin");
  $("stop").onclick = () => state.busy?.abort();
  $("composer").onsubmit = (e) => {
    e.preventDefault();
    const text = $("input").value.trim();
    if (!text || state.busy) return;
    $("input").value = "";
    if ($("compare-view").hidden) ask(text); else compare(text);
  };
  $("input").addEventListener("keydown", (e) => {
    // Enter sends, except while an input method is composing (Chinese IMEs confirm with Enter).
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing && e.keyCode !== 229) {
      e.preventDefault();
      $("composer").requestSubmit();
    }
  });
}

// admin.js uses these
window.lp = { $, t, api, state, showError, loadModels, markdown };
window.addEventListener("DOMContentLoaded", () => { wire(); start(); });
