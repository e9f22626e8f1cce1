"""easy-VQA (the `easy-vqa` PyPI package) as an offline data source.

easy-VQA is a generated VQA set: each 64x64 PNG shows one shape (circle, rectangle or
triangle) in one of 8 colours on a light background, with about ten questions per image
whose answers are among 13 words (the 3 shapes, the 8 colours, yes, no). The package ships
its data as files:
    easy_vqa/data/{train,test}/questions.json   [[question, answer, image_id], ...]
    easy_vqa/data/{train,test}/images/<image_id>.png
    easy_vqa/data/answers.txt
4,000 train / 1,000 test images, 38,575 / 9,673 questions.

`attributes` recovers each image's (shape, colour) from its questions alone. The questions
never contradict each other, but for about a tenth of the images they do not tell the shape
or the colour (only "is there a teal shape? no"-style questions about it): on the installed
data 3,578 of 4,000 train images resolve (259 unknown colour, 163 unknown shape) and 888 of
1,000 test images (66 unknown colour, 46 unknown shape). `attribute_problems` lists the
images left out and why. The pixels agree: in every resolved image of both splits the most
frequent non-background pixel is its colour's palette value; in the test split (checked by the
tests) the share of its bounding box the shape fills also tells its shape, bar shapes under
10 px wide.
"""
from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path

from vlmoe.data.image_refs import FileImage
from vlmoe.data.errors import DataError

EASY_VQA_SPLITS = ("train", "test")
SHAPES = ("circle", "rectangle", "triangle")
COLORS = ("black", "blue", "brown", "gray", "green", "red", "teal", "yellow")

Attributes = tuple[str, str]  # (shape, colour)
# one thing a question says about its image: (kind, value, present); kind is "shape" or "color"
Fact = tuple[str, str, bool]


def easy_vqa_root() -> Path:
    """The installed package's `data` folder, found without importing the package."""
    spec = importlib.util.find_spec("easy_vqa")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("easy_vqa: the `easy-vqa` package is not installed (pip install easy-vqa)")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def _split_dir(split: str) -> Path:
    if split not in EASY_VQA_SPLITS:
        raise DataError(f"easy_vqa: unknown split {split!r}; splits: {', '.join(EASY_VQA_SPLITS)}")
    path = easy_vqa_root() / split
    if not path.is_dir():
        raise DataError(f"easy_vqa: path does not exist: {path}")
    return path


def questions(split: str) -> list[tuple[str, str, int]]:
    """(question, answer, image_id) of a split, in file order."""
    path = _split_dir(split) / "questions.json"
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"easy_vqa: cannot read {path}: {e}") from e
    return [(str(question), str(answer), int(image_id)) for question, answer, image_id in rows]


def image_path(split: str, image_id: int) -> Path:
    """Where the PNG of `image_id` lives (not checked to exist)."""
    return _split_dir(split) / "images" / f"{image_id}.png"


def image_ids(split: str) -> list[int]:
    """Sorted ids of the split's images that have a PNG file."""
    images = _split_dir(split) / "images"
    return sorted(int(p.stem) for p in images.glob("*.png") if p.stem.isdigit())


def question_facts(question: str, answer: str) -> list[Fact]:
    """What one question and its answer say about the image.

    A "what ..." question presupposes the attribute it names ("what is the blue shape?":
    blue) and its answer gives the other one (rectangle). A yes/no question names one
    attribute, present when the answer is yes, unless the question is negated ("is there
    not ...", "is no ... present?", "does the image not contain ...").
    """
    words = question.rstrip("?").split()
    named = [("shape", w, True) for w in words if w in SHAPES] + [("color", w, True) for w in words if w in COLORS]
    if answer in SHAPES:
        return named + [("shape", answer, True)]
    if answer in COLORS:
        return named + [("color", answer, True)]
    negated = "not" in words or "no" in words
    present = (answer == "yes") != negated
    return [(kind, value, present) for kind, value, _ in named]


def resolve_attributes(facts: list[Fact]) -> Attributes | str:
    """(shape, colour) the facts determine, else why not ("unknown shape", "contradictory color").

    Each image shows exactly one shape, so a shape (colour) is also determined when the facts
    deny all the others.
    """
    resolved = []
    for kind, values in (("shape", SHAPES), ("color", COLORS)):
        present = {value for k, value, is_present in facts if k == kind and is_present}
        absent = {value for k, value, is_present in facts if k == kind and not is_present}
        if len(present) > 1 or present & absent:
            return f"contradictory {kind}"
        candidates = present or set(values) - absent
        if len(candidates) != 1:
            return f"unknown {kind}"
        resolved.append(candidates.pop())
    return resolved[0], resolved[1]


def _resolved(split: str) -> dict[int, Attributes | str]:
    with_image = set(image_ids(split))
    facts: dict[int, list[Fact]] = {image_id: [] for image_id in with_image}
    for question, answer, image_id in questions(split):
        facts.setdefault(image_id, []).extend(question_facts(question, answer))
    return {image_id: resolve_attributes(image_facts) if image_id in with_image else "no image file"
            for image_id, image_facts in sorted(facts.items())}


def attributes(split: str) -> dict[int, Attributes]:
    """image_id -> (shape, colour) for every image whose questions determine one of each.

    Images left out (questions contradictory, or not enough to tell the shape or colour)
    are listed, with the reason, by `attribute_problems`.
    """
    return {image_id: result for image_id, result in _resolved(split).items() if isinstance(result, tuple)}


def attribute_problems(split: str) -> dict[int, str]:
    """image_id -> why `attributes` leaves it out (see the module docstring for the counts)."""
    return {image_id: result for image_id, result in _resolved(split).items() if isinstance(result, str)}


def captioned_images() -> Iterator[dict]:
    """Pair records for pretraining: every easy-VQA *train* image whose attributes resolve, with the
    constructed caption "a {colour} {shape}" ("a red circle"); the test images, our validation
    split of the downstream tasks, are never used here. `label_name` is the shape. The images are
    lazy `FileImage`s: a missing or broken file surfaces when it is opened (see `vlmoe.data.sources`)."""
    for image_id, (shape, color) in sorted(attributes("train").items()):
        yield {"image": FileImage(str(image_path("train", image_id))), "text": f"a {color} {shape}",
               "label_name": shape, "source": "easy_vqa", "key": f"train/{image_id}"}
