"""The self-contained HTML report: line charts as inline SVG, sample grids as inline PNG, a table of figures."""

from __future__ import annotations

import base64
import html
import io
import math
import os

from torch import Tensor

from latentdiff.images import make_grid, to_pil
from latentdiff.io import atomic_path

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b")


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About n round tick values covering [lo, hi]."""
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    step = 10 ** math.floor(math.log10(raw))
    step *= min((m for m in (1, 2, 5, 10) if m * step >= raw), default=10)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def svg_chart(title: str, series: dict[str, list[tuple[float, float]]], xlabel: str, ylabel: str,
              logx: bool = False, width: int = 440, height: int = 270) -> str:
    """A line chart, one polyline with markers per series; non-finite points are skipped."""
    points = {k: [(x, y) for x, y in v if math.isfinite(y) and (x > 0 or not logx)] for k, v in series.items()}
    xs = [x for v in points.values() for x, _ in v]
    ys = [y for v in points.values() for _, y in v]
    if not xs:
        return f"<p>{html.escape(title)}: no data</p>"
    fx = (lambda x: math.log10(x)) if logx else (lambda x: x)
    x0, x1 = fx(min(xs)), fx(max(xs))
    y0, y1 = min(ys), max(ys)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    if y1 == y0:
        y0, y1 = y0 - (abs(y0) or 1) * 0.1, y1 + (abs(y1) or 1) * 0.1
    left, right, top, bottom = 58, 120, 28, 42
    pw, ph = width - left - right, height - top - bottom

    def px(x: float) -> float:
        return left + (fx(x) - x0) / (x1 - x0) * pw

    def py(y: float) -> float:
        return top + (1 - (y - y0) / (y1 - y0)) * ph

    parts = [(f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
              f'font-size="11"><text x="{left}" y="16" font-size="13" font-weight="bold">{html.escape(title)}</text>'),
             f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>']
    for t in _ticks(y0, y1):
        parts.append(f'<line x1="{left - 4}" x2="{left + pw}" y1="{py(t):.1f}" y2="{py(t):.1f}" stroke="#eee"/>'
                     f'<text x="{left - 6}" y="{py(t) + 4:.1f}" text-anchor="end">{t:.4g}</text>')
    xticks = sorted(set(xs)) if logx or len(set(xs)) <= 8 else _ticks(min(xs), max(xs))
    for t in xticks:
        parts.append(f'<text x="{px(t):.1f}" y="{top + ph + 15}" text-anchor="middle">{t:g}</text>')
    parts.append(f'<text x="{left + pw / 2}" y="{height - 6}" text-anchor="middle">{html.escape(xlabel)}'
                 f'{" (log scale)" if logx else ""}</text>'
                 f'<text x="14" y="{top + ph / 2}" transform="rotate(-90 14 {top + ph / 2})" '
                 f'text-anchor="middle">{html.escape(ylabel)}</text>')
    for i, (name, pts) in enumerate(points.items()):
        color = COLORS[i % len(COLORS)]
        pts = sorted(pts)
        if pts:
            coords = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)
            parts.append(f'<polyline points="{coords}" fill="none" stroke="{color}" stroke-width="2"/>')
            parts += [f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" fill="{color}"/>' for x, y in pts]
        parts.append(f'<line x1="{left + pw + 10}" x2="{left + pw + 26}" y1="{top + 10 + 16 * i}" '
                     f'y2="{top + 10 + 16 * i}" stroke="{color}" stroke-width="2"/>'
                     f'<text x="{left + pw + 30}" y="{top + 14 + 16 * i}">{html.escape(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def png_data_uri(images: Tensor, ncols: int = 8) -> str:
    """A grid of (N, 3, H, W) images in [-1, 1] as an inline PNG."""
    buffer = io.BytesIO()
    make_grid(to_pil(images), ncols=ncols).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _figure(row: dict, name: str) -> float:
    """One figure of a settings row by a dotted name, NaN when absent."""
    value = row
    for part in name.split("."):
        if not isinstance(value, dict) or part not in value:
            return float("nan")
        value = value[part]
    return float(value)


FIGURES = (("fid", "FID"), ("kid.mean", "KID"), ("precision", "precision"), ("recall", "recall"),
           ("judge_heldout.all_correct", "judge: held-out prompts all correct"),
           ("judge_train_captions.all_correct", "judge: training captions all correct"), ("clip_score", "CLIP score"))


def charts(report: dict) -> list[str]:
    """Every figure against sampler steps (one line per sampler), against guidance, against training step."""
    cfg, rows = report["config"], report["settings"]
    out = []
    for key, label in FIGURES:
        if all(math.isnan(_figure(r, key)) for r in rows):
            continue
        by_sampler = {s: [(r["steps"], _figure(r, key)) for r in rows
                          if r["sampler"] == s and r["guidance"] == cfg["base_guidance"]] for s in cfg["samplers"]}
        out.append(svg_chart(f"{label} vs sampler steps (guidance {cfg['base_guidance']:g})", by_sampler,
                             "sampler steps", label, logx=True))
        by_guidance = [(r["guidance"], _figure(r, key)) for r in rows
                       if r["sampler"] == cfg["base_sampler"] and r["steps"] == cfg["base_steps"]]
        out.append(svg_chart(f"{label} vs guidance ({cfg['base_sampler']}, {cfg['base_steps']} steps)",
                             {cfg["base_sampler"]: by_guidance}, "guidance scale", label))
        if report.get("training"):
            out.append(svg_chart(f"{label} vs training step", {"eval hook": [(r["step"], _figure(r, key))
                                                                                for r in report["training"]]},
                                 "training step", label))
    return out


def _table(rows: list[dict]) -> str:
    head = ["sampler", "steps", "guidance", "FID", "KID (± s.e.)", "precision", "recall", "judge held-out",
            "judge captions", "seconds"]
    lines = ["<table><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>"]
    for r in rows:
        cells = [r["sampler"], r["steps"], f"{r['guidance']:g}", f"{r['fid']:.3f}",
                 f"{r['kid']['mean']:.4f} ± {r['kid']['stderr']:.4f}", f"{r['precision']:.3f}", f"{r['recall']:.3f}",
                 f"{_figure(r, 'judge_heldout.all_correct'):.3f}", f"{_figure(r, 'judge_train_captions.all_correct'):.3f}",
                 r["seconds"]["total"]]
        lines.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
    return "\n".join(lines) + "</table>"


def write_html(path: str | os.PathLike, report: dict, grids: dict[str, Tensor]) -> None:
    """Write the report page atomically; ``grids`` maps "sampler|steps|guidance" to sample images."""
    cfg = report["config"]
    body = [(f"<h1>latentdiff evaluation</h1><p>model <code>{html.escape(report['model'])}</code>, "
             f"{report['image_size']} px; features <code>{html.escape(report['extractor'])}</code>; "
             f"{cfg['n_samples']} generated vs {cfg['n_reference']} reference images per setting; "
             f"judge on {cfg['n_judge']} held-out prompts; {report.get('seconds', '?')} s.</p>"),
            "<h2>Figures</h2>", '<div class="charts">' + "".join(charts(report)) + "</div>",
            "<h2>All settings</h2>", _table(report["settings"])]
    if "memorization" in report:
        m = report["memorization"]
        body.append("<h2>Memorization</h2><ul>" + "".join(
            f"<li>{space}: {m[space]['near_copy_rate']:.3f} of {m[space]['n']} samples flagged as near-copies "
            f"(rule: {html.escape(m[space]['rule'])}; threshold {m[space]['threshold']:.4g}; a model that does not "
            f"copy flags about {m[space]['expected_rate_without_copying']})</li>" for space in ("pixels", "features"))
            + "</ul>")
    body.append("<h2>Samples</h2>")
    for key, images in grids.items():
        if len(images):
            sampler, steps, guidance = key.split("|")
            body.append(f'<figure><img src="{png_data_uri(images)}" width="{min(8, len(images)) * 72}"><figcaption>'
                        f"{html.escape(sampler)}, {steps} steps, guidance {float(guidance):g}</figcaption></figure>")
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>latentdiff evaluation</title><style>"
            "body{font-family:sans-serif;margin:24px;max-width:1400px} .charts svg{margin:6px} "
            "table{border-collapse:collapse} td,th{border:1px solid #ccc;padding:3px 8px;text-align:right} "
            "figure{display:inline-block;margin:8px} img{image-rendering:pixelated}</style></head><body>"
            + "\n".join(body) + "</body></html>")
    with atomic_path(path) as tmp:
        tmp.write_text(page)


def write_samples_html(path: str | os.PathLike, report: dict, images: Tensor) -> None:
    """The report page of a folder of samples against a reference: its figures and a grid of samples."""
    ref = report["reference"]
    ref_text = f"folder <code>{html.escape(ref['folder'])}</code>" if "folder" in ref else "the shapes set"
    rows = [("FID", report.get("fid")), ("KID", report.get("kid", {}).get("mean")),
            ("KID standard error", report.get("kid", {}).get("stderr")), ("precision", report.get("precision")),
            ("recall", report.get("recall"))]
    table = "<table>" + "".join(f"<tr><th>{name}</th><td>{value:.4g}</td></tr>" for name, value in rows
                                if value is not None) + "</table>"
    body = (f"<h1>latentdiff evaluation of samples</h1><p>{report['n_samples']} images from "
            f"<code>{html.escape(report['samples'])}</code> ({report['image_size']} px) against {ref['n']} reference "
            f"images from {ref_text}; features <code>{html.escape(report['extractor'])}</code>; "
            f"{report.get('seconds', '?')} s.</p>{table}")
    if len(images):
        body += f'<h2>Samples</h2><img src="{png_data_uri(images)}" width="{min(8, len(images)) * 72}">'
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>latentdiff evaluation</title><style>"
            "body{font-family:sans-serif;margin:24px} table{border-collapse:collapse} "
            "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right} img{image-rendering:pixelated}"
            "</style></head><body>" + body + "</body></html>")
    with atomic_path(path) as tmp:
        tmp.write_text(page)
