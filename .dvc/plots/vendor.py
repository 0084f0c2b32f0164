"""Build ``offline.html``, the page template of ``dvc plots show`` / ``dvc plots diff`` (``.dvc/config``:
``plots.html_template``), with vega, vega-lite and vega-embed inlined, so the training curves render without
network. DVC's default page loads those three scripts from a CDN and stays blank offline.

Usage, from the repository root, where the npm registry is reachable::

    npm pack vega@5.20.2 vega-lite@5.2.0 vega-embed@6.18.2 --pack-destination /tmp/vega
    python .dvc/plots/vendor.py /tmp/vega

Each tarball must have the npm registry's ``integrity`` recorded in ``sources.json`` and the inlined file its
``sha256`` there; anything else is refused. To move to other versions, edit ``sources.json`` (the
``integrity`` that ``npm pack --json`` prints, the ``sha256`` of the file) and rerun.
"""

from __future__ import annotations

import base64
import hashlib
import json
import sys
import tarfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCES = HERE / "sources.json"
TEMPLATE = HERE / "offline.html"

PAGE = """<!DOCTYPE html>
<html>
<head>
    <meta charset="utf-8">
    {{refresh_tag}}
    <title>DVC Plot</title>
    <!-- DVC's page with {names} inlined from their npm packages (.dvc/plots/README.md): no network needed -->
{scripts}
    <style>
        table {{
            border-spacing: 15px;
        }}
    </style>
</head>
<body>
    {{plot_divs}}
</body>
</html>
"""


class VendorError(ValueError):
    """A tarball or file is not the one ``sources.json`` records."""


def load_sources(path: Path = SOURCES) -> list[dict]:
    """The packages ``sources.json`` lists, in inlining order (vega first: the others need it)."""
    return json.loads(Path(path).read_text())["packages"]


def npm_integrity(data: bytes) -> str:
    """npm's ``integrity`` string (``sha512-<base64>``) of a tarball's bytes."""
    return "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()


def package_files(tarball: Path, package: dict) -> tuple[str, str]:
    """The build file and the licence of ``package`` from its npm ``tarball``, both checked.

    Raises :class:`VendorError` naming the tarball when its integrity or the file's SHA-256 differ from
    ``sources.json``.
    """
    data = Path(tarball).read_bytes()
    if npm_integrity(data) != package["integrity"]:
        raise VendorError(f"{tarball}: integrity {npm_integrity(data)} is not the {package['integrity']} that "
                          f"sources.json records for {package['name']}@{package['version']}")
    with tarfile.open(tarball, "r:gz") as tar:
        code = tar.extractfile(f"package/{package['file']}").read()
        licence = tar.extractfile("package/LICENSE").read().decode("utf-8")
    if hashlib.sha256(code).hexdigest() != package["sha256"]:
        raise VendorError(f"{tarball}: {package['file']} has SHA-256 {hashlib.sha256(code).hexdigest()}, "
                          f"sources.json records {package['sha256']}")
    return code.decode("utf-8"), licence


def script_tag(package: dict, code: str) -> str:
    """An inline ``<script>`` holding ``code`` verbatim, labelled with its package, file and SHA-256."""
    for forbidden in ("</script", "<!--", "{plot_divs}", "{scripts}", "{refresh_tag}"):
        if forbidden in code.lower():
            raise VendorError(f"{package['name']}: {package['file']} contains {forbidden!r}, which cannot be "
                              f"inlined verbatim into the page template")
    label = f'data-package="{package["name"]}@{package["version"]}" data-file="{package["file"]}"'
    return f'    <script {label} data-sha256="{package["sha256"]}">{code}</script>'


def build(tarball_dir: Path, out_dir: Path = HERE, sources: Path = SOURCES) -> Path:
    """Write ``offline.html`` and one ``LICENSE.<package>`` per package into ``out_dir`` from the tarballs
    ``<name>-<version>.tgz`` in ``tarball_dir`` (what ``npm pack`` writes). Returns the template's path."""
    packages = load_sources(sources)
    tags = []
    for package in packages:
        tarball = Path(tarball_dir) / f"{package['name']}-{package['version']}.tgz"
        code, licence = package_files(tarball, package)
        (Path(out_dir) / f"LICENSE.{package['name']}").write_text(licence, encoding="utf-8")
        tags.append(script_tag(package, code))
    names = ", ".join(f"{p['name']}@{p['version']}" for p in packages)
    template = Path(out_dir) / TEMPLATE.name
    template.write_text(PAGE.format(names=names, scripts="\n".join(tags)), encoding="utf-8")
    return template


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(f"usage: python {Path(__file__).as_posix()} TARBALL_DIR (see the module docstring)")
    print(build(Path(sys.argv[1])))
