"""List and remove kept work: stashed shards and the checkpoints of other training runs.

Stages never delete finished work implicitly: shards computed under other settings wait in
``artifacts/.stash/<output>/<key>/`` and each training run keeps its checkpoints in
``artifacts/train/checkpoints/<key>/``, so returning to earlier settings resumes them. This command is the
explicit way to take that disk space back::

    python -m pipeline.store.prune                      # list what is kept, with sizes; removes nothing
    python -m pipeline.store.prune --remove             # remove all of it but the current training run
    python -m pipeline.store.prune --remove --keep 2    # keep the 2 newest entries of each output

The training run of the current trained UNet (``artifacts/train/unet/training_run.json``) is never removed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

STASH = Path("artifacts/.stash")
CHECKPOINTS = Path("artifacts/train/checkpoints")
TRAINED_RUN = Path("artifacts/train/unet/training_run.json")


@dataclass(frozen=True)
class KeptWork:
    """One folder of kept work: ``group`` (the output it belongs to), its ``key``, bytes and last change."""

    group: str
    key: str
    path: Path
    size: int
    mtime: float


def kept_work(stash: Path = STASH, checkpoints: Path = CHECKPOINTS) -> list[KeptWork]:
    """Every stashed shard folder (``<stash>/<output>/<key>``, a folder of ``part-*.parquet``) and every
    training run folder (``<checkpoints>/<key>``), newest first within each group."""
    found = []
    if stash.is_dir():
        for shard in stash.rglob("part-*.parquet"):
            found.append(shard.parent)
    found = sorted(set(found))
    items = [_item(path.parent.relative_to(stash).as_posix(), path) for path in found]
    if checkpoints.is_dir():
        items += [_item(f"training runs ({checkpoints})", p) for p in sorted(checkpoints.iterdir())
                  if p.is_dir() and not p.name.startswith(".")]
    return sorted(items, key=lambda w: (w.group, -w.mtime))


def _item(group: str, path: Path) -> KeptWork:
    """A :class:`KeptWork` for ``path``: size of its files, newest modification time."""
    files = [f for f in path.rglob("*") if f.is_file()]
    mtime = max((f.stat().st_mtime for f in files), default=path.stat().st_mtime)
    return KeptWork(group, path.name, path, sum(f.stat().st_size for f in files), mtime)


def current_training_key(trained_run: Path = TRAINED_RUN) -> str | None:
    """The run key (fingerprint) of the trained UNet in the workspace, if any."""
    try:
        return json.loads(trained_run.read_text()).get("fingerprint")
    except (OSError, json.JSONDecodeError):
        return None


def to_remove(items: list[KeptWork], keep: int, protected: set[str]) -> list[KeptWork]:
    """The entries past the ``keep`` newest of each group, except the ``protected`` keys."""
    out, seen = [], {}
    for item in items:
        seen[item.group] = seen.get(item.group, 0) + 1
        if seen[item.group] > keep and item.key not in protected:
            out.append(item)
    return out


def _size(n: int) -> str:
    """Human-readable byte count."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.store.prune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--remove", action="store_true", help="remove (default: only list)")
    parser.add_argument("--keep", type=int, default=0, help="newest entries kept per output (default 0)")
    args = parser.parse_args(argv)
    items = kept_work()
    protected = {k for k in [current_training_key()] if k}
    doomed = to_remove(items, max(args.keep, 0), protected) if args.remove else []
    now = time.time()
    for item in items:
        verb = "removing" if item in doomed else "kept"
        print(f"{verb:9s} {_size(item.size):>10s}  {(now - item.mtime) / 3600:7.1f} h old  {item.path}")
    for item in doomed:
        shutil.rmtree(item.path)
    total = sum(i.size for i in items)
    freed = sum(i.size for i in doomed)
    print(f"{len(items)} entries, {_size(total)}; removed {len(doomed)} ({_size(freed)})"
          + ("" if args.remove else "; add --remove to remove them"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
