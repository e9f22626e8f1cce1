"""The easy-VQA source and the constructed NLVR2-style and NLI-style builders, on the real
installed data (the `easy-vqa` wheel, Debian's wordnet-base)."""
from __future__ import annotations

import math
import re
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from vlmoe.data import easy_vqa, nli_pairs, nlvr2_pairs
from vlmoe.data.nli_pairs import nli_examples, substitute, usable_sentence
from vlmoe.data.nlvr2_pairs import TEMPLATES, nlvr2_examples, statement_truth
from vlmoe.data.sources import DataError, SkipCounter

# the RGB value easy-VQA draws each colour with (read off its images)
PALETTE = {
    "black": (0, 0, 0), "blue": (0, 0, 255), "brown": (165, 42, 42), "gray": (128, 128, 128),
    "green": (0, 255, 0), "red": (255, 0, 0), "teal": (0, 128, 128), "yellow": (255, 255, 0),
}
# the share of its bounding box a shape fills
SHAPE_FILL = {"rectangle": 1.0, "circle": math.pi / 4, "triangle": 0.5}


# ---------------------------------------------------------------------------------------
# easy-VQA


def test_easy_vqa_counts():
    assert len(easy_vqa.image_ids("train")) == 4000
    assert len(easy_vqa.image_ids("test")) == 1000
    train, test = easy_vqa.questions("train"), easy_vqa.questions("test")
    assert (len(train), len(test)) == (38575, 9673)
    answers = {answer for _, answer, _ in train + test}
    assert len(answers) == 13
    shipped = (easy_vqa.easy_vqa_root() / "answers.txt").read_text().split()
    assert answers == set(shipped) == set(easy_vqa.SHAPES) | set(easy_vqa.COLORS) | {"yes", "no"}
    assert train[0] == ("what is the blue shape?", "rectangle", 0)
    assert easy_vqa.image_path("train", 0).is_file()


def test_easy_vqa_unknown_split():
    with pytest.raises(DataError, match="'validation'"):
        easy_vqa.questions("validation")
    with pytest.raises(DataError, match="'dev'"):
        easy_vqa.attributes("dev")


def test_question_facts():
    assert easy_vqa.question_facts("what is the blue shape?", "rectangle") == [
        ("color", "blue", True), ("shape", "rectangle", True)]
    assert easy_vqa.question_facts("what color is the triangle?", "blue") == [
        ("shape", "triangle", True), ("color", "blue", True)]
    assert easy_vqa.question_facts("what shape is in the image?", "circle") == [("shape", "circle", True)]
    assert easy_vqa.question_facts("is there a red shape?", "no") == [("color", "red", False)]
    assert easy_vqa.question_facts("is there not a red shape?", "no") == [("color", "red", True)]
    assert easy_vqa.question_facts("is no circle present?", "no") == [("shape", "circle", True)]
    assert easy_vqa.question_facts("does the image not contain a triangle?", "yes") == [("shape", "triangle", False)]


def test_resolve_attributes():
    assert easy_vqa.resolve_attributes([("shape", "circle", True), ("color", "red", True),
                                        ("color", "blue", False)]) == ("circle", "red")
    # the only shape not denied
    assert easy_vqa.resolve_attributes([("shape", "circle", False), ("shape", "triangle", False),
                                        ("color", "red", True)]) == ("rectangle", "red")
    assert easy_vqa.resolve_attributes([("shape", "circle", True)]) == "unknown color"
    assert easy_vqa.resolve_attributes([("shape", "circle", True), ("shape", "circle", False),
                                        ("color", "red", True)]) == "contradictory shape"
    assert easy_vqa.resolve_attributes([("shape", "circle", True), ("color", "red", True),
                                        ("color", "teal", True)]) == "contradictory color"


def test_attributes_hand_checked_and_counted():
    train = easy_vqa.attributes("train")
    # from their questions: 0 "what is the blue shape? rectangle"; 2 "what color is the triangle?
    # red"; 3 "what shape is present? rectangle", "what color is the rectangle? brown"
    assert train[0] == ("rectangle", "blue")
    assert train[2] == ("triangle", "red")
    assert train[3] == ("rectangle", "brown")
    problems = easy_vqa.attribute_problems("train")
    # image 49's questions say "circle" but only deny colours (it is blue)
    assert problems[49] == "unknown color" and 49 not in train
    for split, resolved in (("train", 3578), ("test", 888)):
        attributes, problems = easy_vqa.attributes(split), easy_vqa.attribute_problems(split)
        assert len(attributes) == resolved
        assert sorted(attributes.keys() | problems.keys()) == easy_vqa.image_ids(split)
        assert set(problems.values()) == {"unknown shape", "unknown color"}  # never contradictory


def test_attributes_agree_with_the_pixels():
    """Every resolved test image: its shape's pixels have the colour's palette value, and the
    share of the bounding box they fill tells the shape (in shapes at least 10 px wide)."""
    for image_id, (shape, color) in easy_vqa.attributes("test").items():
        with Image.open(easy_vqa.image_path("test", image_id)) as image:
            rgb = image.convert("RGB")
        pixels = rgb.get_flattened_data()
        (_, _), (shape_pixel, shape_count) = Counter(pixels).most_common(2)  # background first
        assert shape_pixel == PALETTE[color], image_id
        mask = Image.frombytes("L", rgb.size, bytes(255 if p == shape_pixel else 0 for p in pixels))
        left, top, right, bottom = mask.getbbox()
        if min(right - left, bottom - top) >= 10:
            fill = shape_count / ((right - left) * (bottom - top))
            assert min(SHAPE_FILL, key=lambda s: abs(SHAPE_FILL[s] - fill)) == shape, (image_id, fill)


# ---------------------------------------------------------------------------------------
# NLVR2-style

RED_CIRCLE, BLUE_CIRCLE, RED_TRIANGLE, GREEN_RECTANGLE = (
    ("circle", "red"), ("circle", "blue"), ("triangle", "red"), ("rectangle", "green"))
# (template, named value, left, right, truth), worked by hand
HAND_WORKED = [
    ("both_shape", "circle", RED_CIRCLE, BLUE_CIRCLE, True),
    ("both_shape", "circle", RED_CIRCLE, RED_TRIANGLE, False),
    ("both_shape", "circle", RED_TRIANGLE, GREEN_RECTANGLE, False),
    ("left_only_shape", "circle", RED_CIRCLE, RED_TRIANGLE, True),
    ("left_only_shape", "circle", RED_CIRCLE, BLUE_CIRCLE, False),
    ("left_only_shape", "circle", RED_TRIANGLE, RED_CIRCLE, False),
    ("exactly_one_shape", "triangle", RED_CIRCLE, RED_TRIANGLE, True),
    ("exactly_one_shape", "triangle", RED_TRIANGLE, RED_CIRCLE, True),
    ("exactly_one_shape", "triangle", RED_TRIANGLE, RED_TRIANGLE, False),
    ("exactly_one_shape", "triangle", RED_CIRCLE, GREEN_RECTANGLE, False),
    ("same_shape", None, RED_CIRCLE, BLUE_CIRCLE, True),
    ("same_shape", None, RED_CIRCLE, RED_TRIANGLE, False),
    ("both_color", "red", RED_CIRCLE, RED_TRIANGLE, True),
    ("both_color", "red", RED_CIRCLE, BLUE_CIRCLE, False),
    ("both_color", "red", BLUE_CIRCLE, GREEN_RECTANGLE, False),
    ("right_only_color", "green", RED_CIRCLE, GREEN_RECTANGLE, True),
    ("right_only_color", "green", GREEN_RECTANGLE, RED_CIRCLE, False),
    ("right_only_color", "green", GREEN_RECTANGLE, GREEN_RECTANGLE, False),
    ("neither_color", "blue", RED_CIRCLE, GREEN_RECTANGLE, True),
    ("neither_color", "blue", RED_CIRCLE, BLUE_CIRCLE, False),
    ("neither_color", "blue", BLUE_CIRCLE, BLUE_CIRCLE, False),
    ("same_color", None, RED_CIRCLE, RED_TRIANGLE, True),
    ("same_color", None, RED_CIRCLE, BLUE_CIRCLE, False),
]


def test_statement_truth_hand_worked():
    for template, value, left, right, truth in HAND_WORKED:
        assert statement_truth(template, value, left, right) is truth, (template, value, left, right)
    covered = {(template, truth) for template, _, _, _, truth in HAND_WORKED}
    assert covered == {(template, truth) for template in TEMPLATES for truth in (True, False)}
    assert len(TEMPLATES) >= 6


@pytest.fixture(scope="module")
def nlvr2():
    return {split: list(nlvr2_examples(split)) for split in ("train", "validation")}


def test_nlvr2_deterministic(nlvr2):
    assert list(nlvr2_examples("validation")) == nlvr2["validation"]
    assert list(nlvr2_examples("validation", seed=1)) != nlvr2["validation"]


def test_nlvr2_splits_disjoint_and_sized(nlvr2):
    keys = {split: {e[side] for e in examples for side in ("left_key", "right_key")}
            for split, examples in nlvr2.items()}
    assert not keys["train"] & keys["validation"]
    assert all(k.startswith("easy_vqa/train/") for k in keys["train"])
    assert all(k.startswith("easy_vqa/test/") for k in keys["validation"])
    # pairs_per_image * resolved images, rounded down to whole blocks of 16
    assert len(nlvr2["train"]) == 7152 and len(nlvr2["validation"]) == 1776
    assert len(list(nlvr2_examples("validation", pairs_per_image=1))) == 880


def test_nlvr2_balanced_and_labels_right(nlvr2):
    for split, examples in nlvr2.items():
        attributes = easy_vqa.attributes(nlvr2_pairs.NLVR2_SPLITS[split])
        per_template = Counter((e["template"], e["label"]) for e in examples)
        assert len(set(per_template.values())) == 1 and len(per_template) == 2 * len(TEMPLATES)
        for e in examples:
            assert e["left"] != e["right"] and e["left"].is_file() and e["right"].is_file()
            left, right = attributes[int(e["left"].stem)], attributes[int(e["right"].stem)]
            value = next((v for v in easy_vqa.SHAPES + easy_vqa.COLORS if re.search(rf"\b{v}\b", e["sentence"])), None)
            assert e["sentence"] == nlvr2_pairs.statement(e["template"], value)
            assert e["label"] == statement_truth(e["template"], value, left, right)


def test_nlvr2_false_cases_include_near_misses(nlvr2):
    """False "both images show a red shape" must not mean "neither is red"."""
    attributes = easy_vqa.attributes("train")
    one_sided = Counter()
    for e in nlvr2["train"]:
        if e["template"] == "both_color" and e["label"] == 0:
            value = e["sentence"].split()[4]
            colors = (attributes[int(e["left"].stem)][1], attributes[int(e["right"].stem)][1])
            one_sided[colors.count(value)] += 1
    assert one_sided[1] > 0.4 * sum(one_sided.values()) and one_sided[0] > 0.4 * sum(one_sided.values())


def test_nlvr2_uses_images_evenly(nlvr2):
    uses = Counter(e[side] for e in nlvr2["train"] for side in ("left_key", "right_key"))
    assert len(uses) == len(easy_vqa.attributes("train"))
    assert min(uses.values()) >= 2 and max(uses.values()) <= 6  # about 2 * pairs_per_image


def test_nlvr2_unknown_split():
    with pytest.raises(DataError, match="'test'"):
        nlvr2_examples("test")


# ---------------------------------------------------------------------------------------
# NLI-style


@pytest.fixture(scope="module")
def nli():
    skips = SkipCounter()
    examples = list(nli_examples(skips=skips))
    assert skips.total == 0
    return examples


def test_nli_deterministic(nli):
    assert list(nli_examples()) == nli


def test_nli_balanced_and_well_formed(nli):
    labels = Counter(e["label"] for e in nli)
    assert set(labels) == set(nli_pairs.LABELS) and len(set(labels.values())) == 1
    assert labels["entailment"] >= 1500
    for e in nli:
        assert re.fullmatch(r"(noun|verb|adj|adv)/\d{8}/\d+", e["key"]), e
        assert e["hypothesis"] != e["premise"]
        assert len(e["premise"].split()) <= 12 and len(e["hypothesis"].split()) <= 12


def _differing_words(a: str, b: str) -> list[tuple[str, str]]:
    return [(x, y) for x, y in zip(a.split(), b.split()) if x != y]


def test_nli_hand_checked(nli):
    by_pair = {(e["premise"], e["hypothesis"]): e for e in nli}
    # noun 07360841 {scene, ...}: its hypernym is {incident}
    scene = ("their parting was a sad scene", "their parting was a sad incident")
    assert by_pair[scene] == {"premise": scene[0], "hypothesis": scene[1], "label": "entailment",
                              "key": "noun/07360841/0"}
    assert by_pair[scene[::-1]]["label"] == "neutral" and by_pair[scene[::-1]]["key"] == "noun/07360841/0"
    assert _differing_words(*scene) == [("scene", "incident")]
    # adjective 02551381 {dry} has the antonym {wet}
    climate = ("a dry climate", "a wet climate")
    assert by_pair[climate]["label"] == "contradiction" and by_pair[climate]["key"] == "adj/02551381/2"
    # a verb hypernym where the verb stands in its base form
    assert by_pair["park the car in the yard", "put the car in the yard"]["label"] == "entailment"
    # every pair of one source sentence shares its key
    keys = Counter(e["key"] for e in nli)
    assert keys["noun/07360841/0"] == 2


def test_nli_wordnet_parsing():
    synsets = nli_pairs.read_synsets(Path(nli_pairs.WORDNET_ROOT), SkipCounter())
    dog = synsets["noun", "02084071"]
    assert dog.lemmas == ("dog", "domestic dog", "Canis familiaris")
    assert dog.examples == ("the dog barked all night",)
    assert nli_pairs.hypernym_lemma(dog, synsets) == "canine"
    hot = synsets["adj", "01247240"]
    assert hot.lemmas[0] == "hot" and nli_pairs.antonym_lemmas(hot, 1, synsets) == ["cold"]


def test_substitute_and_usable_sentence():
    assert substitute("I saw a dog", "dog", "animal") == "I saw an animal"
    assert substitute("An apple fell", "apple", "fruit") == "A fruit fell"
    assert substitute("Dog days", "dog", "canine") == "Canine days"
    assert substitute("hotdogs are hot", "hot", "cold") == "hotdogs are cold"
    assert substitute("a well-known face", "known", "famous") is None
    # "dog" here is a noun, not the verb "dog"; "hit" a past tense
    assert substitute("the dog chased the rabbit", "dog", "pursue", verb=True) is None
    assert substitute("The car hit a tree", "hit", "miss", verb=True) is None
    assert substitute("I will lend you my car", "lend", "give", verb=True) == "I will give you my car"
    assert usable_sentence("a hot day")
    assert not usable_sentence("the day was not hot")
    assert not usable_sentence("it isn't hot")
    assert not usable_sentence("every dog barked")
    assert not usable_sentence("is the dog barking?")
    assert not usable_sentence(" ".join(["word"] * 13))


MINI_WORDNET = {
    "noun": "  1 This software and database is being provided ...\n"
            "00000010 05 n 01 dog 0 001 @ 00000020 n 0000 | a canid; \"I fed a dog\"\n"
            "00000020 05 n 01 animal 0 000 | a living thing\n"
            "00000030 05 n 02 cat 0 005 @ 00000020 n 0000 | broken: fewer pointers than counted\n",
    "verb": "",
    "adj": "00000040 00 a 01 hot 0 001 ! 00000050 a 0101 | hot; \"a hot day\"\n"
           "00000050 00 a 01 cold 0 001 ! 00000040 a 0101 | cold; \"the soup is cold\"\n",
    "adv": "",
}


def test_nli_mini_wordnet(tmp_path):
    for file, text in MINI_WORDNET.items():
        (tmp_path / f"data.{file}").write_text(text)
    skips = SkipCounter()
    examples = list(nli_examples(tmp_path, skips))
    assert skips.counts == {"bad WordNet line": 1} and skips.examples["bad WordNet line"] == [
        f"{tmp_path / 'data.noun'}:4"]
    # 1 entailment, 1 neutral, 2 contradictions, balanced down to 1 of each
    assert Counter(e["label"] for e in examples) == {"entailment": 1, "neutral": 1, "contradiction": 1}
    by_label = {e["label"]: (e["premise"], e["hypothesis"], e["key"]) for e in examples}
    assert by_label["entailment"] == ("I fed a dog", "I fed an animal", "noun/00000010/0")
    assert by_label["neutral"] == ("I fed an animal", "I fed a dog", "noun/00000010/0")
    assert by_label["contradiction"] in {("a hot day", "a cold day", "adj/00000040/0"),
                                         ("the soup is cold", "the soup is hot", "adj/00000050/0")}


def test_nli_missing_root(tmp_path):
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "absent"))):
        nli_examples(tmp_path / "absent")
    with pytest.raises(DataError, match="data.noun"):
        nli_examples(tmp_path)
