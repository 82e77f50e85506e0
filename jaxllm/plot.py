"""The loss-curve PNG a training run writes, drawn with matplotlib when it is installed.

matplotlib is an optional extra (`pip install 'jaxllm[plot]'`): training needs nothing from
it, so without it a run writes no plot and says how to get one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

INSTALL_HINT = "pip install 'jaxllm[plot]'"
MARKERS_UP_TO = 50  # a series with at most this many points also marks each one (evals: a single point shows)


def loss_curve(path: str | os.PathLike, series: dict[str, tuple[Sequence[float], Sequence[float]]]) -> bool:
    """series: {name: (steps, values)} -> a PNG at `path`, one line per series (non-finite points
    dropped). -> False, and nothing written, when matplotlib is not installed."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        return False
    fig = Figure(figsize=(7.2, 4.2), dpi=100)
    FigureCanvasAgg(fig)  # Agg draws in memory: no display needed, and pyplot's global state is never touched
    ax = fig.subplots()
    for name, (xs, ys) in series.items():
        xs, ys = np.asarray(xs, float), np.asarray(ys, float)
        ok = np.isfinite(xs) & np.isfinite(ys)
        if ok.any():
            ax.plot(xs[ok], ys[ok], marker="o" if ok.sum() <= MARKERS_UP_TO else None, markersize=3, label=name)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per token)")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend()
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")  # a run killed while drawing leaves no half-written plot
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)
    return True
