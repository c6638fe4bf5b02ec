"""The ``inspect`` figure: heat-maps of metaquery-state norms, block recipes and similarities.

matplotlib is imported inside the functions that draw, so generating never imports it.
"""
from __future__ import annotations

import math

import torch

from .conditioning import LadderConditioning
from .text import shorten

__all__ = ["MAX_SOURCES_PLOTTED", "draw_inspection"]

MAX_SOURCES_PLOTTED = 4


def _padded(rows: torch.Tensor, total: int) -> torch.Tensor:
    """[kept, ...] -> [total, ...], NaN (drawn grey, 'not kept') beyond the kept rows."""
    if rows.shape[0] >= total:
        return rows[:total]
    pad = torch.full((total - rows.shape[0], *rows.shape[1:]), float("nan"))
    return torch.cat([rows, pad])


def _recipe_matrix(cond: LadderConditioning, source: int) -> torch.Tensor:
    """[num_rungs, num_blocks]: the weight with which block i reads rung r of ``source`` (NaN: not read)."""
    matrix = torch.full((cond.model.num_rungs, cond.num_blocks), float("nan"))
    for block, terms in enumerate(cond.blocks):
        for term in terms:
            if term.source == source:
                previous = matrix[term.rung, block]
                matrix[term.rung, block] = term.weight if torch.isnan(previous) else previous + term.weight
    return matrix


def _heatmap(fig, ax, values, *, title, xlabel, ylabel, cmap, vmin=None, vmax=None, annotate=False, label=""):
    import numpy as np

    data = np.ma.masked_invalid(values.numpy())
    colormap = _colormap(cmap)
    image = ax.imshow(data, aspect="auto", cmap=colormap, vmin=vmin, vmax=vmax, interpolation="nearest")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    rows, cols = values.shape
    ax.set_yticks(range(rows))
    ax.set_yticklabels([str(r) for r in range(rows)], fontsize=6 if rows > 24 else 7)
    step = max(1, cols // 32)
    ax.set_xticks(range(0, cols, step))
    ax.tick_params(axis="x", labelsize=6 if cols > 24 else 7)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.02).set_label(label, fontsize=7)
    cells = [(rc, v) for rc, v in np.ndenumerate(values.numpy()) if not math.isnan(v)]
    if annotate and len(cells) <= 200:
        for (r, c), value in cells:
            ax.text(c, r, f"{value:.2f}", ha="center", va="center", fontsize=5.5 if rows > 24 else 8)
    return image


def _colormap(name: str):
    """A copy of a matplotlib colormap that draws missing values (NaN) light grey."""
    import matplotlib

    return matplotlib.colormaps[name].with_extremes(bad="#d9d9d9")


def draw_inspection(cond, other, norms, rung_sim, block_sim, embedded: bool):
    """The inspect figure as a PIL image (matplotlib's Agg canvas: no display, no pyplot state)."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from PIL import Image

    identity = cond.model
    num_rungs = identity.num_rungs
    shown = min(len(cond.sources), MAX_SOURCES_PLOTTED)
    rows = shown + (1 if other is not None else 0)
    row_height = max(2.6, 0.13 * max(num_rungs, identity.num_dit_blocks) + 1.4)
    fig = Figure(figsize=(13, row_height * rows), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, 2, squeeze=False)
    rung_label = f"MLLM rung (0 embeddings .. {num_rungs - 1} final norm)"
    for index in range(shown):
        source = cond.sources[index]
        more = f" (+{len(source.prompts) - 1} more)" if len(source.prompts) > 1 else ""
        prompt = f"'{shorten(source.prompts[0], 44)}'{more}"
        left, right = axes[index]
        per_token = _padded(norms[index].mean(dim=1), num_rungs)  # [num_rungs, N], mean over prompts
        _heatmap(fig, left, per_token, title=f"s{index} {prompt}\nmetaquery-state norm (red rungs feed a block)",
                 xlabel="metaquery index", ylabel=rung_label, cmap="viridis", label="L2 norm")
        recipe = _recipe_matrix(cond, index)
        used = [r for r in range(num_rungs) if not torch.isnan(recipe[r]).all()]
        for rung in used:  # mark the mapping on the norm map too
            tick = left.get_yticklabels()[rung]
            tick.set_color("red")
            tick.set_fontweight("bold")
        limit = max(1.0, float(np.nanmax(np.abs(recipe.numpy()))) if used else 1.0)
        _heatmap(fig, right, recipe, title=f"s{index}: which rung feeds which DiT block\n(cell = weight; grey = not read; dark = rung not kept)",
                 xlabel="DiT block", ylabel=rung_label, cmap="coolwarm", vmin=-limit, vmax=limit, annotate=True,
                 label="weight")
        for rung in range(source.num_rungs_kept, num_rungs):  # rungs the encode did not keep
            right.axhspan(rung - 0.5, rung + 0.5, color="#bbbbbb", alpha=0.5, linewidth=0)
    if other is not None:
        left, right = axes[shown]
        # Similar prompts stay close to 1 everywhere: start the colour scale just below the lowest value.
        low = float(min(rung_sim.min(), block_sim.min()))
        vmin = max(-1.0, min(0.9, math.floor((low - 0.05) * 10) / 10))
        _heatmap(fig, left, _padded(rung_sim, num_rungs), title="cosine similarity per rung (first sources)",
                 xlabel="prompt", ylabel=rung_label, cmap="RdYlGn", vmin=vmin, vmax=1, annotate=True,
                 label="cosine")
        space = "caption space" if embedded else "metaquery states"
        _heatmap(fig, right, block_sim, title=f"cosine similarity per DiT block ({space})", xlabel="prompt",
                 ylabel="DiT block", cmap="RdYlGn", vmin=vmin, vmax=1, annotate=True, label="cosine")
    if len(cond.sources) > shown:
        fig.suptitle(f"{len(cond.sources) - shown} more sources not drawn (see the summary)", fontsize=8)
    fig.canvas.draw()
    rgba = np.asarray(fig.canvas.buffer_rgba())
    return Image.fromarray(np.ascontiguousarray(rgba[..., :3]), mode="RGB")
