"""The eval report: a markdown table of the generators side by side, and a bar chart of the same."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

# (column title, task, metric) in table order
COLUMNS = [
    ("CMRC gold EM", "cmrc_gold", "official_em"),
    ("gold EM (strict)", "cmrc_gold", "strict_em"),
    ("gold F1", "cmrc_gold", "official_f1"),
    ("gold contained", "cmrc_gold", "containment"),
    ("gold similarity", "cmrc_gold", "similarity"),
    ("CMRC top-k EM", "cmrc_retrieved", "official_em"),
    ("top-k EM (strict)", "cmrc_retrieved", "strict_em"),
    ("top-k F1", "cmrc_retrieved", "official_f1"),
    ("top-k contained", "cmrc_retrieved", "containment"),
    ("top-k similarity", "cmrc_retrieved", "similarity"),
    ("GSM8K acc.", "gsm8k", "accuracy"),
]
CHART_COLUMNS = [c for c in COLUMNS if c[2] in ("official_em", "official_f1", "containment", "accuracy")]


def _cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, str):
        return value
    return f"{100 * float(value):.1f}"


def markdown_table(generators: Mapping[str, Mapping[str, Any]], references: Mapping[str, Any] | None = None) -> str:
    """Rows: each evaluated generator, then reference rows (a dict of task.metric -> value, or a note)."""
    head = "| generator | " + " | ".join(c[0] for c in COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 1)]
    for name, tasks in generators.items():
        cells = [_cell((tasks.get(task) or {}).get(metric)) for _, task, metric in COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for name, ref in (references or {}).items():
        if isinstance(ref, str):
            cells = [ref] + [""] * (len(COLUMNS) - 1)
        else:
            cells = [_cell(ref.get(f"{task}.{metric}")) for _, task, metric in COLUMNS]
        lines.append(f"| {name} (reference) | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def bar_chart(generators: Mapping[str, Mapping[str, Any]], path: str | Path, title: str = "") -> None:
    """Grouped bars: one group per metric, one bar per generator, in percent."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(generators)
    x = np.arange(len(CHART_COLUMNS))
    width = 0.8 / max(1, len(names))
    fig, ax = plt.subplots(figsize=(10, 4.2))
    for i, name in enumerate(names):
        values = [100 * float((generators[name].get(t) or {}).get(m) or 0) for _, t, m in CHART_COLUMNS]
        bars = ax.bar(x + (i - (len(names) - 1) / 2) * width, values, width, label=name)
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.set_xticks(x, [c[0] for c in CHART_COLUMNS], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("%")
    ax.set_ylim(0, 105)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
