"""Rendering the page: one self-contained ``index.html`` and its Markdown twin ``README.md``.

:func:`write_report` renders the same sections twice: ``index.html``, one self-contained page (images
inlined as base64 data URIs, inline CSS, no external asset), and ``README.md``, its Markdown twin (images
written beside it under ``figures/``).
"""

from __future__ import annotations

import base64
import html
import io
import logging
from pathlib import Path
from typing import Sequence

from PIL import Image

from pipeline.report.blocks import Block, Figure, Section, Table, Text
from pipeline.store.codecs import image_from_bytes

log = logging.getLogger(__name__)

CSS = """
body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em;font-size:.9em}
th,td{border:1px solid #bbb;padding:.25em .6em;text-align:right}
th:first-child,th:nth-child(2),td:first-child,td:nth-child(2){text-align:left}
caption{caption-side:top;text-align:left;font-weight:600;padding:.3em 0}
.note{background:#fff4d6;border-left:4px solid #e0a800;padding:.5em 1em}
.banner{background:#ffe0e0;border-left:4px solid #c00;padding:.6em 1em;font-weight:600}
nav ol{columns:2;font-size:.9em;margin:0 0 1.5em}
figure{margin:1em 0}img{max-width:100%;border:1px solid #ddd}figcaption{font-size:.85em;color:#555}
"""

# Marks every image the browser decoded, so a headless check of the DOM can tell broken images apart.
DECODE_CHECK = ("window.addEventListener('load',()=>{for(const i of document.images)"
                "{i.dataset.decoded=(i.complete&&i.naturalWidth>0)?'1':'0';}});")


EMBED_PNG_LIMIT = 1 << 20  # bytes; a larger figure goes into the page as JPEG (its PNG stays in figures/)
EMBED_MAX_WIDTH = 1600     # pixels of such a JPEG


def embedded_image(png: bytes, limit: int = EMBED_PNG_LIMIT, max_width: int = EMBED_MAX_WIDTH) -> tuple[str, bytes]:
    """(MIME type, bytes) to inline for a figure: the PNG itself when small, else a JPEG (quality 85) at
    most ``max_width`` wide, so a page of many attention grids stays a few MB."""
    if len(png) <= limit:
        return "image/png", png
    image = image_from_bytes(png)
    if image.width > max_width:
        image = image.resize((max_width, round(image.height * max_width / image.width)), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=85)
    return "image/jpeg", buf.getvalue()


def render_html(title: str, sections: Sequence[Section], banner: str = "") -> str:
    """One self-contained HTML page: inline CSS, images as ``data:image/png;base64`` URIs, a list of the
    sections linked to them at the top."""
    esc = html.escape
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{esc(title)}</title>",
           f"<style>{CSS}</style>", f"<script>{DECODE_CHECK}</script>", "</head><body>", f"<h1>{esc(title)}</h1>"]
    if banner:
        out.append(f'<p class="banner" id="profile-banner">{esc(banner)}</p>')
    links = "".join(f'<li><a href="#s{i}">{esc(section.title)}</a></li>' for i, section in enumerate(sections))
    out.append(f'<nav id="contents"><ol>{links}</ol></nav>')
    for i, section in enumerate(sections):
        out.append(f'<section id="s{i}"><h2>{esc(section.title)}</h2>')
        for block in section.blocks:
            out.append(_html_block(block))
        out.append("</section>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def _html_block(block: Block) -> str:
    """The HTML of one block: a paragraph, an inlined figure or a table."""
    esc = html.escape
    if isinstance(block, Text):
        cls = f' class="note {block.kind}"' if block.kind in ("note", "missing") else ""
        return f"<p{cls}>{esc(block.text)}</p>"
    if isinstance(block, Figure):
        mime, payload = embedded_image(block.png)
        data = base64.b64encode(payload).decode("ascii")
        return (f'<figure><img alt="{esc(block.caption)}" src="data:{mime};base64,{data}">'
                f"<figcaption>{esc(block.caption)}</figcaption></figure>")
    ident = f' id="{esc(block.name)}"' if block.name else ""
    head = "".join(f"<th>{esc(c)}</th>" for c in block.columns)
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in block.rows)
    return (f"<table{ident}><caption>{esc(block.caption)}</caption><thead><tr>{head}</tr></thead>"
            f"<tbody>{body}</tbody></table>")


def render_markdown(title: str, sections: Sequence[Section], banner: str = "", figures_dir: str = "figures") -> str:
    """The Markdown twin of :func:`render_html`; figures are linked as ``figures/<name>``."""
    out = [f"# {title}", ""]
    if banner:
        out += [f"> **{banner}**", ""]
    for section in sections:
        out += [f"## {section.title}", ""]
        for block in section.blocks:
            out += _md_block(block, figures_dir) + [""]
    return "\n".join(out).rstrip() + "\n"


def _md_cell(text: str) -> str:
    """A Markdown table cell: ``|`` escaped, line breaks as spaces."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _md_block(block: Block, figures_dir: str) -> list[str]:
    """The Markdown lines of one block; figures link to ``figures_dir/<name>``."""
    if isinstance(block, Text):
        return [f"> {block.text}"] if block.kind in ("note", "missing") else [block.text]
    if isinstance(block, Figure):
        return [f"![{_md_cell(block.caption)}]({figures_dir}/{block.name})", f"*{block.caption}*"]
    lines = [f"**{block.caption}**", "", "| " + " | ".join(map(_md_cell, block.columns)) + " |",
             "|" + "---|" * len(block.columns)]
    lines += ["| " + " | ".join(map(_md_cell, row)) + " |" for row in block.rows]
    return lines


def write_report(out_dir: str | Path, title: str, sections: Sequence[Section], banner: str = "") -> dict[str, int]:
    """Write ``index.html``, ``README.md`` and ``figures/*.png`` into ``out_dir``; return block counts."""
    out_dir = Path(out_dir)
    figures = out_dir / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    for stale in figures.glob("*.png"):
        stale.unlink()
    blocks = [b for s in sections for b in s.blocks]
    for fig in (b for b in blocks if isinstance(b, Figure)):
        (figures / fig.name).write_bytes(fig.png)
    (out_dir / "index.html").write_text(render_html(title, sections, banner), encoding="utf-8")
    (out_dir / "README.md").write_text(render_markdown(title, sections, banner), encoding="utf-8")
    counts = {"sections": len(sections), "tables": sum(isinstance(b, Table) for b in blocks),
              "figures": sum(isinstance(b, Figure) for b in blocks),
              "missing_inputs": sum(isinstance(b, Text) and b.kind == "missing" for b in blocks)}
    log.info("report written to %s: %s", out_dir, counts)
    return counts
