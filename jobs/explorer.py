"""The token explorer of report.html and compare.html: a table as embedded JSON plus a small vanilla
script (``explorer.js``, inlined), searchable by id or string and sortable; one self-contained file."""

from __future__ import annotations

import html
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

SCRIPT = Path(__file__).with_name("explorer.js")


@dataclass(frozen=True)
class Column:
    key: str  # the DataFrame column
    label: str
    type: str  # "int", "num", "str" or "ids" (a list of token ids, shown as their strings)
    title: str = ""  # the header's tooltip
    digits: int = 2


@dataclass(frozen=True)
class Preset:
    label: str  # e.g. "weakest as A"
    key: str
    dir: int  # 1 ascending, -1 descending


def _values(series: pd.Series, kind: str) -> list:
    """A column as JSON values, vectorised (a 256,000-token table takes seconds otherwise)."""
    if kind == "num":
        values = series.to_numpy(dtype=np.float64)
        out = np.round(values, 4).astype(object)
        out[~np.isfinite(values)] = None  # JSON has no NaN
        return out.tolist()
    if kind == "int":
        return series.to_numpy(dtype=np.int64).tolist()
    if kind == "ids":
        return np.stack(series.to_numpy()).astype(np.int64).tolist() if len(series) else []
    return series.astype(str).tolist()


def data_json(table: pd.DataFrame, columns: list[Column], presets: list[Preset], vocab: list[str] | None = None) -> str:
    """The explorer's data: columns and presets, values column by column (``token`` and ``token_str``
    always, which search and neighbour lists read), and the strings of listed ids outside the table
    (from ``vocab``). Safe inside a <script> element."""
    keys = dict.fromkeys(["token", "token_str", *(c.key for c in columns)])
    kinds = {"token": "int", "token_str": "str", **{c.key: c.type for c in columns}}
    blob = {"columns": [{k: v for k, v in c.__dict__.items() if v != ""} for c in columns],
            "presets": [p.__dict__ for p in presets],
            "values": {k: _values(table[k], kinds[k]) for k in keys}}
    listed = [np.stack(table[c.key].to_numpy()).ravel() for c in columns if c.type == "ids" and len(table)]
    if vocab is not None and listed:
        outside = np.setdiff1d(np.concatenate(listed), table.token.to_numpy())
        blob["strings"] = {int(t): vocab[t] for t in outside if t < len(vocab)}
    return json.dumps(blob, ensure_ascii=False, separators=(",", ":")).replace("</", "<\\/")


def explorer_html(name: str, table: pd.DataFrame, columns: list[Column], presets: list[Preset], caption: str,
                  links: list[tuple[str, str]] = (), vocab: list[str] | None = None) -> str:
    """The explorer's HTML: its controls, an empty table the script fills, its data and the script."""
    options = "".join(f'<option value="{p.key}:{p.dir}">{html.escape(p.label)}</option>' for p in presets)
    link_html = " · ".join(f'<a href="{html.escape(href)}">{html.escape(label)}</a>' for href, label in links)
    return (f'<div class="explorer" id="{name}" data-source="{name}-data">'
            f'<div class="controls"><label>Find a token (id or text) <input type="search" placeholder="e.g. 1000 or #10"></label> '
            f'<label>Order <select>{options}</select></label> <span class="count"></span></div>'
            f'<div class="scroll"><table><caption>{html.escape(caption)}</caption></table></div>'
            f'<button type="button" class="more">show more</button>'
            + (f"<p>Rows as Parquet: {link_html}</p>" if links else "")
            + f'<script type="application/json" id="{name}-data">{data_json(table, columns, presets, vocab)}</script></div>')


def script_html() -> str:
    """The explorer's script, once per page, after every explorer."""
    return f"<script>{SCRIPT.read_text()}</script>"


STYLE = (".explorer .controls{margin:.5em 0}.explorer .scroll{max-height:32em;overflow:auto}"
         ".explorer table{width:100%}.explorer th button{font:inherit;font-weight:bold;background:none;border:0;"
         "cursor:pointer;padding:0}.explorer th[aria-sort=ascending] button::after{content:' ▲'}"
         ".explorer th[aria-sort=descending] button::after{content:' ▼'}.explorer td.num{text-align:right}"
         ".explorer caption{text-align:left;font-style:italic}")
