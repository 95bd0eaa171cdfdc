"""The leaderboard as one self-contained static page: ``results/site/index.html`` (`make report`).

No server and no network: styles, the sorting script and the plots (PNG data URIs) are inside the file, so it
opens from disk and from any static host. One sortable table per setting (click a column header: numbers high
to low first, text A to Z, a second click reverses; the page also
reads ``#sort=<column>`` or ``#sort=-<column>`` from its address), with 95 % CIs, tied-with-best marks, paired
p-values, costs, and each row's command and config key; per setting a per-subtask drill-down and its plots.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

import pandas as pd

from bench.analysis.tables import read_table, row_label
from bench.files import write_bytes_atomic

SCRIPT = """
function sortTable(table, col, descending) {
  const body = table.tBodies[0];
  const rows = Array.from(body.rows);
  const key = r => { const c = r.cells[col]; const v = c.dataset.value ?? c.textContent.trim();
                     const n = parseFloat(v); return isNaN(n) ? v.toLowerCase() : n; };
  rows.sort((a, b) => { const x = key(a), y = key(b);
                        const c = (typeof x === typeof y) ? (x < y ? -1 : x > y ? 1 : 0) : (typeof x === 'number' ? -1 : 1);
                        return descending ? -c : c; });
  rows.forEach(r => body.appendChild(r));
  Array.from(table.tHead.rows[0].cells).forEach((h, i) =>
    h.setAttribute('aria-sort', i === col ? (descending ? 'descending' : 'ascending') : 'none'));
}
document.querySelectorAll('table.sortable').forEach(table => {
  Array.from(table.tHead.rows[0].cells).forEach((h, i) => h.addEventListener('click', () => {
    const state = h.getAttribute('aria-sort');  // first click: numbers high to low, text A to Z; then toggle
    const descending = state === 'ascending' || ((!state || state === 'none') && !h.classList.contains('text'));
    sortTable(table, i, descending);
  }));
});
const wanted = new URLSearchParams(location.hash.slice(1)).get('sort');
if (wanted) {
  const descending = wanted.startsWith('-'); const name = wanted.replace(/^-/, '');
  document.querySelectorAll('table.sortable').forEach(table => {
    const i = Array.from(table.tHead.rows[0].cells).findIndex(h => h.dataset.name === name);
    if (i >= 0) sortTable(table, i, descending);
  });
}
"""

STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 2em auto; max-width: 1400px; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1em; font-size: 13px; }
th, td { border-bottom: 1px solid #ddd; padding: 3px 8px; text-align: right; white-space: nowrap; }
th { cursor: pointer; background: #f4f4f4; position: sticky; top: 0; }
th[aria-sort=ascending]::after { content: " ▲"; } th[aria-sort=descending]::after { content: " ▼"; }
td.text, th.text { text-align: left; } tr.tied td { background: #eef8ee; }
code { font-size: 11px; color: #555; } img { max-width: 48%; margin-right: 1%; vertical-align: top; }
.note { color: #555; max-width: 900px; }
"""

COLUMNS = [  # (name, header, numeric, format)
    ("tied_with_best", "tied", False, lambda v: "●" if str(v) == "True" else ""),
    ("method", "method", False, str), ("options", "options", False, str), ("variant", "variant", False, str),
    ("metric", "metric", False, str),
    ("mean", "mean", True, "{:.3f}".format),
    ("ci", "95% CI", False, None),
    ("p_vs_reference", "p vs linear", True, lambda v: "" if pd.isna(v) else f"{v:.3f}"),
    ("p_vs_best_single", "p vs best single", True, lambda v: "" if pd.isna(v) else f"{v:.3f}"),
    ("normalized", "norm", True, lambda v: "" if pd.isna(v) else f"{v:.2f}"),
    ("subtasks_best", "tasks best", True, lambda v: "" if pd.isna(v) else f"{v:g}"),
    ("subtasks_tied", "tasks tied", True, lambda v: "" if pd.isna(v) else f"{v:g}"),
    ("seeds", "seeds", True, str), ("n", "n", True, str),
    ("fit_examples_used", "fit ex", True, lambda v: "" if pd.isna(v) else f"{v:g}"),
    ("fit_steps", "steps", True, lambda v: "" if pd.isna(v) else f"{v:g}"),
    ("fit_seconds", "fit s", True, lambda v: "" if pd.isna(v) else f"{v:.1f}"),
    ("eval_seconds", "eval s", True, lambda v: "" if pd.isna(v) else f"{v:.1f}"),
    ("hardware", "hardware", False, lambda v: "" if pd.isna(v) else str(v)),
    ("command", "command", False, None), ("config_key", "config", False, str),
]


def _cell(name: str, row: pd.Series) -> str:
    if name == "ci":
        return f'<td data-value="{row["ci_low"]:.6f}">[{row["ci_low"]:.3f}, {row["ci_high"]:.3f}]</td>'
    if name == "command":
        return f'<td class="text"><code>{html.escape(str(row["command"]))}</code></td>'
    fmt = next(c[3] for c in COLUMNS if c[0] == name)
    value = row.get(name)
    numeric = next(c[2] for c in COLUMNS if c[0] == name)
    data = f' data-value="{value}"' if numeric and not pd.isna(value) else ""
    css = "" if numeric else ' class="text"'
    return f"<td{css}{data}>{html.escape(fmt(value))}</td>"


def _table(group: pd.DataFrame) -> str:
    head = "".join(f'<th data-name="{n}"{"" if numeric else " class=text"}>{html.escape(h)}</th>'
                   for n, h, numeric, _ in COLUMNS)
    body = "".join(f'<tr{" class=tied" if str(r["tied_with_best"]) == "True" else ""}>'
                   + "".join(_cell(n, r) for n, *_ in COLUMNS) + "</tr>" for _, r in group.iterrows())
    return f'<table class="sortable"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _subtasks(group: pd.DataFrame) -> str:
    labels = [row_label(m, v, o) for m, v, o in zip(group["method"], group["variant"], group["options"])]
    tied = group["tied_with_best"] if "tied_with_best" in group else [False] * len(group)
    group = group.assign(label=labels, cell=[f"{m:.3f} [{lo:.3f}, {hi:.3f}]{' ●' if str(t) == 'True' else ''}"
                                             for m, lo, hi, t in zip(group["mean"], group["ci_low"],
                                                                     group["ci_high"], tied)])
    wide = group.pivot_table(index="subtask", columns="label", values="cell", aggfunc="first", sort=False)
    head = "<th class=text>subtask</th>" + "".join(f"<th>{html.escape(c)}</th>" for c in wide.columns)
    body = "".join("<tr><td class=text>" + html.escape(str(t)) + "</td>"
                   + "".join(f"<td>{html.escape(str(v)) if isinstance(v, str) else ''}</td>" for v in row) + "</tr>"
                   for t, row in wide.iterrows())
    return f'<table class="sortable"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _plots(plots_dir: Path, key: str) -> str:
    images = []
    for path in sorted(plots_dir.glob(f"*_{key}_*.png")) if plots_dir.is_dir() else []:
        data = base64.b64encode(path.read_bytes()).decode()
        images.append(f'<img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}">')
    return "".join(images)


def render(overall: pd.DataFrame, per_subtask: pd.DataFrame, plots_dir: Path) -> str:
    sections = []
    for key, group in overall.groupby("setting", sort=False):
        first = group.iloc[0]
        title = (f"{first['task']} · {first['profile']} · experts {first['experts']} · K={first['fit_examples']} "
                 f"· limit {first['limit']}")
        subtasks = per_subtask[per_subtask["setting"] == key]
        sections.append(
            f'<section id="{key}"><h2>{html.escape(title)} <small>(setting {key})</small></h2>{_table(group)}'
            f"<details><summary>per subtask</summary>{_subtasks(subtasks)}</details>"
            f"<div>{_plots(plots_dir, key)}</div></section>")
    note = ("Mean over seeds of the macro average over subtasks; 95 % CI from a bootstrap over examples and seeds, "
            "paired across the methods of a setting; p-values of paired bootstraps, Holm-corrected within a "
            "setting; rows marked ● (green) are not significantly below the setting's best and are not ranked "
            "among themselves; tasks best / tied: the subtasks where a row has the highest mean / is not "
            "significantly below that subtask's best (● in the per-subtask table). Click a column to sort. Every "
            "row's command re-runs it.")
    return (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>LoRA composition leaderboard</title>"
            f"<style>{STYLE}</style></head><body><h1>LoRA composition leaderboard</h1>"
            f'<p class="note">{html.escape(note)}</p>{"".join(sections)}<script>{SCRIPT}</script></body></html>\n')


def write_site(results_dir: Path, out_dir: Path) -> Path:
    """`results_dir`'s leaderboard CSVs and plots -> `out_dir`/index.html."""
    overall = read_table(results_dir / "leaderboard.csv")
    per_subtask = read_table(results_dir / "leaderboard_subtasks.csv")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "index.html"
    write_bytes_atomic(path, render(overall, per_subtask, results_dir / "plots").encode())
    return path
