"""A small synthetic VLM dataset as webdataset tar shards: no network, deterministic from a seed.

Images are ``image_size`` squares (default 64) on a plain background holding one or two
shapes, each a colour from :data:`COLOURS`, a shape from :data:`SHAPES` and a distinct
position from :data:`POSITIONS`. The caption names them in the fixed order of
:data:`POSITIONS`::

    a blue square at the top and an orange circle on the left

so the grammar is learnable from text alone while every colour, shape and position word is
predictable only from the image. Sources (name: modality):

- ``captions`` (image-text): image + caption.
- ``text`` (text): templated English documents: counting, sums, facts about colours and
  shapes, short stories that repeat their own words, scene descriptions in caption grammar.
- ``interleaved`` (interleaved): text and 1-3 images in document order, each image followed
  by its description; even samples use the ``segments`` JSON style, odd ones OBELICS-style
  ``texts``/``images`` lists.
- ``instruct`` (interleaved): ``USER: <image> what is in the picture? ASSISTANT: a red
  circle on the left`` (the image is a segment between the two texts); questions also ask
  for one shape's colour or position, or the number of shapes.
- ``text-instruct`` (text): ``USER: what is 3 plus 4? ASSISTANT: 7`` and similar.

Every shard draws from its own RNG seeded by (seed, source, split, shard), so a shard's
bytes do not depend on how many others are generated. CLI: ``python -m vlm_trainer.data.synthdata OUT_DIR``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
from pathlib import Path
from typing import Callable, Mapping

from PIL import Image, ImageDraw
from webdataset import TarWriter

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "purple": (140, 60, 180),
    "orange": (240, 130, 20),
}
SHAPES = ("circle", "square", "triangle")
# position -> (phrase, centre as a fraction of the image side); caption order is this order.
POSITIONS: dict[str, tuple[str, tuple[float, float]]] = {
    "top": ("at the top", (0.5, 0.25)),
    "left": ("on the left", (0.25, 0.5)),
    "center": ("in the center", (0.5, 0.5)),
    "right": ("on the right", (0.75, 0.5)),
    "bottom": ("at the bottom", (0.5, 0.75)),
}
BACKGROUND = (240, 240, 235)
HALF_SIZE, JITTER = 0.10, 0.02  # fractions of the side: neighbouring shapes never touch

SOURCES = {
    "captions": "image-text",
    "text": "text",
    "interleaved": "interleaved",
    "instruct": "interleaved",
    "text-instruct": "text",
}
DEFAULT_SHARDS = {"captions": 8, "text": 4, "interleaved": 4, "instruct": 4, "text-instruct": 2}

Shape = tuple[str, str, str]  # (colour, shape, position)


# ----------------------------------------------------------------------------- images


def random_scene(rng: random.Random) -> list[Shape]:
    positions = rng.sample(list(POSITIONS), rng.randint(1, 2))
    scene = [(rng.choice(list(COLOURS)), rng.choice(SHAPES), pos) for pos in positions]
    return sorted(scene, key=lambda s: list(POSITIONS).index(s[2]))


def caption(scene: list[Shape]) -> str:
    return " and ".join(f"{_article(colour)} {colour} {shape} {POSITIONS[pos][0]}" for colour, shape, pos in scene)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def centre(position: str, size: int) -> tuple[int, int]:
    """The pixel at the nominal centre of a position (always inside a shape drawn there)."""
    fx, fy = POSITIONS[position][1]
    return int(fx * size), int(fy * size)


def draw(scene: list[Shape], size: int, rng: random.Random) -> bytes:
    img = Image.new("RGB", (size, size), BACKGROUND)
    pen = ImageDraw.Draw(img)
    for colour, shape, pos in scene:
        fx, fy = POSITIONS[pos][1]
        cx = (fx + rng.uniform(-JITTER, JITTER)) * size
        cy = (fy + rng.uniform(-JITTER, JITTER)) * size
        r = HALF_SIZE * size
        box = (cx - r, cy - r, cx + r, cy + r)
        fill = COLOURS[colour]
        if shape == "circle":
            pen.ellipse(box, fill=fill)
        elif shape == "square":
            pen.rectangle(box, fill=fill)
        else:
            pen.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
    out = io.BytesIO()
    img.save(out, format="PNG", compress_level=1)  # tiny images: speed over a few bytes
    return out.getvalue()


# ----------------------------------------------------------------------------- text

NAMES = ("tom", "mia", "sam", "lea", "ben", "ava", "max", "zoe")
ANIMALS = ("cat", "dog", "fox", "owl", "bear", "frog", "duck", "mouse")
PLACES = ("park", "forest", "beach", "garden", "river", "market", "school", "hill")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
COLOUR_FACTS = ("the sky is blue", "grass is green", "a banana is yellow", "a tomato is red",
                "an orange is orange", "a plum is purple", "snow is white", "a lemon is yellow")
MIXES = (("red", "yellow", "orange"), ("blue", "yellow", "green"), ("red", "blue", "purple"))
SIDES = {"triangle": 3, "square": 4}


def _counting(rng: random.Random) -> str:
    start, n = rng.randint(0, 20), rng.randint(3, 8)
    if rng.random() < 0.5:
        return f"let us count from {start} to {start + n - 1}: " + ", ".join(map(str, range(start, start + n))) + "."
    top = start + n
    return f"counting down from {top}: " + ", ".join(map(str, range(top, top - n, -1))) + "."


def _sums(rng: random.Random) -> str:
    pairs = [(rng.randint(0, 9), rng.randint(0, 9)) for _ in range(rng.randint(2, 4))]
    return " ".join(f"{a} plus {b} is {a + b}." for a, b in pairs)


def _facts(rng: random.Random) -> str:
    facts = rng.sample(COLOUR_FACTS, 2)
    a, b, c = rng.choice(MIXES)
    shape = rng.choice(SHAPES)
    shape_fact = (f"a {shape} has {NUMBER_WORDS[SIDES[shape]]} sides" if shape in SIDES
                  else "a circle has no corners")
    return f"{facts[0]}. {facts[1]}. mixing {a} and {b} makes {c}. {shape_fact}."


def _story(rng: random.Random) -> str:
    name, animal, place = rng.choice(NAMES), rng.choice(ANIMALS), rng.choice(PLACES)
    colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
    return (f"once upon a time there was a little {animal} called {name}. every day {name} went to the "
            f"{place}. one day {name} found {_article(colour)} {colour} {shape} in the {place}. {name} took the {colour} "
            f"{shape} home and the {animal} was very happy.")


def _scene_text(rng: random.Random) -> str:
    return f"in my picture there is {caption(random_scene(rng))}."


TEXT_TEMPLATES: tuple[Callable[[random.Random], str], ...] = (_counting, _sums, _facts, _story, _scene_text)


def text_document(rng: random.Random) -> str:
    return " ".join(rng.choice(TEXT_TEMPLATES)(rng) for _ in range(rng.randint(2, 4)))


def text_instruction(rng: random.Random) -> str:
    kind = rng.randrange(5)
    if kind == 0:
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        q, a_ = f"what is {a} plus {b}?", str(a + b)
    elif kind == 1:
        shape = rng.choice(list(SIDES))
        q, a_ = f"how many sides does a {shape} have?", NUMBER_WORDS[SIDES[shape]]
    elif kind == 2:
        a, b, c = rng.choice(MIXES)
        q, a_ = f"what colour do {a} and {b} make?", c
    elif kind == 3:
        n = rng.randint(0, 98)
        q, a_ = f"what number comes after {n}?", str(n + 1)
    else:
        start = rng.randint(1, 10)
        q, a_ = f"count from {start} to {start + 3}.", ", ".join(map(str, range(start, start + 4)))
    return f"USER: {q} ASSISTANT: {a_}"


def visual_question(scene: list[Shape], rng: random.Random) -> tuple[str, str]:
    """A question about the scene and its answer (answerable only by looking)."""
    colour, shape, pos = rng.choice(scene)
    unique = sum(s[1] == shape for s in scene) == 1
    kind = rng.randrange(4)
    if kind == 1 and unique:
        return f"what colour is the {shape}?", colour
    if kind == 2:
        return f"where is the {colour} {shape}?", POSITIONS[pos][0]
    if kind == 3:
        return "how many shapes are there?", NUMBER_WORDS[len(scene)]
    return "what is in the picture?", caption(scene)


# ----------------------------------------------------------------------------- samples


# Makers: (rng, image size, index in shard) -> the sample's members by suffix.


def _captions(rng: random.Random, size: int, index: int) -> dict:
    scene = random_scene(rng)
    return {"png": draw(scene, size, rng), "txt": caption(scene)}


def _text(rng: random.Random, size: int, index: int) -> dict:
    return {"txt": text_document(rng)}


def _text_instruct(rng: random.Random, size: int, index: int) -> dict:
    return {"txt": text_instruction(rng)}


def _interleaved_sample(parts: list[str | bytes], obelics: bool) -> dict:
    """Members from parts in document order (str: text, bytes: PNG)."""
    sample: dict = {}
    texts: list[str | None] = []
    images: list[str | None] = []
    for part in parts:
        if isinstance(part, bytes):
            name = f"{sum(i is not None for i in images)}.png"
            sample[name] = part
            texts.append(None)
            images.append(name)
        else:
            texts.append(part)
            images.append(None)
    if obelics:
        doc = {"texts": texts, "images": images}
    else:
        doc = {"segments": [{"type": "image", "image": i} if i else {"type": "text", "text": t}
                            for t, i in zip(texts, images)]}
    sample["json"] = json.dumps(doc)
    return sample


def _interleaved(rng: random.Random, size: int, index: int) -> dict:
    parts: list[str | bytes] = [rng.choice(("here are some pictures i drew.", "look at these shapes.",
                                            "my drawing book has a few pages."))]
    for _ in range(rng.randint(1, 3)):
        scene = random_scene(rng)
        parts += [draw(scene, size, rng), f"this one shows {caption(scene)}."]
        if rng.random() < 0.3:
            parts.append(rng.choice(TEXT_TEMPLATES)(rng))
    return _interleaved_sample(parts, obelics=index % 2 == 1)


def _instruct(rng: random.Random, size: int, index: int) -> dict:
    scene = random_scene(rng)
    question, answer = visual_question(scene, rng)
    parts = ["USER: ", draw(scene, size, rng), f" {question} ASSISTANT: {answer}"]
    return _interleaved_sample(parts, obelics=False)


MAKERS: dict[str, Callable[[random.Random, int, int], dict]] = {
    "captions": _captions,
    "text": _text,
    "interleaved": _interleaved,
    "instruct": _instruct,
    "text-instruct": _text_instruct,
}


# ----------------------------------------------------------------------------- shards


def _shard_uri(directory: Path, split: str, count: int) -> str:
    return str(directory / f"{split}-{{0000..{count - 1:04d}}}.tar")


def write_shard(path: Path, name: str, split: str, shard: int, *, seed: int, samples: int,
                image_size: int) -> None:
    rng = random.Random(f"{seed}:{name}:{split}:{shard}")
    tmp = path.with_name(path.name + ".tmp")
    with TarWriter(str(tmp), mtime=0) as writer:  # fixed mtime: byte-identical shards per seed
        for i in range(samples):
            writer.write({"__key__": f"{split}{shard:04d}-{i:06d}", **MAKERS[name](rng, image_size, i)})
    os.replace(tmp, path)  # a crash never leaves a half shard under the final name


def generate(out_dir: str | os.PathLike, *, seed: int = 0, samples_per_shard: int = 200,
             shards: Mapping[str, int] | None = None, val_shards: int = 1,
             image_size: int = 64) -> dict[str, dict[str, str]]:
    """Write ``<out_dir>/<source>/{train,val}-NNNN.tar`` for each source in ``shards``
    (source name -> train shard count; default :data:`DEFAULT_SHARDS`).

    Returns ``{source: {"modality", "uri", "validationUri"}}``, the fields of the API's
    ``DataSource``, with brace-range URIs. ``<out_dir>/synthdata.json`` (parameters and
    that result) is written last, so its presence means the dataset is complete.
    """
    shards = dict(DEFAULT_SHARDS if shards is None else shards)
    unknown = set(shards) - set(MAKERS)
    if unknown:
        raise ValueError(f"unknown synthetic sources {sorted(unknown)}; known: {sorted(MAKERS)}")
    root = Path(out_dir).resolve()
    result = {}
    for name, count in shards.items():
        directory = root / name
        directory.mkdir(parents=True, exist_ok=True)
        for split, n in (("train", count), ("val", val_shards)):
            for shard in range(n):
                write_shard(directory / f"{split}-{shard:04d}.tar", name, split, shard, seed=seed,
                            samples=samples_per_shard, image_size=image_size)
        result[name] = {"modality": SOURCES[name], "uri": _shard_uri(directory, "train", count),
                        "validationUri": _shard_uri(directory, "val", val_shards)}
    manifest = {"seed": seed, "samples_per_shard": samples_per_shard, "shards": shards,
                "val_shards": val_shards, "image_size": image_size, "sources": result}
    (root / "synthdata.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m vlm_trainer.data.synthdata", description=__doc__.split("\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--samples-per-shard", type=int, default=200)
    parser.add_argument("--image-size", type=int, default=64)
    args = parser.parse_args(argv)
    result = generate(args.out_dir, seed=args.seed, samples_per_shard=args.samples_per_shard,
                      image_size=args.image_size)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
