// The TiProxy status page: polls the API's JSON routes and draws backends, sessions and moves.
//
// Everything shown comes from the API and is inserted as text (textContent, text nodes,
// attribute values), never as markup: user names, client addresses and labels come from
// clients and operators. The page talks to its own origin only (its Content-Security-Policy
// says so too). Drain and undrain call the write routes; a browser on the proxy's host is let
// through by the loopback rule, any other needs the bearer token, which the operator pastes and
// this tab keeps in sessionStorage.
(() => {
  "use strict";

  const POLL_MS = 1500; // how often the page asks, while it is visible
  const HIDDEN_POLL_MS = 10000; // and while it is in a background tab
  const NOTICE_MS = 8000; // how long "done" stays
  const SESSION_ROWS = 500; // rows drawn at most: a proxy may hold tens of thousands
  const TOKEN_KEY = "tiproxy-api-token";
  const SVG = "http://www.w3.org/2000/svg";
  const CHART = { width: 720, height: 170, left: 34, bottom: 18, top: 8 };

  const $ = (id) => document.getElementById(id);
  const last = {}; // JSON text of each route as last drawn: unchanged data is not redrawn
  let lastSessions = [];
  let timer = null;
  let lastOk = 0;

  // -- building DOM from data, as text only --------------------------------------------------

  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    setProps(node, props);
    for (const child of children) {
      if (child !== null && child !== undefined && child !== false) {
        node.append(child instanceof Node ? child : String(child));
      }
    }
    return node;
  }

  function svg(tag, props, ...children) {
    const node = document.createElementNS(SVG, tag);
    setProps(node, props);
    for (const child of children) node.append(child instanceof Node ? child : String(child));
    return node;
  }

  function setProps(node, props) {
    for (const [key, value] of Object.entries(props || {})) {
      if (key === "onclick") node.addEventListener("click", value);
      else node.setAttribute(key, String(value)); // an attribute value is never markup
    }
  }

  function badge(text, kind) {
    return el("span", { class: `badge ${kind}` }, text);
  }

  function plural(n, noun) {
    return `${n} ${noun}${n === 1 ? "" : "s"}`;
  }

  function fixed(n, digits) {
    return Number(n || 0).toFixed(digits);
  }

  function clock(epochSeconds) {
    return new Date(epochSeconds * 1000).toLocaleTimeString([], { hour12: false });
  }

  // -- talking to the API ------------------------------------------------------------------------

  function token() {
    return sessionStorage.getItem(TOKEN_KEY) || "";
  }

  async function getJSON(path, okStatuses = [200]) {
    const response = await fetch(path, { cache: "no-store" });
    if (!okStatuses.includes(response.status)) {
      throw new Error(`${path}: HTTP ${response.status}`);
    }
    return [await response.text(), response.status];
  }

  async function write(path, what) {
    const headers = {};
    if (token()) headers.Authorization = `Bearer ${token()}`;
    let response;
    try {
      response = await fetch(path, { method: "POST", headers, cache: "no-store" });
    } catch (error) {
      notice(`${what}: the API cannot be reached (${error.message})`, "error");
      return;
    }
    let body = {};
    try {
      body = await response.json();
    } catch (error) {
      body = {};
    }
    if (response.ok) {
      notice(`${what}: done`, "ok");
      pollSoon();
    } else if (response.status === 403) {
      notice(`${what} refused: ${body.error || response.statusText}`, "error");
      $("auth").open = true;
    } else {
      notice(`${what} failed (HTTP ${response.status}): ${body.error || response.statusText}`,
        "error");
    }
  }

  let noticeTimer = null;

  function notice(text, kind) {
    const box = $("notice");
    box.className = kind;
    box.textContent = text;
    box.hidden = false;
    clearTimeout(noticeTimer); // a success goes away by itself, a refusal stays until the next
    if (kind === "ok") noticeTimer = setTimeout(() => { box.hidden = true; }, NOTICE_MS);
  }

  // -- polling ----------------------------------------------------------------------------------

  async function poll() {
    timer = null;
    try {
      const [health, backends, sessions, migrations] = await Promise.all([
        getJSON("api/debug/health", [200, 502]), // 502: unhealthy, with the reason
        getJSON("api/admin/backends"),
        getJSON("api/admin/sessions"),
        getJSON("api/admin/migrations"),
      ]);
      draw("health", health[0], drawHealth);
      draw("backends", backends[0], drawBackends);
      draw("sessions", sessions[0], drawSessions);
      draw("migrations", migrations[0], drawMigrations);
      lastOk = Date.now();
      $("updated").textContent = `updated ${new Date().toLocaleTimeString([], { hour12: false })}`;
      $("updated").className = "muted";
    } catch (error) {
      const since = lastOk ? ` (last answer at ${new Date(lastOk).toLocaleTimeString()})` : "";
      $("updated").textContent = `cannot reach the API: ${error.message}${since}`;
      $("updated").className = "stale";
    }
    schedule();
  }

  function schedule() {
    if (timer === null) timer = setTimeout(poll, document.hidden ? HIDDEN_POLL_MS : POLL_MS);
  }

  function pollSoon() {
    if (timer !== null) clearTimeout(timer);
    timer = setTimeout(poll, 100);
  }

  function draw(key, text, render) {
    if (last[key] === text) return;
    last[key] = text;
    render(JSON.parse(text));
  }

  // -- health and summary ------------------------------------------------------------------------

  function drawHealth(health) {
    const kind = health.status === "healthy" ? "good" : "bad";
    $("health").replaceWith(Object.assign(badge(health.status, kind), { id: "health" }));
    $("health-reason").textContent = health.unhealthy_reason || "";
  }

  function drawSummary(backends) {
    const healthy = backends.filter((b) => b.status === "healthy").length;
    const sessions = backends.reduce((sum, b) => sum + b.connections, 0);
    $("summary").textContent = `${plural(sessions, "session")} · ` +
      `${plural(backends.length, "backend")}, ${healthy} healthy`;
  }

  // -- backends ----------------------------------------------------------------------------------

  const STATUS_KIND = { healthy: "good", draining: "warn", down: "bad", unhealthy: "bad" };
  // Why a backend drains (drained_by), in words.
  const DRAIN_WHY = {
    drained: "drained through the API",
    "fail-backend-list": "in fail-backend-list",
    removed: "gone from its source",
    unhealthy: "failing health checks",
  };

  function drawBackends(backends) {
    drawSummary(backends);
    $("backend-count").textContent = String(backends.length);
    const rows = backends.map(backendRow);
    if (!rows.length) rows.push(emptyRow(7, "No backends: the config and discovery name none."));
    $("backends").tBodies[0].replaceChildren(...rows);
  }

  function backendRow(b) {
    const drainedByUs = b.drained_by.includes("drained");
    const action = drainedByUs ? "undrain" : "drain";
    const button = el("button", {
      type: "button", class: action, "data-action": action, "data-addr": b.addr,
      onclick: () => write(`api/admin/backends/${encodeURIComponent(b.addr)}/${action}`,
        `${action === "drain" ? "Drain" : "Undrain"} ${b.addr}`),
    }, action === "drain" ? "Drain" : "Undrain");
    return el("tr", { "data-backend": b.addr, "data-status": b.status },
      el("td", {}, el("code", {}, b.addr),
        el("div", { class: "muted small" },
          [b.namespace && `namespace ${b.namespace}`, b.sources.join(", "),
            b.galera && "galera"].filter(Boolean).join(" · "))),
      el("td", { class: "status" }, badge(b.status, STATUS_KIND[b.status] || "warn"),
        b.drained_by.length ? el("div", { class: "muted small" },
          b.drained_by.map((why) => DRAIN_WHY[why] || why).join(", ")) : null),
      el("td", { class: "health" }, ...healthLines(b)),
      el("td", { class: "num sessions" }, String(b.connections),
        el("div", { class: "muted small" }, `score ${fixed(b.score, 2)}`)),
      el("td", { class: "load" }, loadText(b.load)),
      el("td", { class: "labels" }, ...Object.entries(b.labels).map(([k, v]) =>
        el("span", { class: "chip" }, `${k}=${v}`))),
      el("td", { class: "actions" }, button));
  }

  function healthLines(b) {
    const lines = [];
    if (b.health) lines.push(el("div", { class: "problem" }, b.health));
    if (b.last_error) lines.push(el("div", { class: "problem" }, `down: ${b.last_error}`));
    if (b.doubt) lines.push(el("div", { class: "problem" }, `in doubt: ${b.doubt}`));
    if (b.move_problem) lines.push(el("div", { class: "problem" }, `moves: ${b.move_problem}`));
    return lines.length ? lines : [el("span", { class: "muted" }, "ok")];
  }

  function loadText(load) {
    const parts = [`${fixed(load.queries_per_second, 1)} q/s`,
      `${fixed(load.threads_running, 1)} running`];
    if (load.cpu) parts.push(`cpu ${fixed(load.cpu, 2)}`);
    return parts.join(" · ");
  }

  function emptyRow(columns, text) {
    return el("tr", { class: "empty" }, el("td", { colspan: columns }, text));
  }

  // -- sessions ----------------------------------------------------------------------------------

  function drawSessions(sessions) {
    lastSessions = sessions;
    const filter = $("session-filter").value.trim().toLowerCase();
    const shown = filter ? sessions.filter((s) =>
      [s.user, s.client, s.backend, String(s.id)].some((v) => v.toLowerCase().includes(filter)))
      : sessions;
    $("session-count").textContent = String(sessions.length);
    const rows = shown.slice(0, SESSION_ROWS).map(sessionRow);
    if (!rows.length) rows.push(emptyRow(7, filter ? "No session matches." : "No sessions."));
    $("sessions").tBodies[0].replaceChildren(...rows);
    $("sessions-more").textContent = shown.length > SESSION_ROWS
      ? `${shown.length - SESSION_ROWS} more not shown (filter to find one)` : "";
  }

  function sessionRow(s) {
    const move = s.moving
      ? el("span", {}, badge(s.move_reason || "moving", "warn"), " ",
        s.waiting ? `waits: ${s.waiting}` : "at its next safe point")
      : (s.waiting ? el("span", { class: "muted" }, s.waiting) : "");
    const tls = [s.client_tls && "client", s.backend_tls && "backend"].filter(Boolean).join(", ");
    return el("tr", { "data-session": s.id },
      el("td", { class: "num" }, String(s.id)),
      el("td", { class: "user" }, s.user),
      el("td", { class: "client" }, el("code", {}, s.client)),
      el("td", { class: "backend" }, el("code", {}, s.backend)),
      el("td", {}, tls || "—"),
      el("td", { class: "num" }, String(s.moves)),
      el("td", { class: "move" }, move));
  }

  // -- migrations ------------------------------------------------------------------------------

  function drawMigrations(m) {
    let moved = 0;
    let failed = 0;
    for (const t of m.totals) {
      if (t.result === "succeed") moved += t.count; else failed += t.count;
    }
    $("move-totals").textContent = `${moved} moved · ${failed} failed since start`;
    $("chart-step").textContent = String(m.step);
    $("chart-span").textContent = String(Math.round((m.step * m.span) / 60));
    drawChart(m);
    const items = m.recent.map(moveItem);
    if (!items.length) items.push(el("li", { class: "empty muted" }, "No moves yet."));
    $("moves").replaceChildren(...items);
  }

  function moveItem(move) {
    const ok = move.result === "succeed";
    return el("li", { class: ok ? "ok" : "fail", "data-session": move.session, "data-from": move.from,
      "data-to": move.to, "data-result": move.result },
    el("span", { class: "when" }, clock(move.at)),
    el("span", {}, `session ${move.session}`, move.user ? el("span", { class: "muted" }, ` (${move.user})`) : null),
    el("span", { class: "route" }, el("code", {}, move.from), " → ", el("code", {}, move.to)),
    badge(move.reason, "neutral"),
    ok ? el("span", { class: "muted" }, `${fixed(move.seconds * 1000, 1)} ms`)
      : el("span", { class: "problem" }, `failed: ${move.error}`));
  }

  function drawChart(m) {
    const { width, height, left, bottom, top } = CHART;
    const plotWidth = width - left;
    const plotHeight = height - bottom - top;
    const newest = Math.floor(m.now / m.step) * m.step;
    const oldest = newest - (m.span - 1) * m.step;
    const peak = Math.max(1, ...m.timeline.map((b) => b.succeed + b.fail));
    const slot = plotWidth / m.span;
    const y = (n) => top + plotHeight - (n / peak) * plotHeight;
    const nodes = [
      svg("line", { x1: left, x2: width, y1: y(0), y2: y(0), class: "axis" }),
      svg("line", { x1: left, x2: width, y1: y(peak), y2: y(peak), class: "grid" }),
      svg("text", { x: left - 4, y: y(peak) + 4, class: "tick end" }, String(peak)),
      svg("text", { x: left - 4, y: y(0) + 4, class: "tick end" }, "0"),
    ];
    for (let minutes = 0; minutes * 60 <= (m.span - 1) * m.step; minutes += 5) {
      const x = left + ((newest - minutes * 60 - oldest) / m.step + 0.5) * slot;
      nodes.push(svg("text", { x: minutes ? x : width, y: height - 4,
        class: minutes ? "tick middle" : "tick end" }, minutes ? `−${minutes} min` : "now"));
    }
    for (const b of m.timeline) {
      if (b.start < oldest) continue;
      const x = left + ((b.start - oldest) / m.step) * slot;
      const reasons = Object.entries(b.reasons).map(([r, n]) => `${r} ${n}`).join(", ");
      const title = svg("title", {},
        `${clock(b.start)}–${clock(b.start + m.step)}: ${b.succeed} moved, ${b.fail} failed (${reasons})`);
      const w = Math.max(1, slot - 1);
      if (b.succeed) {
        nodes.push(svg("rect", { x, y: y(b.succeed), width: w, height: y(0) - y(b.succeed),
          class: "bar ok", "data-start": b.start, "data-count": b.succeed }, title.cloneNode(true)));
      }
      if (b.fail) {
        nodes.push(svg("rect", { x, y: y(b.succeed + b.fail), width: w,
          height: y(b.succeed) - y(b.succeed + b.fail), class: "bar fail",
          "data-start": b.start, "data-count": b.fail }, title));
      }
    }
    $("move-chart").replaceChildren(...nodes);
  }

  // -- controls --------------------------------------------------------------------------------

  function drawTokenState() {
    $("token-state").textContent = token()
      ? "A token is set for this tab: write requests send it."
      : "No token set: write requests rely on this browser being on the proxy's host.";
  }

  function setUp() {
    $("token-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const value = $("token").value.trim();
      if (value) sessionStorage.setItem(TOKEN_KEY, value);
      $("token").value = "";
      drawTokenState();
      $("auth").open = false; // out of the way of the buttons it covers
    });
    $("token-forget").addEventListener("click", () => {
      sessionStorage.removeItem(TOKEN_KEY);
      drawTokenState();
      $("auth").open = false;
    });
    $("session-filter").addEventListener("input", () => drawSessions(lastSessions));
    $("redirect-all").addEventListener("click",
      () => write("api/debug/redirect", "Redirect all sessions"));
    document.addEventListener("visibilitychange", () => {
      if (!document.hidden) pollSoon();
    });
    drawTokenState();
    poll();
  }

  setUp();
})();
