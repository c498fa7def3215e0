r"""SynthEEG-Image's stimulus images: the class vocabulary and the procedural renderer.

Numpy + PIL; :func:`render_image` is a pure function of (cfg.seed, image_index, image_size). Which class an
image belongs to and its jitter vector ``phi(i)`` come from :mod:`dreamdiff.data.synthetic` (the EEG model
reads the same facts); this module only says what the images look like.

``N = K * images_per_class`` stimulus images; image ``i`` has class ``k(i) = i // images_per_class``.
Class ``k`` has a fixed (shape, colour, texture) triplet::

    shape   = SHAPES[k % 8]       colour = COLOURS[k % 10]       texture = TEXTURES[(k // 2) % 4]

(``(k % 8, k % 10)`` is unique for ``k < lcm(8, 10) = 40``, so all 40 triplets are distinct and two
classes share at most one of shape and colour). Each image draws a jitter vector
``phi(i) ~ U(-1, 1)^F`` (``F = 7``, names in :data:`~dreamdiff.data.synthetic.FEATURE_NAMES`) that sets,
for side ``S`` px::

    hue      = hue_k + 0.02 * phi_hue                 (fraction of the hue circle)
    radius   = (0.30 + 0.06 * phi_scale) * S          (px)
    centre   = (0.5 + 0.12 * (phi_x, phi_y)) * S      (px)
    rotation = 30 * phi_rot                           (degrees)
    texture  = 1.8 * (1 + 0.25 * phi_tex)             (cycles per radius)
    backgr.  = 0.30 + 0.12 * phi_bg                   (grey level in [0, 1])

Shapes are drawn with PIL at 4x and box-averaged down to ``S`` (anti-aliasing); the texture's
"off" phase uses the class colour at 30 % brightness.
"""

from __future__ import annotations

import colorsys
import math

import numpy as np
from PIL import Image, ImageDraw

from dreamdiff.data.synthetic import SynthConfig, image_class, image_features

SHAPES = ("circle", "square", "triangle", "star", "cross", "ring", "diamond", "crescent")
COLOURS = (
    ("red", 0.0),
    ("orange", 0.075),
    ("yellow", 0.15),
    ("lime", 0.25),
    ("green", 0.36),
    ("cyan", 0.5),
    ("azure", 0.58),
    ("blue", 0.66),
    ("violet", 0.76),
    ("magenta", 0.87),
)
TEXTURES = ("solid", "stripes", "dots", "checker")
_SUPERSAMPLE = 4  # masks are drawn at this multiple of image_size, then box-averaged (anti-aliasing)


def class_attributes(cfg: SynthConfig) -> list[dict]:
    """Per class: its shape, colour (name and hue in [0, 1)) and texture; distinct for all 40 classes."""
    return [
        {
            "shape": SHAPES[k % len(SHAPES)],
            "colour": COLOURS[k % len(COLOURS)][0],
            "hue": COLOURS[k % len(COLOURS)][1],
            "texture": TEXTURES[(k // 2) % len(TEXTURES)],
        }
        for k in range(cfg.num_classes)
    ]


def _polygon(shape: str) -> np.ndarray:
    """Polygon vertices in units of the radius (sizes balance the areas), angle 0 pointing up (y down)."""
    if shape == "square":
        ang, rad = np.arange(4) * 90 + 45, np.ones(4)
    elif shape == "triangle":
        ang, rad = np.arange(3) * 120, np.full(3, 1.2)
    elif shape == "star":
        ang, rad = np.arange(10) * 36, np.tile([1.1, 0.48], 5)
    elif shape == "diamond":
        ang, rad = np.arange(4) * 90, np.array([1.15, 0.7, 1.15, 0.7])
    else:  # cross: a plus sign with arms of half-width 0.33; one corner triple per arm, turned by 90 deg
        corner = np.array([[0.33, -1.0], [0.33, -0.33], [1.0, -0.33]])
        turn = np.array([[0.0, 1.0], [-1.0, 0.0]])  # (x, y) -> (-y, x)
        return np.concatenate([corner @ np.linalg.matrix_power(turn, q) for q in range(4)])
    a = np.deg2rad(ang)
    return np.stack([rad * np.sin(a), -rad * np.cos(a)], axis=1)


def _shape_mask(shape: str, size: int, cx: float, cy: float, r: float, rot_deg: float) -> np.ndarray:
    img = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(img)

    def disk(x: float, y: float, rad: float, fill: int) -> None:
        draw.ellipse([x - rad, y - rad, x + rad, y + rad], fill=fill)

    th = np.deg2rad(rot_deg)
    if shape == "circle":
        disk(cx, cy, r, 255)
    elif shape == "ring":
        disk(cx, cy, r, 255)
        disk(cx, cy, 0.55 * r, 0)
    elif shape == "crescent":
        disk(cx, cy, r, 255)
        disk(cx + 0.45 * r * math.cos(th), cy + 0.45 * r * math.sin(th), 0.85 * r, 0)
    else:
        rotation = np.array([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]])
        pts = _polygon(shape) @ rotation.T * r + np.array([cx, cy])
        draw.polygon([tuple(p) for p in pts], fill=255)
    return np.asarray(img, dtype=np.float32) / 255.0


def _texture_mask(texture: str, size: int, cx: float, cy: float, r: float, rot_deg: float, freq: float) -> np.ndarray:
    if texture == "solid":
        return np.ones((size, size), dtype=np.float32)
    grid = np.arange(size, dtype=np.float32) + 0.5
    xx, yy = grid[None] - cx, grid[:, None] - cy
    th = np.deg2rad(rot_deg)
    u = (xx * math.cos(th) + yy * math.sin(th)) * (freq / r)  # in texture cycles
    v = (yy * math.cos(th) - xx * math.sin(th)) * (freq / r)
    if texture == "stripes":
        on = np.mod(u, 1.0) < 0.5
    elif texture == "dots":
        on = (np.mod(u, 1.0) - 0.5) ** 2 + (np.mod(v, 1.0) - 0.5) ** 2 > 0.3**2
    else:  # checker
        on = (np.floor(u) + np.floor(v)) % 2 == 0
    return on.astype(np.float32)


def _downsample(mask: np.ndarray, size: int) -> np.ndarray:
    return mask.reshape(size, _SUPERSAMPLE, size, _SUPERSAMPLE).mean(axis=(1, 3))


def render_image(cfg: SynthConfig, image_index: int) -> np.ndarray:
    """The stimulus image: uint8 [S, S, 3], deterministic in (cfg.seed, image_index, image_size)."""
    attrs = class_attributes(cfg)[image_class(cfg, image_index)]
    phi = image_features(cfg, image_index)
    s = cfg.image_size
    big = s * _SUPERSAMPLE
    r = (0.30 + 0.06 * phi[1]) * big
    cx, cy = (0.5 + 0.12 * phi[2]) * big, (0.5 + 0.12 * phi[3]) * big
    rot = 30.0 * phi[4]
    freq = 1.8 * (1.0 + 0.25 * phi[5])
    colour = np.array(colorsys.hsv_to_rgb((attrs["hue"] + 0.02 * phi[0]) % 1.0, 0.85, 0.95))
    background = 0.30 + 0.12 * phi[6]
    shape = _shape_mask(attrs["shape"], big, cx, cy, r, rot)
    on = _texture_mask(attrs["texture"], big, cx, cy, r, rot, freq)
    # compositing is linear in the masks, so box-average them first (anti-aliasing) and colour at 1x
    lit = _downsample(shape * (0.3 + 0.7 * on), s)[..., None]
    img = lit * colour + (1.0 - _downsample(shape, s)[..., None]) * background
    return np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8)
