"""The eval report: markdown tables of the served assistant (base, tuned, the paired difference, each
with its 95 % interval), the diagnostics, reference rows, and a bar chart with error bars."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ragtune.stats import format_ci

# (row title, metrics path, paired-difference key)
HEADLINE = [
    ("CMRC official EM (served)", "served.cmrc.official_em", "served_cmrc.official_em"),
    ("CMRC official F1 (served)", "served.cmrc.official_f1", "served_cmrc.official_f1"),
    ("GSM8K accuracy (served)", "served.gsm8k.accuracy", "served_gsm8k.accuracy"),
    ("maths answers with \\boxed{}", "served.gsm8k.boxed", "served_gsm8k.boxed"),
    ("abstains: article not in the KB", "unanswerable.abstained", "unanswerable.abstained"),
    ("abstains: answerable (served)", "served.cmrc.abstained", "served_cmrc.abstained"),
    ("router accuracy (served)", "served.router.routed_right", None),
]
DIAGNOSTICS = [
    ("CMRC official EM, gold chunk as context", "gold_context.official_em", "gold_context.official_em"),
    ("CMRC official F1, gold chunk as context", "gold_context.official_f1", "gold_context.official_f1"),
    ("CMRC strict EM (the seed's), served", "served.cmrc.strict_em", None),
    ("CMRC strict EM (the seed's), gold chunk", "gold_context.strict_em", None),
    ("CMRC answer copied from its passages, served", "served.cmrc.containment", None),
    ("CMRC similarity (the seed's), gold chunk", "gold_context.similarity", None),
    ("gold chunk among the served passages", "served.cmrc.gold_retrieved", None),
]
CHART = [("EM", "served.cmrc.official_em"), ("F1", "served.cmrc.official_f1"), ("GSM8K", "served.gsm8k.accuracy"),
         ("abstain\n(unanswerable)", "unanswerable.abstained"), ("gold EM", "gold_context.official_em"),
         ("gold F1", "gold_context.official_f1")]


def lookup(metrics: Mapping[str, Any], path: str) -> Any:
    node: Any = metrics
    for key in path.split("."):
        if not isinstance(node, Mapping) or key not in node:
            return None
        node = node[key]
    return node


def cell(stat: Any) -> str:
    if not isinstance(stat, Mapping) or "mean" not in stat:
        return "–"
    return format_ci(stat["mean"], stat["low"], stat["high"])


def diff_cell(diff: Any) -> str:
    if not isinstance(diff, Mapping):
        return "–"
    text = format_ci(diff["mean_diff"], diff["low"], diff["high"])
    return ("+" if diff["mean_diff"] >= 0 else "") + text


def table(rows: list[tuple[str, str, str | None]], columns: Mapping[str, Mapping[str, Any]],
          diffs: Mapping[str, Any] | None) -> list[str]:
    names = list(columns)
    head = "| metric (%) | " + " | ".join(names) + (" | tuned − base |" if diffs is not None else " |")
    lines = [head, "|" + "---|" * (len(names) + 1 + (diffs is not None))]
    for title, path, diff_key in rows:
        if all(lookup(m, path) is None for m in columns.values()):
            continue
        cells = [cell(lookup(m, path)) for m in columns.values()]
        if diffs is not None:
            cells.append(diff_cell(diffs.get(diff_key)) if diff_key else "–")
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    return lines


def reference_lines(references: Mapping[str, Any]) -> list[str]:
    if not references:
        return []
    lines = ["## Reference: the seed's published numbers (not measured here)", "",
             "| source | numbers |", "|---|---|"]
    for name, ref in references.items():
        if isinstance(ref, str):
            lines.append(f"| {name} | {ref} |")
        else:
            shown = ", ".join(f"{k} {100 * v:.2f} %" if isinstance(v, (int, float)) else f"{k}: {v}" for k, v in ref.items())
            lines.append(f"| {name} | {shown} |")
    return lines + [""]


def markdown_report(columns: Mapping[str, Mapping[str, Any]], diffs: Mapping[str, Any] | None,
                    header: list[str], references: Mapping[str, Any] | None = None,
                    retrieval: Mapping[str, Any] | None = None) -> str:
    """The whole report.md: `columns` maps a row name (base, tuned, an endpoint) to its metrics."""
    lines = [*header, "", "## The served assistant", "", *table(HEADLINE, columns, diffs), "",
             "## Diagnostics", "", *table(DIAGNOSTICS, columns, diffs), ""]
    if retrieval:
        shown = ", ".join(f"{k} {v:.3f}" for k, v in retrieval.items() if isinstance(v, float))
        lines += [f"Retrieval ({retrieval.get('kind')}, all {retrieval.get('queries')} held-out questions, relevant = "
                  f"every chunk holding a gold answer): {shown}", ""]
    lines += reference_lines(references or {})
    return "\n".join(lines) + "\n"


def bar_chart(columns: Mapping[str, Mapping[str, Any]], path: str | Path, title: str = "") -> None:
    """Grouped bars with 95 % error bars: one group per headline metric, one bar per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(columns)
    x = np.arange(len(CHART))
    width = 0.8 / max(1, len(names))
    fig, ax = plt.subplots(figsize=(10, 4.2))
    for i, name in enumerate(names):
        stats = [lookup(columns[name], p) or {"mean": 0, "low": 0, "high": 0} for _, p in CHART]
        means = np.array([100 * s["mean"] for s in stats])
        errors = np.array([[100 * (s["mean"] - s["low"]) for s in stats], [100 * (s["high"] - s["mean"]) for s in stats]])
        bars = ax.bar(x + (i - (len(names) - 1) / 2) * width, means, width, yerr=errors, capsize=3, label=name)
        ax.bar_label(bars, fmt="%.0f", fontsize=7, padding=6)
    ax.set_xticks(x, [c[0] for c in CHART], fontsize=8)
    ax.set_ylabel("% (95 % bootstrap interval)")
    ax.set_ylim(0, 105)
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
