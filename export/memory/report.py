"""Render dry-run results: text tables, JSON, and a bar chart against the budget."""

from __future__ import annotations

from blockskip.export.memory.dryrun import PhaseReport
from blockskip.export.memory.tracer import CATEGORIES

LABELS = {
    "frozen_weights": "frozen",
    "trained_base": "span base",
    "lora": "LoRA",
    "gradients": "grads",
    "optimizer": "optim",
    "activations": "activ.",
    "cache": "cache buf",
}


def _unit(reports: list[PhaseReport]) -> tuple[str, float]:
    return ("GiB", 2**30) if max(r.peak for r in reports) >= 2**30 else ("MiB", 2**20)


def table(reports: list[PhaseReport]) -> str:
    unit, div = _unit(reports)
    """Per phase: tensors by category, the runtime (fixed overhead and allocator slack), the process's
    peak, the profile's safety margin kept free on top of it, the budget and the headroom left after
    both (negative: over budget)."""
    cols = [LABELS[c] for c in CATEGORIES] + ["runtime", "peak", "margin", "budget", "headroom"]
    head = f"{'phase (' + unit + ')':<15}" + "".join(f"{c:>10}" for c in cols)
    lines = [head, "-" * len(head)]
    for r in reports:
        vals = [r.tensors.get(c, 0) for c in CATEGORIES] + [
            r.overhead - r.margin,
            r.process_peak,
            r.margin,
            r.budget,
            r.headroom,
        ]
        row = f"{r.phase:<15}" + "".join(f"{v / div:>10.2f}" for v in vals)
        lines.append(row + ("" if r.fits else "   OVER BUDGET"))
    return "\n".join(lines)


def plot(reports: list[PhaseReport], path, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        from blockskip.runtime.errors import BlockSkipError

        raise BlockSkipError("--plot needs matplotlib: pip install matplotlib") from e
    unit, div = _unit(reports)
    fig, ax = plt.subplots(figsize=(7, 4))
    x = range(len(reports))
    bottom = [0.0] * len(reports)
    parts = [(LABELS[c], [r.tensors.get(c, 0) / div for r in reports]) for c in CATEGORIES]
    parts.append(("runtime + slack", [(r.overhead - r.margin) / div for r in reports]))
    parts.append(("safety margin", [r.margin / div for r in reports]))
    for label, vals in parts:
        if any(vals):
            ax.bar(x, vals, bottom=bottom, label=label)
            bottom = [b + v for b, v in zip(bottom, vals)]
    budget = reports[0].budget / div
    if budget:
        ax.axhline(budget, color="red", linestyle="--", label=f"budget {budget:.2f} {unit}")
    ax.set_xticks(list(x), [r.phase for r in reports])
    ax.set_ylabel(unit)
    import textwrap

    ax.set_title("\n".join(textwrap.wrap(title, 90)), fontsize=8)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
