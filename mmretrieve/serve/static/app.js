/* mmretrieve's page: text, image, composed and video search over the /api/v1 of the server that serves it.
   Hand-written, no framework, no network beyond this origin. The query lives in the URL (?index=&q=&item=...),
   so a search can be shared and reloaded; an uploaded image cannot be put in a URL and is not kept. */
"use strict";
(() => {
  const API = "/api/v1";
  const $ = (id) => document.getElementById(id);
  const DEFAULT_K = 24;
  const state = {
    index: null, detail: null, q: "", item: null, upload: null, uploadUrl: null,
    fusion: "sum", weight: 0.5, rerank: "", k: DEFAULT_K, compare: false, fusion2: "intersection",
  };
  const columns = [{ fusion: "sum", next: null, stages: [] }, { fusion: "intersection", next: null, stages: [] }];
  let seq = 0;
  let opener = null;

  // ---- helpers ------------------------------------------------------------------------------------------
  function el(tag, attrs, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") e.className = v; else if (k === "text") e.textContent = v; else e.setAttribute(k, v === true ? "" : v);
    }
    for (const c of children) if (c !== null && c !== undefined) e.append(c);
    return e;
  }
  // items indexed from a folder are keyed by their path: show the file name
  const shortKey = (k) => (k.includes("/") ? k.slice(k.lastIndexOf("/") + 1) : k);
  const fmt = (x, d = 3) => (x === null || x === undefined ? "–" : Number(x).toFixed(d));
  function status(msg, isError) {
    const s = $("status");
    s.textContent = msg || "";
    s.classList.toggle("error", !!isError);
  }
  // the API token travels in an HttpOnly cookie the server sets (POST /session): this script never sees it
  async function api(path, opts) {
    opts = opts || {};
    const r = await fetch(API + path, Object.assign({ credentials: "same-origin" }, opts));
    let body = null;
    try { body = await r.json(); } catch (e) { body = null; }
    if (r.status === 401) { $("token-form").hidden = false; }
    if (!r.ok) {
      const msg = body && body.error ? body.error.message : r.statusText;
      const err = new Error(msg);
      err.status = r.status;
      throw err;
    }
    return body;
  }
  const composed = () => !!state.q && !!(state.item || state.upload);
  const caps = () => (state.detail ? state.detail.capabilities : null);

  // ---- the URL ------------------------------------------------------------------------------------------
  function toURL() {
    const p = new URLSearchParams();
    if (state.index) p.set("index", state.index);
    if (state.q) p.set("q", state.q);
    if (state.item) p.set("item", String(state.item.id));
    if (state.fusion !== "sum") p.set("fusion", state.fusion);
    if (state.fusion === "weighted") p.set("weight", String(state.weight));
    if (state.rerank) p.set("rerank", state.rerank);
    if (state.k !== DEFAULT_K) p.set("k", String(state.k));
    if (state.compare) p.set("compare", state.fusion2);
    return "?" + p.toString();
  }
  async function fromURL() {
    const p = new URLSearchParams(location.search);
    state.q = p.get("q") || "";
    state.fusion = p.get("fusion") || "sum";
    state.weight = parseFloat(p.get("weight") || "0.5");
    state.rerank = p.get("rerank") || "";
    state.k = parseInt(p.get("k") || String(DEFAULT_K), 10) || DEFAULT_K;
    state.compare = p.has("compare");
    state.fusion2 = p.get("compare") || "intersection";
    clearUpload();
    state.item = null;
    const item = p.get("item");
    if (item !== null && /^\d+$/.test(item)) {
      try {
        const it = await api(`/indexes/${encodeURIComponent(state.index)}/items/${item}`);
        state.item = { id: it.id, key: it.key, thumbnail: it.thumbnail };
      } catch (e) { status(`item ${item}: ${e.message}`, true); }
    }
    writeForm();
  }

  // ---- the form -----------------------------------------------------------------------------------------
  function setSelect(sel, value) {
    if ([...sel.options].some((o) => o.value === value && !o.disabled)) sel.value = value;
  }
  function writeForm() {
    $("q").value = state.q;
    setSelect($("fusion"), state.fusion);
    $("weight").value = String(state.weight);
    $("weight-out").textContent = String(state.weight);
    setSelect($("rerank"), state.rerank);
    if (!$("k").querySelector(`option[value="${state.k}"]`)) $("k").append(el("option", { text: String(state.k) }));
    $("k").value = String(state.k);
    $("compare").checked = state.compare;
    setSelect($("fusion2"), state.fusion2);
    showReference();
    updateControls();
  }
  function readForm() {
    state.q = $("q").value.trim();
    state.fusion = $("fusion").value;
    state.weight = parseFloat($("weight").value);
    state.rerank = $("rerank").value;
    state.k = parseInt($("k").value, 10) || DEFAULT_K;
    state.compare = $("compare").checked;
    state.fusion2 = $("fusion2").value;
  }
  function updateControls() {
    const c = composed() || !!(state.item || state.upload);
    for (const id of ["fusion", "fusion2", "compare"]) $(id).disabled = !c;
    $("fusion-wrap").classList.toggle("disabled", !c);
    $("compare-wrap").classList.toggle("disabled", !c);
    $("weight-wrap").hidden = $("fusion").value !== "weighted";
    $("q").placeholder = state.item || state.upload
      ? "Modification text for the reference, e.g. \"but red\" (Enter searches; empty: search by the image)"
      : "Describe what you look for, e.g. a photo of a cat (Enter searches)";
    $("q-label").textContent = state.item || state.upload ? "Modification text" : "Search text";
  }
  function showReference() {
    const ref = $("reference");
    if (state.upload) {
      $("ref-img").src = state.uploadUrl;
      $("ref-label").textContent = state.upload.name || "uploaded image";
    } else if (state.item) {
      $("ref-img").src = state.item.thumbnail + "?size=128";
      $("ref-label").textContent = shortKey(state.item.key);
    }
    ref.hidden = !(state.upload || state.item);
    updateControls();
  }
  function clearUpload() {
    if (state.uploadUrl) URL.revokeObjectURL(state.uploadUrl);
    state.upload = null;
    state.uploadUrl = null;
  }
  function setUpload(file) {
    if (!file) return;
    const c = caps();
    if (c && file.size > c.max_upload_bytes) {
      status(`${file.name}: ${file.size} bytes, more than this server's limit of ${c.max_upload_bytes}`, true);
      return;
    }
    clearUpload();
    state.item = null;
    state.upload = file;
    state.uploadUrl = URL.createObjectURL(file);
    showReference();
    status("Reference image set: type a modification text and press Enter, or press Enter to search by the image.");
    $("q").focus();
  }

  // ---- indexes --------------------------------------------------------------------------------------------
  async function loadIndexes() {
    const list = await api("/indexes");
    const sel = $("index");
    sel.replaceChildren(...list.map((i) => el("option", { value: i.name, text: i.name })));
    const wanted = new URLSearchParams(location.search).get("index");
    state.index = list.some((i) => i.name === wanted) ? wanted : (list[0] && list[0].name);
    sel.value = state.index;
    await loadDetail();
  }
  async function loadDetail() {
    const d = await api(`/indexes/${encodeURIComponent(state.index)}`);
    state.detail = d;
    const bits = [`${d.items} items`, d.encoder, d.version];
    if (d.videos) bits.push(`${d.videos} videos`);
    if (d.patches) bits.push("patches");
    $("index-info").textContent = bits.join(" · ");
    const sel = $("rerank");
    const opts = [el("option", { value: "", text: "none" })];
    const names = { emd: "emd (patch EMD)", frames: "frames (best video moment)", mllm: "mllm (yes/no verifier)" };
    for (const [name, why] of Object.entries(d.capabilities.rerankers)) {
      if (why === null) opts.push(el("option", { value: name, text: names[name] || name }));
    }
    // a preset the server cannot run (e.g. a generative one without --vlm) is listed, greyed, with why
    for (const [name, why] of Object.entries(d.capabilities.pipelines)) {
      opts.push(el("option", { value: "preset:" + name, text: "preset " + name + (why === null ? "" : " (unavailable)"),
                               disabled: why !== null, title: why === null ? null : why }));
    }
    sel.replaceChildren(...opts);
  }

  // ---- searching -------------------------------------------------------------------------------------------
  function requestBody(fusion, offset) {
    const b = { k: state.k, offset };
    if (state.q) b.text = state.q;
    if (state.item) b.item = state.item.id;
    if (composed()) {
      b.fusion = fusion;
      if (fusion === "weighted") b.weight = state.weight;
    }
    if (state.rerank.startsWith("preset:")) b.pipeline = state.rerank.slice(7);
    else if (state.rerank) b.rerank = [state.rerank];
    return b;
  }
  function runSearch(fusion, offset) {
    const b = requestBody(fusion, offset);
    const path = `/indexes/${encodeURIComponent(state.index)}/search`;
    if (state.upload) {
      const fd = new FormData();
      fd.append("image", state.upload, state.upload.name || "upload");
      for (const [k, v] of Object.entries(b)) {
        if (Array.isArray(v)) v.forEach((x) => fd.append(k, x)); else fd.append(k, String(v));
      }
      return api(path, { method: "POST", body: fd });
    }
    return api(path, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(b) });
  }
  async function search(push) {
    readForm();
    updateControls();
    if (!state.q && !state.item && !state.upload) {
      status("Type a text, or drop, paste or choose an image.");
      $("q").focus();
      return;
    }
    const url = toURL();
    if (push !== false && url !== location.search) history.pushState(null, "", url);
    const mine = ++seq;
    const both = state.compare && composed();
    columns[0].fusion = state.fusion;
    columns[1].fusion = state.fusion2;
    $("col-1").hidden = !both;
    status(both ? `Searching with ${state.fusion} and ${state.fusion2}…` : "Searching…");
    try {
      const runs = both ? [columns[0].fusion, columns[1].fusion] : [columns[0].fusion];
      const results = await Promise.all(runs.map((f) => runSearch(f, 0)));
      if (mine !== seq) return;
      results.forEach((res, i) => render(i, res, false));
      if (!both) $("col-1").hidden = true;
      const r = results[0];
      const what = r.query.kind + (r.query.fusion ? ` (${runs.join(" vs ")})` : "");
      const note = state.compare && !composed() ? " · comparing two fusions needs a reference image plus a text" : "";
      status(`${r.hits.length}${r.has_more ? "+" : ""} results · ${what} · ${r.stages.join(" → ")} · ` +
             `${Math.round(r.timings_ms.total)} ms${note}`);
    } catch (e) {
      if (mine === seq) status(e.message, true);
    }
  }
  async function more(i) {
    const col = columns[i];
    if (col.next === null) return;
    try {
      const res = await runSearch(col.fusion, col.next);
      render(i, res, true);
    } catch (e) { status(e.message, true); }
  }

  // ---- what generative stages report ---------------------------------------------------------------------
  // The description and the reasoning are model output: they only ever go into the page as text (textContent).
  function costLine(stage, c, d) {
    const how = d.schedule || d.strategy;
    const unread = c.unparsed ? `, ${c.unparsed} answer(s) unread` : "";
    return `${stage}${how ? ` (${how})` : ""}: ${c.prompts} prompt(s), ${c.cache_hits} cached, ` +
           `${c.prompt_tokens} prompt + ${c.generated_tokens} generated tokens, ${fmt(c.seconds, 2)} s${unread}`;
  }
  const asText = (x) => (typeof x === "string" ? x : JSON.stringify(x, null, 1));
  function genInfo(res) {
    const info = res.stage_info || {};
    let desc = res.description;
    if (desc === null || desc === undefined) desc = info.describe ? info.describe.description : null;
    const out = [];
    if (typeof desc === "string" && desc) {
      out.push(el("p", { class: "described" }, el("span", { class: "label", text: "searched for: " }),
                  el("span", { class: "description", text: desc })));
    }
    const costs = [], details = [];
    for (const [stage, d] of Object.entries(info)) {
      if (!d || typeof d !== "object") continue;
      if (d.cost) costs.push(el("li", { class: "cost", text: costLine(stage, d.cost, d) }));
      if (Array.isArray(d.skipped) && d.skipped.length) {
        costs.push(el("li", { class: "cost", text: `${stage}: ${d.skipped.length} candidate(s) skipped (unreadable)` }));
      }
      if (Array.isArray(d.reasoning) && d.reasoning.length) {
        const box = el("details", { class: "reasoning" }, el("summary", { text: `${stage}: the model's reasoning (${d.reasoning.length})` }));
        box.append(el("ol", {}, ...d.reasoning.map((r) => el("li", { text: asText(r) }))));
        details.push(box);
      }
    }
    if (costs.length) out.push(el("ul", { class: "costs" }, ...costs));
    out.push(...details);
    return out;
  }

  // ---- results ---------------------------------------------------------------------------------------------
  function stagesLine(h, stages) {
    if (stages.length < 2) return null;
    const span = el("span");
    stages.forEach((s, j) => {
      const r = h.stage_ranks[s];
      if (j) span.append(" → ");
      span.append(`#${s} ${r === undefined ? "–" : r}`);
    });
    const first = h.stage_ranks[stages[0]], last = h.stage_ranks[stages[stages.length - 1]];
    if (first !== undefined && last !== undefined && first !== last) span.className = last < first ? "up" : "down";
    return span;
  }
  function hitCard(h, stages) {
    const stagesEl = stagesLine(h, stages);
    const moment = h.moment !== null && h.moment !== undefined;
    const label = [`${h.rank}. ${shortKey(h.key)}`, h.caption, `score ${fmt(h.score)}`, stagesEl ? stagesEl.textContent : null,
                   h.kind === "video" ? (moment ? `video, best moment ${fmt(h.moment, 1)} s` : "video") : null];
    const b = el("button", { type: "button", class: "hit", "aria-label": label.filter(Boolean).join(", ") });
    b.dataset.id = String(h.id);
    b.dataset.key = h.key;
    const thumb = el("div", { class: "thumb" }, el("img", { src: h.thumbnail + "?size=256", alt: "", loading: "lazy" }),
                     el("span", { class: "rank", text: `#${h.rank}` }));
    if (h.kind === "video") thumb.append(el("span", { class: "badge", text: moment ? `▶ ${fmt(h.moment, 1)} s` : "▶ video" }));
    b.append(thumb, el("span", { class: "key", text: shortKey(h.key), title: h.key }));
    if (h.caption) b.append(el("span", { class: "caption", text: h.caption, title: h.caption }));
    b.append(el("span", { class: "score", text: `score ${fmt(h.score)}` }));
    if (stagesEl) b.append(el("span", { class: "stages" }, stagesEl));
    b.addEventListener("click", () => openDetail(h, stages, b));
    return el("li", {}, b);
  }
  function render(i, res, append) {
    const col = $(`col-${i}`);
    const grid = col.querySelector(".grid");
    const c = columns[i];
    c.stages = res.stages;
    c.next = res.next_offset;
    const cards = res.hits.map((h) => hitCard(h, res.stages));
    if (append) grid.append(...cards); else grid.replaceChildren(...cards);
    const title = [];
    if (res.query.kind === "composed") title.push(`fusion: ${res.query.fusion}`);
    if (res.stages.length > 1) title.push(res.stages.join(" → "));
    col.querySelector(".col-title").textContent = title.join(" · ");
    if (!append) {
      const gi = col.querySelector(".gen-info");
      gi.replaceChildren(...genInfo(res));
      gi.hidden = !gi.childElementCount;
    }
    const btn = col.querySelector(".more");
    btn.hidden = !res.has_more;
    if (!res.hits.length && !append) grid.append(el("li", { class: "muted", text: "No results." }));
  }

  // ---- the detail dialog ----------------------------------------------------------------------------------
  function openDetail(h, stages, button) {
    opener = button;
    const d = $("detail");
    const media = $("d-media");
    media.replaceChildren();
    const moment = h.moment !== null && h.moment !== undefined;
    if (h.kind === "video" && h.media) {
      const v = el("video", { controls: true, preload: "metadata", playsinline: true });
      v.muted = true;
      v.src = h.media + (moment ? `#t=${h.moment.toFixed(2)}` : "");
      v.addEventListener("loadedmetadata", () => {
        if (moment) v.currentTime = h.moment;
        v.play().catch(() => {});
      }, { once: true });
      media.append(v);
    } else {
      media.append(el("img", { src: h.thumbnail + "?size=512", alt: h.caption || h.key }));
    }
    $("d-title").textContent = `#${h.rank} ${shortKey(h.key)}`;
    $("d-caption").textContent = h.caption || "";
    const st = stagesLine(h, stages);
    $("d-stages").replaceChildren(...(st ? [st] : []));
    const meta = [["score", fmt(h.score, 4)], ["kind", h.kind]];
    for (const [s, v] of Object.entries(h.stage_scores || {})) meta.push([`${s} score`, fmt(v, 4)]);
    if (moment) meta.push(["best moment", `${fmt(h.moment, 2)} s`]);
    meta.push(["id", String(h.id)]);
    $("d-meta").replaceChildren(...meta.flatMap(([k, v]) => [el("dt", { text: k }), el("dd", { text: v })]));
    const open = $("d-open");
    open.hidden = !h.media;
    if (h.media) open.href = h.media;
    // focus moves on to the query box: the dialog's close must not hand it back to the card
    $("d-search").onclick = () => { opener = null; d.close(); useItem(h, false); };
    $("d-ref").onclick = () => { opener = null; d.close(); useItem(h, true); };
    d.showModal();
    $("d-search").focus();
  }
  function useItem(h, asReference) {
    clearUpload();
    state.item = { id: h.id, key: h.key, thumbnail: h.thumbnail };
    if (!asReference) {
      $("q").value = "";
      showReference();
      search();
      return;
    }
    // a text left in the box from an earlier search must not silently become the modification
    $("q").value = "";
    state.q = "";
    showReference();
    updateControls();
    $("q").focus();
    $("q").select();
    status(`Reference: ${shortKey(h.key)}. Type a modification text and press Enter.`);
  }

  // ---- wiring ---------------------------------------------------------------------------------------------
  function wire() {
    $("search-form").addEventListener("submit", (e) => { e.preventDefault(); search(); });
    $("q").addEventListener("input", () => { state.q = $("q").value.trim(); updateControls(); });
    $("fusion").addEventListener("change", updateControls);
    $("weight").addEventListener("input", () => { $("weight-out").textContent = $("weight").value; });
    $("index").addEventListener("change", async () => {
      state.index = $("index").value;
      state.item = null;
      clearUpload();
      showReference();
      try { await loadDetail(); } catch (e) { status(e.message, true); }
      if (state.q) search();
    });
    $("ref-clear").addEventListener("click", () => { clearUpload(); state.item = null; showReference(); $("q").focus(); });
    const drop = $("drop"), file = $("file");
    drop.addEventListener("click", () => file.click());
    drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); file.click(); } });
    file.addEventListener("change", () => { setUpload(file.files[0]); file.value = ""; });
    drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
    drop.addEventListener("dragleave", () => drop.classList.remove("over"));
    drop.addEventListener("drop", (e) => {
      e.preventDefault();
      drop.classList.remove("over");
      const f = e.dataTransfer && e.dataTransfer.files && e.dataTransfer.files[0];
      if (f) setUpload(f); else status("Drop an image file.", true);
    });
    document.addEventListener("paste", (e) => {
      const items = (e.clipboardData && e.clipboardData.items) || [];
      for (const it of items) {
        if (it.kind === "file" && it.type.startsWith("image/")) { e.preventDefault(); setUpload(it.getAsFile()); return; }
      }
    });
    document.addEventListener("keydown", (e) => {
      const typing = /^(INPUT|SELECT|TEXTAREA)$/.test(document.activeElement.tagName);
      if (e.key === "/" && !typing && !$("detail").open) { e.preventDefault(); $("q").focus(); }
    });
    $("d-close").addEventListener("click", () => $("detail").close());
    $("detail").addEventListener("close", () => {
      const v = $("d-media").querySelector("video");
      if (v) v.pause();
      if (opener) opener.focus();
    });
    document.querySelectorAll(".more").forEach((b, i) => b.addEventListener("click", () => more(i)));
    window.addEventListener("popstate", async () => { await fromURL(); if (state.q || state.item) search(false); });
    $("token-form").addEventListener("submit", async (e) => {
      e.preventDefault();
      const r = await fetch("/session", { method: "POST", credentials: "same-origin",
        headers: { "Content-Type": "application/json" }, body: JSON.stringify({ token: $("token").value.trim() }) });
      $("token").value = "";
      if (!r.ok) { status("That token was not accepted.", true); return; }
      $("token-form").hidden = true;
      start();
    });
  }

  async function start() {
    delete document.body.dataset.ready;  // set again once this start is through (a sign-in starts again)
    try {
      await loadIndexes();
      await fromURL();
      if (state.q || state.item) await search(false);
      else status("Type what you look for and press Enter; drop or paste an image to search by it.");
    } catch (e) {
      status(e.status === 401 ? "This server needs an API token (enter it above)." : e.message, true);
    }
    document.body.dataset.ready = "1";
  }

  wire();
  start();
})();
