"""A synthetic vision-language world, generated from a seed: scenes of colored shapes, their captions and
question/answer pairs, in train / validation / test splits.

A scene holds one or two groups of objects. A group is `count` (1-3; 1-2 when there are two groups) objects of one
shape, color and size; two groups differ in shape and in color. With two groups, one stands in the left half of the
image and the other in the right half; a lone object also stands on one side. Every attribute is in the pixels and
nowhere else: a caption or an answer cannot be guessed without the image (chance is 1/6 for a color, 1/3 for a
shape or a count, 1/2 for a size, a side or a yes/no).
"""

from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 64
SHAPES = ("circle", "square", "triangle")
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 90, 230),
    "yellow": (235, 205, 40),
    "purple": (150, 60, 200),
    "white": (250, 250, 250),
}
SIZES = {"small": 4.5, "large": 8.5}  # radius in pixels at 64 x 64
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
SIDES = ("left", "right")


@dataclass(frozen=True)
class Group:
    shape: str
    color: str
    size: str
    count: int
    side: str | None  # "left" / "right", or None for a lone group of several objects spread over the image

    def phrase(self, with_size: bool = True, with_side: bool = True) -> str:
        """`"two small red circles on the left"`, `"a large blue square"`, ..."""
        words = ["a" if self.count == 1 else COUNT_WORDS[self.count]]
        if with_size:
            words.append(self.size)
        words += [self.color, self.shape + ("s" if self.count > 1 else "")]
        if with_side and self.side is not None:
            words += ["on the", self.side]
        return " ".join(words)


@dataclass(frozen=True)
class Scene:
    groups: tuple[Group, ...]
    seed: int  # draws the exact positions and the background

    def key(self) -> str:
        """What the captions can tell apart (positions within a side are not described)."""
        return " | ".join(sorted(group.phrase() for group in self.groups))

    def captions(self) -> list[str]:
        """Every caption of the scene: the groups in both orders, with and without sizes, with "there is/are"."""
        orders = [self.groups] if len(self.groups) == 1 else [self.groups, self.groups[::-1]]
        captions = []
        for groups in orders:
            full = " and ".join(group.phrase() for group in groups)
            captions.append(full)
            verb = "is" if groups[0].count == 1 else "are"
            captions.append(f"there {verb} {full}")
            captions.append(" and ".join(group.phrase(with_size=False) for group in groups))
        return list(dict.fromkeys(captions))

    def questions(self) -> list[dict[str, str]]:
        """Every question the scene answers: `{"question", "answer", "type"}`."""
        qa = []
        present = {group.shape for group in self.groups}
        for group in self.groups:
            is_the = f"is the {group.shape}" if group.count == 1 else f"are the {group.shape}s"
            qa.append({"question": f"what color {is_the}?", "answer": group.color, "type": "color"})
            qa.append({"question": f"what size {is_the}?", "answer": group.size, "type": "size"})
            qa.append(
                {
                    "question": f"how many {group.shape}s are there?",
                    "answer": COUNT_WORDS[group.count],
                    "type": "count",
                }
            )
            qa.append({"question": f"which shape is {group.color}?", "answer": group.shape, "type": "shape"})
            if group.side is not None:
                qa.append({"question": f"where {is_the}?", "answer": group.side, "type": "side"})
        for shape in SHAPES:
            answer = "yes" if shape in present else "no"
            qa.append({"question": f"is there a {shape}?", "answer": answer, "type": "yes/no"})
        return qa

    def _layout(self) -> tuple[np.random.Generator, tuple[int, ...], list[tuple[int, float, float, float]]]:
        """The scene's random drawing decisions: `(rng, background color, [(group index, x, y, radius)])`; `rng` is
        left where the sensor noise continues."""
        rng = np.random.default_rng(self.seed)
        background = tuple(int(v) for v in rng.integers(60, 110, size=3))
        placed: list[tuple[int, float, float, float]] = []
        for index, group in enumerate(self.groups):
            radius = SIZES[group.size]
            lo, hi = radius + 1, IMAGE_SIZE - radius - 1
            if group.side == "left":
                x_range = (lo, IMAGE_SIZE / 2 - radius)
            elif group.side == "right":
                x_range = (IMAGE_SIZE / 2 + radius, hi)
            else:
                x_range = (lo, hi)
            for _ in range(group.count):
                for _attempt in range(200):  # rejection sampling: objects never overlap
                    x, y = rng.uniform(*x_range), rng.uniform(lo, hi)
                    if all(math.hypot(x - px, y - py) > radius + pr + 2 for _, px, py, pr in placed):
                        break
                placed.append((index, x, y, radius))
        return rng, background, placed

    def draw(self) -> Image.Image:
        rng, background, placed = self._layout()
        image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), background)
        pen = ImageDraw.Draw(image)
        for index, x, y, radius in placed:
            group = self.groups[index]
            _draw_shape(pen, group.shape, x, y, radius, COLORS[group.color])
        # sensor noise, so that no two images are equal pixel for pixel
        pixels = np.asarray(image, dtype=np.int16) + rng.integers(-12, 13, size=(IMAGE_SIZE, IMAGE_SIZE, 3))
        return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))

    def group_mask(self) -> np.ndarray:
        """`[H, W]` int: the index of the group each pixel shows, -1 for the background."""
        _, _, placed = self._layout()
        image = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
        pen = ImageDraw.Draw(image)
        for index, x, y, radius in placed:
            _draw_shape(pen, self.groups[index].shape, x, y, radius, index + 1)
        return np.asarray(image, dtype=np.int64) - 1


def _draw_shape(pen: ImageDraw.ImageDraw, shape: str, x: float, y: float, r: float, color: tuple) -> None:
    if shape == "circle":
        pen.ellipse((x - r, y - r, x + r, y + r), fill=color)
    elif shape == "square":
        s = r * 0.88  # the same area as the circle, roughly
        pen.rectangle((x - s, y - s, x + s, y + s), fill=color)
    else:
        pen.polygon([(x - r, y + r * 0.85), (x + r, y + r * 0.85), (x, y - r * 1.05)], fill=color)


def random_scene(rng: random.Random) -> Scene:
    num_groups = 1 if rng.random() < 0.4 else 2
    shapes = rng.sample(SHAPES, num_groups)
    colors = rng.sample(list(COLORS), num_groups)
    sides = rng.sample(SIDES, 2)
    groups = []
    for index in range(num_groups):
        count = rng.randint(1, 3 if num_groups == 1 else 2)
        size = rng.choice(list(SIZES))
        if num_groups == 2:
            side = sides[index]
        elif count == 1:
            side = sides[0]
        else:
            side = None
        if count == 3 and size == "large":
            size = "small" if rng.random() < 0.5 else size  # three large objects rarely fit without overlap
        groups.append(Group(shapes[index], colors[index], size, count, side))
    return Scene(tuple(groups), seed=rng.getrandbits(32))


def make_world(num_train: int, num_val: int, num_test: int, seed: int = 0) -> dict[str, list[Scene]]:
    """The splits, each drawn with its own generator. Within the validation and the test split every scene is
    distinct (no two held-out images share their captions, so retrieval has one right answer); a held-out scene may
    also occur in training, with other positions and noise, as a COCO caption recurs across images."""
    splits = {}
    for offset, (split, size) in enumerate((("train", num_train), ("validation", num_val), ("test", num_test))):
        rng = random.Random(seed * 1000 + offset)
        scenes: dict[str, Scene] = {}
        while len(scenes) < size:
            scene = random_scene(rng)
            if split == "train":
                scenes[str(len(scenes))] = scene
            else:
                scenes.setdefault(scene.key(), scene)
        splits[split] = list(scenes.values())
    return splits


# A group as the captions phrase it (`Group.phrase`): "two small red circles on the left", "a blue square".
_GROUP_PHRASE = re.compile(
    rf"\b(a|{'|'.join(COUNT_WORDS.values())}) (?:({'|'.join(SIZES)}) )?({'|'.join(COLORS)}) "
    rf"({'|'.join(SHAPES)})s?(?: on the ({'|'.join(SIDES)}))?"
)
CAPTION_ATTRIBUTES = ("groups", "color", "shape", "count", "size", "side")


def caption_content_accuracy(captions: Sequence[str], scenes: Sequence[Sequence[dict]]) -> dict[str, float]:
    """What generated captions say about their images, attribute by attribute (%), read with the world's grammar.

    CIDEr scores phrasing as much as content (which of an image's six caption styles a model settles on moves it by
    tens of points); this scores only what a caption claims. `scenes[i]` is image i's `record["scene"]` (its groups as
    dicts). Per attribute:

    - `groups`: the caption describes as many groups as the image has;
    - `color`: of the image's groups, the share the caption names by their color (a scene's groups differ in color);
    - `shape`, `count`, `side`: of those groups, the share whose shape / number / side (or none, for a lone group of
      several objects) the caption states right;
    - `size`: the same, over the groups whose phrase states a size.
    """
    right = {name: 0 for name in CAPTION_ATTRIBUTES}
    total = dict(right)
    count_of = {"a": 1} | {word: count for count, word in COUNT_WORDS.items()}
    for caption, groups in zip(captions, scenes, strict=True):
        described = {match[3]: match for match in _GROUP_PHRASE.finditer(caption)}
        total["groups"] += 1
        right["groups"] += len(described) == len(groups)
        for group in groups:
            total["color"] += 1
            match = described.get(group["color"])
            if match is None:
                continue
            right["color"] += 1
            for name, said, truth in (
                ("shape", match[4], group["shape"]),
                ("count", count_of[match[1]], group["count"]),
                ("side", match[5], group["side"]),
                ("size", match[2], group["size"]),
            ):
                if name == "size" and said is None:
                    continue
                total[name] += 1
                right[name] += said == truth
    return {name: 100 * right[name] / total[name] if total[name] else float("nan") for name in CAPTION_ATTRIBUTES}


def caption_is_right(caption: str, groups: Sequence[dict]) -> bool:
    """The caption is wholly right about its image (`groups`: `record["scene"]`): it names every group and no other,
    each with its right color, shape, count and side, and its right size where it states one."""
    described = {match[3]: match for match in _GROUP_PHRASE.finditer(caption)}
    if len(_GROUP_PHRASE.findall(caption)) != len(groups) or len(described) != len(groups):
        return False
    count_of = {"a": 1} | {word: count for count, word in COUNT_WORDS.items()}
    for group in groups:
        match = described.get(group["color"])
        if match is None or (match[4], count_of[match[1]], match[5]) != (
            group["shape"],
            group["count"],
            group["side"],
        ):
            return False
        if match[2] is not None and match[2] != group["size"]:
            return False
    return True


def write_split(scenes: list[Scene], folder: Path) -> list[dict[str, Any]]:
    """Draw the images into `folder/images/` and write `folder/annotations.json`: one record per image with its
    path (relative to `folder`), captions, questions and scene."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for index, scene in enumerate(scenes):
        path = f"images/{index:05d}.png"
        scene.draw().save(folder / path)
        records.append(
            {
                "image": path,
                "caption": scene.captions(),
                "questions": scene.questions(),
                "scene": [asdict(group) for group in scene.groups],
            }
        )
    (folder / "annotations.json").write_text(json.dumps(records, indent=1))
    return records
