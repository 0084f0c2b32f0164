"""The training curves file for ``dvc plots`` (kept apart from the loop: it does not change the weights)."""

from __future__ import annotations

from pathlib import Path


def write_curves(path: Path, curves: list[dict[str, float]]) -> None:
    """Per-step curves as CSV (one column per logged value) for ``dvc plots``."""
    import pandas as pd

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(curves).to_csv(path, index=False, float_format="%.6g")
