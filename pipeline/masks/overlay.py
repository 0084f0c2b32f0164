"""The ``masks`` stage's figure: images with their masks tinted and boxes labelled (plots/masks_overlay.png)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from pipeline.store.codecs import rle_decode
from pipeline.store.shards import STATUS_OK


def plot_overlay(rows: Sequence[dict[str, Any]], images: dict[str, Image.Image], out_path: Path,
                 num_images: int) -> int:
    """Draw up to ``num_images`` images with their ok masks (tinted) and boxes (labelled); returns the count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ids = [i for i in dict.fromkeys(str(r["image_id"]) for r in rows if r["status"] == STATUS_OK) if i in images]
    ids = ids[:num_images]
    fig, axes = plt.subplots(1, max(1, len(ids)), figsize=(3.2 * max(1, len(ids)), 3.4), squeeze=False)
    colours = plt.get_cmap("tab10")
    for ax, image_id in zip(axes[0], ids):
        picture = np.asarray(images[image_id], dtype=np.float32) / 255.0
        mine = [r for r in rows if str(r["image_id"]) == image_id and r["status"] == STATUS_OK]
        for k, r in enumerate(mine):
            colour = np.array(colours(k % 10)[:3], dtype=np.float32)
            m = rle_decode(r["mask"])
            picture[m] = 0.55 * picture[m] + 0.45 * colour
            ys, xs = np.nonzero(m)
            x0, y0, x1, y1 = r["box"] if r["box"] is not None else (xs.min(), ys.min(), xs.max(), ys.max())
            if r["box"] is not None:
                ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, lw=1.5, color=colour))
            ax.text(x0, y0, r["phrase"], fontsize=7, color="white", backgroundcolor=tuple(colour), va="bottom")
        ax.imshow(np.clip(picture, 0, 1))
        ax.set_title(image_id, fontsize=8)
        ax.axis("off")
    if not ids:
        axes[0][0].text(0.5, 0.5, "no masks", ha="center")
        axes[0][0].axis("off")
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return len(ids)
