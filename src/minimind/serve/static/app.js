/* MiniMind web chat: one page talking to the OpenAI-compatible server that serves it.
 *
 * Plain modern JavaScript, no build step and no third-party code.  SECURITY RULE for this file:
 * every string that comes from the user, the model or the server reaches the DOM through
 * textContent / createTextNode / attribute setters only; innerHTML is never used.
 */
"use strict";

(() => {
  const STORE_CHAT = "minimind.chat.v1";
  const STORE_SETTINGS = "minimind.settings.v1";
  const MAX_TOOL_ROUNDS = 5;

  // ---- i18n --------------------------------------------------------------------------------------
  const I18N = {
    en: {
      newChat: "New chat",
      settings: "Settings",
      language: "Language",
      temperature: "Temperature",
      maxTokens: "Max tokens",
      apiKey: "API key",
      apiKeyHint: "optional (Bearer token)",
      tools: "Tools",
      toolsHint: "The model may call the checked tools; they run on the server.",
      toolsLoading: "Loading…",
      toolsNone: "No tools available.",
      toolsError: "Could not load the tools.",
      toolsOn: (n) => `${n} tool${n === 1 ? "" : "s"} on`,
      emptyTitle: "Start a conversation",
      emptyHint: "Enter sends, Shift+Enter adds a new line.",
      thinking: "Thinking",
      placeholder: "Message MiniMind…",
      send: "Send",
      stop: "Stop",
      you: "You",
      assistant: "MiniMind",
      reasoning: "Reasoning",
      reasoningLive: "Thinking…",
      toolCall: "Tool call",
      toolResult: "Tool result",
      toolRunning: "running…",
      stopped: "(stopped)",
      truncated: "(reply cut at the token limit)",
      roundLimit: (n) => `Stopped after ${n} tool rounds.`,
      errorPrefix: "Error: ",
      needKey: "The server wants an API key: enter it under Settings.",
      noModel: "model unavailable",
    },
    zh: {
      newChat: "新对话",
      settings: "设置",
      language: "语言",
      temperature: "温度",
      maxTokens: "最大生成长度",
      apiKey: "API 密钥",
      apiKeyHint: "可选（Bearer 令牌）",
      tools: "工具",
      toolsHint: "模型可以调用勾选的工具，工具在服务器端运行。",
      toolsLoading: "加载中…",
      toolsNone: "没有可用的工具。",
      toolsError: "无法加载工具列表。",
      toolsOn: (n) => `已启用 ${n} 个工具`,
      emptyTitle: "开始对话",
      emptyHint: "回车发送，Shift+回车换行。",
      thinking: "思考",
      placeholder: "给 MiniMind 发消息…",
      send: "发送",
      stop: "停止",
      you: "你",
      assistant: "MiniMind",
      reasoning: "思考过程",
      reasoningLive: "思考中…",
      toolCall: "工具调用",
      toolResult: "工具结果",
      toolRunning: "运行中…",
      stopped: "（已停止）",
      truncated: "（回复达到长度上限被截断）",
      roundLimit: (n) => `已达到 ${n} 轮工具调用上限，停止。`,
      errorPrefix: "错误：",
      needKey: "服务器需要 API 密钥：请在“设置”中填写。",
      noModel: "模型不可用",
    },
  };

  // ---- state -------------------------------------------------------------------------------------
  const $ = (id) => document.getElementById(id);
  const el = {
    modelName: $("model-name"), newChat: $("new-chat"), settingsToggle: $("settings-toggle"),
    lang: $("lang"), settings: $("settings"), temperature: $("temperature"),
    temperatureValue: $("temperature-value"), maxTokens: $("max-tokens"), apiKey: $("api-key"),
    toolsList: $("tools-list"), toolsBadge: $("tools-badge"), messages: $("messages"),
    empty: $("empty"), status: $("status"), composer: $("composer"), thinking: $("thinking-toggle"),
    input: $("input"), send: $("send"), stop: $("stop"),
  };

  const settings = Object.assign(
    { lang: null, temperature: 0.85, maxTokens: 1024, apiKey: "", thinking: false, tools: [] },
    readJSON(STORE_SETTINGS, {}),
  );
  if (settings.lang !== "zh" && settings.lang !== "en") {
    settings.lang = (navigator.language || "en").toLowerCase().startsWith("zh") ? "zh" : "en";
  }

  /** The conversation as OpenAI messages.  Assistant entries may carry a UI-only `reasoning`
   *  field (shown, never sent back) and `note` (e.g. "stopped"). */
  let history = readJSON(STORE_CHAT, []);
  if (!Array.isArray(history)) history = [];
  let modelId = "minimind";
  let availableTools = []; // OpenAI tool schemas from /api/tools
  let controller = null; // AbortController of the running request

  function readJSON(key, fallback) {
    try {
      const raw = localStorage.getItem(key);
      return raw ? JSON.parse(raw) : fallback;
    } catch (_) {
      return fallback;
    }
  }

  function writeJSON(key, value) {
    try {
      localStorage.setItem(key, JSON.stringify(value));
    } catch (_) {
      /* storage full or disabled: the page still works for this session */
    }
  }

  const saveSettings = () => writeJSON(STORE_SETTINGS, settings);
  const saveHistory = () => writeJSON(STORE_CHAT, history);

  function t(key, ...args) {
    const v = (I18N[settings.lang] || I18N.en)[key];
    return typeof v === "function" ? v(...args) : v ?? key;
  }

  // ---- DOM helpers (text only) --------------------------------------------------------------------
  /** Create an element; `text` becomes a text node, never markup. */
  function h(tag, attrs = {}, text) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) {
      if (k === "class") node.className = v;
      else if (v !== undefined && v !== null && v !== false) node.setAttribute(k, v === true ? "" : String(v));
    }
    if (text !== undefined && text !== null) node.appendChild(document.createTextNode(String(text)));
    return node;
  }

  function applyLanguage() {
    document.documentElement.lang = settings.lang === "zh" ? "zh-CN" : "en";
    el.lang.value = settings.lang;
    for (const node of document.querySelectorAll("[data-i18n]")) node.textContent = t(node.dataset.i18n);
    for (const node of document.querySelectorAll("[data-i18n-placeholder]")) {
      node.setAttribute("placeholder", t(node.dataset.i18nPlaceholder));
    }
    updateToolsBadge();
  }

  function showStatus(text, kind = "error") {
    el.status.textContent = text;
    el.status.className = `status ${kind}`;
    el.status.hidden = !text;
  }

  function scrollToEnd() {
    const m = el.messages;
    // Follow the stream only when the reader is already near the bottom.
    if (m.scrollHeight - m.scrollTop - m.clientHeight < 160) m.scrollTop = m.scrollHeight;
  }

  // ---- HTTP --------------------------------------------------------------------------------------
  function headers(json = true) {
    const out = {};
    if (json) out["Content-Type"] = "application/json";
    if (settings.apiKey) out.Authorization = `Bearer ${settings.apiKey}`;
    return out;
  }

  async function errorText(resp) {
    let detail = "";
    try {
      const body = await resp.json();
      const e = body && (body.error || body.detail);
      detail = typeof e === "string" ? e : e && e.message ? e.message : JSON.stringify(body);
    } catch (_) {
      /* not JSON */
    }
    if (resp.status === 401) return t("needKey");
    return `HTTP ${resp.status}${detail ? `: ${detail}` : ""}`;
  }

  async function loadModel() {
    try {
      const resp = await fetch("v1/models", { headers: headers(false) });
      if (!resp.ok) throw new Error(await errorText(resp));
      const body = await resp.json();
      const first = body && Array.isArray(body.data) && body.data[0];
      if (first && first.id) modelId = String(first.id);
      el.modelName.textContent = modelId;
      el.modelName.classList.remove("offline");
    } catch (err) {
      el.modelName.textContent = t("noModel");
      el.modelName.classList.add("offline");
      showStatus(err.message || String(err));
    }
  }

  async function loadTools() {
    try {
      const resp = await fetch("api/tools", { headers: headers(false) });
      if (!resp.ok) throw new Error(await errorText(resp));
      const body = await resp.json();
      const list = Array.isArray(body) ? body : Array.isArray(body.tools) ? body.tools : [];
      availableTools = list.filter((s) => s && s.function && typeof s.function.name === "string");
      renderTools();
    } catch (err) {
      el.toolsList.replaceChildren(h("span", { class: "hint error" }, `${t("toolsError")} ${err.message || ""}`));
    }
  }

  function renderTools() {
    el.toolsList.replaceChildren();
    if (!availableTools.length) {
      el.toolsList.appendChild(h("span", { class: "hint", "data-i18n": "toolsNone" }, t("toolsNone")));
    }
    for (const schema of availableTools) {
      const name = schema.function.name;
      const id = `tool-${name.replace(/[^A-Za-z0-9_-]/g, "_")}`;
      const row = h("label", { class: "tool-option", for: id, title: schema.function.description || "" });
      const box = h("input", { type: "checkbox", id, "data-testid": id, value: name });
      box.checked = settings.tools.includes(name);
      box.addEventListener("change", () => {
        const on = new Set(settings.tools);
        if (box.checked) on.add(name);
        else on.delete(name);
        settings.tools = [...on];
        saveSettings();
        updateToolsBadge();
      });
      const text = h("span", { class: "tool-option-text" });
      text.appendChild(h("code", {}, name));
      if (schema.function.description) text.appendChild(h("small", {}, schema.function.description));
      row.append(box, text);
      el.toolsList.appendChild(row);
    }
    updateToolsBadge();
  }

  function enabledToolSchemas() {
    return availableTools.filter((s) => settings.tools.includes(s.function.name));
  }

  function updateToolsBadge() {
    const n = enabledToolSchemas().length;
    el.toolsBadge.hidden = n === 0;
    el.toolsBadge.textContent = n ? t("toolsOn", n) : "";
  }

  // ---- message rendering -------------------------------------------------------------------------
  function bubble(role) {
    el.empty.hidden = true;
    const wrap = h("div", { class: `msg ${role}`, "data-testid": `msg-${role}`, "data-role": role });
    const who = role === "user" ? t("you") : role === "assistant" ? t("assistant") : t("toolResult");
    wrap.appendChild(h("div", { class: "who" }, who));
    const body = h("div", { class: "body" });
    wrap.appendChild(body);
    el.messages.appendChild(wrap);
    return { wrap, body };
  }

  function renderUser(text) {
    const { wrap, body } = bubble("user");
    body.appendChild(h("div", { class: "content", "data-testid": "user-content" }, text));
    return wrap;
  }

  /** An assistant bubble whose parts (reasoning, text, tool calls) are filled in as they stream. */
  function assistantView() {
    const { wrap, body } = bubble("assistant");
    const view = {
      wrap,
      body,
      details: null,
      reasoningText: null,
      content: h("div", { class: "content", "data-testid": "assistant-content" }),
      calls: h("div", { class: "tool-calls" }),
      note: null,
    };
    body.append(view.content, view.calls);
    return view;
  }

  function ensureReasoning(view, open) {
    if (!view.details) {
      view.details = h("details", { class: "reasoning", "data-testid": "reasoning" });
      view.details.open = open;
      view.summary = h("summary", {}, open ? t("reasoningLive") : t("reasoning"));
      view.reasoningText = h("div", { class: "reasoning-text", "data-testid": "reasoning-text" });
      view.details.append(view.summary, view.reasoningText);
      view.body.insertBefore(view.details, view.content);
    }
    return view.reasoningText;
  }

  function appendText(node, text) {
    // Extend the last text node instead of adding one node per token.
    const last = node.lastChild;
    if (last && last.nodeType === Node.TEXT_NODE) last.appendData(text);
    else node.appendChild(document.createTextNode(text));
  }

  function setNote(view, text) {
    if (!view.note) {
      view.note = h("div", { class: "note", "data-testid": "note" });
      view.body.appendChild(view.note);
    }
    view.note.textContent = text;
  }

  function prettyArgs(args) {
    if (typeof args !== "string") return JSON.stringify(args, null, 2);
    try {
      return JSON.stringify(JSON.parse(args), null, 2);
    } catch (_) {
      return args;
    }
  }

  /** Card showing one tool call; returns the element, keyed by the call id. */
  function renderToolCall(view, call) {
    const card = h("div", { class: "tool-call", "data-testid": "tool-call", "data-tool": call.function.name });
    const head = h("div", { class: "card-head" });
    head.append(h("span", { class: "card-label" }, t("toolCall")), h("code", { class: "tool-name" }, call.function.name));
    card.append(head, h("pre", { class: "tool-args" }, prettyArgs(call.function.arguments)));
    view.calls.appendChild(card);
    return card;
  }

  function renderToolResult(name, content, pending = false) {
    const { wrap, body } = bubble("tool");
    const card = h("div", { class: "tool-result", "data-testid": "tool-result", "data-tool": name });
    const head = h("div", { class: "card-head" });
    head.append(h("span", { class: "card-label" }, t("toolResult")), h("code", { class: "tool-name" }, name));
    const pre = h("pre", { class: "tool-output" }, pending ? t("toolRunning") : content);
    if (pending) card.classList.add("pending");
    card.append(head, pre);
    body.appendChild(card);
    return { wrap, card, pre };
  }

  /** Rebuild the message area from `history` (after a reload or a language switch). */
  function renderHistory() {
    for (const node of [...el.messages.querySelectorAll(".msg")]) node.remove();
    el.empty.hidden = history.length > 0;
    const names = new Map();
    for (const msg of history) {
      if (msg.role === "user") {
        renderUser(msg.content || "");
      } else if (msg.role === "assistant") {
        const view = assistantView();
        if (msg.reasoning) ensureReasoning(view, false).textContent = msg.reasoning;
        view.content.textContent = msg.content || "";
        for (const call of msg.tool_calls || []) {
          names.set(call.id, call.function.name);
          renderToolCall(view, call);
        }
        if (msg.note) setNote(view, t(msg.note));
      } else if (msg.role === "tool") {
        const shown = renderToolResult(names.get(msg.tool_call_id) || "tool", msg.content || "");
        shown.card.classList.toggle("error", Boolean(msg.is_error)); // a failure stays marked after reload
      }
    }
    el.messages.scrollTop = el.messages.scrollHeight;
  }

  // ---- streaming ---------------------------------------------------------------------------------
  /** Yield the JSON payloads of an SSE response body (`data:` lines; stops at `[DONE]`). */
  async function* sseEvents(resp, signal) {
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    let data = [];
    try {
      for (;;) {
        if (signal.aborted) return;
        const { value, done } = await reader.read();
        buf += decoder.decode(value || new Uint8Array(), { stream: !done });
        let nl;
        while ((nl = buf.search(/\r?\n/)) >= 0) {
          const line = buf.slice(0, nl);
          buf = buf.slice(buf[nl] === "\r" ? nl + 2 : nl + 1);
          if (line === "") {
            // Blank line: one event is complete.
            if (data.length) {
              const payload = data.join("\n");
              data = [];
              if (payload.trim() === "[DONE]") return;
              yield JSON.parse(payload);
            }
          } else if (line.startsWith("data:")) {
            data.push(line.slice(5).replace(/^ /, ""));
          } // comments (":") and other fields are ignored
        }
        if (done) break;
      }
      const payload = data.join("\n").trim();
      if (payload && payload !== "[DONE]") yield JSON.parse(payload);
    } finally {
      reader.cancel().catch(() => {});
    }
  }

  /** Wire messages: the UI-only fields stay in the page. */
  function apiMessages() {
    return history.map((m) => {
      const out = { role: m.role, content: m.content ?? "" };
      if (m.tool_calls && m.tool_calls.length) out.tool_calls = m.tool_calls;
      if (m.tool_call_id) out.tool_call_id = m.tool_call_id;
      return out;
    });
  }

  /** One model round: stream a reply into a new assistant bubble; resolves to the parsed reply. */
  async function streamReply(signal) {
    const view = assistantView();
    view.wrap.classList.add("streaming");
    scrollToEnd();
    const tools = enabledToolSchemas();
    const body = {
      model: modelId,
      messages: apiMessages(),
      stream: true,
      temperature: Number(settings.temperature),
      max_tokens: Number(settings.maxTokens),
      chat_template_kwargs: { open_thinking: Boolean(settings.thinking) },
    };
    if (tools.length) body.tools = tools;

    const reply = { content: "", reasoning: "", calls: [], finish: null, aborted: false, view };
    try {
      const resp = await fetch("v1/chat/completions", {
        method: "POST", headers: headers(), body: JSON.stringify(body), signal,
      });
      if (!resp.ok) throw new Error(await errorText(resp));
      for await (const chunk of sseEvents(resp, signal)) {
        if (chunk.error) {
          const e = chunk.error;
          throw new Error(typeof e === "string" ? e : e.message || JSON.stringify(e));
        }
        const choice = chunk.choices && chunk.choices[0];
        if (!choice) continue;
        const delta = choice.delta || {};
        if (typeof delta.reasoning_content === "string" && delta.reasoning_content) {
          reply.reasoning += delta.reasoning_content;
          appendText(ensureReasoning(view, true), delta.reasoning_content);
        }
        if (typeof delta.content === "string" && delta.content) {
          reply.content += delta.content;
          appendText(view.content, delta.content);
        }
        for (const tc of delta.tool_calls || []) {
          const i = Number.isInteger(tc.index) ? tc.index : reply.calls.length;
          const call = (reply.calls[i] ||= { id: "", type: "function", function: { name: "", arguments: "" } });
          if (tc.id) call.id = tc.id;
          if (tc.function && tc.function.name) call.function.name += tc.function.name;
          if (tc.function && typeof tc.function.arguments === "string") call.function.arguments += tc.function.arguments;
        }
        if (choice.finish_reason) reply.finish = choice.finish_reason;
        scrollToEnd();
      }
    } catch (err) {
      if (err.name === "AbortError" || signal.aborted) reply.aborted = true;
      else reply.error = err.message || String(err);
    } finally {
      view.wrap.classList.remove("streaming");
      if (view.summary) view.summary.textContent = t("reasoning");
    }
    reply.calls = reply.calls.filter(Boolean);
    reply.calls.forEach((c, i) => {
      if (!c.id) c.id = `call_${Date.now().toString(36)}_${i}`;
    });
    return reply;
  }

  /** Whether the user ticked this tool (the model may name any tool; only ticked ones run). */
  function toolEnabled(name) {
    return enabledToolSchemas().some((s) => s.function.name === name);
  }

  /** Run one call on the server; resolves to {content, isError} (errors go back to the model too). */
  async function runTool(call, signal) {
    if (!toolEnabled(call.function.name)) {
      return { content: `error: the tool "${call.function.name}" is not enabled in this chat`, isError: true };
    }
    let args = {};
    const raw = call.function.arguments;
    if (raw && raw.trim()) {
      try {
        args = JSON.parse(raw);
      } catch (_) {
        return { content: `error: the arguments are not valid JSON: ${raw}`, isError: true };
      }
    }
    try {
      const resp = await fetch("api/tools/call", {
        method: "POST", headers: headers(), signal,
        body: JSON.stringify({ name: call.function.name, arguments: args }),
      });
      if (!resp.ok) return { content: `error: ${await errorText(resp)}`, isError: true };
      const body = await resp.json();
      const content = typeof body.content === "string" ? body.content : JSON.stringify(body.content ?? body);
      return { content, isError: Boolean(body.is_error) };
    } catch (err) {
      if (err.name === "AbortError") throw err;
      return { content: `error: ${err.message || err}`, isError: true };
    }
  }

  /** Send the conversation, stream the answer and run tool rounds until a plain reply. */
  async function converse() {
    controller = new AbortController();
    const { signal } = controller;
    setBusy(true);
    try {
      for (let round = 0; ; round++) {
        const reply = await streamReply(signal);
        const msg = { role: "assistant", content: reply.content };
        if (reply.reasoning) msg.reasoning = reply.reasoning;
        const wantsTools = reply.calls.length > 0 && !reply.aborted && !reply.error;
        if (wantsTools) msg.tool_calls = reply.calls;
        if (reply.aborted) msg.note = "stopped";
        else if (reply.finish === "length") msg.note = "truncated";
        if (msg.note) setNote(reply.view, t(msg.note));
        if (reply.error) {
          reply.view.wrap.classList.add("failed");
          setNote(reply.view, t("errorPrefix") + reply.error);
          showStatus(t("errorPrefix") + reply.error);
        }
        if (reply.content || reply.reasoning || wantsTools || reply.aborted) {
          history.push(msg);
          saveHistory();
        }
        if (!wantsTools) break;

        for (const call of reply.calls) {
          renderToolCall(reply.view, call);
          const shown = renderToolResult(call.function.name, "", true);
          scrollToEnd();
          const { content, isError } = await runTool(call, signal);
          shown.card.classList.remove("pending");
          shown.card.classList.toggle("error", isError);
          shown.pre.textContent = content;
          const toolMsg = { role: "tool", tool_call_id: call.id, content };
          if (isError) toolMsg.is_error = true; // UI-only: not sent to the API (see apiMessages)
          history.push(toolMsg);
          saveHistory();
          scrollToEnd();
        }
        if (round + 1 >= MAX_TOOL_ROUNDS) {
          showStatus(t("roundLimit", MAX_TOOL_ROUNDS), "info");
          break;
        }
      }
    } catch (err) {
      if (err.name !== "AbortError") showStatus(t("errorPrefix") + (err.message || err));
    } finally {
      controller = null;
      setBusy(false);
      el.input.focus();
    }
  }

  function setBusy(busy) {
    document.body.classList.toggle("busy", busy);
    el.send.hidden = busy;
    el.stop.hidden = !busy;
    el.send.disabled = busy;
    el.newChat.disabled = busy;
  }

  function submit() {
    if (controller) return;
    const text = el.input.value.trim();
    if (!text) return;
    showStatus("");
    el.input.value = "";
    autosize();
    history.push({ role: "user", content: text });
    saveHistory();
    renderUser(text);
    el.messages.scrollTop = el.messages.scrollHeight;
    converse();
  }

  function autosize() {
    el.input.style.height = "auto";
    el.input.style.height = `${Math.min(el.input.scrollHeight, 220)}px`;
  }

  // ---- wiring ------------------------------------------------------------------------------------
  function init() {
    el.temperature.value = String(settings.temperature);
    el.temperatureValue.textContent = Number(settings.temperature).toFixed(2);
    el.maxTokens.value = String(settings.maxTokens);
    el.apiKey.value = settings.apiKey;
    el.thinking.checked = Boolean(settings.thinking);
    applyLanguage();
    renderHistory();

    el.composer.addEventListener("submit", (e) => {
      e.preventDefault();
      submit();
    });
    el.input.addEventListener("keydown", (e) => {
      if (e.key === "Enter" && !e.shiftKey && !e.isComposing && e.keyCode !== 229) {
        e.preventDefault();
        submit();
      }
    });
    el.input.addEventListener("input", autosize);
    $("settings-form").addEventListener("submit", (e) => e.preventDefault()); // settings apply on change
    el.stop.addEventListener("click", () => controller && controller.abort());
    el.newChat.addEventListener("click", () => {
      if (controller) return;
      history = [];
      saveHistory();
      showStatus("");
      renderHistory();
      el.input.focus();
    });
    el.settingsToggle.addEventListener("click", () => {
      el.settings.hidden = !el.settings.hidden;
      el.settingsToggle.setAttribute("aria-expanded", String(!el.settings.hidden));
    });
    el.lang.addEventListener("change", () => {
      settings.lang = el.lang.value === "zh" ? "zh" : "en";
      saveSettings();
      applyLanguage();
      if (!controller) renderHistory(); // re-labels the bubbles; never while a reply streams
      if (!availableTools.length) loadTools();
    });
    el.temperature.addEventListener("input", () => {
      settings.temperature = Number(el.temperature.value);
      el.temperatureValue.textContent = settings.temperature.toFixed(2);
      saveSettings();
    });
    el.maxTokens.addEventListener("change", () => {
      const n = Math.max(1, Math.floor(Number(el.maxTokens.value) || 1024));
      el.maxTokens.value = String(n);
      settings.maxTokens = n;
      saveSettings();
    });
    el.apiKey.addEventListener("change", () => {
      settings.apiKey = el.apiKey.value.trim();
      saveSettings();
      showStatus("");
      loadModel();
      loadTools();
    });
    el.thinking.addEventListener("change", () => {
      settings.thinking = el.thinking.checked;
      saveSettings();
    });

    loadModel();
    loadTools();
    el.input.focus();
  }

  init();
})();
