"""NLVR2-style examples (two images, one statement, true or false) built from easy-VQA.

This is a constructed dataset, not NLVR2: the images are easy-VQA's (one shape of one colour
each), the statements come from 8 fixed templates over the two images' shapes and colours
(see TEMPLATES), and the label is computed from the images' attributes by
`statement_truth`. Split "train" draws only on easy-VQA's train images, "validation" only on
its test images, so no image is in both. Only the images whose attributes easy-VQA's
questions determine are used (`vlmoe.data.easy_vqa.attributes`).

Construction, for the same `seed` the same on every run and machine (one `random.Random`):
  - the examples come in blocks of 16, one per (template, label) pair in shuffled order, so
    labels are exactly balanced overall and per template; the count is
    `pairs_per_image * images` rounded down to a multiple of 16;
  - a template that names a value ("both images show a red shape") draws it with the
    frequency of that value among the images, whatever the label, so the words do not give
    the label away;
  - the two images' values are then drawn uniformly over the configurations that give the
    wanted label, a configuration being (left has the value, right has the value, left and
    right equal). The false cases of "both images show a red shape" are thus evenly: only
    the left is red, only the right, neither (same colour), neither (different colours);
  - each image comes from a shuffled deck of the images with that value, dealt round after
    round, so every image is used about equally (2 * pairs_per_image times give or take 2);
    the two images of an example always differ.

Counts with the defaults (pairs_per_image=2): train 7,152 examples from 3,578 images,
validation 1,776 examples from 888 images; half true, half false, per template too.
"""
from __future__ import annotations

import itertools
import random
from collections.abc import Iterator
from typing import Any, Callable, NamedTuple

from vlmoe.data import easy_vqa
from vlmoe.data.easy_vqa import COLORS, SHAPES, Attributes
from vlmoe.data.sources import DataError

NLVR2_SPLITS = {"train": "train", "validation": "test"}  # our split -> easy-VQA's split


class Template(NamedTuple):
    text: str  # "{value}" stands for the attribute value the statement names, if any
    attribute: str  # "shape" or "color": what of the two images the statement is about
    holds: Callable[[str, str, str | None], bool]  # (left's value, right's value, named value) -> truth


TEMPLATES: dict[str, Template] = {
    "both_shape": Template("both images show a {value}", "shape", lambda left, right, v: left == v and right == v),
    "left_only_shape": Template("the left image shows a {value} and the right one does not", "shape",
                                lambda left, right, v: left == v and right != v),
    "exactly_one_shape": Template("exactly one image shows a {value}", "shape",
                                  lambda left, right, v: (left == v) != (right == v)),
    "same_shape": Template("the two images show the same shape", "shape", lambda left, right, v: left == right),
    "both_color": Template("both images show a {value} shape", "color",
                           lambda left, right, v: left == v and right == v),
    "right_only_color": Template("the right image shows a {value} shape and the left one does not", "color",
                                 lambda left, right, v: right == v and left != v),
    "neither_color": Template("neither image shows a {value} shape", "color",
                              lambda left, right, v: left != v and right != v),
    "same_color": Template("the two shapes have the same color", "color", lambda left, right, v: left == right),
}
_VALUES = {"shape": SHAPES, "color": COLORS}
_ATTRIBUTE_INDEX = {"shape": 0, "color": 1}  # position in an Attributes tuple


def statement_truth(template: str, value: str | None, left: Attributes, right: Attributes) -> bool:
    """Whether TEMPLATES[template], naming `value` (None if it names none), is true of the images."""
    spec = TEMPLATES[template]
    index = _ATTRIBUTE_INDEX[spec.attribute]
    return spec.holds(left[index], right[index], value)


def statement(template: str, value: str | None) -> str:
    """The sentence of a template naming `value`."""
    return TEMPLATES[template].text.format(value=value)


def _configuration(left: str, right: str, value: str | None) -> tuple[bool, bool, bool]:
    """All that any template can tell about two values: which have the named one, are they equal."""
    return left == value, right == value, left == right


class _Deck:
    """The images with one attribute value, dealt in shuffled rounds so each is used equally."""

    def __init__(self, image_ids: list[int], rng: random.Random) -> None:
        self.image_ids = image_ids
        self.rng = rng
        self.pile: list[int] = []

    def deal(self, avoid: int | None = None) -> int:
        """The next image of the pile other than `avoid` (which stays on the pile)."""
        for position in range(len(self.pile) - 1, -1, -1):
            if self.pile[position] != avoid:
                return self.pile.pop(position)
        # the new round goes under what is left of this one: those images are dealt first
        self.pile = self.rng.sample(self.image_ids, len(self.image_ids)) + self.pile
        return self.deal(avoid)


def nlvr2_examples(split: str, seed: int = 0, pairs_per_image: int = 2) -> Iterator[dict[str, Any]]:
    """Balanced NLVR2-style examples of `split` ("train" or "validation"); see the module docstring.

    Each: {"left": Path, "right": Path, "left_key": "easy_vqa/train/12", "right_key": ...,
    "sentence": str, "label": 1 (true) or 0 (false), "template": a TEMPLATES name}.
    """
    if split not in NLVR2_SPLITS:
        raise DataError(f"nlvr2: unknown split {split!r}; splits: {', '.join(NLVR2_SPLITS)}")
    if pairs_per_image < 1:
        raise ValueError(f"nlvr2: pairs_per_image must be at least 1, got {pairs_per_image}")
    source_split = NLVR2_SPLITS[split]
    attributes = easy_vqa.attributes(source_split)
    by_value = {(kind, value): [i for i, attrs in attributes.items() if attrs[_ATTRIBUTE_INDEX[kind]] == value]
                for kind, values in _VALUES.items() for value in values}
    too_few = [f"{kind} {value}" for (kind, value), ids in by_value.items() if len(ids) < 2]
    if too_few:
        raise DataError(f"nlvr2: easy_vqa {source_split} has fewer than 2 images of {', '.join(too_few)}")
    block_size = len(TEMPLATES) * 2  # one example per (template, label)
    count = pairs_per_image * len(attributes) // block_size * block_size
    return _examples(source_split, attributes, by_value, count, random.Random(seed))


def _examples(source_split: str, attributes: dict[int, Attributes], by_value: dict[tuple[str, str], list[int]],
              count: int, rng: random.Random) -> Iterator[dict[str, Any]]:
    decks = {key: _Deck(ids, rng) for key, ids in by_value.items()}
    sizes = {key: len(ids) for key, ids in by_value.items()}
    block = [(name, label) for name in TEMPLATES for label in (1, 0)]
    for _ in range(count // len(block)):
        for name, label in rng.sample(block, len(block)):
            spec = TEMPLATES[name]
            values = _VALUES[spec.attribute]
            value = None
            if "{value}" in spec.text:
                value = rng.choices(values, weights=[sizes[spec.attribute, v] for v in values])[0]
            left_value, right_value = _value_pair(spec, value, bool(label), sizes, rng)
            left = decks[spec.attribute, left_value].deal()
            right = decks[spec.attribute, right_value].deal(avoid=left)
            # the label is what the images make of the statement, not the label aimed at
            truth = statement_truth(name, value, attributes[left], attributes[right])
            yield {"left": easy_vqa.image_path(source_split, left), "right": easy_vqa.image_path(source_split, right),
                   "left_key": f"easy_vqa/{source_split}/{left}", "right_key": f"easy_vqa/{source_split}/{right}",
                   "sentence": statement(name, value), "label": int(truth), "template": name}


def _value_pair(spec: Template, value: str | None, truth: bool, sizes: dict[tuple[str, str], int],
                rng: random.Random) -> tuple[str, str]:
    """(left value, right value) making the statement `truth`: a configuration uniformly, then a
    pair of that configuration as often as such image pairs occur."""
    by_configuration: dict[tuple[bool, bool, bool], list[tuple[str, str]]] = {}
    for left, right in itertools.product(_VALUES[spec.attribute], repeat=2):
        if spec.holds(left, right, value) == truth:
            by_configuration.setdefault(_configuration(left, right, value), []).append((left, right))
    pairs = by_configuration[rng.choice(sorted(by_configuration))]
    weights = [sizes[spec.attribute, left] * sizes[spec.attribute, right] for left, right in pairs]
    return rng.choices(pairs, weights=weights)[0]
