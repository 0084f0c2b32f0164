"""`dvc plots show` / `dvc plots diff` pages render offline: the page template `.dvc/config` names inlines
vega, vega-lite and vega-embed (`.dvc/plots/`) instead of loading them from a CDN."""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import io
import json
import os
import subprocess
import sys
import tarfile
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
PLOTS_DIR = REPO / ".dvc" / "plots"
CHROMIUM = Path("/usr/bin/chromium")


def _vendor():
    """``.dvc/plots/vendor.py`` as a module (it lives outside the package)."""
    spec = importlib.util.spec_from_file_location("plots_vendor", PLOTS_DIR / "vendor.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Scripts(HTMLParser):
    """The ``<script>`` elements of a page: attributes and text."""

    def __init__(self):
        super().__init__()
        self.scripts: list[tuple[dict, str]] = []
        self._open: dict | None = None

    def handle_starttag(self, tag, attrs):
        if tag == "script":
            self._open = dict(attrs)
            self.scripts.append((self._open, ""))

    def handle_data(self, data):
        if self._open is not None:
            attrs, text = self.scripts[-1]
            self.scripts[-1] = (attrs, text + data)

    def handle_endtag(self, tag):
        if tag == "script":
            self._open = None


def _scripts(page: str) -> list[tuple[dict, str]]:
    parser = _Scripts()
    parser.feed(page)
    return parser.scripts


def _template_path() -> Path:
    """The page template `.dvc/config` names (DVC reads a relative path from the `.dvc` folder)."""
    from configobj import ConfigObj

    value = ConfigObj(str(REPO / ".dvc" / "config"))["plots"]["html_template"]
    return (REPO / ".dvc" / value).resolve()


def test_dvc_config_names_the_offline_template():
    assert _template_path() == PLOTS_DIR / "offline.html"


def test_template_inlines_the_recorded_builds_and_loads_nothing():
    vendor = _vendor()
    packages = vendor.load_sources()
    page = _template_path().read_text(encoding="utf-8")
    scripts = _scripts(page)
    assert [a.get("src") for a, _ in scripts] == [None] * 3  # no script is fetched, from a CDN or elsewhere
    assert [a["data-package"] for a, _ in scripts] == [f"{p['name']}@{p['version']}" for p in packages]
    for (attrs, code), package in zip(scripts, packages):
        assert hashlib.sha256(code.encode("utf-8")).hexdigest() == attrs["data-sha256"] == package["sha256"]
    assert page.count("{plot_divs}") == 1 and "{scripts}" not in page  # DVC's CDN tags have nowhere to go
    names = ", ".join(f"{p['name']}@{p['version']}" for p in packages)
    tags = "\n".join(vendor.script_tag(p, code) for p, (_, code) in zip(packages, scripts))
    assert page == vendor.PAGE.format(names=names, scripts=tags)  # exactly what vendor.py writes
    for package in packages:
        licence = (PLOTS_DIR / f"LICENSE.{package['name']}").read_text()
        assert licence.startswith("Copyright") and "Redistribution" in licence


def test_versions_are_those_dvcs_default_page_loads():
    from dvc_render.vega import VegaRenderer

    for package in _vendor().load_sources():
        assert f"https://cdn.jsdelivr.net/npm/{package['name']}@{package['version']}\"" in VegaRenderer.SCRIPTS


def _npm_tarball(path: Path, files: dict[str, bytes]) -> bytes:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(f"package/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path.read_bytes()


def test_vendor_build_checks_integrity_and_file_digest(tmp_path):
    vendor = _vendor()
    code, licence = b"window.fake = 1;", b"Copyright (c) someone\n"
    data = _npm_tarball(tmp_path / "fake-1.0.0.tgz", {"build/fake.min.js": code, "LICENSE": licence})
    package = {"name": "fake", "version": "1.0.0", "file": "build/fake.min.js", "integrity": vendor.npm_integrity(data),
               "sha256": hashlib.sha256(code).hexdigest()}
    (tmp_path / "sources.json").write_text(json.dumps({"packages": [package]}))
    out = tmp_path / "out"
    out.mkdir()
    page = vendor.build(tmp_path, out, tmp_path / "sources.json").read_text()
    assert _scripts(page) == [({"data-package": "fake@1.0.0", "data-file": "build/fake.min.js",
                                "data-sha256": package["sha256"]}, code.decode())]
    assert (out / "LICENSE.fake").read_bytes() == licence
    _npm_tarball(tmp_path / "fake-1.0.0.tgz", {"build/fake.min.js": b"window.fake = 2;", "LICENSE": licence})
    with pytest.raises(vendor.VendorError, match="integrity sha512-.* is not the"):
        vendor.build(tmp_path, out, tmp_path / "sources.json")
    package["integrity"] = vendor.npm_integrity((tmp_path / "fake-1.0.0.tgz").read_bytes())
    (tmp_path / "sources.json").write_text(json.dumps({"packages": [package]}))
    with pytest.raises(vendor.VendorError, match="build/fake.min.js has SHA-256"):
        vendor.build(tmp_path, out, tmp_path / "sources.json")


# --- the page `dvc plots show` writes -------------------------------------------------------------

def _curves(path: Path) -> None:
    """A small ``train_curves.csv`` with the columns the top-level plots of dvc.yaml draw."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["step", "loss", "denoise", "token", "pixel"])
        for step in range(1, 31):
            out.writerow([step, 1.0 + 0.1 * np.sin(step), 0.9 + 0.1 * np.cos(step), 1.0 / step, 10.0 + step % 5])


@pytest.fixture(scope="module")
def plots_page(tmp_path_factory) -> Path:
    """``dvc plots show -o`` run in a scratch DVC project holding this repository's plot definitions
    (dvc.yaml's top-level ``plots``), its ``.dvc/config`` plots section and template folder."""
    from configobj import ConfigObj

    root = tmp_path_factory.mktemp("plots_project")
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    dvc = [sys.executable, "-m", "dvc"]
    subprocess.run([*dvc, "init", "--no-scm", "-q"], cwd=root, env=env, check=True)
    config = ConfigObj(str(root / ".dvc" / "config"))
    config["plots"] = dict(ConfigObj(str(REPO / ".dvc" / "config"))["plots"])
    config.write()
    (root / ".dvc" / "plots").mkdir()
    for path in PLOTS_DIR.iterdir():
        (root / ".dvc" / "plots" / path.name).write_bytes(path.read_bytes())
    plots = yaml.safe_load((REPO / "dvc.yaml").read_text())["plots"]
    (root / "dvc.yaml").write_text(yaml.safe_dump({"plots": plots}, sort_keys=False))
    _curves(root / "plots" / "train_curves.csv")
    _by_step(root / "plots" / "by_step.csv")
    run = subprocess.run([*dvc, "plots", "show", "-o", "out"], cwd=root, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    return root / "out" / "index.html"


def _by_step(path: Path) -> None:
    """A stand-in for stage by_step's table: four steps, every column the by-step plots draw."""
    import pandas as pd

    columns = [f"{s}_mg{k}" for s in ("coco", "ade20k") for k in (2, 3, 4, 5)]
    columns += ["visor_oa", "visor_uncond", "visor_cond", "grounding_share_mean", "psnr_unedit_part",
                "ssim_unedit_part_x1e2", "clip_whole", "clip_edited", "fid_coco", "fid_flickr30k"]
    table = pd.DataFrame({"step": [0, 10, 20, 30], "model": ["sd14", "step_10", "step_20", "trained"]})
    for i, column in enumerate(columns):
        table[column] = [10.0 + i, 12.0 + i, 11.0 + i, 14.0 + i]
    table.to_csv(path, index=False)


PLOT_COUNT = len(yaml.safe_load((REPO / "dvc.yaml").read_text())["plots"])  # training curves and by-step plots


def test_plots_page_has_no_remote_script(plots_page):
    page = plots_page.read_text(encoding="utf-8")
    scripts = _scripts(page)
    assert not [a["src"] for a, _ in scripts if a.get("src")]  # nothing fetched, http(s) or otherwise
    assert "cdn.jsdelivr.net" not in page
    assert sum("vegaEmbed(" in code for _, code in scripts) == PLOT_COUNT == 10  # 3 training, 7 by step


def _chromium(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", "--virtual-time-budget=5000",
             f"--user-data-dir={tmp_path / 'chromium-profile'}"]
    return subprocess.run([str(CHROMIUM), *flags, *args], capture_output=True, text=True, timeout=120)


def test_plots_page_renders_its_curves_in_headless_chromium(plots_page, tmp_path):
    """Every plot becomes a drawn canvas, and the screenshot holds coloured line pixels (the page DVC writes
    by default shows none of them without network)."""
    if not CHROMIUM.exists():
        pytest.skip("headless browser check needs Debian's chromium at /usr/bin/chromium "
                    "(apt-get install -y chromium); CI installs it")
    dom = _chromium(["--dump-dom", plots_page.as_uri()], tmp_path)
    assert dom.returncode == 0, dom.stderr[-2000:]
    marks = [tag for tag in dom.stdout.split("<")[1:] if tag.startswith(("canvas", "svg")) and 'class="marks"' in tag]
    assert len(marks) == PLOT_COUNT, dom.stdout[-3000:]
    assert 'width="0"' not in "".join(marks), "a plot was drawn without data"
    shot = tmp_path / "plots.png"
    run = _chromium(["--window-size=1200,1400", f"--screenshot={shot}", plots_page.as_uri()], tmp_path)
    assert run.returncode == 0 and shot.is_file(), run.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    coloured = (pixels.max(axis=2) - pixels.min(axis=2)) > 80  # lines and legend symbols; axes are grey
    assert coloured.sum() > 2000, f"only {coloured.sum()} coloured pixels: the curves did not render"
