"""dvc.yaml against the code: DVC reruns a stage only when a listed dependency changes."""

from __future__ import annotations

import ast
import re

import pytest
import yaml

from pipeline.store.identity import PACKAGE_DIR, import_closure

REPO = PACKAGE_DIR.parent
STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def _covered(path: str, deps: list[str]) -> bool:
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in deps)


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_deps_cover_the_code_it_imports(name):
    """Every package file a stage script may import (statically, also inside functions) is a dependency, and
    no other package file is."""
    stage = STAGES[name].get("do", STAGES[name])
    script = "stages/{}.py".format(re.search(r"-m stages\.(\w+)", stage["cmd"]).group(1))
    deps = [str(d) for d in stage["deps"]]
    needed = [script] + [p.relative_to(REPO).as_posix() for p in import_closure(REPO / script)
                         if p != PACKAGE_DIR / "__init__.py"]
    missing = [f for f in needed if not _covered(f, deps)]
    assert not missing, f"dvc.yaml stage {name}: add to deps {missing}"
    unused = [d for d in deps if d.startswith("pipeline/") and not any(_covered(f, [d]) for f in needed)]
    assert not unused, f"dvc.yaml stage {name}: its script never imports {unused} (a change there reruns it)"


def _foreach_keys(stage: dict, params: dict) -> list[str | None]:
    """The ``${key}`` / ``${item}`` values of a stage: its foreach keys (or list items), or [None]."""
    each = stage.get("foreach")
    if each is None:
        return [None]
    if isinstance(each, str):  # ${eval_models}: a params mapping (or a list: ${checkpoint_steps})
        each = params[each.strip("${}")]
    return [str(k) for k in each]


def _lookup(params: dict, dotted: str) -> bool:
    node = params
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


@pytest.mark.parametrize("profile", ["demo", "paper"])
def test_declared_params_exist_in_each_profile(profile):
    """Every params key a stage declares names a value of params.yaml once ``${profile}``, ``${key}`` and
    ``${item}`` are resolved (a misspelt key would make DVC refuse the stage); scale-bound keys go through
    ``profiles.${profile}``, so the inactive profile's values never rerun a stage."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    bad, literal = [], []
    for name, stage in STAGES.items():
        body = stage.get("do", stage)
        for each in _foreach_keys(stage, params):
            for key in body.get("params", []):
                literal += [f"{name}: {key}"] if key.startswith(("profiles.demo", "profiles.paper")) else []
                dotted = key.replace("${profile}", profile)
                if each is not None:
                    dotted = dotted.replace("${key}", each).replace("${item}", each)
                if not _lookup(params, dotted):
                    bad.append(f"{name}@{each}: {dotted}")
    assert not literal, f"declare profile keys as profiles.${{profile}}.<key>: {literal}"
    assert not bad, f"dvc.yaml declares params that params.yaml lacks: {bad}"


def test_import_closure_follows_relative_lazy_and_package_imports(tmp_path):
    """The closure of the trainer holds what it imports directly (losses), through another module
    (attention via losses), lazily inside functions, and the packages' ``__init__`` files; never the zoo."""
    names = {p.relative_to(PACKAGE_DIR).as_posix() for p in import_closure("pipeline.training.trainer")}
    assert {"training/trainer.py", "training/losses.py", "attention.py", "store/identity.py",
            "training/__init__.py", "store/__init__.py"} <= names
    assert not {n for n in names if n.startswith(("zoo/", "report/", "multigen/", "masks/"))}
    assert not names & {"piebench.py", "editing.py"}
    script = tmp_path / "stage.py"
    script.write_text("def main():\n    from pipeline.report.render import write_report\n")
    assert PACKAGE_DIR / "report" / "render.py" in import_closure(script)
    with pytest.raises(ValueError, match="must be modules"):
        import_closure("pipeline.no_such_module")


def _as_help_shows(entries: list, placeholder: str) -> list[str]:
    """dvc.yaml params or outputs as ``--help`` lists them: ``${key}`` -> ``<MODEL>`` (the script's argument),
    any other ``${name}`` -> ``<name>``."""
    names = [next(iter(e)) if isinstance(e, dict) else e for e in entries]
    return [re.sub(r"\$\{(\w[\w.]*)\}", lambda m: f"<{placeholder if m[1] in ('key', 'item') else m[1]}>", n)
            for n in names]


def test_every_stage_script_answers_help_without_running(tmp_path):
    """`python stages/X.py --help` prints the script's docstring and the params, inputs and outputs its
    dvc.yaml stage declares, and exits; it must not run the stage (which would rebuild models, delete
    checkpoints or rewrite the report)."""
    import subprocess
    import sys

    by_script = {}  # the first stage that runs a script (help shows it; the *_step families come later)
    for s in STAGES.values():
        by_script.setdefault(re.search(r"-m stages\.(\w+)", s.get("do", s)["cmd"]).group(1), s.get("do", s))
    for script in sorted((REPO / "stages").glob("*.py")):
        proc = subprocess.run([sys.executable, str(script), "--help"], cwd=tmp_path, capture_output=True, text=True)
        first_line = ast.get_docstring(ast.parse(script.read_text())).splitlines()[0]
        assert proc.returncode == 0 and proc.stdout.startswith("usage:"), (script.name, proc.stderr[-500:])
        assert first_line.split(":")[0] in proc.stdout, script.name
        stage, text = by_script[script.stem], " ".join(proc.stdout.split())  # help wraps lines at spaces
        placeholder = re.match(r"usage: python -m stages\.\w+ \[-h\] ?(\w*)", text).group(1)
        params = ", ".join(_as_help_shows(stage.get("params", []), placeholder)) or "(none)"
        assert f" Params read (dvc.yaml): {params} Inputs: " in text, (script.name, text)
        outputs = ", ".join(_as_help_shows(stage.get("outs", []) + stage.get("metrics", []), placeholder))
        assert f" Outputs: {outputs}" in text, (script.name, text)
    assert not any(tmp_path.iterdir())  # nothing was written


def test_stages_run_as_modules_of_the_checkout():
    """`python -m stages.X` from the repository root imports this checkout's `pipeline/`, never another
    checkout's that an editable install points at (e.g. a `dvc exp run --temp` copy)."""
    for name, stage in STAGES.items():
        cmd = stage.get("do", stage)["cmd"]
        assert re.match(r"(python|\$\{launcher\}) -m stages\.\w+", cmd), (name, cmd)
        assert (REPO / "stages" / (re.search(r"-m stages\.(\w+)", cmd).group(1) + ".py")).is_file(), name


def test_docs_module_table_is_current():
    """docs/caching.md holds the module → stage instances table of this dvc.yaml (`python -m pipeline.deps_table`)."""
    from pipeline.deps_table import current_table

    text = (REPO / "docs" / "caching.md").read_text()
    block = text.split("<!-- deps-table:begin -->\n")[1].split("<!-- deps-table:end -->")[0]
    assert block == current_table(), "regenerate the table: python -m pipeline.deps_table"


def _rerun(module: str) -> list[str]:
    from pipeline.deps_table import rerun_by_module

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    return rerun_by_module({"stages": STAGES}, params, [module])[module]


@pytest.mark.parametrize("module,only,never", [
    ("pipeline/multigen/scoring.py", ("score@",), ("sample@", "detect@", "visor@", "edit@", "piebench@")),
    ("pipeline/zoo/sd.py", ("models",), ()),
    ("pipeline/zoo/__init__.py", ("models",), ()),
    ("pipeline/editing.py", ("edit@",), ("piebench@", "sample@")),
    ("pipeline/piebench.py", ("piebench@",), ("edit@", "report")),
    ("pipeline/training/losses.py", ("train",), ("sample@", "masks", "edit@", "attention_maps", "grounding_eval@")),
    ("pipeline/multigen/detection.py", ("detect@", "visor@"), ("sample@", "score@")),
    ("pipeline/report/sections.py", ("report",), ()),
    ("pipeline/photorealism/scoring.py", ("fid@",), ("fid_sample@", "fid_reference", "sample@", "latency@")),
    ("pipeline/photorealism/latency.py", ("latency@",), ("fid@", "sample@")),
    ("pipeline/photorealism/references.py", ("fid_data",), ("fid_reference", "fid_sample@", "fid@")),
    ("pipeline/clip_score.py", ("piebench@", "fid@"), ("edit@", "sample@", "fid_sample@")),
])
def test_an_edit_reruns_only_the_stages_that_run_the_module(module, only, never):
    """The edits the layout is built for: each module's rerun set holds only its own family's instances."""
    def matches(name: str, patterns: tuple[str, ...]) -> bool:  # "score@" matches score@* and score_step@*
        name = name.replace("_step@", "@")                       # (the checkpoints' family); "train" only train
        return any(name.startswith(p) if p.endswith("@") else name == p for p in patterns)

    names = _rerun(module)
    assert names, module
    assert all(matches(n, only) for n in names), names
    assert not [n for n in names if matches(n, never)], names


def test_no_stage_but_models_depends_on_the_embedded_zoo():
    """Stages load what the models stage wrote (artifacts/models), never the zoo's code: a paper-profile run,
    which builds no embedded model, does not depend on it."""
    users = {name for name, stage in STAGES.items() for d in stage.get("do", stage).get("deps", [])
             if str(d).startswith("pipeline/zoo")}
    assert users == {"models"}
