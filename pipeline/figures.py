"""Figures as PNG bytes (matplotlib, Agg backend): attention grids, training curves, bar charts, image grids."""

from __future__ import annotations

import io
import textwrap
from typing import Any, Collection, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

DPI = 100


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def overlay(grey: np.ndarray, heat: np.ndarray, alpha: float = 0.6, cmap: str = "jet") -> np.ndarray:
    """A heat map in [0, 1] over a grey image in [0, 1], both (H, W) -> (H, W, 3) float RGB in [0, 1]."""
    colours = matplotlib.colormaps[cmap](np.clip(heat, 0.0, 1.0))[..., :3]
    return alpha * colours + (1.0 - alpha) * grey[..., None]


def attention_mosaic(image: np.ndarray, maps: np.ndarray, alpha: float = 0.6, gap: int = 4) -> np.ndarray:
    """The pixels of :func:`attention_grid`: (K (h + gap) - gap, C (w + gap) - gap, 3) float RGB in [0, 1].

    ``maps`` (G, S, K, h, w); C = 1 + G·S columns. Token ``k``'s row starts at ``k (h + gap)``; the final
    image (h, w, 3 uint8) fills the first cell of row 0 (the first column is white below it), and the map of
    group ``g`` at step ``s`` lies in column ``1 + g·S + s`` over the grey image.
    """
    groups, steps, tokens, h, w = maps.shape
    if image.shape[:2] != (h, w):
        raise ValueError(f"image {image.shape[:2]} and maps {(h, w)} must have the same size")
    cols = 1 + groups * steps
    mosaic = np.ones((tokens * (h + gap) - gap, cols * (w + gap) - gap, 3))
    mosaic[:h, :w] = image / 255.0
    grey = image.astype(np.float64).mean(axis=-1) / 255.0
    for k in range(tokens):
        for g in range(groups):
            for s in range(steps):
                y, x = k * (h + gap), (1 + g * steps + s) * (w + gap)
                mosaic[y:y + h, x:x + w] = overlay(grey, maps[g, s, k], alpha)
    return mosaic


def attention_grid(
    image: np.ndarray,
    maps: np.ndarray,
    group_labels: Sequence[str],
    step_labels: Sequence[str],
    token_labels: Sequence[str],
    title: str = "",
    alpha: float = 0.6,
    gap: int = 4,
    colour_scale: tuple[float, str] | None = None,
) -> bytes:
    """A grid of attention maps beside the final image, as PNG bytes.

    Args:
        image: the final image, (h, w, 3) uint8 at the cell size.
        maps: (G, S, K, h, w) maps in [0, 1] (G resolution groups, S denoising steps, K word tokens),
            upsampled to the cell size.
        group_labels, step_labels, token_labels: G, S and K labels.
        title: figure title (prompt and model).
        alpha: opacity of the heat map over the grey image.
        gap: white pixels between cells.
        colour_scale: (value that 1.0 stands for, label) of a colour bar under the grid; None: no bar.

    Layout: one row per word token; the final image in the first column of the first row, then one block
    of S step columns per group. Cells are composed into one mosaic (one ``imshow``), so the figure costs
    the same whatever the number of cells.
    """
    groups, steps, tokens, h, w = maps.shape
    if (groups, steps, tokens) != (len(group_labels), len(step_labels), len(token_labels)):
        raise ValueError(f"maps of shape {maps.shape} do not match {len(group_labels)} groups, "
                         f"{len(step_labels)} steps and {len(token_labels)} tokens")
    mosaic = attention_mosaic(image, maps, alpha, gap)
    height, width = mosaic.shape[:2]
    bar = 0.6 if colour_scale else 0.0  # inches under the grid for the colour bar
    fig_w, fig_h = width / DPI + 1.0, height / DPI + 1.0 + bar
    fig = plt.figure(figsize=(fig_w, fig_h), dpi=DPI)
    ax = fig.add_axes((0.8 / fig_w, (0.05 + bar) / fig_h, width / DPI / fig_w, height / DPI / fig_h))
    ax.imshow(mosaic, interpolation="nearest")
    ax.set_axis_off()
    for k, label in enumerate(token_labels):
        ax.text(-6, k * (h + gap) + h / 2, label, ha="right", va="center", fontsize=8)
    ax.text(w / 2, -4, "final image", ha="center", va="bottom", fontsize=7)
    for g, group in enumerate(group_labels):
        for s, step in enumerate(step_labels):
            ax.text((1 + g * steps + s) * (w + gap) + w / 2, -4, f"{group}\n{step}", ha="center", va="bottom",
                    fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    if colour_scale:
        top, label = colour_scale
        cax = fig.add_axes((0.8 / fig_w, 0.3 / fig_h, min(width / DPI, 3.0) / fig_w, 0.12 / fig_h))
        mappable = matplotlib.cm.ScalarMappable(matplotlib.colors.Normalize(0.0, top), cmap="jet")
        cbar = fig.colorbar(mappable, cax=cax, orientation="horizontal")
        cbar.set_label(label, fontsize=7)
        cbar.ax.tick_params(labelsize=7)
    return _png(fig)


def curves_figure(table: pd.DataFrame, x: str = "step", title: str = "") -> bytes:
    """One small line plot per numeric column of ``table`` against column ``x`` (or the row number), 4 per row."""
    xs = table[x] if x in table.columns else pd.Series(np.arange(len(table)), name="row")
    columns = [c for c in table.columns if c != x and pd.api.types.is_numeric_dtype(table[c])]
    if not columns:
        raise ValueError(f"no numeric columns to plot besides {x!r}; columns: {list(table.columns)}")
    ncols = min(4, len(columns))
    nrows = -(-len(columns) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 2.4 * nrows), squeeze=False)
    for ax in axes.flat[len(columns):]:
        ax.set_visible(False)
    for ax, column in zip(axes.flat, columns):
        ax.plot(xs, table[column], linewidth=1.2)
        ax.set_title(column, fontsize=9)
        ax.set_xlabel(xs.name, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _png(fig)


def lines_with_errors(panels: Mapping[str, Mapping[str, tuple[Sequence[float], Sequence[float], Sequence[float]]]],
                      xlabel: str, per_row: int = 3) -> bytes:
    """One panel per entry of ``panels`` (title -> {series name: (x, y, y error)}): lines with markers and
    error bars (a NaN error draws none, a NaN value leaves a gap)."""
    ncols = min(per_row, len(panels))
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.0 * nrows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (title, series) in zip(axes.flat, panels.items()):
        for name, (xs, ys, errs) in series.items():
            errs = np.asarray(errs, dtype=float)
            ax.errorbar(xs, ys, yerr=None if np.all(np.isnan(errs)) else np.nan_to_num(errs), marker="o",
                        markersize=3, linewidth=1.2, capsize=3, label=name)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)


def grouped_bars(panels: Mapping[str, Mapping[str, tuple[Sequence[float], Sequence[float]]]],
                 categories: Sequence[str], hatched: Collection[str] = (), ylabel: str = "",
                 per_row: int | None = None, sharey: bool = True) -> bytes:
    """Bar charts, one per panel, ``per_row`` to a row (default all in one row), as PNG bytes.

    ``panels``: panel title -> series label -> (means, stds), each of ``len(categories)`` values. In each
    panel every category on the x axis has one bar per series, with its std as an error bar; a NaN mean draws
    no bar, a NaN std a zero-length error bar, and a series whose stds are all NaN no error bars. Series
    named in ``hatched`` (published rows) are drawn hatched. A series keeps its colour and slot in every
    panel. ``sharey``: one y scale for all panels.
    """
    labels = list(dict.fromkeys(label for series in panels.values() for label in series))
    for title, series in panels.items():
        for label, (means, stds) in series.items():
            if len(means) != len(categories) or len(stds) != len(categories):
                raise ValueError(f"{title} / {label}: {len(means)} means and {len(stds)} stds for "
                                 f"{len(categories)} categories")
    per_row = min(per_row or len(panels), len(panels))
    nrows = -(-len(panels) // per_row)
    width = 0.8 / max(1, len(labels))
    panel_width = max(3.0, 0.22 * len(labels) * len(categories) + 0.8)
    slanted = max(len(c) for c in categories) > 6
    fig, axes = plt.subplots(nrows, per_row, figsize=(panel_width * per_row, (3.9 if slanted else 3.4) * nrows),
                             squeeze=False, sharey=sharey)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    colours = matplotlib.colormaps["tab10" if len(labels) <= 10 else "tab20"]
    handles: dict[str, Any] = {}
    for ax, (title, series) in zip(axes.flat, panels.items()):
        for slot, label in enumerate(labels):
            if label not in series:
                continue
            means, stds = (np.asarray(v, dtype=float) for v in series[label])
            shown = np.flatnonzero(~np.isnan(means))
            if not shown.size:
                continue
            errors = stds[shown]
            handles[label] = ax.bar(shown - 0.4 + width * (slot + 0.5), means[shown], width,
                                    yerr=np.nan_to_num(errors) if np.isfinite(errors).any() else None,
                                    color=colours(slot % colours.N),
                                    hatch="//" if label in hatched else None, edgecolor="black", linewidth=0.4,
                                    capsize=2, error_kw={"linewidth": 0.8})
        ax.set_xticks(np.arange(len(categories)), categories, rotation=35 if slanted else 0,
                      ha="right" if slanted else "center", fontsize=8 if slanted else 10)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    for row in axes:
        row[0].set_ylabel(ylabel)
    fig.legend([handles[k] for k in labels if k in handles], [k for k in labels if k in handles],
               loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=min(4, len(labels)), fontsize=8, frameon=False)
    fig.tight_layout()
    return _png(fig)


def image_grid(images: Sequence[Sequence[np.ndarray | None]], captions: Sequence[Sequence[str]],
               row_labels: Sequence[str], column_labels: Sequence[str], title: str = "") -> bytes:
    """Images in rows and columns, each with a caption under it, as PNG bytes.

    ``images[r][c]``: (h, w, 3) uint8, all of one size, or ``None`` for a cell without an image (drawn grey,
    its caption says why). ``captions`` has the same rows and columns; ``row_labels`` go left of the rows,
    ``column_labels`` above the columns (wrapped to the cell width).
    """
    rows, cols = len(row_labels), len(column_labels)
    if len(images) != rows or any(len(r) != cols for r in images) or len(captions) != rows or any(
            len(r) != cols for r in captions):
        raise ValueError(f"images and captions must be {rows} rows of {cols} cells")
    sizes = {img.shape for row in images for img in row if img is not None}
    if len(sizes) > 1:
        raise ValueError(f"images must have one size; got {sorted(sizes)}")
    h, w = next(iter(sizes))[:2] if sizes else (128, 128)
    chars = max(12, w // 6)
    header = max([1] + [len(textwrap.wrap(label, chars)) for label in column_labels])
    lines = max([1] + [len(textwrap.wrap(c, chars)) for row in captions for c in row])  # every caption line shows
    cell_w, cell_h = w / DPI + 0.15, h / DPI + 0.2 + 0.13 * lines
    fig, axes = plt.subplots(rows, cols, figsize=(cell_w * cols + 1.2, cell_h * rows + 0.16 * header + 0.4),
                             squeeze=False)
    for r in range(rows):
        for c in range(cols):
            ax = axes[r][c]
            image = images[r][c]
            ax.imshow(image if image is not None else np.full((h, w, 3), 200, np.uint8), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_xlabel("\n".join(textwrap.wrap(captions[r][c], chars)) or " ", fontsize=7)
            if r == 0:
                ax.set_title("\n".join(textwrap.wrap(column_labels[c], chars)), fontsize=7)
            if c == 0:
                ax.set_ylabel(row_labels[r], fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _png(fig)
