"""A static HTML gallery of a job's ok images: ``report/index.html`` plus thumbnails.

The page needs no server and no network: the rows are embedded as JSON in the page, the
thumbnails and full images are relative links, and the script is inline, so it works when
opened straight from ``file://``. Row values are user text (prompts): the JSON is escaped
so it cannot close its script tag, and the script only ever sets ``textContent``.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any

from farm import manifest, storage
from farm.images import open_rgb
from farm.layout import REPORT_DIR

THUMB_DIR = "thumbs"
THUMB_SIZE = 256


@dataclass
class ReportInfo:
    index: str  # path (or URI) of index.html
    images: int  # thumbnails written = ok image rows whose file is there
    missing: list[str] = field(default_factory=list)  # ok image rows whose file is gone: left out
    warnings: list[str] = field(default_factory=list)  # one line each, for stderr

    def summary(self) -> str:
        text = f"wrote {self.index}: {self.images} images"
        if "://" not in self.index:
            text += f"\nopen file://{self.index}"
        return text


def _jsonable(value: Any) -> Any:
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.hex()
    return value


def embed_json(rows: list[dict[str, Any]]) -> str:
    """Rows as JSON safe inside a <script> element: no '<', '>' or '&' appear literally."""
    text = json.dumps([{k: _jsonable(v) for k, v in r.items()} for r in rows], ensure_ascii=False)
    return (
        text.replace("<", "\\u003c")
        .replace(">", "\\u003e")
        .replace("&", "\\u0026")
        .replace("\u2028", "\\u2028")
        .replace("\u2029", "\\u2029")
    )


def _image_base(job_root: str, out_dir: str) -> str:
    """The job folder as a URL relative to the report folder (where images/ lives)."""
    if "://" in job_root or "://" in out_dir:
        return "../" if out_dir.rstrip("/") == storage.join(job_root, REPORT_DIR) else job_root.rstrip("/") + "/"
    rel = os.path.relpath(job_root, out_dir).replace(os.sep, "/")
    return "" if rel == "." else rel + "/"


def write_report(job_root: str, out_dir: str | None = None, thumb_size: int = THUMB_SIZE) -> ReportInfo:
    """Write ``<out_dir>/index.html`` and ``<out_dir>/thumbs/<task_id>.jpg`` for every ok image
    row (each task's latest row) whose image file is there; the others are named in the warnings.

    ``out_dir`` defaults to ``<job_root>/report``. ManifestError for a missing or non-job folder.
    """
    job_root = storage.normalise_root(job_root)
    manifest.open_job(job_root)  # a missing or non-job folder: a one-line ManifestError
    out_dir = storage.normalise_root(out_dir) if out_dir else storage.join(job_root, REPORT_DIR)
    sql = f"SELECT * FROM {manifest.TABLE_NAME} WHERE {manifest.OK_IMAGES} ORDER BY created_at, batch_id, batch_index"
    rows = manifest.query(job_root, sql).to_pylist()

    filesystem, base = storage.open_root(job_root)
    out_fs, out_base = storage.open_root(out_dir)
    shown: list[dict[str, Any]] = []
    missing: list[str] = []
    for row in rows:
        try:
            data = storage.read_bytes(filesystem, storage.join(base, row["image_path"]))
        except FileNotFoundError:  # one lost file costs its thumbnail, not the gallery
            missing.append(row["image_path"])
            continue
        shown.append(row)
        thumb = open_rgb(data)
        thumb.thumbnail((thumb_size, thumb_size))
        buffer = io.BytesIO()
        thumb.save(buffer, format="JPEG", quality=85)
        storage.write_bytes(out_fs, storage.join(out_base, THUMB_DIR, f"{row['task_id']}.jpg"), buffer.getvalue())

    rows = shown
    columns = [name for name, _, _ in manifest.COLUMNS]
    job_name = rows[0]["job"] if rows else job_root.rstrip("/").rsplit("/", 1)[-1]
    page = (
        _PAGE.replace("@@TITLE@@", _html_escape(f"farm report: {job_name}"))
        .replace("@@COLUMNS@@", embed_json([{"c": c} for c in columns]))
        .replace("@@IMAGE_BASE@@", embed_json([{"b": _image_base(job_root, out_dir)}]))
        .replace("@@ROWS@@", embed_json(rows))
    )
    index = storage.join(out_base, "index.html")
    storage.write_bytes(out_fs, index, page.encode("utf-8"))
    return ReportInfo(
        index=index if "://" not in out_dir else storage.join(out_dir, "index.html"),
        images=len(rows),
        missing=missing,
        warnings=[manifest.missing_warning(job_root, missing)] if missing else [],
    )


def _html_escape(text: str) -> str:
    import html

    return html.escape(text, quote=True)


# The page. Placeholders (@@...@@) are filled by write_report; everything a row holds is set
# with textContent or as an attribute value, never parsed as HTML.
_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>@@TITLE@@</title>
<style>
body { font-family: sans-serif; margin: 1em; background: #fafafa; color: #222; }
#filters { display: flex; gap: .5em; align-items: center; margin-bottom: .5em; }
#filter-text { width: 24em; }
#grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(200px, 1fr)); gap: .8em; }
figure.thumb { margin: 0; background: #fff; border: 1px solid #ddd; padding: .4em; cursor: pointer; }
figure.thumb img { width: 100%; height: auto; display: block; }
figure.thumb figcaption { font-size: 12px; overflow-wrap: anywhere; }
figure.thumb .prompt { font-weight: bold; }
figure.thumb .params { color: #555; }
#overlay { position: fixed; inset: 0; background: rgba(0,0,0,.85); display: none; overflow: auto; }
#overlay.open { display: block; }
#overlay-body { display: flex; gap: 1em; padding: 1em; color: #eee; }
#overlay img { max-width: 60vw; max-height: 90vh; }
#overlay table { font-size: 12px; border-collapse: collapse; }
#overlay td { border-bottom: 1px solid #444; padding: 2px 6px; vertical-align: top; overflow-wrap: anywhere; }
#overlay td:first-child { font-weight: bold; white-space: nowrap; }
#close { position: fixed; top: .5em; right: 1em; font-size: 1.5em; }
</style>
</head>
<body>
<h1>@@TITLE@@</h1>
<div id="filters">
<label>Filter <select id="filter-column"><option value="">any column</option></select></label>
<input id="filter-text" type="search" placeholder="text, =value, <number, >number, or column=value">
</div>
<p id="count"></p>
<div id="grid"></div>
<div id="overlay"><button id="close" type="button">&times;</button>
<div id="overlay-body"><img id="full" alt=""><table><tbody id="meta"></tbody></table></div></div>
<script type="application/json" id="columns">@@COLUMNS@@</script>
<script type="application/json" id="image-base">@@IMAGE_BASE@@</script>
<script type="application/json" id="rows">@@ROWS@@</script>
<script>
"use strict";
const ROWS = JSON.parse(document.getElementById("rows").textContent);
const COLUMNS = JSON.parse(document.getElementById("columns").textContent).map(o => o.c);
const BASE = JSON.parse(document.getElementById("image-base").textContent)[0].b;
const PARAMS = ["seed", "guidance", "steps", "scheduler", "width", "height"];
const columnSelect = document.getElementById("filter-column");
const textInput = document.getElementById("filter-text");
const grid = document.getElementById("grid");
const count = document.getElementById("count");
const overlay = document.getElementById("overlay");

function show(value) { return value === null || value === undefined ? "null" : String(value); }

for (const c of COLUMNS) {
  const option = document.createElement("option");
  option.value = c; option.textContent = c;
  columnSelect.appendChild(option);
}

// A filter: {column ("" = any), op ("~" substring, "=", "<", ">", "<=", ">="), value}.
function parseFilter(column, text) {
  text = text.trim();
  let m = text.match(/^([A-Za-z_][A-Za-z0-9_]*)\\s*(<=|>=|=|<|>|~)\\s*(.*)$/);
  if (m && COLUMNS.includes(m[1])) return {column: m[1], op: m[2], value: m[3]};
  m = text.match(/^(<=|>=|=|<|>|~)\\s*(.*)$/);
  if (m) return {column: column, op: m[1], value: m[2]};
  return {column: column, op: "~", value: text};
}

function test(value, op, want) {
  const s = show(value);
  if (op === "~") return s.toLowerCase().includes(want.toLowerCase());
  if (op === "=") {
    if (s === want) return true;
    const a = Number(s), b = Number(want);
    return want !== "" && !isNaN(a) && !isNaN(b) && a === b;
  }
  if (value === null || value === undefined || want === "") return false;
  const a = Number(value), b = Number(want);
  const numeric = !isNaN(a) && !isNaN(b);
  const x = numeric ? a : s, y = numeric ? b : want;
  if (op === "<") return x < y;
  if (op === ">") return x > y;
  if (op === "<=") return x <= y;
  if (op === ">=") return x >= y;
  return false;
}

function matches(row, f) {
  if (f.value === "" && f.op === "~") return true;
  const cols = f.column ? [f.column] : COLUMNS;
  return cols.some(c => test(row[c], f.op, f.value));
}

function figure(row) {
  const fig = document.createElement("figure");
  fig.className = "thumb";
  fig.dataset.taskId = row.task_id;
  const img = document.createElement("img");
  img.src = "thumbs/" + encodeURIComponent(row.task_id) + ".jpg";
  img.alt = show(row.prompt);
  img.loading = "lazy";
  const cap = document.createElement("figcaption");
  const prompt = document.createElement("div");
  prompt.className = "prompt"; prompt.textContent = show(row.prompt);
  const params = document.createElement("div");
  params.className = "params";
  const present = PARAMS.filter(c => row[c] !== null && row[c] !== undefined);
  params.textContent = present.map(c => c + " " + show(row[c])).join(" \\u00b7 ");
  cap.appendChild(prompt); cap.appendChild(params);
  fig.appendChild(img); fig.appendChild(cap);
  fig.addEventListener("click", () => open(row));
  return fig;
}

function render() {
  const f = parseFilter(columnSelect.value, textInput.value);
  const shown = ROWS.filter(r => matches(r, f));
  grid.replaceChildren(...shown.map(figure));
  count.textContent = shown.length + " of " + ROWS.length + " images";
}

function open(row) {
  const full = document.getElementById("full");
  full.src = BASE + show(row.image_path).split("/").map(encodeURIComponent).join("/");
  full.alt = show(row.prompt);
  const meta = document.getElementById("meta");
  meta.replaceChildren();
  for (const c of COLUMNS) {
    const tr = document.createElement("tr");
    const k = document.createElement("td"), v = document.createElement("td");
    k.textContent = c; v.textContent = show(row[c]);
    tr.appendChild(k); tr.appendChild(v); meta.appendChild(tr);
  }
  overlay.classList.add("open");
}

function close() { overlay.classList.remove("open"); }
document.getElementById("close").addEventListener("click", close);
overlay.addEventListener("click", e => { if (e.target === overlay || e.target.id === "overlay-body") close(); });
document.addEventListener("keydown", e => { if (e.key === "Escape") close(); });

// An initial filter from the URL hash: index.html#seed=2, #guidance>5, #cat (any column).
function fromHash() {
  let text = "";
  try { text = decodeURIComponent(location.hash.replace(/^#/, "")); } catch (e) { text = ""; }
  const f = parseFilter("", text);
  const value = f.column && f.op !== "~" ? f.op + f.value : f.value;
  // The defaults (the selected / value attributes) too: a form reset returns to the hash's filter.
  for (const option of columnSelect.options) option.defaultSelected = option.value === f.column;
  columnSelect.value = f.column;
  textInput.defaultValue = value;
  textInput.value = value;
  render();
}
columnSelect.addEventListener("change", render);
textInput.addEventListener("input", render);
window.addEventListener("hashchange", fromHash);
fromHash();
</script>
</body>
</html>
"""
