// Chipi web chat: plain JavaScript, no framework, no build step. Talks to the REST API and the chat WebSocket.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const ui = {
    layout: $("layout"),
    sidebar: $("sidebar"),
    scrim: $("scrim"),
    menu: $("menu"),
    newChat: $("new-chat"),
    search: $("search"),
    list: $("conversation-list"),
    listEmpty: $("list-empty"),
    title: $("chat-title"),
    actions: $("chat-actions"),
    rename: $("rename"),
    renameForm: $("rename-form"),
    renameInput: $("rename-input"),
    renameCancel: $("rename-cancel"),
    remove: $("delete"),
    connection: $("connection"),
    messages: $("messages"),
    welcome: $("welcome"),
    banner: $("banner"),
    keyForm: $("key-form"),
    keyPrompt: $("key-prompt"),
    keyInput: $("key-input"),
    composer: $("composer"),
    input: $("input"),
    mic: $("mic"),
    send: $("send"),
    stop: $("stop"),
  };

  const state = {
    conversations: [],
    current: null, // the open conversation (the API's conversation object)
    messages: [], // its active branch, oldest first
    query: "",
    listRequest: 0,
    openRequest: 0,
    socket: null,
    outbox: [], // frames waiting for the socket to open
    reconnectDelay: 500,
    reconnectTimer: null,
    // "start": a message/regenerate/audio frame was sent and its user_message is awaited;
    // "resume": a resume frame was sent; null otherwise.
    expect: null,
    pendingUser: null, // the user bubble shown before the server confirms it
    streaming: null, // {message, el, lastSeq} while a reply streams
    renderQueued: false,
    recorder: null,
    voiceAvailable: false,
  };

  // ---------------------------------------------------------------- markdown (escape first, then format)

  const ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };
  const escapeHtml = (text) => text.replace(/[&<>"']/g, (c) => ESCAPES[c]);

  const FENCE = /^\s{0,3}(`{3,}|~{3,})\s*([\w+#.-]*)/;
  const HEADING = /^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$/;
  const RULE = /^\s{0,3}([-*_])(\s*\1){2,}\s*$/;
  const QUOTE = /^\s{0,3}>\s?/;
  const LIST_ITEM = /^(\s*)([-*+]|\d{1,9}[.)])\s+(.*)$/;

  const indentOf = (line) => line.match(/^\s*/)[0].length;
  const isBlockStart = (line) =>
    FENCE.test(line) || HEADING.test(line) || RULE.test(line) || QUOTE.test(line) || LIST_ITEM.test(line);

  function safeUrl(url) {
    if (/^(https?:|mailto:)/i.test(url)) return url;
    if (/^[/#?]/.test(url) && !url.startsWith("//")) return url;
    return null;
  }

  function emphasis(escaped) {
    return escaped
      .replace(/\*\*(?=\S)([\s\S]*?\S)\*\*/g, "<strong>$1</strong>")
      .replace(/__(?=\S)([\s\S]*?\S)__/g, "<strong>$1</strong>")
      .replace(/(^|[^*\w])\*(?=[^\s*])([^*]*?[^\s*])\*(?![*\w])/g, "$1<em>$2</em>")
      .replace(/(^|[^_\w])_(?=[^\s_])([^_]*?[^\s_])_(?![_\w])/g, "$1<em>$2</em>")
      .replace(/~~(?=\S)([\s\S]*?\S)~~/g, "<del>$1</del>");
  }

  function formatText(text) {
    // Links become placeholders first so that emphasis never reaches inside an href.
    const slots = [];
    const hold = (html) => `\u0000${slots.push(html) - 1}\u0000`;
    const link = (href, labelHtml) =>
      hold(`<a href="${escapeHtml(href)}" target="_blank" rel="noopener noreferrer">${labelHtml}</a>`);
    let out = text.replace(/\[([^\]\n]+)\]\(\s*<?([^\s<>()]+)>?(?:\s+"[^"\n]*")?\s*\)/g, (all, label, url) => {
      const href = safeUrl(url);
      return href ? link(href, emphasis(escapeHtml(label))) : all;
    });
    out = out.replace(/\bhttps?:\/\/[^\s<>"'\u0000]+/g, (found) => {
      // Trailing punctuation, and a ")" without its "(", belong to the sentence around the address.
      let url = found.replace(/[.,;:!?'\]]+$/, "");
      while (url.endsWith(")") && url.split(")").length > url.split("(").length) url = url.slice(0, -1);
      return link(url, escapeHtml(url)) + found.slice(url.length);
    });
    out = emphasis(escapeHtml(out));
    return out.replace(/\u0000(\d+)\u0000/g, (_, n) => slots[Number(n)]);
  }

  function inline(text) {
    const parts = [];
    const code = /(`+)([^`]|[^`][\s\S]*?[^`])\1(?!`)/g;
    let last = 0;
    let m;
    while ((m = code.exec(text))) {
      parts.push(formatText(text.slice(last, m.index)), `<code>${escapeHtml(m[2].trim())}</code>`);
      last = code.lastIndex;
    }
    parts.push(formatText(text.slice(last)));
    return parts.join("");
  }

  function parseList(lines, start, out) {
    const first = lines[start].match(LIST_ITEM);
    const base = first[1].length;
    const ordered = /\d/.test(first[2]);
    const items = [];
    let i = start;
    const sameLevelItem = (line) => {
      const m = line.match(LIST_ITEM);
      return m && m[1].length <= base + 1 ? m : null;
    };
    while (i < lines.length) {
      const line = lines[i];
      const m = sameLevelItem(line);
      if (m) {
        if (/\d/.test(m[2]) !== ordered) break;
        items.push({ lines: [m[3]], contentIndent: m[1].length + m[2].length + 1 });
        i++;
        continue;
      }
      const item = items[items.length - 1];
      if (!line.trim()) {
        let j = i + 1;
        while (j < lines.length && !lines[j].trim()) j++;
        const next = j < lines.length ? sameLevelItem(lines[j]) : null;
        if (j < lines.length && (indentOf(lines[j]) > base + 1 || (next && /\d/.test(next[2]) === ordered))) {
          item.lines.push("");
          i = j;
          continue;
        }
        break;
      }
      if (indentOf(line) > base) {
        item.lines.push(line.slice(Math.min(indentOf(line), item.contentIndent)));
      } else if (!isBlockStart(line)) {
        item.lines.push(line.trim()); // a lazy continuation of the item's text
      } else {
        break;
      }
      i++;
    }
    const startNumber = ordered ? parseInt(first[2], 10) : 1;
    const tag = ordered ? "ol" : "ul";
    const startAttr = ordered && startNumber !== 1 ? ` start="${startNumber}"` : "";
    const body = items.map((item) => {
      // Items read as tight lists: their first paragraph is not wrapped in <p>.
      const html = renderMarkdown(item.lines.join("\n")).replace(/^<p>([\s\S]*?)<\/p>/, "$1");
      return `<li>${html}</li>`;
    });
    out.push(`<${tag}${startAttr}>${body.join("")}</${tag}>`);
    return i;
  }

  function renderMarkdown(source) {
    const lines = source.replace(/\r\n?/g, "\n").replace(/\u0000/g, "").split("\n");
    const out = [];
    let i = 0;
    while (i < lines.length) {
      const line = lines[i];
      let m;
      if (!line.trim()) {
        i++;
      } else if ((m = line.match(FENCE))) {
        const fence = m[1];
        const code = [];
        i++;
        const closing = new RegExp(`^\\s{0,3}${fence[0] === "`" ? "`" : "~"}{${fence.length},}\\s*$`);
        while (i < lines.length && !closing.test(lines[i])) {
          code.push(lines[i]);
          i++;
        }
        i++; // the closing fence (a reply still streaming may not have it yet)
        const lang = m[2] ? ` class="language-${escapeHtml(m[2])}"` : "";
        out.push(`<pre><code${lang}>${escapeHtml(code.join("\n"))}</code></pre>`);
      } else if ((m = line.match(HEADING))) {
        const level = m[1].length;
        out.push(`<h${level}>${inline(m[2])}</h${level}>`);
        i++;
      } else if (RULE.test(line)) {
        out.push("<hr>");
        i++;
      } else if (QUOTE.test(line)) {
        const quoted = [];
        while (i < lines.length && QUOTE.test(lines[i])) quoted.push(lines[i++].replace(QUOTE, ""));
        out.push(`<blockquote>${renderMarkdown(quoted.join("\n"))}</blockquote>`);
      } else if (LIST_ITEM.test(line)) {
        i = parseList(lines, i, out);
      } else {
        const paragraph = [line.trim()];
        i++;
        while (i < lines.length && lines[i].trim() && !isBlockStart(lines[i])) paragraph.push(lines[i++].trim());
        out.push(`<p>${paragraph.map(inline).join("<br>")}</p>`);
      }
    }
    return out.join("");
  }

  // ---------------------------------------------------------------- API key (only once the server has keys)

  // A server without keys never asks; one with keys answers 401 (a socket closes with 4401), and the page asks for
  // a key once, keeps it in this browser's localStorage and sends it with every request.
  const KEY_STORAGE = "chipi.apiKey";

  function apiKey() {
    try {
      return localStorage.getItem(KEY_STORAGE) || "";
    } catch {
      return "";
    }
  }

  function askForKey() {
    if (!ui.keyForm.hidden) return;
    ui.keyPrompt.textContent = apiKey()
      ? "The server refused the saved API key. Paste a valid one:"
      : "This Chipi needs an API key (from chipi keys create):";
    ui.keyForm.hidden = false;
    ui.keyInput.focus();
  }

  function saveKey(event) {
    event.preventDefault();
    const key = ui.keyInput.value.trim();
    if (!key) return;
    localStorage.setItem(KEY_STORAGE, key);
    ui.keyInput.value = "";
    ui.keyForm.hidden = true;
    hideBanner();
    loadList();
    detectVoice();
    routeFromLocation();
  }

  // ---------------------------------------------------------------- HTTP API

  class ApiError extends Error {
    constructor(status, detail) {
      super(detail);
      this.status = status;
    }
  }

  async function api(method, path, body) {
    const init = { method, headers: { Accept: "application/json" } };
    const key = apiKey();
    if (key) init.headers.Authorization = `Bearer ${key}`;
    if (body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    const response = await fetch(path, init);
    const isJson = (response.headers.get("content-type") || "").includes("json");
    const data = isJson ? await response.json() : null;
    if (response.status === 401) askForKey();
    if (!response.ok) throw new ApiError(response.status, (data && data.detail) || response.statusText);
    return data;
  }

  // ---------------------------------------------------------------- small view helpers

  function showBanner(text) {
    ui.banner.textContent = text;
    ui.banner.hidden = false;
  }

  function hideBanner() {
    ui.banner.hidden = true;
  }

  function formatTime(iso) {
    const date = new Date(iso);
    const seconds = (Date.now() - date.getTime()) / 1000;
    if (seconds < 60) return "just now";
    if (seconds < 3600) return `${Math.floor(seconds / 60)} min ago`;
    if (date.toDateString() === new Date().toDateString()) {
      return date.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
    }
    return date.toLocaleDateString();
  }

  function nearBottom() {
    const box = ui.messages;
    return box.scrollHeight - box.scrollTop - box.clientHeight < 80;
  }

  function scrollToBottom() {
    ui.messages.scrollTop = ui.messages.scrollHeight;
  }

  function autosize() {
    ui.input.style.height = "auto";
    ui.input.style.height = `${Math.min(ui.input.scrollHeight, 200)}px`;
  }

  function setSidebar(open) {
    ui.layout.classList.toggle("sidebar-open", open);
  }

  function setConnection(text) {
    ui.connection.textContent = text;
    ui.connection.hidden = !text;
  }

  // ---------------------------------------------------------------- conversation list

  async function loadList() {
    const request = ++state.listRequest;
    const params = new URLSearchParams({ limit: "100" });
    if (state.query) params.set("q", state.query);
    try {
      const data = await api("GET", `/api/conversations?${params}`);
      if (request !== state.listRequest) return; // a newer search answered first
      state.conversations = data.conversations;
      renderList();
    } catch (error) {
      if (error.status !== 401) showBanner(`Could not load conversations: ${error.message}`);
    }
  }

  function renderList() {
    const currentId = state.current && state.current.session_id;
    ui.list.replaceChildren(
      ...state.conversations.map((conversation) => {
        const item = document.createElement("li");
        item.dataset.id = conversation.session_id;
        item.classList.toggle("active", conversation.session_id === currentId);
        const button = document.createElement("button");
        button.type = "button";
        const title = document.createElement("span");
        title.className = "conversation-title";
        title.textContent = conversation.title || "New conversation";
        const time = document.createElement("span");
        time.className = "conversation-time";
        time.textContent = formatTime(conversation.updated_at);
        button.append(title, time);
        button.addEventListener("click", () => {
          setSidebar(false);
          if (conversation.session_id !== currentId) openConversation(conversation.session_id, true);
        });
        item.append(button);
        return item;
      }),
    );
    ui.listEmpty.textContent = state.query ? "No matching conversations." : "No conversations yet.";
    ui.listEmpty.hidden = state.conversations.length > 0;
    const listed = state.conversations.find((c) => c.session_id === currentId);
    if (listed && state.current) {
      state.current.title = listed.title;
      renderHeader();
    }
  }

  // ---------------------------------------------------------------- the open conversation

  function renderHeader() {
    const open = Boolean(state.current);
    ui.title.textContent = open ? state.current.title || "New conversation" : "Chipi";
    document.title = open ? `${ui.title.textContent} · Chipi` : "Chipi";
    ui.actions.hidden = !open;
    if (!open) ui.renameForm.hidden = true;
    ui.title.hidden = !ui.renameForm.hidden;
  }

  // `follow`: keep following a reply that is still being written (off after a resume found nothing to follow).
  async function openConversation(id, push, follow = true) {
    const request = ++state.openRequest;
    hideBanner();
    closeSocket();
    stopAudio();
    resetTurn();
    let data;
    try {
      data = await api("GET", `/api/conversations/${encodeURIComponent(id)}`);
      if (request !== state.openRequest) return; // another conversation was opened meanwhile
    } catch (error) {
      if (request !== state.openRequest) return;
      if (error.status === 401) return; // the key form is showing; saving a key opens it again
      showConversation(null, []);
      history.replaceState(null, "", location.pathname);
      showBanner(error.status === 404 ? "That conversation no longer exists." : `Could not open it: ${error.message}`);
      return;
    }
    setLocation(id, push);
    showConversation(data.conversation, data.messages);
    const last = data.messages[data.messages.length - 1];
    if (follow && last && last.role === "assistant" && last.status === "streaming") {
      // A reply is still being written (e.g. the page was reloaded mid-reply): follow it from its start.
      const el = ui.messages.querySelector(`[data-id="${last.id}"]`);
      state.streaming = { message: { ...last, content: "", reasoning: "" }, el, lastSeq: 0 };
      setBusy(true);
    }
    connectSocket();
  }

  function setLocation(id, push) {
    if (push && location.hash !== `#/c/${id}`) history.pushState(null, "", `#/c/${id}`);
    else history.replaceState(null, "", `#/c/${id}`);
  }

  function showConversation(conversation, messages) {
    state.current = conversation;
    state.messages = messages;
    renderHeader();
    renderMessages();
    renderList();
    if (conversation) ui.input.focus();
  }

  function renderMessages() {
    ui.messages.replaceChildren();
    ui.welcome.hidden = Boolean(state.current && state.messages.length);
    ui.messages.append(ui.welcome);
    for (const message of state.messages) ui.messages.append(messageElement(message));
    refreshRegenerate();
    scrollToBottom();
  }

  function messageElement(message) {
    const el = document.createElement("article");
    el.className = `message ${message.role}`;
    const body = document.createElement("div");
    body.className = "body";
    if (message.role === "assistant") {
      const thinking = document.createElement("details");
      thinking.className = "thinking";
      const summary = document.createElement("summary");
      summary.textContent = "Thinking";
      const reasoning = document.createElement("div");
      reasoning.className = "reasoning";
      thinking.append(summary, reasoning);
      const meta = document.createElement("div");
      meta.className = "meta";
      el.append(thinking, body, meta);
    } else {
      el.append(body);
    }
    updateMessage(el, message);
    return el;
  }

  const STATUS_LABELS = { cancelled: "Stopped", error: "Error" };
  const CUT_OFF_LABELS = { length: "Cut off at the length limit", time: "Cut off at the time limit" };

  function updateMessage(el, message) {
    el.dataset.role = message.role;
    el.dataset.status = message.status;
    if (message.id) el.dataset.id = message.id;
    el.classList.toggle("streaming", message.status === "streaming");
    const body = el.querySelector(".body");
    if (message.role !== "assistant") {
      body.textContent = message.content;
      return;
    }
    body.innerHTML = renderMarkdown(message.content || "");
    const thinking = el.querySelector(".thinking");
    thinking.hidden = !message.reasoning;
    if (message.reasoning) {
      el.querySelector(".reasoning").innerHTML = renderMarkdown(message.reasoning);
      thinking.querySelector("summary").textContent = message.status === "streaming" && !message.content
        ? "Thinking…"
        : "Thinking";
      if (message.status === "streaming" && !message.content) thinking.open = true;
    }
    const meta = el.querySelector(".meta");
    const parts = [];
    const label = STATUS_LABELS[message.status];
    if (label) {
      const status = document.createElement("span");
      status.className = "status";
      status.textContent = message.status === "error" && message.finish_reason ? `${label} (${message.finish_reason})` : label;
      parts.push(status);
    } else if (message.status === "complete" && CUT_OFF_LABELS[message.finish_reason]) {
      const status = document.createElement("span");
      status.className = "status";
      status.textContent = CUT_OFF_LABELS[message.finish_reason];
      parts.push(status);
    }
    if (el.dataset.spoken) {
      const spoken = document.createElement("span");
      spoken.className = "spoken";
      spoken.textContent = `Spoken aloud (${el.dataset.spoken} ${el.dataset.spoken === "1" ? "part" : "parts"})`;
      parts.push(spoken);
    }
    meta.replaceChildren(...parts);
  }

  function refreshRegenerate() {
    for (const old of ui.messages.querySelectorAll(".regenerate")) old.remove();
    if (state.streaming || state.expect) return;
    const last = state.messages[state.messages.length - 1];
    if (!last || last.role !== "assistant" || last.status === "streaming") return;
    const el = ui.messages.querySelector(`.message[data-id="${last.id}"]`);
    if (!el) return;
    const button = document.createElement("button");
    button.type = "button";
    button.className = "link-button regenerate";
    button.textContent = "Regenerate";
    button.title = "Write another reply to the same message";
    button.addEventListener("click", regenerate);
    el.querySelector(".meta").append(button);
  }

  function scheduleStreamRender() {
    if (state.renderQueued) return;
    state.renderQueued = true;
    requestAnimationFrame(() => {
      state.renderQueued = false;
      if (!state.streaming) return;
      const stick = nearBottom();
      updateMessage(state.streaming.el, state.streaming.message);
      if (stick) scrollToBottom();
    });
  }

  // ---------------------------------------------------------------- a turn: send, stream, stop, regenerate

  function setBusy(busy) {
    ui.send.hidden = busy;
    ui.stop.hidden = !busy;
    ui.stop.disabled = false;
    ui.mic.disabled = busy && !state.recorder;
    refreshRegenerate();
  }

  function resetTurn() {
    state.expect = null;
    state.pendingUser = null;
    state.streaming = null;
    setBusy(false);
  }

  function appendMessageElement(message) {
    ui.welcome.hidden = true;
    const el = messageElement(message);
    ui.messages.append(el);
    scrollToBottom();
    return el;
  }

  async function createConversation() {
    const created = await api("POST", "/api/conversations/new");
    state.openRequest++;
    closeSocket();
    stopAudio();
    resetTurn();
    setLocation(created.session_id, true);
    showConversation(created, []);
    connectSocket();
    loadList();
  }

  async function sendMessage() {
    const content = ui.input.value.trim();
    if (!content || state.streaming || state.expect) return;
    hideBanner();
    if (!state.current) {
      try {
        await createConversation();
      } catch (error) {
        showBanner(`Could not start a conversation: ${error.message}`);
        return;
      }
    }
    ui.input.value = "";
    autosize();
    const message = { id: null, role: "user", content, status: "complete" };
    state.pendingUser = { message, el: appendMessageElement(message), restore: content };
    beginTurn({ type: "message", content });
  }

  function regenerate() {
    if (state.streaming || state.expect) return;
    hideBanner();
    beginTurn({ type: "regenerate" });
  }

  function beginTurn(frame) {
    state.expect = "start";
    setBusy(true);
    sendFrame(frame);
  }

  function stopReply() {
    ui.stop.disabled = true;
    stopAudio();
    sendFrame({ type: "stop" });
  }

  function onUserMessage(message) {
    state.expect = null;
    const known = state.messages.findIndex((m) => m.id === message.id);
    if (known >= 0) {
      // Regenerate: the same user message gets a new reply; the old one stays on a sibling branch.
      state.messages = state.messages.slice(0, known + 1);
      renderMessages();
    } else {
      state.messages.push(message);
      if (state.pendingUser) updateMessage(state.pendingUser.el, message);
      else appendMessageElement(message);
    }
    state.pendingUser = null;
    const reply = { id: null, role: "assistant", content: "", reasoning: "", status: "streaming" };
    state.streaming = { message: reply, el: appendMessageElement(reply), lastSeq: 0 };
    setBusy(true);
    loadList(); // the first message names the conversation
  }

  function onStreamEvent(frame) {
    const stream = state.streaming;
    if (!stream || frame.seq <= stream.lastSeq) return; // resumed streams never repeat an event
    stream.lastSeq = frame.seq;
    if (frame.type === "token") stream.message.content += frame.text;
    else stream.message.reasoning = (stream.message.reasoning || "") + frame.text;
    if (state.expect === "resume") state.expect = null;
    scheduleStreamRender();
  }

  function onDone(frame) {
    const stream = state.streaming;
    if (!stream) return;
    const stick = nearBottom();
    const index = state.messages.findIndex((m) => m.id === frame.message.id);
    if (index >= 0) state.messages[index] = frame.message;
    else state.messages.push(frame.message);
    state.streaming = null;
    state.expect = null;
    updateMessage(stream.el, frame.message);
    const thinking = stream.el.querySelector(".thinking");
    if (thinking) thinking.open = false;
    setBusy(false);
    if (stick) scrollToBottom();
    loadList();
  }

  function onError(frame) {
    if (state.expect === "resume") {
      // The reply ended while we were away: what was stored is the truth.
      if (state.current) openConversation(state.current.session_id, false, false);
      return;
    }
    if (state.expect === "start") {
      if (state.pendingUser) {
        state.pendingUser.el.remove();
        if (state.pendingUser.restore && !ui.input.value) {
          ui.input.value = state.pendingUser.restore;
          autosize();
        }
      }
      resetTurn();
      showBanner(frame.detail);
      return;
    }
    if (state.streaming) {
      const message = { ...state.streaming.message, status: "error", finish_reason: frame.code };
      updateMessage(state.streaming.el, message);
      state.streaming = null;
      setBusy(false);
    }
    showBanner(frame.detail);
  }

  function handleFrame(frame) {
    switch (frame.type) {
      case "user_message":
        onUserMessage(frame.message);
        break;
      case "transcript":
        if (state.pendingUser) updateMessage(state.pendingUser.el, { ...state.pendingUser.message, content: frame.text });
        break;
      case "token":
      case "reasoning":
        onStreamEvent(frame);
        break;
      case "done":
        onDone(frame);
        break;
      case "audio":
        playPiece(frame);
        break;
      case "error":
        if (frame.code !== "unauthorized") onError(frame); // the socket closes with 4401 next: the key form shows
        break;
      default: // heartbeat, audio_done
        break;
    }
  }

  // ---------------------------------------------------------------- the WebSocket (reconnects, then resumes)

  function connectSocket() {
    if (!state.current) return;
    const id = state.current.session_id;
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    // Browsers cannot set headers on a WebSocket: the key goes in the query (never in the server's access log).
    const key = apiKey();
    const query = key ? `?api_key=${encodeURIComponent(key)}` : "";
    const socket = new WebSocket(`${scheme}://${location.host}/api/conversations/${encodeURIComponent(id)}/ws${query}`);
    state.socket = socket;
    socket.addEventListener("open", () => {
      if (state.socket !== socket) return;
      state.reconnectDelay = 500;
      setConnection("");
      if (state.streaming && state.expect !== "start") {
        state.expect = "resume";
        socket.send(JSON.stringify({ type: "resume", last_seq: state.streaming.lastSeq }));
      }
      for (const frame of state.outbox.splice(0)) socket.send(JSON.stringify(frame));
    });
    socket.addEventListener("message", (event) => {
      if (state.socket === socket) handleFrame(JSON.parse(event.data));
    });
    socket.addEventListener("close", (event) => {
      if (state.socket !== socket) return;
      state.socket = null;
      if (event.code === 4401) {
        setConnection("");
        askForKey(); // saving a key reopens the conversation and its socket
        return;
      }
      if (event.code === 4404) {
        showBanner("This conversation no longer exists.");
        showConversation(null, []);
        resetTurn();
        loadList();
        return;
      }
      setConnection(state.streaming || state.expect ? "Reconnecting…" : "Offline, reconnecting…");
      state.reconnectTimer = setTimeout(connectSocket, state.reconnectDelay);
      state.reconnectDelay = Math.min(state.reconnectDelay * 2, 5000);
    });
  }

  function closeSocket() {
    clearTimeout(state.reconnectTimer);
    state.outbox = [];
    const socket = state.socket;
    state.socket = null;
    setConnection("");
    if (socket) socket.close(1000);
  }

  function sendFrame(frame) {
    if (state.socket && state.socket.readyState === WebSocket.OPEN) {
      state.socket.send(JSON.stringify(frame));
      return;
    }
    state.outbox.push(frame);
    if (!state.socket && state.current) {
      clearTimeout(state.reconnectTimer);
      connectSocket();
    }
  }

  // ---------------------------------------------------------------- voice: record, send, play the reply

  const player = { context: null, next: 0, chain: Promise.resolve(), sources: new Set() };

  function audioContext() {
    if (!player.context) player.context = new AudioContext();
    if (player.context.state === "suspended") player.context.resume().catch(() => {});
    return player.context;
  }

  function base64Bytes(data) {
    const binary = atob(data);
    const bytes = new Uint8Array(binary.length);
    for (let i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
    return bytes;
  }

  function playPiece(frame) {
    // Pieces arrive in order; decoding is asynchronous, so each waits for the previous one to be scheduled.
    const target = state.streaming ? state.streaming.el : ui.messages.querySelector(".message.assistant:last-of-type");
    player.chain = player.chain
      .then(async () => {
        const context = audioContext();
        const buffer = await context.decodeAudioData(base64Bytes(frame.data).buffer);
        const source = context.createBufferSource();
        source.buffer = buffer;
        source.connect(context.destination);
        if (frame.index === 0) player.next = 0;
        const at = Math.max(context.currentTime + 0.05, player.next);
        source.start(at);
        player.next = at + buffer.duration;
        player.sources.add(source);
        source.addEventListener("ended", () => player.sources.delete(source));
        if (target) {
          target.dataset.spoken = String(Number(target.dataset.spoken || 0) + 1);
          const message = state.messages.find((m) => m.id === target.dataset.id);
          if (message && target !== (state.streaming && state.streaming.el)) updateMessage(target, message);
        }
      })
      .catch((error) => showBanner(`Could not play the spoken reply: ${error.message}`));
  }

  function stopAudio() {
    for (const source of player.sources) source.stop();
    player.sources.clear();
    player.next = 0;
  }

  function blobBase64(blob) {
    return new Promise((resolve, reject) => {
      const reader = new FileReader();
      reader.onload = () => resolve(String(reader.result).split(",", 2)[1] || "");
      reader.onerror = () => reject(reader.error);
      reader.readAsDataURL(blob);
    });
  }

  async function toggleRecording() {
    if (state.recorder) {
      state.recorder.stop();
      return;
    }
    if (state.streaming || state.expect) return;
    hideBanner();
    audioContext(); // created on the click, so the spoken reply may play
    let stream;
    try {
      stream = await navigator.mediaDevices.getUserMedia({ audio: true });
    } catch (error) {
      showBanner(`The microphone is not available: ${error.message}`);
      return;
    }
    if (!state.current) {
      try {
        await createConversation();
      } catch (error) {
        stream.getTracks().forEach((track) => track.stop());
        showBanner(`Could not start a conversation: ${error.message}`);
        return;
      }
    }
    const type = ["audio/webm;codecs=opus", "audio/ogg;codecs=opus", "audio/webm"].find((t) =>
      MediaRecorder.isTypeSupported(t),
    );
    const recorder = new MediaRecorder(stream, type ? { mimeType: type } : undefined);
    const chunks = [];
    recorder.addEventListener("dataavailable", (event) => {
      if (event.data.size) chunks.push(event.data);
    });
    recorder.addEventListener("stop", async () => {
      stream.getTracks().forEach((track) => track.stop());
      state.recorder = null;
      ui.mic.classList.remove("recording");
      ui.mic.title = "Speak a message";
      const blob = new Blob(chunks, { type: recorder.mimeType });
      if (!blob.size) {
        setBusy(false);
        return;
      }
      const message = { id: null, role: "user", content: "Transcribing your recording…", status: "complete" };
      state.pendingUser = { message, el: appendMessageElement(message), restore: "" };
      beginTurn({ type: "audio", data: await blobBase64(blob), reply_audio: true });
    });
    recorder.start();
    state.recorder = recorder;
    ui.mic.classList.add("recording");
    ui.mic.title = "Stop recording and send";
    ui.mic.disabled = false;
  }

  async function detectVoice() {
    if (!(navigator.mediaDevices && navigator.mediaDevices.getUserMedia && window.MediaRecorder)) return;
    try {
      const data = await api("GET", "/api/voices");
      state.voiceAvailable = Array.isArray(data.voices);
    } catch {
      state.voiceAvailable = false;
    }
    ui.mic.hidden = !state.voiceAvailable;
  }

  // ---------------------------------------------------------------- rename, delete, search, events

  function startRename() {
    if (!state.current) return;
    ui.renameInput.value = state.current.title || "";
    ui.renameForm.hidden = false;
    ui.title.hidden = true;
    ui.actions.hidden = true;
    ui.renameInput.focus();
    ui.renameInput.select();
  }

  function endRename() {
    ui.renameForm.hidden = true;
    renderHeader();
  }

  async function saveRename(event) {
    event.preventDefault();
    const title = ui.renameInput.value.trim();
    if (!title || !state.current) return;
    try {
      const data = await api("PATCH", `/api/conversations/${state.current.session_id}/title`, { title });
      state.current.title = data.title;
      endRename();
      loadList();
    } catch (error) {
      showBanner(`Could not rename: ${error.message}`);
    }
  }

  async function deleteConversation() {
    if (!state.current) return;
    const { session_id: id, title } = state.current;
    if (!confirm(`Delete "${title || "this conversation"}" and all its messages?`)) return;
    try {
      await api("DELETE", `/api/conversations/${id}`);
    } catch (error) {
      if (error.status !== 404) {
        showBanner(`Could not delete: ${error.message}`);
        return;
      }
    }
    closeSocket();
    stopAudio();
    resetTurn();
    history.replaceState(null, "", location.pathname);
    showConversation(null, []);
    loadList();
  }

  function routeFromLocation() {
    const match = location.hash.match(/^#\/c\/([0-9a-fA-F-]{36})$/);
    if (match) openConversation(match[1], false);
    else {
      closeSocket();
      resetTurn();
      showConversation(null, []);
    }
  }

  let searchTimer = null;
  ui.search.addEventListener("input", () => {
    clearTimeout(searchTimer);
    searchTimer = setTimeout(() => {
      state.query = ui.search.value.trim();
      loadList();
    }, 250);
  });

  ui.composer.addEventListener("submit", (event) => {
    event.preventDefault();
    sendMessage();
  });
  ui.input.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      sendMessage();
    } else if (event.key === "Escape" && (state.streaming || state.expect)) {
      stopReply();
    }
  });
  ui.input.addEventListener("input", autosize);
  ui.stop.addEventListener("click", stopReply);
  ui.mic.addEventListener("click", toggleRecording);
  ui.newChat.addEventListener("click", async () => {
    setSidebar(false);
    hideBanner();
    try {
      await createConversation();
    } catch (error) {
      showBanner(`Could not start a conversation: ${error.message}`);
    }
  });
  ui.rename.addEventListener("click", startRename);
  ui.renameForm.addEventListener("submit", saveRename);
  ui.renameCancel.addEventListener("click", endRename);
  ui.renameInput.addEventListener("keydown", (event) => {
    if (event.key === "Escape") endRename();
  });
  ui.remove.addEventListener("click", deleteConversation);
  ui.keyForm.addEventListener("submit", saveKey);
  ui.menu.addEventListener("click", () => setSidebar(!ui.layout.classList.contains("sidebar-open")));
  ui.scrim.addEventListener("click", () => setSidebar(false));
  window.addEventListener("popstate", routeFromLocation);

  window.Chipi = Object.freeze({ renderMarkdown }); // for tests and the curious; the page needs no globals

  renderHeader();
  loadList();
  detectVoice();
  routeFromLocation();
})();
