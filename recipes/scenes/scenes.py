"""A seeded generator of small scenes and questions about them, where the question decides what must be seen.

A scene is a 3 x 3 grid (72 px: cells of 24 px) holding 3-6 objects in distinct cells on a textured background.
Each object has a shape (6, distinct within a scene, so "the triangle" names one object), a colour (6, repeats
allowed, at most 3 of one colour), a size (small: 12-14 px, big: 18-21 px) and a cell (row top / middle / bottom,
column left / center / right), and is placed at a random point of its cell. That is 15-30 facts per image, more than
a few query tokens can carry: a model must choose what to pass on, and only the question says what.

Question types (`TYPES`), each with several phrasings (`PHRASINGS`), each needing the facts of one or two objects:

    color     What color is the triangle?               -> red       (the named object's colour)
    size      Is the triangle big or small?             -> big       (its size)
    shape_at  What shape is in the top left cell?       -> circle    (the object of a named cell)
    exists    Is there a red triangle?                  -> yes / no  (colour and shape bound to one object)
    count     How many red shapes are there?            -> zero..three
    left_of   Is the circle left of the star?           -> yes / no  (columns of two objects; they differ)
    above     Is the circle above the star?             -> yes / no  (rows of two objects; they differ)

Every answer is one word. yes and no are equally likely in the yes / no types. Everything is drawn from
`random.Random` seeded by a string (seed, split, index), so a scene, its picture and its questions depend on the
seed and the index alone (not on how many were generated before or in which process).

The picture is drawn without anti-aliasing: every object pixel has its palette colour exactly, and the background
(muted noise, stripes, checks or a gradient, channels within 60 of each other and at most 200) never looks like
one; the tests read the scene back from the pixels and recompute every answer from that.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 72
GRID = 3
CELL = IMAGE_SIZE // GRID  # 24 px: with 8 px patches, a cell is 3 x 3 patches

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (50, 90, 230),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 200),
    "white": (245, 245, 245),
}
COLORS = tuple(PALETTE)
SHAPES = ("circle", "square", "triangle", "diamond", "cross", "star")
SIZES = ("small", "big")
ROWS = ("top", "middle", "bottom")
COLUMNS = ("left", "center", "right")
NUMBERS = ("zero", "one", "two", "three")
EXTENT = {"small": (12, 14), "big": (18, 21)}  # px, the object's width = height, both ends included
MAX_SAME_COLOR = 3
MIN_OBJECTS, MAX_OBJECTS = 3, 6

TYPES = ("color", "size", "shape_at", "exists", "count", "left_of", "above")
PHRASINGS: dict[str, tuple[str, ...]] = {
    "color": ("What color is the {shape}?", "What is the color of the {shape}?", "Which color is the {shape}?",
              "The {shape} has what color?"),
    "size": ("Is the {shape} big or small?", "What size is the {shape}?", "How big is the {shape}?"),
    "shape_at": ("What shape is in the {row} {column} cell?", "Which shape is at the {row} {column}?",
                 "What is the shape in the {row} {column} cell?", "Name the shape at the {row} {column}."),
    "exists": ("Is there a {color} {shape}?", "Does the image contain a {color} {shape}?",
               "Is a {color} {shape} present?"),
    "count": ("How many {color} shapes are there?", "How many shapes are {color}?", "Count the {color} shapes.",
              "What is the number of {color} shapes?"),
    "left_of": ("Is the {shape} left of the {other}?", "Is the {shape} to the left of the {other}?",
                "Is the {shape} further left than the {other}?"),
    "above": ("Is the {shape} above the {other}?", "Is the {shape} higher than the {other}?",
              "Is the {shape} further up than the {other}?"),
}
# the answers a question of each type can have (ranking candidates)
ANSWERS: dict[str, tuple[str, ...]] = {
    "color": COLORS, "size": SIZES, "shape_at": SHAPES, "exists": ("yes", "no"), "count": NUMBERS,
    "left_of": ("yes", "no"), "above": ("yes", "no"),
}
WORDS = (*COLORS, *SHAPES, *SIZES, *ROWS, *COLUMNS, *NUMBERS, "yes", "no")  # every word of an answer or a fact


@dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    size: str
    row: int  # 0..2, top to bottom
    column: int  # 0..2, left to right
    extent: int  # px
    x: int  # top-left corner, px
    y: int

    @property
    def facts(self) -> tuple[str, str, str, str, str]:
        """The object in words: colour, shape, size, row, column."""
        return self.color, self.shape, self.size, ROWS[self.row], COLUMNS[self.column]


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]
    background: dict  # pattern and its parameters (see `draw_background`)

    def by_shape(self, shape: str) -> Obj | None:
        return next((o for o in self.objects if o.shape == shape), None)


@dataclass(frozen=True)
class Question:
    type: str
    phrasing: int  # index into PHRASINGS[type]
    text: str
    answer: str
    about: tuple[str, ...]  # the shapes of the objects whose facts decide the answer (count: every one of that colour)


def rng_for(seed: int, split: str, index: int, what: str) -> random.Random:
    return random.Random(f"scenes:{seed}:{split}:{index}:{what}")


# ----------------------------------------------------------------------------------------------------------------------
# Scenes


def sample_scene(rng: random.Random, n_objects: int | None = None) -> Scene:
    n = n_objects if n_objects is not None else rng.randint(MIN_OBJECTS, MAX_OBJECTS)
    if not 1 <= n <= len(SHAPES):
        raise ValueError(f"a scene holds 1 to {len(SHAPES)} objects, got {n}")
    shapes = rng.sample(SHAPES, n)
    cells = rng.sample(range(GRID * GRID), n)
    colors: list[str] = []
    for _ in range(n):
        allowed = [c for c in COLORS if colors.count(c) < MAX_SAME_COLOR]
        colors.append(rng.choice(allowed))
    objects = []
    for shape, color, cell in zip(shapes, colors, cells, strict=True):
        size = rng.choice(SIZES)
        extent = rng.randint(*EXTENT[size])
        row, column = divmod(cell, GRID)
        # anywhere in the cell with a 1 px margin: the object never crosses into another cell
        x = column * CELL + rng.randint(1, CELL - 1 - extent)
        y = row * CELL + rng.randint(1, CELL - 1 - extent)
        objects.append(Obj(shape, color, size, row, column, extent, x, y))
    return Scene(tuple(objects), sample_background(rng))


def sample_background(rng: random.Random) -> dict:
    base = rng.randint(50, 130)
    tint = [rng.randint(-15, 15) for _ in range(3)]
    return {"pattern": rng.choice(("noise", "stripes", "checks", "gradient")), "base": [base + t for t in tint],
            "delta": rng.randint(12, 30), "period": rng.randint(3, 9), "direction": rng.choice(("h", "v", "d")),
            "seed": rng.randrange(2**31)}


def draw_background(spec: dict, size: int = IMAGE_SIZE) -> np.ndarray:
    """(size, size, 3) uint8: muted, every pixel's channels within 60 of each other and at most 200."""
    base = np.array(spec["base"], dtype=np.float32)
    yy, xx = np.mgrid[0:size, 0:size]
    pattern, delta, period = spec["pattern"], spec["delta"], spec["period"]
    if pattern == "noise":
        noise = np.random.default_rng(spec["seed"]).normal(0.0, delta / 2, (size, size, 1))
        image = base + noise
    elif pattern == "stripes":
        coord = {"h": yy, "v": xx, "d": xx + yy}[spec["direction"]]
        image = base + delta * ((coord // period) % 2)[..., None]
    elif pattern == "checks":
        image = base + delta * (((xx // period) + (yy // period)) % 2)[..., None]
    else:  # gradient, along the direction
        coord = {"h": yy, "v": xx, "d": (xx + yy) / 2}[spec["direction"]]
        image = base + 2 * delta * (coord / size)[..., None]
    return np.clip(image, 0, 200).astype(np.uint8)


def shape_points(shape: str, x: int, y: int, extent: int) -> list[tuple[float, float]]:
    """The polygon of a polygonal shape in the box (x, y, x + extent - 1, y + extent - 1)."""
    x1, y1 = x + extent - 1, y + extent - 1
    cx, cy = (x + x1) / 2, (y + y1) / 2
    if shape == "triangle":
        return [(cx, y), (x1, y1), (x, y1)]
    if shape == "diamond":
        return [(cx, y), (x1, cy), (cx, y1), (x, cy)]
    if shape == "star":
        outer, inner = (extent - 1) / 2, (extent - 1) / 2 * 0.45
        points = []
        for k in range(10):
            r = outer if k % 2 == 0 else inner
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((cx + r * math.cos(angle), cy + outer * 0.1 + r * math.sin(angle)))
        return points
    raise ValueError(f"{shape} is not a polygon")


def render(scene: Scene, size: int = IMAGE_SIZE) -> Image.Image:
    """The scene's picture (RGB), drawn without anti-aliasing."""
    image = Image.fromarray(draw_background(scene.background, size))
    draw = ImageDraw.Draw(image)
    for o in scene.objects:
        color = PALETTE[o.color]
        x1, y1 = o.x + o.extent - 1, o.y + o.extent - 1
        if o.shape == "circle":
            draw.ellipse((o.x, o.y, x1, y1), fill=color)
        elif o.shape == "square":
            draw.rectangle((o.x, o.y, x1, y1), fill=color)
        elif o.shape == "cross":
            arm = max(3, round(o.extent / 3))
            start = o.x + (o.extent - arm) // 2
            top = o.y + (o.extent - arm) // 2
            draw.rectangle((start, o.y, start + arm - 1, y1), fill=color)
            draw.rectangle((o.x, top, x1, top + arm - 1), fill=color)
        else:
            draw.polygon(shape_points(o.shape, o.x, o.y, o.extent), fill=color)
    return image


# ----------------------------------------------------------------------------------------------------------------------
# Questions


def ask(scene: Scene, kind: str, rng: random.Random, phrasing: int | None = None) -> Question:
    """One question of type `kind` about `scene`, with its answer; the phrasing is drawn unless given."""
    if kind not in PHRASINGS:
        raise ValueError(f"unknown question type {kind!r}; known: {', '.join(TYPES)}")
    objects = scene.objects
    p = rng.randrange(len(PHRASINGS[kind])) if phrasing is None else phrasing
    template = PHRASINGS[kind][p]
    if kind in ("color", "size"):
        o = rng.choice(objects)
        answer, slots, about = (o.color if kind == "color" else o.size), {"shape": o.shape}, (o.shape,)
    elif kind == "shape_at":
        o = rng.choice(objects)
        answer, about = o.shape, (o.shape,)
        slots = {"row": ROWS[o.row], "column": COLUMNS[o.column]}
    elif kind == "exists":
        o = rng.choice(objects)
        if rng.random() < 0.5:
            color, shape, answer = o.color, o.shape, "yes"
        elif rng.random() < 0.5:  # the object's shape in another colour: only the binding tells
            color, shape, answer = rng.choice([c for c in COLORS if c != o.color]), o.shape, "no"
        else:  # the object's colour on a shape that is not in the scene (if there is one)
            absent = [s for s in SHAPES if scene.by_shape(s) is None]
            color, shape, answer = o.color, rng.choice(absent or [o.shape]), "no"
            if not absent:
                color = rng.choice([c for c in COLORS if c != o.color])
        slots, about = {"color": color, "shape": shape}, (shape,) if scene.by_shape(shape) else ()
    elif kind == "count":
        present = sorted({o.color for o in objects})
        color = rng.choice([c for c in COLORS if c not in present] or present) if rng.random() < 0.2 \
            else rng.choice(present)
        matching = [o for o in objects if o.color == color]
        answer, slots, about = NUMBERS[len(matching)], {"color": color}, tuple(o.shape for o in matching)
    else:  # left_of / above: two objects in different columns / rows, in either order
        axis = "column" if kind == "left_of" else "row"
        pairs = [(a, b) for a in objects for b in objects if getattr(a, axis) != getattr(b, axis)]
        if not pairs:  # every object in one column (row): ask about another pair type's axis is impossible
            raise ValueError(f"no two objects in different {axis}s")
        a, b = rng.choice(pairs)
        answer = "yes" if getattr(a, axis) < getattr(b, axis) else "no"
        slots, about = {"shape": a.shape, "other": b.shape}, (a.shape, b.shape)
    return Question(kind, p, template.format(**slots), answer, about)


def questions_for(scene: Scene, rng: random.Random, per_type: dict[str, int] | None = None) -> list[Question]:
    """`per_type[kind]` questions of each type about `scene` (default: one of each); a type that cannot be asked of
    the scene (left_of when every object is in one column) is left out."""
    per_type = per_type or dict.fromkeys(TYPES, 1)
    unknown = sorted(set(per_type) - set(TYPES))
    if unknown:
        raise ValueError(f"unknown question type(s) {unknown}; known: {', '.join(TYPES)}")
    out = []
    for kind, count in per_type.items():
        for _ in range(count):
            try:
                out.append(ask(scene, kind, rng))
            except ValueError:
                break
    return out


def make_split(seed: int, split: str, n_scenes: int, per_type: dict[str, int] | None = None,
               n_objects: tuple[int, int] = (MIN_OBJECTS, MAX_OBJECTS)) -> list[tuple[Scene, list[Question]]]:
    """`n_scenes` scenes of a split, each with its questions; scene i depends on (seed, split, i) alone."""
    out = []
    for i in range(n_scenes):
        scene = sample_scene(rng_for(seed, split, i, "scene"), rng_for(seed, split, i, "n").randint(*n_objects))
        out.append((scene, questions_for(scene, rng_for(seed, split, i, "questions"), per_type)))
    return out


def describe(scene: Scene) -> str:
    """The scene in words, one object per clause (for captions and for people)."""
    return ", ".join(f"a {o.size} {o.color} {o.shape} at the {ROWS[o.row]} {COLUMNS[o.column]}"
                     for o in scene.objects)
