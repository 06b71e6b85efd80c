"""sweep.png: every trial's objective against its learning rate, one colour per optimizer, the best one marked."""

import io
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from dynnet.sweep.space import OPTIMIZER, short_name

# A gap at the optimum can come out a hair below 0 in float64: drawn at the floor of the log axis instead.
FLOOR = 1e-16


def plot(rows: list[dict[str, Any]], objective: str, title: str) -> bytes:
    """The PNG of the objective against the learning rate, one colour per optimizer, log axes: completed trials filled,
    pruned ones hollow at their last reported value, failed ones as crosses along the top, the best one ringed by
    a star. Rows are trials.csv's."""
    figure = Figure(figsize=(7, 4.5), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    by_lr = any("lr" in row and row["lr"] != "" for row in rows)
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(short_name(row.get(OPTIMIZER)) if row.get(OPTIMIZER) else "trials", []).append(row)
    for (name, group), color in zip(groups.items(), [f"C{i}" for i in range(10)] * 10):
        for state, style in (("complete", {"marker": "o"}), ("pruned", {"marker": "o", "mfc": "none"})):
            points = [_point(r, objective, by_lr) for r in group if r["state"] == state and r[objective] != ""]
            if points:
                xs, ys = zip(*points)
                axes.plot(xs, ys, ls="none", color=color, ms=6, **style)
        failed = [_x(r, by_lr) for r in group if r["state"] == "failed" and _x(r, by_lr) is not None]
        if failed:
            axes.plot(
                failed,
                [1.0] * len(failed),
                ls="none",
                marker="x",
                color=color,
                transform=axes.get_xaxis_transform(),
                clip_on=False,
            )
        axes.plot([], [], ls="none", marker="o", color=color, label=name)
    best = next((r for r in rows if r["best"] and _x(r, by_lr) is not None), None)
    if best is not None:
        axes.plot(*_point(best, objective, by_lr), ls="none", marker="*", ms=18, mfc="none", mec="black", mew=1.2)
    if by_lr:
        axes.set_xscale("log")
    if any(r[objective] != "" and float(r[objective]) > 0 for r in rows) and objective != "val/log10_gap":
        axes.set_yscale("log")
    handles, _ = axes.get_legend_handles_labels()
    handles += [
        Line2D([], [], ls="none", marker="o", color="0.4", label="complete"),
        Line2D([], [], ls="none", marker="o", mfc="none", color="0.4", label="pruned (last value)"),
        Line2D([], [], ls="none", marker="x", color="0.4", label="failed"),
    ]
    if best is not None:
        handles.append(
            Line2D([], [], ls="none", marker="*", ms=12, mfc="none", mec="black", label=f"best: trial {best['trial']}")
        )
    axes.legend(handles=handles, fontsize="small", loc="best")
    axes.set(xlabel="learning rate" if by_lr else "trial", ylabel=objective, title=title)
    axes.grid(True, which="major", alpha=0.3)
    figure.tight_layout()
    image = io.BytesIO()
    figure.savefig(image, format="png")
    return image.getvalue()


def _point(row: dict[str, Any], objective: str, by_lr: bool) -> tuple[Any, float]:
    return _x(row, by_lr), max(float(row[objective]), FLOOR)


def _x(row: dict[str, Any], by_lr: bool) -> Any:
    if not by_lr:
        return row["trial"]
    return row["lr"] if row.get("lr") not in (None, "") else None
