"""Drawing of the synthetic demo pictures: simple objects on gradient backgrounds, with exact masks.

The demo training images (:mod:`pipeline.datasets.demo_images`) and the demo PIE-Bench scenes
(:mod:`pipeline.datasets.demo_piebench`) are drawn with the same code. Because the drawing is exact (no
anti-aliasing), each object's mask is its drawn pixels: inside the mask a pixel has the object's body colour
or the shared dark :data:`ACCENT` colour, outside every mask it has the background colour of its row, and no
palette colour is ever a background colour (all background channels are >= 170, every palette colour has a
channel <= 90).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from PIL import Image, ImageDraw

# Body colours: every one has a channel <= 90, so none can equal a background colour (channels >= 170).
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 195, 30),
    "purple": (140, 60, 190),
    "pink": (235, 90, 170),
    "brown": (140, 90, 40),
}
ACCENT = (50, 50, 50)  # wheels, trunks, roofs, handles, masts: part of the object's mask
# (top, bottom) colours of the vertical background gradients; every channel in [170, 250].
BACKGROUNDS = (
    ((245, 245, 240), (205, 200, 190)),
    ((200, 225, 250), (240, 245, 250)),
    ((235, 230, 210), (190, 185, 175)),
    ((225, 240, 225), (180, 200, 185)),
    ((230, 230, 230), (230, 230, 230)),
)

NOUNS = ("ball", "box", "tree", "house", "car", "cup", "kite", "star", "flower", "boat")


# --- shapes ----------------------------------------------------------------------------------------

class _Canvas:
    """Binary body/accent layers of one object in a square box of side ``s`` at (x0, y0)."""

    def __init__(self, height: int, width: int, box: tuple[int, int, int]):
        self.x0, self.y0, self.s = box
        self.body_img = Image.new("L", (width, height), 0)
        self.accent_img = Image.new("L", (width, height), 0)
        self.body = ImageDraw.Draw(self.body_img)
        self.accent = ImageDraw.Draw(self.accent_img)

    def p(self, u: float, v: float) -> tuple[int, int]:
        """Pixel at relative position (u, v) in [0, 1]^2 of the box."""
        return (self.x0 + round(u * (self.s - 1)), self.y0 + round(v * (self.s - 1)))

    def rect(self, u0: float, v0: float, u1: float, v1: float) -> list[tuple[int, int]]:
        return [self.p(u0, v0), self.p(u1, v1)]

    def circle(self, u: float, v: float, r: float) -> list[tuple[int, int]]:
        return self.rect(u - r, v - r, u + r, v + r)

    def width(self, fraction: float) -> int:
        return max(1, round(fraction * self.s))

    def layers(self) -> tuple[np.ndarray, np.ndarray]:
        return np.asarray(self.body_img) > 0, np.asarray(self.accent_img) > 0


def _ball(c: _Canvas) -> None:
    c.body.ellipse(c.rect(0, 0, 1, 1), fill=1)


def _box(c: _Canvas) -> None:
    c.body.rectangle(c.rect(0.08, 0.2, 0.92, 0.98), fill=1)
    c.accent.rectangle(c.rect(0.08, 0.2, 0.92, 0.3), fill=1)


def _tree(c: _Canvas) -> None:
    c.body.polygon([c.p(0.5, 0.0), c.p(0.05, 0.75), c.p(0.95, 0.75)], fill=1)
    c.accent.rectangle(c.rect(0.42, 0.7, 0.58, 1.0), fill=1)


def _house(c: _Canvas) -> None:
    c.body.rectangle(c.rect(0.15, 0.45, 0.85, 1.0), fill=1)
    c.accent.polygon([c.p(0.5, 0.05), c.p(0.0, 0.45), c.p(1.0, 0.45)], fill=1)
    c.accent.rectangle(c.rect(0.42, 0.7, 0.58, 1.0), fill=1)


def _car(c: _Canvas) -> None:
    c.body.rectangle(c.rect(0.0, 0.45, 1.0, 0.8), fill=1)
    c.body.rectangle(c.rect(0.2, 0.2, 0.75, 0.45), fill=1)
    c.accent.ellipse(c.circle(0.25, 0.82, 0.14), fill=1)
    c.accent.ellipse(c.circle(0.75, 0.82, 0.14), fill=1)


def _cup(c: _Canvas) -> None:
    c.body.polygon([c.p(0.05, 0.2), c.p(0.7, 0.2), c.p(0.62, 0.95), c.p(0.13, 0.95)], fill=1)
    c.accent.ellipse(c.rect(0.55, 0.35, 0.95, 0.75), outline=1, width=c.width(0.08))


def _kite(c: _Canvas) -> None:
    c.body.polygon([c.p(0.5, 0.0), c.p(0.85, 0.35), c.p(0.5, 0.75), c.p(0.15, 0.35)], fill=1)
    c.accent.line([c.p(0.5, 0.75), c.p(0.62, 1.0)], fill=1, width=c.width(0.05))


def _star(c: _Canvas) -> None:
    angles = -np.pi / 2 + np.arange(10) * np.pi / 5
    radii = np.where(np.arange(10) % 2 == 0, 0.5, 0.2)
    pts = [c.p(0.5 + r * np.cos(a), 0.55 + r * np.sin(a)) for r, a in zip(radii, angles)]
    c.body.polygon(pts, fill=1)


def _flower(c: _Canvas) -> None:
    c.accent.rectangle(c.rect(0.46, 0.5, 0.54, 1.0), fill=1)
    for a in -np.pi / 2 + np.arange(5) * 2 * np.pi / 5:
        c.body.ellipse(c.circle(0.5 + 0.22 * np.cos(a), 0.35 + 0.22 * np.sin(a), 0.13), fill=1)
    c.accent.ellipse(c.circle(0.5, 0.35, 0.1), fill=1)


def _boat(c: _Canvas) -> None:
    c.body.polygon([c.p(0.0, 0.7), c.p(1.0, 0.7), c.p(0.8, 0.97), c.p(0.2, 0.97)], fill=1)
    c.body.polygon([c.p(0.55, 0.08), c.p(0.55, 0.62), c.p(0.92, 0.62)], fill=1)
    c.accent.line([c.p(0.5, 0.05), c.p(0.5, 0.7)], fill=1, width=c.width(0.05))


SHAPES: dict[str, Callable[[_Canvas], None]] = {
    "ball": _ball, "box": _box, "tree": _tree, "house": _house, "car": _car,
    "cup": _cup, "kite": _kite, "star": _star, "flower": _flower, "boat": _boat,
}


def draw_object(noun: str, height: int, width: int, box: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Rasterise ``noun`` in the square ``box`` = (x0, y0, side) of an (H, W) frame.

    Returns (body, accent): two (H, W) bool layers; the object's mask is their union and accent pixels
    are painted over body pixels.
    """
    if noun not in SHAPES:
        raise ValueError(f"no drawing for {noun!r}; known objects: {', '.join(SHAPES)}")
    canvas = _Canvas(height, width, box)
    SHAPES[noun](canvas)
    return canvas.layers()


def gradient(height: int, width: int, top: tuple[int, int, int], bottom: tuple[int, int, int]) -> np.ndarray:
    """(H, W, 3) uint8 vertical gradient from ``top`` to ``bottom``; every row has one colour."""
    t = np.linspace(0.0, 1.0, height)[:, None]
    rows = np.rint(np.asarray(top) * (1 - t) + np.asarray(bottom) * t).astype(np.uint8)
    return np.broadcast_to(rows[:, None, :], (height, width, 3)).copy()


def paint(pixels: np.ndarray, body: np.ndarray, accent: np.ndarray, colour: tuple[int, int, int]) -> None:
    """Paint an object's layers into ``pixels`` (H, W, 3) in place: body in ``colour``, accent on top."""
    pixels[body] = colour
    pixels[accent] = ACCENT
