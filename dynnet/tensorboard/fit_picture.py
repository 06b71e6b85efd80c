"""The picture of the fit TensorBoard shows at every validation: sin(x) and each degree's fit, drawn as pixels."""

import math
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.transforms import Bbox

# TensorBoard's Images tab shows a picture 350 pixels wide and scales it pixel by pixel (nearest neighbour), which
# drops lines and letters from anything wider. At exactly 350 pixels the thumbnail is the picture itself; 480 high
# gives its three panels room for five tick labels each.
WIDTH, HEIGHT, DPI = 350, 480, 100
# In points: 11 pixels at this DPI, the smallest size that reads comfortably on a screen.
FONT_SIZE = 8
STYLES = ("-", "--", ":", "-.")
# Where a ScaledPanel puts its ticks, as fractions of its current scale.
SCALED_TICKS = (-1.0, -0.5, 0.0, 0.5, 1.0)


class FitPicture:
    """The fit as an RGB image: sin(x) and each degree's fit; each fit minus sin(x); each fit minus the mean of
    the degrees' fits, which tells the degrees apart once their curves coincide. The two lower panels follow the
    size of their curves (see ScaledPanel).

    Everything but the curves is drawn once and kept as a background; each picture restores it and draws only the
    curves (blitting): a few milliseconds, where a full draw takes over a hundred.
    """

    def __init__(self, x: np.ndarray, y: np.ndarray, degrees: list[int]) -> None:
        self.y = y
        self.figure = Figure(figsize=(WIDTH / DPI, HEIGHT / DPI), dpi=DPI)
        canvas = FigureCanvasAgg(self.figure)
        fit, residual, spread = self.figure.subplots(3, 1, sharex=True, height_ratios=[2, 1.2, 1.2])
        columns = 4  # of the legend, above the panels: four entries fit in the picture's width
        rows = math.ceil((len(degrees) + 1) / columns)
        self.figure.subplots_adjust(left=0.2, right=0.97, bottom=0.08, top=1 - 0.06 * rows, hspace=0.12)
        target = fit.plot(x, y, color="0.6", lw=4)[0]  # wide and grey, so that the fits show on top of it
        self.lines = {degree: fit.plot(x, y, **_style(i))[0] for i, degree in enumerate(degrees)}
        labels = ["sin(x)", *(f"degree {degree}" for degree in degrees)]
        self.figure.legend(
            [target, *self.lines.values()], labels, loc="upper center", ncols=min(len(labels), columns),
            fontsize=FONT_SIZE, frameon=False, handlelength=1.3, columnspacing=0.7, handletextpad=0.3,
        )  # fmt: skip
        fit.set(xlim=(float(x[0]), float(x[-1])), ylim=(-1.5, 1.5), yticks=(-1, 0, 1), ylabel="y")
        self.residual = ScaledPanel(residual, x, degrees, "fit − sin(x)")
        self.spread = ScaledPanel(spread, x, degrees, "fit − mean fit")
        spread.set_xlabel("x", fontsize=FONT_SIZE, labelpad=1)
        for axes in (fit, residual, spread):  # in line, and clear of the scaled panels' widest tick labels
            axes.tick_params(labelsize=FONT_SIZE, length=3, pad=2)
            axes.yaxis.label.set_fontsize(FONT_SIZE)
            axes.yaxis.set_label_coords(-0.17, 0.5)
        canvas.draw()
        self.background = canvas.copy_from_bbox(self.figure.bbox)

    def draw(self, predictions: dict[int, np.ndarray]) -> np.ndarray:
        """The picture for ``predictions`` (degree -> values at x) as a height x width x 3 uint8 array."""
        canvas = self.figure.canvas
        canvas.restore_region(self.background)
        for degree, line in self.lines.items():
            line.set_ydata(predictions[degree])
            line.axes.draw_artist(line)
        mean = np.mean(list(predictions.values()), axis=0)
        self.residual.draw({degree: p - self.y for degree, p in predictions.items()})
        self.spread.draw({degree: p - mean for degree, p in predictions.items()})
        return np.asarray(canvas.buffer_rgba())[..., :3].copy()  # the buffer is reused by the next picture


class ScaledPanel:
    """A panel of one curve per degree whose scale follows the curves' size: from hundreds early in training to
    thousandths at its end.

    Its limits never change, so the figure's background stays valid: it draws the curves divided by a round scale
    and labels its ticks in that scale. The labels are drawn once per scale and kept as pixels, since text is the
    slowest thing to draw.
    """

    def __init__(self, axes: Axes, x: np.ndarray, degrees: list[int], ylabel: str) -> None:
        self.axes = axes
        self.lines = {degree: axes.plot(x, np.zeros_like(x), **_style(i))[0] for i, degree in enumerate(degrees)}
        axes.set(ylim=(-1.1, 1.1), yticks=SCALED_TICKS, ylabel=ylabel)
        axes.tick_params(axis="y", labelleft=False)  # drawn by _draw_tick_labels, for the current scale
        axes.axhline(0, color="k", lw=0.5)
        self.tick_labels = [
            axes.text(
                -0.015,
                tick,
                "",
                transform=axes.get_yaxis_transform(),
                ha="right",
                va="center",
                animated=True,
                fontsize=FONT_SIZE,
            )  # fmt: skip
            for tick in SCALED_TICKS
        ]
        self.tick_pixels: dict[float, Any] = {}  # scale -> its tick labels, drawn

    def draw(self, curves: dict[int, np.ndarray]) -> None:
        scale = round_scale(max(float(np.abs(c).max()) for c in curves.values()))
        self._draw_tick_labels(scale)
        for degree, line in self.lines.items():
            line.set_ydata(curves[degree] / scale)
            self.axes.draw_artist(line)

    def _draw_tick_labels(self, scale: float) -> None:
        canvas = self.axes.figure.canvas
        if scale in self.tick_pixels:
            canvas.restore_region(self.tick_pixels[scale])
            return
        for label, tick in zip(self.tick_labels, SCALED_TICKS):
            label.set_text(_tick_label(tick * scale))
            self.axes.draw_artist(label)
        # Left of the panel, from a little below its bottom tick to a little above its top one.
        panel = self.axes.get_window_extent()
        area = Bbox.from_extents(0, panel.y0 - DPI / 12, panel.x0, panel.y1 + DPI / 12)
        self.tick_pixels[scale] = canvas.copy_from_bbox(area)


def _style(i: int) -> dict[str, Any]:
    """The i-th degree's line: its own colour and line style, so that curves on top of each other still show."""
    return {"color": f"C{i % 10}", "ls": STYLES[i % len(STYLES)], "lw": 1.5, "animated": True}


def _tick_label(value: float) -> str:
    """As matplotlib labels ticks: the shortest form, and a minus sign rather than a hyphen."""
    return f"\N{MINUS SIGN}{-value:g}" if value < 0 else f"{value:g}"


def round_scale(peak: float) -> float:
    """The smallest 1, 2 or 5 times a power of ten at or above ``peak``: a limit whose tick labels read well."""
    if not (math.isfinite(peak) and peak > 0):
        return 1.0
    power = 10.0 ** math.floor(math.log10(peak))
    return next(m * power for m in (1, 2, 5, 10) if m * power >= peak)
