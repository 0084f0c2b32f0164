"""Stage `report`: one self-contained HTML page and its Markdown twin with every result of the pipeline.

Deps: metrics/ and plots/ of the evaluation stages (read if present; a missing input is named on the page),
data/published.yaml. Outs: report/index.html, report/README.md, report/figures/; metrics/report.json.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import NonNegativeInt, load_params, section
from pipeline.report.blocks import Text
from pipeline.report.page import build_sections, profile_banner
from pipeline.report.published import load_published
from pipeline.report.render import write_report
from pipeline.runtime import run_stage, stage_argument, write_json

log = logging.getLogger("stages.report")


@dataclass(frozen=True)
class ReportCfg:
    """Params section ``report``."""

    published: Path
    title: str
    decimals: NonNegativeInt
    out_dir: Path
    published_rows: dict[str, list[str]]   # this run's model -> the published MultiGen rows it reproduces


def main() -> None:
    params = load_params()
    cfg = section(params, "report", ReportCfg)
    profile = params["profile"]
    published = load_published(cfg.published)
    sections = build_sections(Path("."), published, profile, cfg.decimals, cfg.published_rows)
    counts = write_report(cfg.out_dir, cfg.title, sections, banner=profile_banner(profile))
    missing = [b.text for s in sections for b in s.blocks if isinstance(b, Text) and b.kind == "missing"]
    for note in missing:
        log.warning("%s", note)
    write_json("metrics/report.json", {"profile": profile, **counts})


if __name__ == "__main__":
    stage_argument(__doc__)
    run_stage(main)
