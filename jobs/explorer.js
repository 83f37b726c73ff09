// The token explorer: a searchable, sortable table over the JSON embedded beside it (jobs/explorer.py).
// No library, no network: report.html works offline.
"use strict";
(function () {
  const PAGE = 100;

  function init(root) {
    const data = JSON.parse(document.getElementById(root.dataset.source).textContent);
    const cols = data.columns;
    const values = data.values;
    const n = values[cols[0].key].length;
    const strings = new Map();  // token id -> string, for neighbour lists
    values.token.forEach((t, i) => strings.set(t, values.token_str[i]));
    for (const [t, str] of Object.entries(data.strings || {})) strings.set(Number(t), str);
    const lower = values.token_str.map((s) => s.toLowerCase());
    const input = root.querySelector("input[type=search]");
    const preset = root.querySelector("select");
    const table = root.querySelector("table");
    const count = root.querySelector(".count");
    const more = root.querySelector("button.more");
    let rows = Int32Array.from({length: n}, (_, i) => i);
    let sortKey = null, sortDir = 1, limit = PAGE;

    const head = document.createElement("thead");
    const tr = document.createElement("tr");
    for (const c of cols) {
      const th = document.createElement("th");
      th.scope = "col";
      if (c.type === "ids") {
        th.textContent = c.label;
      } else {
        const b = document.createElement("button");
        b.type = "button";
        b.textContent = c.label;
        b.title = c.title || "";
        b.addEventListener("click", () => sortBy(c.key, sortKey === c.key ? -sortDir : (c.type === "str" ? 1 : -1)));
        th.appendChild(b);
      }
      th.dataset.key = c.key;
      tr.appendChild(th);
    }
    head.appendChild(tr);
    table.appendChild(head);
    const body = document.createElement("tbody");
    table.appendChild(body);

    function cell(c, i) {
      const v = values[c.key][i];
      if (v === null || v === undefined) return "–";
      if (c.type === "num") return v.toFixed(c.digits === undefined ? 2 : c.digits);
      if (c.type === "ids") return v.map((t) => strings.has(t) ? strings.get(t) : "#" + t).join(" · ");
      return String(v);
    }

    function render() {
      body.textContent = "";
      const frag = document.createDocumentFragment();
      const shown = Math.min(limit, rows.length);
      for (let r = 0; r < shown; r++) {
        const i = rows[r];
        const row = document.createElement("tr");
        for (const c of cols) {
          const td = document.createElement("td");
          td.textContent = cell(c, i);
          if (c.type === "num" || c.type === "int") td.className = "num";
          row.appendChild(td);
        }
        frag.appendChild(row);
      }
      body.appendChild(frag);
      count.textContent = `${shown} of ${rows.length} token${rows.length === 1 ? "" : "s"} shown`;
      more.hidden = shown >= rows.length;
      for (const th of head.querySelectorAll("th")) {
        th.setAttribute("aria-sort", th.dataset.key === sortKey ? (sortDir > 0 ? "ascending" : "descending") : "none");
      }
    }

    function sortBy(key, dir) {
      sortKey = key;
      sortDir = dir;
      const v = values[key];
      const isStr = typeof v.find((x) => x !== null) === "string";
      const arr = Array.from(rows);
      arr.sort((i, j) => {
        const a = v[i], b = v[j];
        if (a === null) return b === null ? i - j : 1;  // missing values last, whichever the direction
        if (b === null) return -1;
        const d = isStr ? a.localeCompare(b) : a - b;
        return d !== 0 ? dir * d : i - j;
      });
      rows = Int32Array.from(arr);
      limit = PAGE;
      render();
    }

    function filter() {
      const q = input.value.trim();
      const ql = q.toLowerCase();
      const id = /^#?\d+$/.test(q) ? Number(q.replace("#", "")) : null;
      const picked = [];
      for (let i = 0; i < n; i++) {
        if (!q || values.token[i] === id || lower[i].includes(ql)) picked.push(i);
      }
      if (id !== null) picked.sort((i, j) => (values.token[j] === id) - (values.token[i] === id));  // the id first
      rows = Int32Array.from(picked);
      if (sortKey !== null && id === null) sortBy(sortKey, sortDir);
      else { limit = PAGE; render(); }
    }

    input.addEventListener("input", filter);
    preset.addEventListener("change", () => {
      const [key, dir] = preset.value.split(":");
      if (key) sortBy(key, Number(dir));
    });
    more.addEventListener("click", () => { limit += PAGE * 10; render(); });
    const first = data.presets && data.presets[0];
    if (first) sortBy(first.key, first.dir); else render();
    root.dataset.readyMs = performance.now().toFixed(0);  // since navigation: the time to interactive
    root.dataset.ready = "1";
  }

  for (const root of document.querySelectorAll(".explorer")) init(root);
})();
