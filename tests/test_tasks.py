"""Downstream tasks in one process: metrics against hand-computed cases, heads' shapes, data builders
(deterministic, no image in both splits), users' files with bad records, errors that name the problem."""
from __future__ import annotations

import json
import math

import pytest
import torch
from PIL import Image

from conftest import TASK_CAP, TASK_CAPS
from vlmoe.data import task_data as builder
from vlmoe.data.sources import DataError
from vlmoe.data.task_data import DataSpec, data_dir_for
from vlmoe.data.text_tokenizer import TextTokenizer
from vlmoe.model.config import model_config
from vlmoe.model.multiway import MultiwayTransformer
from vlmoe.tasks import TASK_NAMES, get_task
from vlmoe.tasks.base import TaskInputs, count_tokens, majority_baseline
from vlmoe.tasks.image_classification import topk_accuracy
from vlmoe.tasks.retrieval import chance_recall, contrastive_loss, english_captions, hard_negatives, recall_at_k
from vlmoe.tasks.vqa import answer_scores, answer_vocabulary, score_targets, vqa_accuracy, vqa_loss

# ------------------------------------------------------------------------------------ metrics


def test_recall_at_k_with_several_texts_per_image():
    # 3 images, 5 texts: image 0 has texts 0 and 1, image 1 text 2, image 2 texts 3 and 4
    similarity = torch.tensor([[0.1, 0.9, 0.8, 0.0, 0.2],
                               [0.7, 0.1, 0.3, 0.6, 0.5],
                               [0.2, 0.3, 0.9, 0.1, 0.4]])
    text_to_image = torch.tensor([0, 0, 1, 2, 2])
    r = recall_at_k(similarity, text_to_image)
    # image -> text: image 0's best text is first; image 1's text is 4th; image 2's best (text 4) is 2nd
    assert r["i2t_r1"] == pytest.approx(1 / 3) and r["i2t_r5"] == 1.0 and r["i2t_r10"] == 1.0
    # text -> image: only text 1 ranks its image first; k >= 3 images counts every candidate
    assert r["t2i_r1"] == pytest.approx(1 / 5) and r["t2i_r5"] == 1.0 and r["t2i_r10"] == 1.0
    assert r["r_mean"] == pytest.approx((1 / 3 + 1 + 1 + 1 / 5 + 1 + 1) / 6)
    r2 = recall_at_k(similarity, text_to_image, ks=(2,))
    assert r2["i2t_r2"] == pytest.approx(2 / 3) and r2["t2i_r2"] == pytest.approx(3 / 5)
    assert set(r) == {"i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "r_mean"}
    with pytest.raises(ValueError, match="text_to_image"):
        recall_at_k(similarity, torch.tensor([0, 1]))


def test_chance_recall_of_a_random_ranking():
    r = chance_recall([1, 1])  # 2 images with one text each
    assert r["i2t_r1"] == 0.5 and r["t2i_r1"] == 0.5 and r["i2t_r5"] == 1.0 and r["t2i_r10"] == 1.0
    r = chance_recall([2, 1, 1])  # 4 texts: the first image finds one of its 2 in a random top 1 half the time
    assert r["i2t_r1"] == pytest.approx((2 / 4 + 1 / 4 + 1 / 4) / 3)
    assert r["t2i_r1"] == pytest.approx(1 / 3)


def test_vqa_scores_follow_the_vqav2_rule():
    ten = ["two"] * 4 + ["three"] * 3 + ["four"] * 2 + ["five"]
    assert answer_scores(ten) == pytest.approx({"two": 1.0, "three": 1.0, "four": 2 / 3, "five": 1 / 3})
    assert answer_scores(["yes"]) == {"yes": 1.0}  # one answer given: it is the answer
    assert answer_scores(["red", "blue"]) == {"red": 0.5, "blue": 0.5}
    vocab = answer_vocabulary([ten, ["two"], ["yes", "no"]], max_size=3)
    assert vocab == ["two", "five", "four"]  # by questions having them, then name
    index = {a: i for i, a in enumerate(vocab)}
    targets = score_targets([ten, ["yes"]], index, 3)
    assert torch.allclose(targets, torch.tensor([[1.0, 1 / 3, 2 / 3], [0.0, 0.0, 0.0]]))  # "yes": not in the vocabulary
    logits = torch.tensor([[0.0, 0.0, 5.0], [3.0, 0.0, 0.0]])
    assert float(vqa_accuracy(logits, targets)) == pytest.approx((2 / 3 + 0.0) / 2)
    sigmoid = [[1 / (1 + math.exp(-z)) for z in row] for row in logits.tolist()]
    manual = -sum(t * math.log(p) + (1 - t) * math.log(1 - p)
                  for row_t, row_p in zip(targets.tolist(), sigmoid) for t, p in zip(row_t, row_p)) / 2
    assert float(vqa_loss(logits, targets)) == pytest.approx(float(manual), rel=1e-5)


def test_topk_accuracy_and_majority_baseline():
    logits = torch.tensor([[0.1, 0.5, 0.4], [0.9, 0.02, 0.08]])
    assert float(topk_accuracy(logits, torch.tensor([2, 1]), 1)) == 0.0
    assert float(topk_accuracy(logits, torch.tensor([2, 1]), 2)) == 0.5
    assert float(topk_accuracy(logits, torch.tensor([2, 1]), 5)) == 1.0  # k capped at the classes
    assert majority_baseline(["a", "b", "b"], ["b", "a", "b", "c"]) == 0.5


def test_contrastive_loss_spreads_targets_over_an_images_captions():
    features = torch.eye(2)
    own = contrastive_loss(features, features, features, features, torch.eye(2, dtype=torch.bool), torch.tensor(1.0))
    assert float(own) == pytest.approx(math.log(1 + math.exp(-1)), rel=1e-6)
    both = contrastive_loss(features, features, features, features, torch.ones(2, 2, dtype=torch.bool),
                            torch.tensor(1.0))  # two captions of one image: half the target on each
    assert float(both) == pytest.approx(0.5 * math.log(1 + math.exp(-1)) + 0.5 * math.log(1 + math.exp(1)), rel=1e-6)


def test_hard_negatives_are_never_positives():
    torch.manual_seed(0)
    similarity = torch.randn(4, 6)
    positives = torch.zeros(4, 6, dtype=torch.bool)
    positives[torch.arange(4), torch.arange(4)] = True
    positives[3] = True  # nothing left to draw for row 3
    for _ in range(50):
        column, has = hard_negatives(similarity, positives)
        assert has.tolist() == [True, True, True, False]
        assert not positives[torch.arange(3), column[:3]].any()


def test_pair_encoding_truncates_the_longer_side():
    tok = TextTokenizer.train([f"word{i} and more words here" for i in range(300)], 64, "/tmp/vlmoe_pair_tok.model")
    ids = tok.encode_pair("word1 and more words here word2 word3", "word4", max_len=8)
    assert len(ids) == 8 and ids[0] == tok.cls_id and ids[-1] == tok.sep_id and ids.count(tok.sep_id) == 2
    assert ids[ids.index(tok.sep_id) + 1:-1] == tok.encode("word4", 32)[1:-1]  # the short side is kept whole


def test_tux_paint_captions_keep_distinct_english_variants(tmp_path):
    description = tmp_path / "x.txt"
    description.write_text("A colorful kite.\nde.utf8=Ein Drachen.\nen_GB.utf8=A colourful kite.\n"
                           "en_AU.utf8=A colourful kite.\nen_CA.utf8=A colorful kite.\n", encoding="utf-8")
    assert english_captions(description) == ["A colorful kite.", "A colourful kite."]


# ------------------------------------------------------------------------------------ data builders


def _spec(cap: int = 40) -> DataSpec:
    return DataSpec(entries=(), max_items_per_source=cap, val_fraction=0.1)


def _image_keys(split) -> set[str]:
    return set(split.images["key"]) if split.images is not None else set(split.examples["key"])


@pytest.mark.parametrize("name", TASK_NAMES)
def test_embedded_data_is_deterministic_and_no_image_is_in_both_splits(name, tmp_path):
    task = get_task(name)
    reports = [builder.build(tmp_path / f"build{i}", name, task.records, _spec(), verbose=False) for i in (0, 1)]
    assert reports[0]["examples"] == reports[1]["examples"] and reports[0]["sources"] == reports[1]["sources"]
    first, second = builder.load(tmp_path / "build0"), builder.load(tmp_path / "build1")
    for split in ("train", "validation"):
        assert first[split].examples.to_list() == second[split].examples.to_list()
        assert 0 < len(first[split]) <= 40 * len(task.records.default)
        if first[split].images is not None:
            assert first[split].images["image"][:3] == second[split].images["image"][:3]
    assert not _image_keys(first["train"]) & _image_keys(first["validation"])
    if task.records.image_fields:  # every example's images are in its own split's table
        for split in ("train", "validation"):
            rows = len(first[split].images)
            assert all(0 <= r < rows for f in task.records.image_fields for r in first[split].examples[f])


def test_a_cap_samples_each_source_by_hash_not_its_first_records(tmp_path):
    # WordNet's pairs come nouns first (entailment and neutral) and adjectives last (contradiction)
    task = get_task("nli")
    builder.build(tmp_path / "nli", "nli", task.records, _spec(60), verbose=False)
    splits = builder.load(tmp_path / "nli")
    for split in ("train", "validation"):
        labels = splits[split].examples["label"]
        assert len(labels) == 60
        assert all(labels.count(name) >= 10 for name in ("entailment", "neutral", "contradiction"))


@pytest.fixture(scope="module")
def tokenizer(prepared_data) -> TextTokenizer:
    return TextTokenizer.load(prepared_data / "text_tokenizer.model")


@pytest.mark.parametrize("name", TASK_NAMES)
def test_each_head_gives_its_outputs_and_trains(name, task_data, tokenizer):
    task = get_task(name)
    spec = DataSpec(entries=(), max_items_per_source=TASK_CAPS.get(name, TASK_CAP), val_fraction=0.1)
    splits = builder.load(data_dir_for(task_data, name, spec))
    vocab = task.vocabulary(splits["train"])
    inputs = TaskInputs.create(tokenizer, 32, 32, vocab)
    torch.manual_seed(0)
    backbone = MultiwayTransformer(model_config("tiny", vocab_size=tokenizer.vocab_size, drop_path=0.0))
    model = task.build_model(backbone, inputs)
    assert model.head_modules() and all(m is not backbone for m in model.head_modules())
    train = task.training_split(splits["train"])
    examples = [{**task.load_subset_example(splits["train"], "examples", _row(train, i), inputs), "valid": True}
                for i in range(4)]
    batch = task.collate_subsets({"examples": examples}, inputs, step=0, rank=0)
    assert count_tokens(batch, 17) > 0
    out = model(batch)
    assert out["loss"].dim() == 0 and out["loss"].requires_grad and int(out["num_examples"]) == 4
    out["loss"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for m in model.head_modules() for p in m.parameters())
    metric = task.main_metric if task.main_metric in out else "itm_accuracy"
    assert 0.0 <= float(out[metric]) <= 1.0
    baseline = task.trivial_baseline(splits["train"], splits["validation"], inputs, 50)
    assert 0.0 < baseline[task.main_metric] < 1.0
    evaluation = task.eval_datasets(splits["validation"], 5)
    assert all(len(rows) >= 1 for rows in evaluation.values())
    if name == "retrieval":  # dual encoding: features of images and texts, with their positions
        eval_examples = {subset: [{**task.load_subset_example(splits["validation"], subset, _row(table, i), inputs),
                                   "valid": True} for i in range(len(table))]
                         for subset, table in evaluation.items()}
        features = model(task.collate_subsets(eval_examples, inputs, 0, 0))
        assert features["image_features"].shape == (5, backbone.cfg.dim)
        assert features["text_features"].shape[0] == len(evaluation["texts"]) >= 5
        assert torch.allclose(features["image_features"].norm(dim=-1), torch.ones(5))
        metrics = task.evaluate([features], torch.device("cpu"))
        assert set(metrics) >= {"r_mean", "i2t_r1", "t2i_r10"}


def _row(table, index: int) -> dict:
    """Row ``index`` of a datasets.Dataset or RowTable, as the step-indexed batches read it."""
    return {k: v[0] for k, v in table[[index]].items()}


# ------------------------------------------------------------------------------------ users' files


def _png(path, colour=(200, 30, 30)):
    Image.new("RGB", (20, 16), colour).save(path)
    return path.name


def _write_jsonl(path, lines):
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def _build_user(tmp_path, name, lines):
    task = get_task(name)
    data = DataSpec(entries=(f"jsonl:{_write_jsonl(tmp_path / 'data.jsonl', lines)}",), val_fraction=0.5)
    report = builder.build(tmp_path / "built", name, task.records, data, verbose=False)
    return report, builder.load(tmp_path / "built")


def test_user_vqa_file_counts_and_skips_bad_records(tmp_path):
    a, b, c = (_png(tmp_path / f"{n}.png", colour) for n, colour in (("a", (255, 0, 0)), ("b", (0, 255, 0)),
                                                                      ("c", (0, 0, 255))))
    (tmp_path / "broken.png").write_bytes(b"not a png")
    lines = [
        {"image": a, "question": "what colour?", "answers": ["red"] * 7 + ["pink"] * 3, "split": "train"},
        {"image": a, "question": "is it red?", "answers": "yes", "split": "train"},
        {"image": b, "question": "what colour?", "answers": ["green"] * 10, "split": "validation"},
        {"image": a, "question": "shared image?", "answers": ["no"], "split": "validation"},
        {"image": c, "answers": ["blue"], "split": "train"},
        {"image": "missing.png", "question": "q?", "answers": ["x"], "split": "train"},
        {"image": "broken.png", "question": "q?", "answers": ["x"], "split": "train"},
        {"image": c, "question": "q?", "answers": [], "split": "train"},
        {"image": c, "question": "q?", "answers": ["x"], "split": "test"},
        "{not json",
    ]
    report, splits = _build_user(tmp_path, "vqa", lines)
    assert report["examples"] == {"train": 2, "validation": 1}
    skipped = {reason: info["count"] for reason, info in report["skipped"].items()}
    assert skipped == {"missing field 'question'": 1, "missing image file": 1, "corrupt image": 1,
                       "image already in the train split": 1, "bad JSONL line": 1,
                       "bad field 'answers' (expected a non-empty list of strings)": 1,
                       "bad field 'split' (expected train or validation)": 1}
    where = report["skipped"]["missing image file"]["examples"][0]
    assert where.endswith(f"data.jsonl:6 ({tmp_path / 'missing.png'})")  # the line and the file
    assert sorted(splits["train"].examples["answers"], key=len)[0] == ["yes"]
    # a capped answer vocabulary leaves out training questions without a known answer, counted
    from vlmoe.train.finetune import _usable
    task = get_task("vqa")
    inputs = TaskInputs.create(None, 32, 32, task.vocabulary(splits["train"], max_size=1))
    kept = _usable(task, splits, inputs, is_main=False)
    assert len(kept["train"]) == 1 and len(kept["validation"]) == 1  # validation keeps it: it scores 0


def test_user_files_of_the_other_tasks(tmp_path):
    names = [str(tmp_path / _png(tmp_path / f"{i}.png", (i * 20, 0, 0))) for i in range(8)]  # absolute paths
    retrieval = [{"image": names[0], "captions": ["a red square", "a square"], "split": "train"},
                 {"image": names[1], "text": "a dark square", "split": "validation"},
                 {"image": names[1], "text": "another caption of the same image", "split": "validation"},
                 {"image": names[2], "split": "train"}]
    (tmp_path / "r").mkdir()
    report, splits = _build_user(tmp_path / "r", "retrieval", retrieval)
    assert report["examples"] == {"train": 1, "validation": 2} and report["images"]["validation"] == 1
    assert report["skipped"]["missing field 'captions' or 'text'"]["count"] == 1
    texts = get_task("retrieval").eval_datasets(splits["validation"])["texts"]
    assert len(texts) == 2 and set(texts.columns["image_position"]) == {0}  # both captions are the one image's

    nlvr2 = [{"left": names[0], "right": names[1], "sentence": "both are red", "label": "True", "split": "train"},
             {"left": names[2], "right": names[3], "sentence": "both are red", "label": False, "split": "validation"},
             {"left": names[4], "right": names[5], "sentence": "x", "label": "maybe", "split": "train"}]
    (tmp_path / "n").mkdir()
    report, splits = _build_user(tmp_path / "n", "nlvr2", nlvr2)
    assert splits["train"].examples["label"] == [1] and splits["validation"].examples["label"] == [0]
    assert report["skipped"]["bad field 'label' (expected true or false)"]["count"] == 1

    nli = [{"premise": "a dog barked", "hypothesis": "an animal barked", "label": "entailment", "split": "train"},
           {"premise": "a cat sat", "hypothesis": "a cat stood", "label": 2, "split": "validation"},
           {"premise": "no hypothesis", "label": "neutral"}]
    (tmp_path / "l").mkdir()
    report, splits = _build_user(tmp_path / "l", "nli", nli)
    assert splits["validation"].examples["label"] == ["2"]  # an int label is kept as its name
    assert report["skipped"]["missing field 'hypothesis'"]["count"] == 1

    classes = [{"image": names[6], "label": 3, "split": "train"}, {"image": names[7], "label": "3", "split": "validation"},
               {"image": names[5], "label": None, "split": "train"}]
    (tmp_path / "c").mkdir()
    report, splits = _build_user(tmp_path / "c", "image_classification", classes)
    assert splits["train"].examples["label"] == ["3"] == splits["validation"].examples["label"]
    assert report["skipped"]["missing field 'label'"]["count"] == 1


def test_image_folder_classification_and_empty_split_error(tmp_path):
    for label in ("cats", "dogs"):
        (tmp_path / "folder" / label).mkdir(parents=True)
        for i in range(12):
            _png(tmp_path / "folder" / label / f"{i}.png", (i * 10, 100 if label == "cats" else 0, 0))
    task = get_task("image_classification")
    data = DataSpec(entries=(f"image_folder:{tmp_path / 'folder'}",), val_fraction=0.3)
    report = builder.build(tmp_path / "built", "image_classification", task.records, data, verbose=False)
    assert report["examples"]["train"] + report["examples"]["validation"] == 24
    splits = builder.load(tmp_path / "built")
    assert set(splits["train"].examples["label"]) == {"cats", "dogs"}
    with pytest.raises(DataError, match="validation split is empty"):
        builder.build(tmp_path / "none", "image_classification", task.records,
                        DataSpec(entries=(f"image_folder:{tmp_path / 'folder'}",), val_fraction=1e-9), verbose=False)
    with pytest.raises(DataError, match="not data of task 'image_classification'.*fashion_mnist"):
        builder.build(tmp_path / "bad", "image_classification", task.records, DataSpec(entries=("easy_vqa",)))
    with pytest.raises(DataError, match="path does not exist"):
        builder.build(tmp_path / "bad", "vqa", get_task("vqa").records,
                        DataSpec(entries=(f"jsonl:{tmp_path / 'absent.jsonl'}",)))


def test_unknown_task_is_an_error_listing_the_tasks(tmp_path):
    import subprocess
    import sys

    from conftest import REPO, launch_env
    from vlmoe.config import load_config

    proc = subprocess.run([sys.executable, "-m", "vlmoe", "finetune", "finetune_tiny_vqa", "finetune.task=vqa2",
                           f"run_dir={tmp_path / 'run'}"], cwd=REPO, env=launch_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and not (tmp_path / "run").exists()
    assert "config key 'finetune.task': unknown task 'vqa2'; tasks: image_classification, vqa, retrieval" in proc.stderr
    cfg = load_config("finetune_tiny_vqa", ["finetune.data=jsonl:/data/vqa.jsonl"])
    assert cfg.finetune.data == ["jsonl:/data/vqa.jsonl"]  # one entry stands for a list of one
