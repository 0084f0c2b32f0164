"""Stage `check_params`: every key of params.yaml is one that some stage reads (a misspelt `los:` fails).

Deps: params.yaml as a file, so it runs on every change of it (about a second), also when no stage's own
params changed (DVC refuses dvc.yaml itself as a dependency; a test checks the repository's two files).
Every key a stage's `params` list (or a `${...}` in dvc.yaml) names is known; values are checked by the
stages that read them, except `checkpoint_steps`, checked here against the active profile's checkpoint_every
and max_steps so a bad step fails before training, not after it. Outs: metrics/params.json (how many keys
were checked).
"""

from __future__ import annotations

from pathlib import Path

import yaml

from pipeline.config import load_params
from pipeline.params_check import check_checkpoint_steps, check_known_keys
from pipeline.runtime import run_stage, stage_argument, write_json


def main() -> None:
    params = load_params()
    text = Path("dvc.yaml").read_text()
    checked = check_known_keys(params, yaml.safe_load(text), text)
    check_checkpoint_steps(params)  # steps the active profile's training saves (stage checkpoint@<N>)
    write_json("metrics/params.json", {"keys_checked": checked, "profile": params["profile"]})


if __name__ == "__main__":
    stage_argument(__doc__)
    run_stage(main)
