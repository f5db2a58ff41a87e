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
    filter: "", show: [],
  };
  const columns = [{ fusion: "sum", next: null, stages: [] }, { fusion: "intersection", next: null, stages: [] }];
  let seq = 0;
  let opener = null;
  const hitsShown = [];  // the hits of the first column, in grid order (selection ranges, export)
  const selected = new Map();  // id -> hit

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
    if (state.filter) p.set("filter", state.filter);
    if (state.show.length) p.set("show", state.show.join(","));
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
    state.filter = p.get("filter") || "";
    state.show = (p.get("show") || "").split(",").filter(Boolean);
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
    $("filter").value = state.filter;
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
    state.filter = $("filter").value.trim();
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
  // a filter and no query browses the items that meet it (the API's filter-only search: no scores, no stages)
  const browsing = () => !state.q && !state.item && !state.upload && !!state.filter;
  function requestBody(fusion, offset) {
    const b = { k: state.k, offset };
    if (browsing()) return { ...b, filter: state.filter };
    if (state.q) b.text = state.q;
    if (state.item) b.item = state.item.id;
    if (composed()) {
      b.fusion = fusion;
      if (fusion === "weighted") b.weight = state.weight;
    }
    if (state.rerank.startsWith("preset:")) b.pipeline = state.rerank.slice(7);
    else if (state.rerank) b.rerank = [state.rerank];
    if (state.filter) b.filter = state.filter;
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
    const url = toURL();
    if (push !== false && url !== location.search) history.pushState(null, "", url);
    loadFacets();
    if (!state.q && !state.item && !state.upload && !state.filter) {
      status("Type a text, or drop, paste or choose an image (or pick a field value to browse).");
      $("q").focus();
      return;
    }
    const mine = ++seq;
    const both = state.compare && composed() && !browsing();
    columns[0].fusion = state.fusion;
    columns[1].fusion = state.fusion2;
    $("col-1").hidden = !both;
    status(both ? `Searching with ${state.fusion} and ${state.fusion2}…` : "Searching…");
    try {
      const runs = both ? [columns[0].fusion, columns[1].fusion] : [columns[0].fusion];
      const results = await Promise.all(runs.map((f) => runSearch(f, 0)));
      if (mine !== seq) return;
      results.forEach((res, i) => render(i, res, false));
      drawMap();
      if (!both) $("col-1").hidden = true;
      const r = results[0];
      const what = r.query.kind === "browse" ? `browsing ${r.query.matching} matching, in order of ${r.query.order}`
        : r.query.kind + (r.query.fusion ? ` (${runs.join(" vs ")})` : "");
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
      drawMap();
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
    const label = [`${h.rank}. ${shortKey(h.key)}`, h.caption, stages.includes("browse") ? null : `score ${fmt(h.score)}`, stagesEl ? stagesEl.textContent : null,
                   h.kind === "video" ? (moment ? `video, best moment ${fmt(h.moment, 1)} s` : "video") : null];
    const b = el("button", { type: "button", class: "hit", "aria-label": label.filter(Boolean).join(", ") });
    b.dataset.id = String(h.id);
    b.dataset.key = h.key;
    const thumb = el("div", { class: "thumb" }, el("img", { src: h.thumbnail + "?size=256", alt: "", loading: "lazy" }),
                     el("span", { class: "rank", text: `#${h.rank}` }));
    if (h.kind === "video") thumb.append(el("span", { class: "badge", text: moment ? `▶ ${fmt(h.moment, 1)} s` : "▶ video" }));
    b.append(thumb, el("span", { class: "key", text: shortKey(h.key), title: h.key }));
    if (h.caption) b.append(el("span", { class: "caption", text: h.caption, title: h.caption }));
    if (!stages.includes("browse")) b.append(el("span", { class: "score", text: `score ${fmt(h.score)}` }));
    if (stagesEl) b.append(el("span", { class: "stages" }, stagesEl));
    const shown = hitMeta(h);
    if (shown) b.append(shown);
    const li = el("li", {}, b);
    const box = el("input", { type: "checkbox", class: "sel", "aria-label": `select ${shortKey(h.key)}`, tabindex: "-1" });
    box.addEventListener("click", (e) => { e.stopPropagation(); toggleSelect(h, e.shiftKey, box.checked); });
    li.prepend(box);
    if (selected.has(h.id)) { box.checked = true; li.classList.add("selected"); }
    b.addEventListener("click", (e) => {
      if (e.shiftKey || e.ctrlKey || e.metaKey) { e.preventDefault(); toggleSelect(h, e.shiftKey, !selected.has(h.id)); return; }
      openDetail(h, stages, b);
    });
    return li;
  }
  function render(i, res, append) {
    const col = $(`col-${i}`);
    const grid = col.querySelector(".grid");
    const c = columns[i];
    c.stages = res.stages;
    c.next = res.next_offset;
    if (!append && i === 0) hitsShown.length = 0;
    if (i === 0) hitsShown.push(...res.hits);
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
    for (const [k, v] of Object.entries(h.metadata || {})) meta.push([k, asText(v)]);
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

  // ---- browsing: filters from facets, shown fields ---------------------------------------------------------
  // Metadata values are data: they reach the page as text only (textContent), and reach a filter quoted.
  const KEYWORDS = new Set(["and", "or", "not", "in", "is", "null", "true", "false", "contains"]);
  const BUILTINS = new Set(["id", "key", "uri", "kind", "caption", "size", "mtime", "width", "height", "added_at"]);
  function quoteField(name, builtin) {
    if (builtin) return name;
    if (/^[A-Za-z_][A-Za-z0-9_]*$/.test(name) && !KEYWORDS.has(name.toLowerCase()) && !BUILTINS.has(name)) return name;
    return "`" + name.replace(/`/g, "``") + "`";
  }
  function literal(v) {
    if (typeof v === "boolean") return v ? "true" : "false";
    if (typeof v === "number") return String(v);
    return "'" + String(v).replace(/'/g, "''") + "'";
  }
  function addClause(clause) {
    const f = state.filter.trim();
    state.filter = f ? `(${f}) and ${clause}` : clause;
    $("filter").value = state.filter;
    search();
  }
  const valueText = (v) => (v === null || v === undefined ? "–" : typeof v === "object" ? JSON.stringify(v) : String(v));
  function hitMeta(h) {
    const md = h.metadata || {};
    const rows = state.show.filter((f) => f in md).flatMap((f) => [el("dt", { text: f }), el("dd", { text: valueText(md[f]), title: valueText(md[f]) })]);
    return rows.length ? el("dl", { class: "hit-meta" }, ...rows) : null;
  }
  let facetSeq = 0;
  let facetFields = [];
  async function loadFacets() {
    if (!state.index) return;
    const mine = ++facetSeq;
    const q = state.filter ? `?filter=${encodeURIComponent(state.filter)}` : "";
    try {
      const f = await api(`/indexes/${encodeURIComponent(state.index)}/facets${q}`);
      if (mine !== facetSeq) return;
      facetFields = f.fields;
      $("facets-info").textContent = `${f.matching} matching`;
      $("facets").replaceChildren(...f.fields.map(facetBox));
      renderShowFields();
    } catch (e) {
      if (mine === facetSeq) { $("facets-info").textContent = ""; $("facets").replaceChildren(el("p", { class: "muted", text: e.message })); }
    }
  }
  function facetBox(f) {
    const box = el("details", { class: "facet", open: f.values.length <= 12 ? true : null });
    box.dataset.field = f.name;
    box.append(el("summary", { text: `${f.name} (${f.distinct}${f.truncated ? ", top " + f.values.length : ""})`, title: f.name }));
    const name = quoteField(f.name, !!f.builtin);
    if (f.histogram) box.append(histogram(f.histogram), rangeForm(f, name));
    const list = el("ul", { class: "facet-values" });
    for (const v of f.values) {
      const b = el("button", { type: "button", class: "facet-value" }, el("span", { class: "v", text: valueText(v.value) }),
                   el("span", { class: "n", text: String(v.count) }));
      b.dataset.value = valueText(v.value);
      b.addEventListener("click", () => addClause(`${name} = ${literal(v.value)}`));
      list.append(el("li", {}, b));
    }
    box.append(list);
    return box;
  }
  function histogram(h) {
    const top = Math.max(1, ...h.counts);
    const bars = h.counts.map((n, i) => {
      const s = el("span", { title: `${fmt(h.edges[i], 2)} – ${fmt(h.edges[i + 1], 2)}: ${n}` });
      s.style.height = `${Math.round((100 * n) / top)}%`;
      return s;
    });
    return el("div", { class: "hist", "aria-hidden": "true" }, ...bars);
  }
  function rangeForm(f, name) {
    const lo = el("input", { type: "number", step: "any", value: String(f.min), "aria-label": `${f.name} from` });
    const hi = el("input", { type: "number", step: "any", value: String(f.max), "aria-label": `${f.name} to` });
    const go = el("button", { type: "button", class: "secondary", text: "Apply" });
    go.addEventListener("click", () => {
      const a = parseFloat(lo.value), b = parseFloat(hi.value);
      const parts = [];
      if (Number.isFinite(a)) parts.push(`${name} >= ${a}`);
      if (Number.isFinite(b)) parts.push(`${name} <= ${b}`);
      if (parts.length) addClause(parts.join(" and "));
    });
    return el("div", { class: "range" }, lo, el("span", { text: "–" }), hi, go);
  }
  function renderShowFields() {
    const names = facetFields.filter((f) => !f.builtin).map((f) => f.name);
    for (const n of state.show) if (!names.includes(n)) names.push(n);
    $("show-fields").replaceChildren(...names.map((n) => {
      const cb = el("input", { type: "checkbox", checked: state.show.includes(n) });
      cb.dataset.field = n;
      cb.addEventListener("change", () => {
        state.show = [...$("show-fields").querySelectorAll("input:checked")].map((x) => x.dataset.field);
        history.replaceState(null, "", toURL());
        rerenderCards();
      });
      return el("label", {}, cb, " ", el("span", { text: n }));
    }));
  }
  function rerenderCards() {
    document.querySelectorAll(".grid .hit").forEach((b) => {
      const h = hitsShown.find((x) => String(x.id) === b.dataset.id);
      const old = b.querySelector(".hit-meta");
      if (old) old.remove();
      const m = h ? hitMeta(h) : null;
      if (m) b.append(m);
    });
  }

  // ---- the map: every item on two dimensions, drawn into one ImageData (no per-point DOM) -------------------
  // A box or a lasso becomes "map within (x y, ...)": a polygon in map coordinates that the server tests
  // against the same cached map (no id list: any number of items, at most MAX_VERTICES vertices).
  const MAX_VERTICES = 64;
  const map = { ids: null, xy: null, base: null, index: null, drag: null, lasso: false };
  function b64bytes(b64) {
    const bin = atob(b64), out = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
    return out.buffer;
  }
  function half(h) {  // float16 -> number
    const s = h & 0x8000 ? -1 : 1, e = (h >> 10) & 0x1f, f = h & 0x3ff;
    if (e === 0) return s * f * 2 ** -24;
    if (e === 31) return f ? NaN : s * Infinity;
    return s * (1 + f / 1024) * 2 ** (e - 15);
  }
  async function loadMap() {
    const index = state.index;
    map.ids = null;
    $("map-info").textContent = "loading…";
    try {
      const m = await api(`/indexes/${encodeURIComponent(index)}/map`);
      if (index !== state.index) return;
      const ids = m.ids_dtype === "int32" ? new Int32Array(b64bytes(m.ids)) : new Float64Array(b64bytes(m.ids));
      const raw = new Uint16Array(b64bytes(m.xy));
      const xy = new Float32Array(raw.length);
      for (let i = 0; i < raw.length; i++) xy[i] = half(raw[i]);
      Object.assign(map, { ids, xy, index, pos: new Map() });
      for (let i = 0; i < ids.length; i++) map.pos.set(ids[i], i);
      const drawn = m.total > m.count ? `${m.count} of ${m.total} items drawn (an even sample; a selection takes all)` : `${m.count} items`;
      $("map-info").textContent = `${drawn} · ${m.method}`;
      map.base = null;
      drawMap();
    } catch (e) { $("map-info").textContent = e.message; }
  }
  function toCanvas(c, x, y) {
    const pad = 6;
    return [pad + ((x + 1) / 2) * (c.width - 2 * pad), pad + ((1 - y) / 2) * (c.height - 2 * pad)];
  }
  function drawBase(c, ctx) {
    const img = ctx.createImageData(c.width, c.height);
    const px = new Uint32Array(img.data.buffer);
    px.fill(0xffffffff);
    const dot = 0xffb08a5f;  // ABGR, little-endian: a muted blue
    const { xy } = map, w = c.width, h = c.height;
    for (let i = 0; i < xy.length / 2; i++) {
      const [x, y] = toCanvas(c, xy[2 * i], xy[2 * i + 1]);
      const xi = x | 0, yi = y | 0;
      if (xi >= 0 && yi >= 0 && xi < w - 1 && yi < h - 1) {
        const o = yi * w + xi;
        px[o] = dot; px[o + 1] = dot; px[o + w] = dot; px[o + w + 1] = dot;
      }
    }
    map.base = img;
  }
  function drawSelection(ctx) {
    const d = map.drag;
    if (!d) return;
    ctx.strokeStyle = "#0b5cad";
    ctx.lineWidth = 1.5;
    if (d.lasso) {
      ctx.beginPath();
      d.path.forEach(([x, y], i) => (i ? ctx.lineTo(x, y) : ctx.moveTo(x, y)));
      ctx.closePath();
      ctx.stroke();
    } else {
      ctx.strokeRect(Math.min(d.x0, d.x1), Math.min(d.y0, d.y1), Math.abs(d.x1 - d.x0), Math.abs(d.y1 - d.y0));
    }
  }
  function drawMap() {
    const c = $("map");
    if (!map.ids || !c) return;
    const ctx = c.getContext("2d");
    if (!map.base) drawBase(c, ctx);
    ctx.putImageData(map.base, 0, 0);
    ctx.fillStyle = "#e8590c";
    for (const h of hitsShown) {
      const i = map.pos.get(h.id);
      if (i === undefined) continue;
      const [x, y] = toCanvas(c, map.xy[2 * i], map.xy[2 * i + 1]);
      ctx.fillRect(x - 3, y - 3, 7, 7);
    }
    drawSelection(ctx);
    c.dataset.drawn = String(Number(c.dataset.drawn || 0) + 1);  // a count of redraws (bench map waits on it)
  }
  function canvasPoint(c, e) {
    const r = c.getBoundingClientRect();
    return [((e.clientX - r.left) * c.width) / r.width, ((e.clientY - r.top) * c.height) / r.height];
  }
  function fromCanvas(c, x, y) {  // the inverse of toCanvas
    const pad = 6;
    return [((x - pad) / (c.width - 2 * pad)) * 2 - 1, 1 - ((y - pad) / (c.height - 2 * pad)) * 2];
  }
  function inPolygon(px, py, poly) {  // even-odd, as the server's filter (edges aside: it keeps them)
    let odd = false;
    for (let i = 0, j = poly.length - 1; i < poly.length; j = i++) {
      const [x1, y1] = poly[i], [x2, y2] = poly[j];
      if ((y1 > py) !== (y2 > py) && px < x1 + ((py - y1) * (x2 - x1)) / (y2 - y1)) odd = !odd;
    }
    return odd;
  }
  function simplify(path) {  // at most MAX_VERTICES vertices, evenly along the drawn path
    if (path.length <= MAX_VERTICES) return path;
    return Array.from({ length: MAX_VERTICES }, (_, i) => path[Math.round((i * (path.length - 1)) / (MAX_VERTICES - 1))]);
  }
  function polygonOf(d) {  // the selection in map coordinates, rounded to 3 decimals
    const c = $("map");
    const px = d.lasso ? simplify(d.path)
      : [[d.x0, d.y0], [d.x1, d.y0], [d.x1, d.y1], [d.x0, d.y1]];
    return px.map(([x, y]) => fromCanvas(c, x, y).map((v) => Math.round(v * 1000) / 1000));
  }
  function mapSelect(d) {
    const c = $("map");
    const xs = d.lasso ? d.path.map((p) => p[0]) : [d.x0, d.x1], ys = d.lasso ? d.path.map((p) => p[1]) : [d.y0, d.y1];
    if (Math.max(...xs) - Math.min(...xs) < 3 || Math.max(...ys) - Math.min(...ys) < 3) return;
    if (d.lasso && d.path.length < 3) return;
    const poly = polygonOf(d);
    let n = 0;
    for (let i = 0; i < map.ids.length; i++) if (inPolygon(map.xy[2 * i], map.xy[2 * i + 1], poly)) n++;
    if (!n) { status(`No items in that ${d.lasso ? "lasso" : "box"}.`, true); return; }
    addClause(`map within (${poly.map(([x, y]) => `${x} ${y}`).join(", ")})`);
  }
  function setLasso(on) {
    map.lasso = on;
    $("map-mode").setAttribute("aria-pressed", String(on));
    $("map-mode").textContent = on ? "Lasso" : "Box";
  }
  function wireMap() {
    const c = $("map");
    $("map-mode").addEventListener("click", () => setLasso(!map.lasso));
    c.addEventListener("pointerdown", (e) => {
      if (!map.ids) return;
      const [x, y] = canvasPoint(c, e);
      map.drag = { x0: x, y0: y, x1: x, y1: y, lasso: map.lasso !== e.shiftKey, path: [[x, y]] };
      c.setPointerCapture(e.pointerId);
    });
    c.addEventListener("pointermove", (e) => {
      const d = map.drag;
      if (!d) return;
      [d.x1, d.y1] = canvasPoint(c, e);
      const [lx, ly] = d.path[d.path.length - 1];
      if (Math.hypot(d.x1 - lx, d.y1 - ly) >= 2) d.path.push([d.x1, d.y1]);
      drawMap();
    });
    c.addEventListener("pointerup", (e) => {
      const d = map.drag;
      if (!d) return;
      [d.x1, d.y1] = canvasPoint(c, e);
      d.path.push([d.x1, d.y1]);
      map.drag = null;
      drawMap();
      mapSelect(d);
    });
  }

  // ---- selection, export, arrow keys ----------------------------------------------------------------------
  let lastPicked = null;
  function toggleSelect(h, range, on) {
    const ids = hitsShown.map((x) => x.id);
    let pick = [h];
    if (range && lastPicked !== null && ids.includes(lastPicked)) {
      const a = ids.indexOf(lastPicked), b = ids.indexOf(h.id);
      pick = hitsShown.slice(Math.min(a, b), Math.max(a, b) + 1);
      on = true;
    }
    for (const x of pick) if (on) selected.set(x.id, x); else selected.delete(x.id);
    lastPicked = h.id;
    showSelection();
  }
  function showSelection() {
    document.querySelectorAll("#col-0 .grid li").forEach((li) => {
      const b = li.querySelector(".hit");
      if (!b) return;
      const on = selected.has(Number(b.dataset.id));
      li.classList.toggle("selected", on);
      li.querySelector(".sel").checked = on;
    });
    $("selection-bar").hidden = !selected.size;
    $("sel-count").textContent = `${selected.size} selected`;
  }
  function exportRows() {
    const rows = [...selected.values()];
    const fields = [...new Set(rows.flatMap((h) => Object.keys(h.metadata || {})))];
    return { rows, fields };
  }
  function csvCell(v) {
    let s = v === null || v === undefined ? "" : typeof v === "object" ? JSON.stringify(v) : String(v);
    if (/^[=+\-@\t\r]/.test(s)) s = "'" + s;  // a spreadsheet must not run a value as a formula
    return /[",\n\r]/.test(s) ? '"' + s.replace(/"/g, '""') + '"' : s;
  }
  function download(text, name, type) {
    const url = URL.createObjectURL(new Blob([text], { type }));
    const a = el("a", { href: url, download: name });
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10_000);
  }
  function exportSelection(format) {
    const { rows, fields } = exportRows();
    const base = ["id", "key", "kind", "caption", "score", "rank"];
    if (format === "csv") {
      const lines = [[...base, ...fields].map(csvCell).join(",")];
      for (const h of rows) lines.push([...base.map((k) => h[k]), ...fields.map((f) => (h.metadata || {})[f])].map(csvCell).join(","));
      download(lines.join("\r\n") + "\r\n", `${state.index}-selection.csv`, "text/csv");
    } else {
      const lines = rows.map((h) => JSON.stringify(Object.assign(Object.fromEntries(base.map((k) => [k, h[k]])), { metadata: h.metadata || {} })));
      download(lines.join("\n") + "\n", `${state.index}-selection.jsonl`, "application/x-ndjson");
    }
  }
  // the whole filtered view (every item that meets the filter, not only the hits shown), by the API's export
  async function exportView(format) {
    const q = new URLSearchParams({ format });
    if (state.filter) q.set("filter", state.filter);
    status("Exporting…");
    try {
      const r = await fetch(`${API}/indexes/${encodeURIComponent(state.index)}/export?${q}`, { credentials: "same-origin" });
      if (!r.ok) {
        let msg = r.statusText;
        try { msg = (await r.json()).error.message; } catch (e) { /* not JSON */ }
        throw new Error(msg);
      }
      const body = await r.blob();  // bytes as sent (a tar is binary)
      const total = Number(r.headers.get("X-Total-Count")), cap = Number(r.headers.get("X-Row-Limit") || total);
      const suffix = format === "wds" ? "tar" : format;
      download(body, `${state.index}-${state.filter ? "filtered" : "all"}.${suffix}`, r.headers.get("Content-Type") || "text/plain");
      status(total > cap ? `Exported the first ${cap} of ${total} items (this server's export limit).` : `Exported ${total} items.`);
    } catch (e) { status(`Export failed: ${e.message}`, true); }
  }
  function gridKeys(e) {
    const b = e.target.closest(".hit");
    if (!b || !["ArrowLeft", "ArrowRight", "ArrowUp", "ArrowDown"].includes(e.key)) return;
    const cards = [...b.closest(".grid").querySelectorAll(".hit")];
    const i = cards.indexOf(b);
    const top = cards[0].getBoundingClientRect().top;  // cards of the first row share it
    let perRow = cards.findIndex((x) => Math.abs(x.getBoundingClientRect().top - top) > 2);
    if (perRow < 1) perRow = cards.length;
    const step = { ArrowLeft: -1, ArrowRight: 1, ArrowUp: -perRow, ArrowDown: perRow }[e.key];
    const next = cards[i + step];
    if (next) { e.preventDefault(); next.focus(); }
  }
  function wireBrowsing() {
    $("filter-form").addEventListener("submit", (e) => { e.preventDefault(); search(); });
    $("filter-clear").addEventListener("click", () => { $("filter").value = ""; search(); });
    $("export-csv").addEventListener("click", () => exportSelection("csv"));
    $("export-jsonl").addEventListener("click", () => exportSelection("jsonl"));
    $("export-view-csv").addEventListener("click", () => exportView("csv"));
    $("export-view-jsonl").addEventListener("click", () => exportView("jsonl"));
    $("export-view-wds").addEventListener("click", () => exportView("wds"));
    $("sel-clear").addEventListener("click", () => { selected.clear(); showSelection(); });
    $("results").addEventListener("keydown", gridKeys);
    wireMap();
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
      state.filter = "";
      $("filter").value = "";
      loadMap();
      loadFacets();
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
    window.addEventListener("popstate", async () => { await fromURL(); renderShowFields(); search(false); });
    wireBrowsing();
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
      loadMap();
      loadFacets();
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
