"""A self-contained HTML report of one ``monet eval`` run.

One file, no external resources: plots and heatmaps are embedded as ``data:image/png;base64``
URIs, the style sheet is inline, there is no script. Sections: run settings and checkpoint,
accuracy tables per latent size, latent diagnostics, ablations (with the latent-usage verdict),
figures, then per-sample answers (reference, extracted prediction, verdict and who decided it, the
output with latent spans highlighted, the predictions under each ablation, and the latent heatmap
for the first samples). Every text from data or model output is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from monet.atomic import atomic_write_text
from monet.eval.report import SampleRecord
from monet.render import SPAN_PLACEHOLDER

_CSS = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:0.5em 0 1.5em}
th,td{border:1px solid #ccc;padding:3px 7px;font-size:13px;vertical-align:top}
th{background:#f0f0f0}td.num{text-align:right}.correct{color:#0a7a2f}.incorrect{color:#b00020}.degenerate{color:#a66f00}
pre{white-space:pre-wrap;word-break:break-word;margin:0;font-size:12px;max-height:18em;overflow:auto}
.latent{background:#ffe08a;border-radius:3px}.verdict{font-weight:bold}img{max-width:100%}
.note{background:#eef4ff;padding:0.6em;border-left:4px solid #4a7bd0}
"""


@dataclass
class HtmlSample:
    """One sample's row: its baseline ``record``, the ``question``, ablated records by ablation
    name, and an optional heatmap PNG."""

    record: SampleRecord
    question: str = ""
    ablated: dict[str, SampleRecord] = field(default_factory=dict)
    heatmap: Path | None = None


def png_data_uri(path: str | os.PathLike) -> str:
    data = Path(path).read_bytes()
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        raise ValueError(f"{path}: not a PNG file")
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def highlight_spans(rendered: str) -> str:
    """Escaped text with every rendered latent span wrapped in ``<span class="latent">``."""
    parts = rendered.split(SPAN_PLACEHOLDER)
    mark = f'<span class="latent">{html.escape(SPAN_PLACEHOLDER)}</span>'
    return mark.join(html.escape(p) for p in parts)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if v is None:
        return "-"
    return html.escape(str(v))


def _table(rows: Sequence[dict], columns: Sequence[str] | None = None) -> str:
    if not rows:
        return "<p>(none)</p>"
    cols = list(columns or rows[0].keys())
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = []
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c)
            cls = ' class="num"' if isinstance(v, (int, float)) and not isinstance(v, bool) else ""
            cells.append(f"<td{cls}>{_fmt(v)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _verdict(rec: SampleRecord) -> str:
    v = html.escape(rec.verdict)
    return f'<span class="verdict {v}">{v}</span> ({html.escape(rec.decided_by)})'


def render_html(report: dict, figures: Sequence[tuple[str, Path]], samples: Sequence[HtmlSample]) -> str:
    """The report page as a string (see module doc)."""
    out = ["<!DOCTYPE html><html><head><meta charset='utf-8'><title>monet eval</title>",
           f"<style>{_CSS}</style></head><body><h1>monet eval</h1>"]
    out.append(f"<p class='note'>{html.escape(str(report.get('latent_usage_summary', '')))}</p>")
    ck = report.get("checkpoint", {})
    out.append(f"<p>checkpoint <code>{html.escape(str(ck.get('model', '')))}</code>, weights sha256 "
               f"<code>{html.escape(str(ck.get('sha256', '')))}</code>; "
               f"created {html.escape(str(report.get('created', '')))}</p>")
    out.append("<details><summary>run settings</summary><pre>" +
               html.escape(json.dumps(report.get("settings", {}), indent=1, default=str)) + "</pre></details>")
    for run in report.get("runs", []):
        k = run["latent_size"]
        out.append(f"<h2>K = {k} ({html.escape(run['layout'])})</h2><h3>accuracy</h3>")
        out.append(_table(run["rows"], ["benchmark", "category", "n", "correct", "accuracy", "ci_low", "ci_high",
                                        "chance", "degenerate", "by_rule", "by_judge", "undecided"]))
        out.append("<h3>latent diagnostics</h3>")
        drows = []
        for bench, d in run["latent_diagnostics"].items():
            norms = d.get("norms") or {}
            drows.append({"benchmark": bench, "answers": d["answers"], "share_with_span": d["share_with_span"],
                          "spans_per_answer": d["spans_per_answer"], "norm_mean": norms.get("mean"),
                          "norm_std": norms.get("std"), "cosine_within": d["cosine_within"],
                          "cosine_across": d["cosine_across"], "effective_rank": d["effective_rank"]})
        out.append(_table(drows))
        out.append("<h3>ablations</h3>")
        out.append(f"<p class='note'>{html.escape(run['latent_usage']['message'])}</p>")
        out.append(_table(run["ablations"]))
    if figures:
        out.append("<h2>figures</h2>")
        for caption, path in figures:
            out.append(f"<figure><img alt='{html.escape(caption)}' src='{png_data_uri(path)}'>"
                       f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    if samples:
        k0 = report["runs"][0]["latent_size"] if report.get("runs") else "?"
        out.append(f"<h2>samples (K = {k0})</h2><table><tr><th>sample</th><th>reference / prediction</th>"
                   "<th>verdict</th><th>output (latent spans highlighted)</th><th>under ablation</th></tr>")
        for hs in samples:
            r = hs.record
            abl = "<br>".join(f"{html.escape(a)}: {_fmt(x.prediction)} {_verdict(x)}" for a, x in hs.ablated.items())
            q = f"<pre>{html.escape(hs.question)}</pre>" if hs.question else ""
            out.append(f"<tr><td>{html.escape(r.sample_id)}<br>spans: {_fmt(r.extra.get('latent_spans'))}</td>"
                       f"<td>{_fmt(r.answer)} / {_fmt(r.prediction)}</td><td>{_verdict(r)}</td>"
                       f"<td>{q}<pre>{highlight_spans(r.text)}</pre></td><td>{abl or '-'}</td></tr>")
            if hs.heatmap is not None:
                out.append(f"<tr><td colspan='5'><img alt='latent heatmap {html.escape(r.sample_id)}' "
                           f"src='{png_data_uri(hs.heatmap)}'></td></tr>")
        out.append("</table>")
    out.append("</body></html>")
    return "\n".join(out)


def write_html_report(path: str | os.PathLike, *, report: dict, figures: Sequence[tuple[str, Path]] = (),
                      samples: Sequence[HtmlSample] = ()) -> Path:
    return atomic_write_text(path, render_html(report, figures, samples))
