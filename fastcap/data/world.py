"""Procedural "caption world": FastCap's built-in image-captioning dataset.

Scenes of coloured shapes on textured backgrounds are drawn with numpy/PIL and written as
real JPEG files plus official COCO captions JSON, so training reads them through the same
COCO loader as real data. Everything is a pure function of the parameters and the seed.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["ensure_world"]

# Part of the cache key: bump whenever drawing or captions change so stale folders are not reused.
WORLD_VERSION = 1
SPLITS = ("train", "val", "test")
VARIANTS = ("clean", "web")
MAX_TOKENS = 20
_SS = 2  # shapes are drawn at 2x and box-downsampled, which is cheap antialiasing

KINDS = ("circle", "square", "triangle", "star", "cross", "ring", "diamond", "heart", "hexagon")
NOUNS = {
    "circle": ("circle", "ball", "disc"), "square": ("square", "box", "block"),
    "triangle": ("triangle",), "star": ("star",), "cross": ("cross",), "ring": ("ring", "donut"),
    "diamond": ("diamond",), "heart": ("heart",), "hexagon": ("hexagon",),
}
_PLURALS = {"box": "boxes", "cross": "crosses"}
COLOURS = {
    "red": (215, 35, 35), "green": (40, 170, 50), "blue": (35, 70, 215), "yellow": (240, 215, 40),
    "orange": (245, 135, 25), "purple": (135, 50, 175), "pink": (245, 130, 190),
    "white": (245, 245, 245), "black": (25, 25, 25), "brown": (125, 75, 35),
}
COLOUR_NAMES = tuple(COLOURS)
_COLOUR_WORDS = {"purple": ("purple", "purple", "violet")}
SIZES = {"small": 0.075, "medium": 0.11, "large": 0.155}  # radius as a fraction of image size
_SIZE_WORDS = {"small": ("small", "small", "little", "tiny"), "medium": ("medium", "medium sized"),
               "large": ("large", "large", "big")}
# Plain backgrounds stay mid-tone so that both white and black objects remain visible.
PLAIN_BG = {"gray": (125, 125, 128), "dark": (55, 58, 66), "teal": (55, 110, 112)}
_LOW_CONTRAST = {"dark": ("black", "brown"), "grass": ("green",), "sky": ("blue",)}  # colours never used there
BACKGROUNDS = ("plain", "stripes", "checker", "dots", "sky", "grass")
_BG_PHRASES = {
    "plain": ("on a {name} background", "on a plain {name} background", "on a plain background"),
    "stripes": ("on a striped background", "on stripes", "in front of stripes"),
    "checker": ("on a checkerboard", "on a checkered background", "on a checkered floor"),
    "dots": ("on a dotted background", "on a polka dot background"),
    "sky": ("against a blue sky", "in the sky", "against the sky"),
    "grass": ("on the grass", "on a grassy field", "on green grass"),
}
_BG_NOUNS = {
    "plain": ("a plain {name} background", "a {name} background"), "stripes": ("a striped background",),
    "checker": ("a checkered background", "a checkerboard"), "dots": ("a dotted background",),
    "sky": ("a blue sky",), "grass": ("a grassy field", "a patch of grass"),
}
_BG_SHORT = {"plain": ("{name} background", "plain background"), "stripes": ("stripes",),
             "checker": ("checkerboard",), "dots": ("dots",), "sky": ("sky", "blue sky"), "grass": ("grass",)}
_RELATIONS = {
    "left": ("to the left of", "left of", "on the left of"),
    "right": ("to the right of", "right of", "on the right of"),
    "above": ("above", "over", "on top of"), "below": ("below", "under", "beneath", "underneath"),
    "inside": ("inside", "in", "within", "in the middle of"), "around": ("around", "surrounding"),
}
_INVERSE = {"left": "right", "right": "left", "above": "below", "below": "above", "inside": "around"}
_LOCATIONS = {  # (column, row) of a 3x3 grid, used when the image holds a single object
    (0, 0): "in the top left corner", (1, 0): "at the top", (2, 0): "in the top right corner",
    (0, 1): "on the left", (1, 1): "in the center", (2, 1): "on the right",
    (0, 2): "in the bottom left corner", (1, 2): "at the bottom", (2, 2): "in the bottom right corner",
}
_PREFIXES = ("an image of", "a picture of", "a photo of", "a drawing of", "a simple drawing of")
_VAGUE = ("some shapes", "abstract picture", "colorful shapes", "geometric shapes", "abstract art",
          "simple shapes", "untitled", "image", "picture", "graphic design", "pattern", "shapes on {bg}")
_WORD_DIGITS = {1: ("a", "1"), 2: ("two", "2"), 3: ("three", "3")}


def _pick(rng: np.random.Generator, seq):
    return seq[int(rng.integers(len(seq)))]


def _plural(noun: str) -> str:
    return _PLURALS.get(noun, noun + "s")


# ---------------------------------------------------------------------------------------- scenes
def _sample_scene(rng: np.random.Generator) -> dict:
    bg = _pick(rng, BACKGROUNDS)
    bg_name = _pick(rng, tuple(PLAIN_BG)) if bg == "plain" else bg
    n_groups = int(rng.choice([1, 2, 3], p=[0.25, 0.5, 0.25]))
    inside = n_groups >= 2 and rng.random() < 0.12
    groups, used = [], set()
    for gi in range(n_groups):
        while True:  # (kind, colour) must differ between groups or relations become ambiguous
            kind, colour = _pick(rng, KINDS), _pick(rng, COLOUR_NAMES)
            if colour in _LOW_CONTRAST.get(bg_name, ()):
                continue
            if inside and gi == 0 and kind == "ring":
                continue
            if inside and gi == 1:
                kind = "ring"
            if (kind, colour) not in used:
                break
        used.add((kind, colour))
        count = int(rng.choice([1, 2, 3], p=[0.5, 0.3, 0.2] if gi < 2 else [0.6, 0.3, 0.1]))
        sizes = ("small", "medium") if count == 3 or gi == 2 else ("small", "medium", "large")
        size = _pick(rng, sizes)
        if inside and gi == 0:
            count, size = 1, _pick(rng, ("small", "medium"))
        if inside and gi == 1:
            count, size = 1, "large"
        groups.append({"kind": kind, "colour": colour, "size": size, "count": count})
    relation = "inside" if inside else (_pick(rng, ("left", "right", "above", "below")) if n_groups > 1 else None)
    loc = (int(rng.integers(3)), int(rng.integers(3))) if n_groups == 1 and groups[0]["count"] == 1 else None
    scene = {"groups": groups, "relation": relation, "bg": bg, "bg_name": bg_name, "loc": loc}
    scene["objects"] = _place(rng, scene)
    return scene


def _place(rng: np.random.Generator, scene: dict) -> list[tuple[int, float, float, float]]:
    """Objects as (group, cx, cy, r) in unit coordinates, honouring the scene's relation."""
    rel, objs = scene["relation"], []
    if rel == "inside":
        cx, cy, rr = 0.5 + rng.uniform(-0.08, 0.08), 0.5 + rng.uniform(-0.08, 0.08), rng.uniform(0.27, 0.31)
        objs = [(0, cx + rng.uniform(-0.02, 0.02), cy + rng.uniform(-0.02, 0.02),
                 SIZES[scene["groups"][0]["size"]] * rng.uniform(0.9, 1.05)), (1, cx, cy, rr)]
    for gi, g in enumerate(scene["groups"]):
        if rel == "inside" and gi < 2:
            continue
        for _ in range(g["count"]):
            for _attempt in range(40):
                r = SIZES[g["size"]] * rng.uniform(0.9, 1.1)
                lo, hi = [r, r], [1 - r, 1 - r]
                side = rel if gi == 0 else (_INVERSE.get(rel) if gi == 1 else None)
                # Objects may cross the midline a little, which creates partial occlusions.
                if side == "left":
                    hi[0] = 0.5 - 0.35 * r
                elif side == "right":
                    lo[0] = 0.5 + 0.35 * r
                elif side == "above":
                    hi[1] = 0.5 - 0.35 * r
                elif side == "below":
                    lo[1] = 0.5 + 0.35 * r
                if scene["loc"] is not None:
                    c = [0.2 + 0.3 * v + rng.uniform(-0.05, 0.05) for v in scene["loc"]]
                    cx, cy = (float(np.clip(v, r, 1 - r)) for v in c)
                else:
                    cx, cy = rng.uniform(lo[0], hi[0]), rng.uniform(lo[1], hi[1])
                # Same-group objects barely touch (so they can be counted); others may overlap partly.
                ok = all(np.hypot(cx - ox, cy - oy) >= (1.7 * max(r, orr) if og == gi else 0.75 * (r + orr))
                         for og, ox, oy, orr in objs)
                if ok:
                    break
            objs.append((gi, cx, cy, r))
    return objs


# ---------------------------------------------------------------------------------------- drawing
@functools.lru_cache(maxsize=8)
def _grid(n: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32)
    return yy, xx


def _muted(rng: np.random.Generator, lo: float = 80, hi: float = 170) -> np.ndarray:
    return np.clip(rng.uniform(lo, hi) + rng.normal(0, 18, 3), 0, 255)


def _two_tones(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    a = _muted(rng, 75, 125)
    return a, np.clip(a + rng.uniform(35, 65) + rng.normal(0, 10, 3), 0, 255)


def _background(scene: dict, n: int, rng: np.random.Generator) -> np.ndarray:
    yy, xx = _grid(n)
    kind = scene["bg"]
    if kind == "plain":
        base = np.array(PLAIN_BG[scene["bg_name"]], np.float32) + rng.normal(0, 8, 3)
        img = np.broadcast_to(base, (n, n, 3)) + rng.normal(0, 3, (n, n, 1))
    elif kind in ("stripes", "checker", "dots"):
        a, b = _two_tones(rng)
        if rng.random() < 0.5:
            a, b = b, a
        period = rng.uniform(0.08, 0.2) * n
        if kind == "stripes":
            coord = (yy, xx, (xx + yy) * 0.7071)[int(rng.integers(3))]
            mask = ((coord / period + rng.random()) % 1.0) < 0.5
        elif kind == "checker":
            mask = ((xx // period + yy // period) % 2) == 1
        else:
            ox, oy = rng.random(2) * period
            dx, dy = (xx + ox) % period - period / 2, (yy + oy) % period - period / 2
            mask = dx * dx + dy * dy < (0.22 * period) ** 2
        img = np.where(mask[..., None], b, a)
    elif kind == "sky":
        top = np.array([60, 115, 205]) + rng.normal(0, 10, 3)
        bottom = np.array([160, 195, 235]) + rng.normal(0, 8, 3)
        t = (yy / n)[..., None]
        img = top * (1 - t) + bottom * t
        for _ in range(int(rng.integers(0, 3))):  # soft clouds; blurry, so never mistaken for objects
            cx, cy, s = rng.random() * n, rng.random() * n, rng.uniform(0.08, 0.16) * n
            w = np.exp(-(((xx - cx) / (2 * s)) ** 2 + ((yy - cy) / s) ** 2))[..., None]
            img = img * (1 - 0.6 * w) + 240 * 0.6 * w
    else:  # grass: green noise stretched vertically so it reads as blades
        base = np.array([55, 125, 45]) + rng.normal(0, 10, 3)
        blades = np.repeat(rng.normal(0, 1, (n // 4 + 1, n)), 4, axis=0)[:n]
        img = base + (blades * 16 + rng.normal(0, 8, (n, n)))[..., None] * np.array([0.6, 1.0, 0.4])
    return np.clip(img, 0, 255).astype(np.uint8)


def _polygon(kind: str, cx: float, cy: float, r: float, rot: float) -> list[tuple[float, float]]:
    if kind == "square":
        ang = np.arange(4) * np.pi / 2 + np.pi / 4
        rad = np.full(4, 1.2 * r)
    elif kind == "triangle":
        ang, rad = np.arange(3) * 2 * np.pi / 3 - np.pi / 2, np.full(3, 1.2 * r)
    elif kind == "star":
        ang = np.arange(10) * np.pi / 5 - np.pi / 2
        rad = np.where(np.arange(10) % 2 == 0, 1.2 * r, 0.5 * r)
    elif kind == "hexagon":
        ang, rad = np.arange(6) * np.pi / 3, np.full(6, 1.05 * r)
    elif kind == "diamond":
        pts = np.array([[0, -1.25], [0.75, 0], [0, 1.25], [-0.75, 0]]) * r
        ang, rad = np.arctan2(pts[:, 1], pts[:, 0]), np.hypot(pts[:, 0], pts[:, 1])
    elif kind == "cross":
        w, l = 0.34, 1.05
        pts = np.array([[-w, -l], [w, -l], [w, -w], [l, -w], [l, w], [w, w], [w, l], [-w, l], [-w, w],
                        [-l, w], [-l, -w], [-w, -w]]) * r
        ang, rad = np.arctan2(pts[:, 1], pts[:, 0]), np.hypot(pts[:, 0], pts[:, 1])
    else:  # heart, from the classic parametric curve
        t = np.linspace(0, 2 * np.pi, 40, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t)) - 2.5
        ang, rad = np.arctan2(y, x), np.hypot(x, y) * r / 15
    ang = ang + rot
    return list(zip((cx + rad * np.cos(ang)).tolist(), (cy + rad * np.sin(ang)).tolist()))


# Max rotation per kind: squares, crosses and diamonds must not turn into diamonds or X's.
_ROTATION = {"square": 0.25, "triangle": 0.3, "star": 0.6, "hexagon": 0.5, "diamond": 0.12, "cross": 0.15,
             "heart": 0.25, "circle": 0.0, "ring": 0.0}


def _render(scene: dict, size: int, rng: np.random.Generator) -> Image.Image:
    n = size * _SS
    # Textures are computed at the output size (the costly part) and only shapes are supersampled.
    img = Image.fromarray(_background(scene, size, rng)).resize((n, n), Image.NEAREST)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(0, 6))):  # clutter: specks and thin lines that captions ignore
        x, y, c = rng.random() * n, rng.random() * n, tuple(int(v) for v in _muted(rng, 40, 220))
        if rng.random() < 0.7:
            s = rng.uniform(0.008, 0.02) * n
            draw.ellipse([x - s, y - s, x + s, y + s], fill=c)
        else:
            a, ln = rng.uniform(0, np.pi), rng.uniform(0.1, 0.3) * n
            draw.line([x, y, x + ln * np.cos(a), y + ln * np.sin(a)], fill=c, width=max(1, n // 64))
    styles = []
    for g in scene["groups"]:
        # Mostly a brightness shift: independent channel noise would turn brown olive, white pink.
        rgb = np.clip(np.array(COLOURS[g["colour"]]) + rng.integers(-18, 19) + rng.integers(-7, 8, 3), 0, 255)
        outline = rng.random() < 0.25
        styles.append((rgb, outline))
    for k in rng.permutation(len(scene["objects"])):  # random draw order -> varied occlusions
        gi, cx, cy, r = scene["objects"][k]
        kind, (rgb, outline) = scene["groups"][gi]["kind"], styles[gi]
        fill = tuple(int(v) for v in np.clip(rgb + rng.integers(-5, 6, 3), 0, 255))
        edge = tuple(int(v * 0.45) for v in fill) if outline else None
        ow = max(1, n // 48) if outline else 0
        cx, cy, r, rot = cx * n, cy * n, r * n, rng.uniform(-1, 1) * _ROTATION[kind]
        box = [cx - r, cy - r, cx + r, cy + r]
        if kind == "circle":
            draw.ellipse(box, fill=fill, outline=edge, width=ow)
        elif kind == "ring":
            thick = (0.2 if scene["relation"] == "inside" and gi == 1 else 0.33) * r
            draw.ellipse(box, outline=fill, width=max(2, int(round(thick))))
        else:
            draw.polygon(_polygon(kind, cx, cy, r, rot), fill=fill, outline=edge, width=ow)
    return img.reduce(_SS)


# ---------------------------------------------------------------------------------------- captions
def _fix_articles(text: str) -> str:
    return re.sub(r"\ba (?=[aeiou])", "an ", text)


def _noun_phrase(g: dict, rng: np.random.Generator, size: bool, colour: bool) -> str:
    n = g["count"]
    if n == 1:
        words = [_pick(rng, ("a",) * 8 + ("one", "a single"))]
    else:
        words = [_pick(rng, ("a pair of",) + ("two",) * 10) if n == 2 else "three"]
    if size:
        words.append(_pick(rng, _SIZE_WORDS[g["size"]]))
    if colour:
        words.append(_pick(rng, _COLOUR_WORDS.get(g["colour"], (g["colour"],))))
    noun = _pick(rng, NOUNS[g["kind"]])
    words.append(_plural(noun) if n > 1 else noun)
    return " ".join(words)


def _clean_caption(scene: dict, rng: np.random.Generator, detail: float) -> str:
    groups, rel = scene["groups"], scene["relation"]
    nps = [_noun_phrase(g, rng, rng.random() < 0.6 * detail + 0.15, rng.random() < 0.95) for g in groups]
    be = ["is" if g["count"] == 1 else "are" for g in groups]
    bg = _pick(rng, _BG_PHRASES[scene["bg"]]).format(name=scene["bg_name"])
    lead_bg, subject = False, 0  # subject is None when the clause already has a verb
    if rel is None:
        loc = _LOCATIONS[scene["loc"]] if scene["loc"] else ""
        core = nps[0]
        if loc and rng.random() < 0.3 + 0.5 * detail:
            if rng.random() < 0.3:
                core, subject = f"{nps[0]} {be[0]} {loc}", None
            else:
                core = f"{nps[0]} {loc}"
    else:
        rel_w = _pick(rng, _RELATIONS[rel])
        inv_w = _pick(rng, _RELATIONS[_INVERSE[rel]])
        if rel in ("left", "right") and rng.random() < 0.2:
            rel_w = inv_w = _pick(rng, ("next to", "beside"))
        forms = ["{A} {r} {B}", "{B} {i} {A}", "{A} {ba} {r} {B}", "{B} {bb} {i} {A}", "{A} and {B}"]
        if rel == "inside":
            forms += ["{B} with {A} inside", "{B} with {A} in the middle"]
        weights = np.array([6, 5, 3, 3, 1, 2, 2][: len(forms)], dtype=float)
        form = int(rng.choice(len(forms), p=weights / weights.sum()))
        core = forms[form].format(A=nps[0], B=nps[1], r=rel_w, i=inv_w, ba=be[0], bb=be[1])
        subject = {0: 0, 1: 1, 4: 0, 5: 1, 6: 1}.get(form)
        if len(groups) == 3:
            core += " " + _pick(rng, ("and", "with", "and also", "plus")) + " " + nps[2]
    u = rng.random()
    if subject is not None and u < 0.2:
        core = f"there {be[subject]} {core}"
    elif subject is not None and u < 0.4:
        core = f"{_pick(rng, _PREFIXES)} {core}"
    elif subject is not None and u < 0.5:
        core = f"{_pick(rng, _BG_NOUNS[scene['bg']]).format(name=scene['bg_name'])} with {core}"
        lead_bg = True
    if not lead_bg and rng.random() < 0.25 + 0.5 * detail:
        core = f"{core} {bg}"
    return _fix_articles(core)


def _web_caption(scene: dict, rng: np.random.Generator) -> str:
    """One short alt-text-like caption; ~15% wrong and ~10% vague on purpose."""
    bg_short = _pick(rng, _BG_SHORT[scene["bg"]]).format(name=scene["bg_name"])
    u = rng.random()
    if u < 0.10:
        return _pick(rng, _VAGUE).format(bg=bg_short)
    groups = [dict(g) for g in scene["groups"]]
    wrong = None
    if u < 0.25:  # corrupt one attribute of the main group, and make sure the caption shows it
        wrong = _pick(rng, ("colour", "kind", "count"))
        g = groups[0]
        if wrong == "colour":
            g["colour"] = _pick(rng, tuple(c for c in COLOUR_NAMES if c != g["colour"]))
        elif wrong == "kind":
            g["kind"] = _pick(rng, tuple(k for k in KINDS if k != g["kind"]))
        else:
            g["count"] = _pick(rng, tuple(c for c in (1, 2, 3) if c != g["count"]))

    def cn(g: dict, count: bool = False) -> str:
        noun = _pick(rng, NOUNS[g["kind"]])
        words = [_pick(rng, _COLOUR_WORDS.get(g["colour"], (g["colour"],))), noun]
        if count or g["count"] > 1:
            words[1] = noun if g["count"] == 1 else _plural(noun)
            if count or rng.random() < 0.7:
                words.insert(0, _pick(rng, _WORD_DIGITS[g["count"]]) if rng.random() < 0.3 else
                             ("a", "two", "three")[g["count"] - 1])
        return " ".join(words)

    g0, g1 = groups[0], groups[1] if len(groups) > 1 else None
    templates = ["{c0}", "{c0} on {bg}", "{c0} clipart", "{c0} icon", "{s0} {c0}", "photo of {n0}"]
    if g0["count"] > 1:  # a size word cannot precede a count word
        templates.remove("{s0} {c0}")
    if g1 is not None:
        templates += ["{c0} and {c1}", "{c0} and {c1}", "{c0} {rel} {c1}", "{col0} and {col1} shapes",
                      "{c0} and {c1} on {bg}"]
    if wrong == "count":
        templates = ["{n0}", "photo of {n0}", "{n0} on {bg}"]
    elif wrong == "kind":
        templates = [t for t in templates if "shapes" not in t]
    rel = {"left": "left of", "right": "right of", "above": "above", "below": "below", "inside": "in"}
    text = _pick(rng, templates).format(
        c0=cn(g0), n0=cn(g0, count=True), s0=_pick(rng, _SIZE_WORDS[g0["size"]]), bg=bg_short,
        c1=cn(g1) if g1 else "", col0=g0["colour"], col1=g1["colour"] if g1 else "",
        rel=rel.get(scene["relation"] or "", "and"),
    )
    if text.startswith("photo of") and g0["count"] > 1 and wrong != "colour" and rng.random() < 0.5:
        text = f"photo of {('two', 'three')[g0['count'] - 2]} {_plural(_pick(rng, NOUNS[g0['kind']]))}"
    return _fix_articles(text)


def _captions(scene: dict, rng: np.random.Generator, variant: str) -> list[str]:
    if variant == "web":
        return [_web_caption(scene, rng)]
    caps: list[str] = []
    for attempt in range(60):
        detail = 1.0 if not caps else rng.random()
        cap = _clean_caption(scene, rng, detail if attempt < 30 else 0.0)
        # Distinct phrasings are the point of 5 references; overly long ones are resampled.
        if len(cap.split()) <= MAX_TOKENS and cap not in caps:
            caps.append(cap)
            if len(caps) == 5:
                return caps
    while len(caps) < 5:  # pathological fallback; keeps the "5 per image" contract
        caps.append(_clean_caption(scene, rng, 0.0))
    return caps


# ---------------------------------------------------------------------------------------- files
def _params(variant: str, counts: dict[str, int], image_size: int, seed: int) -> dict:
    return {"variant": variant, "num_train": counts["train"], "num_val": counts["val"],
            "num_test": counts["test"], "image_size": image_size, "seed": seed, "version": WORLD_VERSION}


def _manifest_ok(folder: Path, params: dict) -> bool:
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
        if manifest.get("params") != params:
            return False
        total = sum(manifest["counts"][s]["images"] for s in SPLITS)
        n_files = sum(1 for e in os.scandir(folder / "images") if e.name.endswith(".jpg"))
        return n_files == total and all((folder / f"captions_{s}.json").is_file() for s in SPLITS)
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, separators=(",", ":")))
    os.replace(tmp, path)


def _generate(folder: Path, params: dict, log: Callable[[str], None]) -> None:
    variant, size, seed = params["variant"], params["image_size"], params["seed"]
    (folder / "images").mkdir(parents=True)
    image_id = ann_id = 0
    counts = {}
    for split_idx, split in enumerate(SPLITS):
        images, annotations = [], []
        for i in range(params[f"num_{split}"]):
            # Seeded per image, so any image can be regenerated alone and order never matters.
            key = [seed, VARIANTS.index(variant), split_idx, i]
            scene = _sample_scene(np.random.default_rng(key + [0]))
            img = _render(scene, size, np.random.default_rng(key + [1]))
            image_id += 1
            name = f"{split}_{i:06d}.jpg"
            img.save(folder / "images" / name, quality=90)
            images.append({"id": image_id, "file_name": name, "width": size, "height": size})
            for cap in _captions(scene, np.random.default_rng(key + [2]), variant):
                ann_id += 1
                annotations.append({"id": ann_id, "image_id": image_id, "caption": cap})
        info = {"description": f"FastCap procedural caption world ({variant}, {split})",
                "version": str(WORLD_VERSION), "year": 2024, "contributor": "fastcap", "url": "",
                "date_created": ""}  # fixed, so that the JSON is byte-identical across runs
        _write_json(folder / f"captions_{split}.json",
                    {"info": info, "licenses": [], "images": images, "annotations": annotations})
        counts[split] = {"images": len(images), "captions": len(annotations)}
        log(f"world: {split}: {len(images)} images, {len(annotations)} captions")
    # Written last: its presence is what marks the folder as complete.
    _write_json(folder / "manifest.json", {"params": params, "counts": counts})


def _remove_stale_tmp(root: Path, name: str) -> None:
    """Delete temp folders left by crashed generators, but not those of live processes."""
    for tmp in root.glob(f".{name}.tmp-*"):
        try:
            os.kill(int(tmp.name.rsplit("-", 1)[1]), 0)
        except ProcessLookupError:
            shutil.rmtree(tmp, ignore_errors=True)
        except (ValueError, OSError):
            pass


def ensure_world(root: str | Path, *, variant: str = "clean", num_train: int = 8000, num_val: int = 500,
                 num_test: int = 500, image_size: int = 64, seed: int = 0,
                 log: Callable[[str], None] = print) -> Path:
    """Generate (or reuse) the caption world and return its folder.

    The folder holds ``images/*.jpg`` and ``captions_{train,val,test}.json`` in COCO captions format.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16, got {image_size}")
    counts = {"train": num_train, "val": num_val, "test": num_test}
    if any(int(c) != c or c < 0 for c in counts.values()):
        raise ValueError(f"split sizes must be non-negative integers, got {counts}")
    params = _params(variant, {k: int(v) for k, v in counts.items()}, int(image_size), int(seed))
    digest = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]
    root = Path(root).expanduser()
    folder = root / f"{variant}-{digest}"
    if _manifest_ok(folder, params):
        return folder
    if folder.exists():
        log(f"world: {folder} is incomplete (no valid manifest); rebuilding it from scratch")
        shutil.rmtree(folder)
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(root, folder.name)
    tmp = root / f".{folder.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    log(f"world: generating {variant} world ({num_train}/{num_val}/{num_test} images, "
        f"{image_size}px, seed {seed}) in {folder}")
    start = time.perf_counter()
    try:
        _generate(tmp, params, log)
        try:
            os.replace(tmp, folder)
        except OSError:
            # Another process (e.g. another DDP rank) finished first; its copy is identical.
            if not _manifest_ok(folder, params):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"world: done in {time.perf_counter() - start:.1f}s")
    return folder
