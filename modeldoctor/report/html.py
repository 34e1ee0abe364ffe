"""A self-contained HTML report: diagnosis, figures, tables, with plots embedded as PNG."""

from __future__ import annotations

import base64
import html
from pathlib import Path

from modeldoctor.checkup.diagnosis import diagnose, estimate_summary
from modeldoctor.report.results import CheckupReport, _atomic_write

SEVERITY_COLORS = {"healthy": "#3a9d5d", "mild": "#e0b13a", "moderate": "#e07b39", "severe": "#c8373b"}
STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { margin-bottom: 0; } .sub { color: #666; margin-top: .2em; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
td, th { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
td:first-child, th:first-child { text-align: left; }
.finding { border-left: 6px solid; padding: .3em .8em; margin: .6em 0; background: #fafafa; }
.badge { color: white; border-radius: 4px; padding: 0 6px; font-size: .85em; }
img { max-width: 100%; border: 1px solid #ddd; margin: .5em 0; }
"""


def _badge(severity: str) -> str:
    return f'<span class="badge" style="background:{SEVERITY_COLORS[severity]}">{severity}</span>'


def _block_kinds(model: dict) -> str:
    """What mixes the tokens, where it is not attention in every block."""
    if model.get("kind") == "state-space":
        return " (state-space: Mamba mixers, no attention)"
    if model.get("kind") == "hybrid":
        return (f" (hybrid: {model.get('attention_blocks')} attention + {model.get('state_space_blocks')} "
                "state-space)")
    return ""


def render_html(report: CheckupReport, images: dict[str, bytes] | None = None) -> str:
    model = report.model
    ref = report.reference
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>Model Doctor: "
             f"{html.escape(str(model.get('name', 'model')))}</title><style>{STYLE}</style></head><body>",
             f"<h1>Checkup of {html.escape(str(model.get('name')))}</h1>",
             f"<p class='sub'>{html.escape(str(model.get('architecture')))}, {model.get('blocks')} blocks"
             f"{_block_kinds(model)}, "
             f"{model.get('parameters', 0) / 1e6:.1f} M parameters · {report.status} in {report.elapsed_s:.0f} s · "
             f"reference perplexity {ref.get('ppl', float('nan')):.3f} on {int(ref.get('tokens', 0))} tokens"
             + (f", knowledge probes {report.reference_knowledge():.1%}" if report.reference_knowledge() is not None
                else "") + f"<br>Every figure is on {html.escape(report.measured_on())}.</p>", "<h2>Diagnosis</h2>"]
    for line in estimate_summary(report):
        parts.append(f"<p><i>{html.escape(line)}</i></p>")
    for finding in diagnose(report):
        parts.append(f"<div class='finding' style='border-color:{SEVERITY_COLORS[finding.severity]}'>"
                     f"<b>{html.escape(finding.title)}</b> {_badge(finding.severity)}<br>{html.escape(finding.text)}"
                     + (f"<br><i>Treatment: {html.escape(finding.recommendation)}</i>" if finding.recommendation
                        else "") + "</div>")
    if images:
        parts.append("<h2>Plots</h2>")
        for name, png in images.items():
            data = base64.b64encode(png).decode("ascii")
            parts.append(f"<h3>{html.escape(name)}</h3><img alt='{html.escape(name)}' src='data:image/png;base64,{data}'>")
    parts.append("<h2>Probes</h2><table><tr><th>probe</th><th>mode</th><th>KL mean</th><th>± se</th><th>KL p99</th>"
                 "<th>same top</th><th>ppl ratio</th><th>knowledge</th><th>verdict</th></tr>")
    for probe in sorted(report.probes, key=lambda p: p.score, reverse=True):
        m = probe.metrics
        mode = probe.spec.mode + (" (estimated)" if probe.estimated else "")
        cells = [html.escape(probe.spec.label), mode] + [
            f"{m[k]:.4g}" if isinstance(m.get(k), (int, float)) else "–"
            for k in ("kl_mean", "kl_stderr", "kl_p99")] + [
            f"{m[k]:.1%}" if isinstance(m.get(k), (int, float)) else "–" for k in ("same_top",)] + [
            f"{m['ppl_ratio']:.3f}" if isinstance(m.get("ppl_ratio"), (int, float)) else "–",
            f"{m['knowledge_accuracy']:.0%}" if isinstance(m.get("knowledge_accuracy"), (int, float)) else "–",
            _badge(probe.severity if probe.bleeding else "healthy")]
        parts.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    parts.append("</table>")
    parts += _experts_section(report)
    parts.append("<h2>Model</h2><table>" + "".join(
        f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(str(v))}</td></tr>" for k, v in model.items()) + "</table>")
    parts.append("<h2>Plan and data</h2><table>" + "".join(
        f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(str(v))}</td></tr>"
        for k, v in {**report.plan, **report.data}.items()) + "</table>")
    parts.append("<p class='sub'>Written by Model Doctor.</p></body></html>")
    return "\n".join(parts)


def _experts_section(report: CheckupReport) -> list[str]:
    """A mixture of experts: the share of evaluation tokens each expert receives, and the probes
    that re-route most tokens."""
    from modeldoctor.checkup.experts import expert_usage, routing_probes

    usage = expert_usage(report)
    if not usage:
        return []
    width = max(len(u) for u in usage.values())
    parts = ["<h2>Experts</h2><p>Share of the evaluation tokens routed to each expert (each token goes to k "
             "experts; 0 % = never used):</p><table><tr><th>block</th>"
             + "".join(f"<th>e{i}</th>" for i in range(width)) + "</tr>"]
    for block, shares in usage.items():
        parts.append(f"<tr><td>{block}</td>" + "".join(f"<td>{s:.0%}</td>" for s in shares) + "</tr>")
    parts.append("</table><p>Probes that send the most tokens to other experts (routing flip rate: tokens whose set "
                 "of experts changes in at least one block):</p><table><tr><th>probe</th><th>flip rate</th>"
                 "<th>load shift</th><th>KL mean</th></tr>")
    for probe in routing_probes(report)[:15]:
        m = probe.metrics
        parts.append(f"<tr><td>{html.escape(probe.spec.label)}</td><td>{m['routing_flip_rate']:.1%}</td>"
                     f"<td>{m.get('load_shift', 0.0):.3f}</td><td>{probe.score:.4g}</td></tr>")
    parts.append("</table>")
    return parts


def write_html(report: CheckupReport, path: str | Path, images: dict[str, bytes] | None = None) -> Path:
    path = Path(path)
    _atomic_write(path, render_html(report, images))
    return path
