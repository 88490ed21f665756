"""Synthetic scenes for the demo model: one to three solid shapes on a plain background.

A scene is data (`Scene`): shapes with a kind (circle, square, triangle), one of eight
named colours, a centre and a size, all relative to the image side, so one scene renders at
any resolution. From a scene come the image (`render`), its caption (`caption`), questions
with their answers (`questions`), and the per-patch labels the vision encoder is pretrained
on (`patch_labels`).

Rules that keep every caption and answer unambiguous:
  * no two shapes share both colour and kind (a scene's (colour, shape) pairs are a set);
  * shapes do not overlap and stay inside the image;
  * the background is far (in RGB distance) from the colour of every shape in the scene.
Captions list the shapes in a fixed order (by kind, then colour), so a description depends
only on what is in the image, not on where: "a red circle, a blue circle and a green
triangle".

Only Pillow and the standard library: the scenes are pure functions of a `random.Random`.
"""

from __future__ import annotations

import io
import math
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

KINDS = ("circle", "square", "triangle")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (245, 215, 30),
    "orange": (245, 135, 15),
    "purple": (140, 50, 175),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
}
COLOUR_NAMES = tuple(COLOURS)
NUMBER_WORDS = ("none", "one", "two", "three")

# Relative size (the side of a shape's bounding box over the image side) and the gap kept
# between shapes and from the border.
MIN_SIZE, MAX_SIZE = 0.16, 0.5
MARGIN = 0.02
# Least RGB distance between the background and any shape colour of the scene.
MIN_BACKGROUND_DISTANCE = 110.0


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    cx: float  # centre, relative to the image side (0..1)
    cy: float
    size: float  # bounding-box side, relative to the image side

    @property
    def pair(self) -> tuple[str, str]:
        return (self.colour, self.kind)


@dataclass(frozen=True)
class Scene:
    shapes: tuple[Shape, ...]
    background: tuple[int, int, int]

    @property
    def pairs(self) -> set[tuple[str, str]]:
        return {s.pair for s in self.shapes}

    def ordered(self) -> list[Shape]:
        """Shapes in caption order: by kind, then by colour (the orders of KINDS, COLOURS)."""
        return sorted(self.shapes, key=lambda s: (KINDS.index(s.kind), COLOUR_NAMES.index(s.colour)))


def _distance(a, b) -> float:
    return math.dist(a, b)


def sample_scene(
    rng: random.Random,
    n_shapes: int | None = None,
    size_range: tuple[float, float] = (MIN_SIZE, MAX_SIZE),
) -> Scene:
    """A random scene: 1-3 shapes (uniform), distinct (colour, kind) pairs, no overlaps."""
    n = n_shapes or rng.randint(1, 3)
    while True:
        pairs: set[tuple[str, str]] = set()
        while len(pairs) < n:
            pairs.add((rng.choice(COLOUR_NAMES), rng.choice(KINDS)))
        pairs_list = sorted(pairs)
        rng.shuffle(pairs_list)
        # Bigger scenes get smaller shapes on average so that they fit.
        lo, hi = size_range
        hi = min(hi, {1: hi, 2: 0.45, 3: 0.38}[n])
        shapes: list[Shape] = []
        for colour, kind in pairs_list:
            for _ in range(200):
                size = rng.uniform(lo, hi)
                half = size / 2 + MARGIN
                cx, cy = rng.uniform(half, 1 - half), rng.uniform(half, 1 - half)
                # Bounding circles (radius size/sqrt(2) covers a square) must not touch.
                if all(
                    math.hypot(cx - o.cx, cy - o.cy) > (size + o.size) / math.sqrt(2) * 0.92 + MARGIN
                    for o in shapes
                ):
                    shapes.append(Shape(kind, colour, cx, cy, size))
                    break
            else:
                break
        if len(shapes) < n:
            continue
        while True:
            background = tuple(rng.randrange(256) for _ in range(3))
            if all(_distance(background, COLOURS[s.colour]) >= MIN_BACKGROUND_DISTANCE for s in shapes):
                break
        return Scene(tuple(shapes), background)


def _polygon(shape: Shape, side: float) -> list[tuple[float, float]] | None:
    """Corner points in pixels for squares and triangles (None for a circle)."""
    cx, cy, s = shape.cx * side, shape.cy * side, shape.size * side
    if shape.kind == "square":
        h = s * 0.85 / 2  # a square looks bigger than a circle of the same box
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape.kind == "triangle":
        h = s * math.sqrt(3) / 2  # equilateral, pointing up, centred on its box
        return [(cx, cy - h / 2), (cx + s / 2, cy + h / 2), (cx - s / 2, cy + h / 2)]
    return None


def _draw(draw: ImageDraw.ImageDraw, shape: Shape, side: int, fill) -> None:
    poly = _polygon(shape, side)
    if poly is None:
        r = shape.size * side / 2
        cx, cy = shape.cx * side, shape.cy * side
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon(poly, fill=fill)


def render(
    scene: Scene,
    resolution: int,
    *,
    rng: random.Random | None = None,
    colour_jitter: int = 0,
    jpeg_quality: int | None = None,
) -> Image.Image:
    """The scene as a square RGB image of `resolution` pixels a side.

    `colour_jitter` shifts each shape's RGB by up to that much per channel (drawn from `rng`),
    `jpeg_quality` round-trips the image through JPEG at that quality."""
    img = Image.new("RGB", (resolution, resolution), scene.background)
    draw = ImageDraw.Draw(img)
    for shape in scene.shapes:
        colour = COLOURS[shape.colour]
        if colour_jitter and rng is not None:
            colour = tuple(min(255, max(0, c + rng.randint(-colour_jitter, colour_jitter))) for c in colour)
        _draw(draw, shape, resolution, colour)
    if jpeg_quality is not None:
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=jpeg_quality)
        buf.seek(0)
        img = Image.open(buf).convert("RGB")
    return img


def coverage_map(scene: Scene, cells: int, side: int = 128) -> list[float]:
    """Fraction of each of cells x cells square cells covered by some shape (row-major)."""
    mask = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(mask)
    for shape in scene.shapes:
        _draw(draw, shape, side, 255)
    return [v / 255 for v in mask.resize((cells, cells), Image.Resampling.BOX).getdata()]


def patch_labels(scene: Scene, grid: int, side: int = 64) -> tuple[list[int], list[int]]:
    """Per-patch targets on a grid x grid raster (row-major, as ViT patches are ordered).

    colour: 0 background, 1 + COLOUR_NAMES index; kind: 0 background, 1 + KINDS index.
    A patch belongs to the shape covering most of it when that covers at least 30%."""
    coverage = []
    for shape in scene.shapes:
        mask = Image.new("L", (side, side), 0)
        _draw(ImageDraw.Draw(mask), shape, side, 255)
        coverage.append(list(mask.resize((grid, grid), Image.Resampling.BOX).getdata()))
    colours, kinds = [], []
    for p in range(grid * grid):
        best, best_cov = None, 0.3 * 255
        for shape, cov in zip(scene.shapes, coverage):
            if cov[p] >= best_cov:
                best, best_cov = shape, cov[p]
        colours.append(0 if best is None else 1 + COLOUR_NAMES.index(best.colour))
        kinds.append(0 if best is None else 1 + KINDS.index(best.kind))
    return colours, kinds


# ---- text ----------------------------------------------------------------------------------

DESCRIBE_PROMPTS = (
    "Describe this image.",
    "Describe the image.",
    "What is in this image?",
    "What is in the picture?",
    "What do you see?",
    "What shapes are in the image?",
    "Caption this image.",
    "Describe the shapes.",
    "List the shapes in the image.",
    "What does this picture show?",
)


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(scene: Scene) -> str:
    """'a red circle', 'a red circle and an orange square', 'a red circle, a blue square and
    a green triangle' (kind order, then colour order)."""
    parts = [f"{article(s.colour)} {s.colour} {s.kind}" for s in scene.ordered()]
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


@dataclass(frozen=True)
class QA:
    question: str
    answer: str
    category: str  # colour | count | count_kind | exists | shape


def _pick(rng: random.Random, options):
    return options[rng.randrange(len(options))]


def questions(scene: Scene, rng: random.Random) -> list[QA]:
    """Every question type that has an unambiguous answer for this scene, one phrasing each
    (chosen with `rng`)."""
    out: list[QA] = []
    kinds = [s.kind for s in scene.shapes]
    # colour of a kind that appears exactly once
    for shape in scene.shapes:
        if kinds.count(shape.kind) == 1:
            q = _pick(rng, ("What colour is the {k}?", "What color is the {k}?", "Which colour is the {k}?"))
            out.append(QA(q.format(k=shape.kind), shape.colour, "colour"))
    # shape of a colour that appears exactly once
    colours = [s.colour for s in scene.shapes]
    for shape in scene.shapes:
        if colours.count(shape.colour) == 1:
            q = _pick(rng, ("What shape is the {c} one?", "What shape is {c}?", "Which shape is {c}?"))
            out.append(QA(q.format(c=shape.colour), shape.kind, "shape"))
    q = _pick(rng, ("How many shapes are there?", "How many shapes are in the image?", "How many shapes do you see?"))
    out.append(QA(q, NUMBER_WORDS[len(scene.shapes)], "count"))
    kind = rng.choice(KINDS)
    q = _pick(rng, ("How many {k}s are there?", "How many {k}s are in the image?"))
    out.append(QA(q.format(k=kind), NUMBER_WORDS[kinds.count(kind)], "count_kind"))
    # yes/no: half the time about a shape that is there
    if rng.random() < 0.5:
        colour, kind = rng.choice(sorted(scene.pairs))
    else:
        colour, kind = rng.choice(COLOUR_NAMES), rng.choice(KINDS)
    q = _pick(rng, ("Is there {a} {c} {k}?", "Is there {a} {c} {k} in the image?"))
    out.append(QA(q.format(a=article(colour), c=colour, k=kind), "yes" if (colour, kind) in scene.pairs else "no", "exists"))
    return out


def training_pair(scene: Scene, rng: random.Random, p_caption: float = 0.5) -> tuple[str, str]:
    """(prompt, answer) for instruction tuning: a caption request or one of the questions."""
    if rng.random() < p_caption:
        return rng.choice(DESCRIBE_PROMPTS), caption(scene)
    qa = rng.choice(questions(scene, rng))
    return qa.question, qa.answer


# ---- parsing model output --------------------------------------------------------------------


def pairs_in_text(text: str) -> list[tuple[str, str]]:
    """Every '<colour> <shape>' (or plural) mentioned in `text`, in order, repeats kept."""
    import re

    pattern = r"\b(" + "|".join(COLOUR_NAMES) + r")\s+(" + "|".join(KINDS) + r")s?\b"
    return [(m.group(1), m.group(2)) for m in re.finditer(pattern, text.lower())]
