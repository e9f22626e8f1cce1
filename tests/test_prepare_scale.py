"""`vlmoe prepare` at scale: units in parallel, resumed, incremental, sharded over nodes; the same
data whatever the schedule; images capped and re-encoded per source."""
from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from safetensors.torch import load_file
from sentencepiece.sentencepiece_model_pb2 import ModelProto

from conftest import REPO, launch_env
from vlmoe.data.layout import MANIFEST_FILE, SPLITS, SUBSETS, load_split
from vlmoe.data.prepare import REPORT_FILE, Shard, SourceSpec, prepare
from vlmoe.data.sources import DataError

SETTINGS = dict(val_fraction=0.2, text_vocab_size=120, image_size=16, patch_size=8, codebook_size=8,
                tokenizer_fit_images=40, records_per_unit=25, verbose=False)


@pytest.fixture(scope="module")
def captions(tmp_path_factory) -> Path:
    """A JSONL of JPEG photos (two caption lines each), PNG drawings and bad lines, spread over units."""
    root = tmp_path_factory.mktemp("captions")
    (root / "img").mkdir()
    lines = []
    for i in range(30):
        photo = Image.new("RGB", (90, 60), (i * 8, 255 - i * 8, 40))
        photo.save(root / "img" / f"photo{i}.jpg", quality=90)
        lines += [json.dumps({"image": f"img/photo{i}.jpg", "text": f"photo {i} of a field"}),
                  json.dumps({"image": f"img/photo{i}.jpg", "text": f"a field, photo number {i}"})]
        if i % 7 == 0:
            lines.append('{"image": "img/photo0.jpg", "text": ')  # a bad JSON line: counted once
            lines.append(json.dumps({"image": f"img/missing{i}.png", "text": "gone"}))  # counted when opened
    for i in range(10):
        Image.new("RGBA", (40, 40), (0, 0, 200, 255)).save(root / "img" / f"drawing{i}.png")
        lines.append(json.dumps({"image": f"img/drawing{i}.png", "text": f"drawing {i}"}))
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root / "captions.jsonl"


def _sources(captions: Path) -> list[SourceSpec]:
    return [SourceSpec("fashion_mnist", max_items=60), SourceSpec("jsonl", str(captions)),
            SourceSpec("wordnet", max_items=140)]


def _content(root: Path) -> dict:
    """Every split's rows (images as bytes) and both tokenizers' bytes: what must not depend on how
    the data was prepared."""
    rows = {}
    for subset in SUBSETS:
        for split in SPLITS:
            dataset = load_split(root, subset, split)
            if "image" in dataset.column_names:
                dataset = dataset.cast_column("image", type(dataset.features["image"])(decode=False))
            rows[(subset, split)] = dataset.to_list()
    text_model = ModelProto()
    text_model.ParseFromString((root / "text_tokenizer.model").read_bytes())
    return {"rows": rows, "text_tokenizer": list(text_model.pieces),  # the file also records its own path
            "visual_tokenizer": load_file(root / "visual_tokenizer.safetensors")["centroids"].tolist()}


@pytest.fixture(scope="module")
def one_worker(tmp_path_factory, captions) -> Path:
    out = tmp_path_factory.mktemp("w1") / "data"
    prepare(out, _sources(captions), num_workers=1, **SETTINGS)
    return out


def test_two_workers_write_the_same_data_as_one(one_worker, captions, tmp_path):
    report = prepare(tmp_path / "data", _sources(captions), num_workers=2, **SETTINGS)
    assert _content(tmp_path / "data") == _content(one_worker)
    assert report.throughput["workers"] == 2 and report.throughput["units_written"] >= report.throughput["units"]
    single = json.loads((one_worker / REPORT_FILE).read_text())
    assert report.skipped == single["skipped"] and report.records == single["records"]


def test_units_split_sources_and_count_each_skip_once(one_worker, captions, tmp_path):
    report = json.loads((one_worker / REPORT_FILE).read_text())
    manifest = json.loads((one_worker / MANIFEST_FILE).read_text())
    assert sorted(manifest["units"].values()) == [3, 4, 6]  # 60 / 25, 77 lines / 25 (+ the short one), 140 / 25
    # the same skips as one unit per source would find: 5 bad lines, 5 missing files
    whole = prepare(tmp_path / "whole", _sources(captions), num_workers=1, **{**SETTINGS, "records_per_unit": 10_000})
    assert report["skipped"] == whole.skipped
    assert report["skipped"]["bad JSONL line"]["count"] == 5 and report["skipped"]["missing image file"]["count"] == 5
    assert _content(tmp_path / "whole")["rows"] == _content(one_worker)["rows"]


def test_images_are_capped_and_keep_a_photo_format(one_worker):
    report = json.loads((one_worker / REPORT_FILE).read_text())
    assert report["max_image_side"] == 19  # 8/7 of image_size 16
    pairs = load_split(one_worker, "pairs", "train").cast_column("image", load_split(one_worker, "pairs", "train")
                                                                  .features["image"].__class__(decode=False))
    formats = {}
    for row in pairs:
        image = Image.open(io.BytesIO(row["image"]["bytes"]))
        assert max(image.size) <= 19 and image.mode == "RGB"
        formats["photo" if row["text"].startswith(("photo", "a field")) else "drawing"] = image.format
    assert formats == {"photo": "JPEG", "drawing": "PNG"}


def test_an_interrupted_prepare_redoes_only_its_unfinished_units(one_worker, captions, tmp_path):
    out = tmp_path / "data"
    shutil.copytree(one_worker, out)
    unit = sorted((out / "parts").glob("jsonl-*/000001"))[0]
    torn = unit.with_name("000001.tmp-12345")  # what a killed worker leaves: a unit without its rename
    shutil.move(unit, torn)
    (out / MANIFEST_FILE).unlink()
    report = prepare(out, _sources(captions), num_workers=1, **SETTINGS)
    assert report.throughput["images_written"] == json.loads((torn.with_name("000001") / "unit.json").read_text())["images"]
    assert not torn.exists()  # only the lost unit was decoded again, and the torn one is gone
    assert _content(out) == _content(one_worker)


def test_adding_a_source_does_not_reread_the_others(one_worker, captions, tmp_path):
    out = tmp_path / "data"
    shutil.copytree(one_worker, out)
    report = prepare(out, [*_sources(captions), SourceSpec("shakespeare", max_items=30)], num_workers=1, **SETTINGS)
    assert report.throughput["images_written"] == 0  # the image sources' units were kept
    assert sum(report.records["shakespeare"].values()) == 30
    smaller = prepare(out, _sources(captions)[:2], num_workers=1, **SETTINGS)  # a source removed: its units go
    assert smaller.throughput["images_written"] == 0 and len(list((out / "parts").iterdir())) == 2


def test_shards_on_two_nodes_then_merge_give_the_same_data(one_worker, captions, tmp_path):
    out = tmp_path / "data"
    assert prepare(out, _sources(captions), shard=Shard(1, 2), **SETTINGS) is None
    with pytest.raises(DataError, match=r"unit 0 .* is not prepared; run `vlmoe prepare` with --shard i/N"):
        prepare(out, _sources(captions), merge_only=True, **SETTINGS)
    assert prepare(out, _sources(captions), shard=Shard(0, 2), **SETTINGS) is None
    prepare(out, _sources(captions), merge_only=True, **SETTINGS)
    assert _content(out) == _content(one_worker)
    assert Shard.parse("3/4") == Shard(3, 4)
    with pytest.raises(DataError, match="--shard '4/4'"):
        Shard.parse("4/4")


def test_cli_shards_over_nodes_by_launcher_rank(captions, tmp_path):
    out = tmp_path / "data"
    args = [sys.executable, "-m", "vlmoe", "prepare", "pretrain_tiny", f"data.dir={out}", "prepare.num_workers=1",
            f"prepare.sources=[jsonl:{captions},wordnet]", "prepare.max_items_per_source=60",
            "prepare.text_vocab_size=120", "prepare.codebook_size=8", "prepare.records_per_unit=20"]
    for rank in (0, 1):  # SLURM's srun starts one such process per node
        env = {**launch_env(), "SLURM_PROCID": str(rank), "SLURM_NTASKS": "2"}
        proc = subprocess.run([*args, "--shard", "auto"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0 and f"prepared shard {rank}/2" in proc.stdout, proc.stderr[-2000:]
    assert not (out / MANIFEST_FILE).exists()
    merged = subprocess.run([*args, "--merge"], cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=300)
    assert merged.returncode == 0, merged.stderr[-2000:]
    assert json.loads((out / REPORT_FILE).read_text())["subsets"]["pairs"]["train"] > 0
    wrong = subprocess.run([sys.executable, "-m", "vlmoe", "pretrain", "pretrain_tiny", "--shard", "0/2"], cwd=REPO,
                           env=launch_env(), capture_output=True, text=True, timeout=300)
    assert wrong.returncode == 2 and "--shard and --merge are options of `vlmoe prepare`" in wrong.stderr


def test_a_side_below_the_training_size_is_refused(captions, tmp_path):
    with pytest.raises(DataError, match="'prepare.max_image_side' is 12, below the model's image_size 16"):
        prepare(tmp_path / "data", _sources(captions), max_image_side=12, **SETTINGS)
    assert not (tmp_path / "data").exists()


def _webdataset_shards(root: Path, shards: int, per_shard: int) -> str:
    """Tar shards of Fashion-MNIST images as JPEG with captions (.txt, or .json every third sample),
    as CC3M-style releases ship them; returns the brace pattern naming them."""
    import itertools
    import tarfile

    from vlmoe.data.sources import FASHION_MNIST_CLASSES, SkipCounter, open_source

    records = open_source("fashion_mnist", None, SkipCounter())
    root.mkdir(parents=True)
    for shard in range(shards):
        with tarfile.open(root / f"shard-{shard:04d}.tar", "w") as tar:
            for index, record in enumerate(itertools.islice(records, per_shard)):
                key = f"{shard:04d}{index:05d}"
                buffer = io.BytesIO()
                record["image"].open().convert("RGB").resize((40, 40)).save(buffer, format="JPEG", quality=90)
                caption = f"a photo of a {FASHION_MNIST_CLASSES[record['label']].lower()}"
                text = (f"{key}.json", json.dumps({"caption": caption}).encode()) if index % 3 == 0 else \
                    (f"{key}.txt", caption.encode())
                for name, data in ((f"{key}.jpg", buffer.getvalue()), text):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return str(root / f"shard-{{0000..{shards - 1:04d}}}.tar")


def test_webdataset_shards_prepare_and_pretrain_on_two_ranks(tmp_path):
    from conftest import TEST_OVERRIDES, deepspeed_cmd, run
    from vlmoe.train.metrics import read_metrics

    pattern = _webdataset_shards(tmp_path / "shards", shards=3, per_shard=60)
    data, run_dir = tmp_path / "data", tmp_path / "run"
    # each shard is read on its own (no unit reads the shards before its own): 3 shards x 2 units
    report = prepare(data, [SourceSpec("webdataset", pattern), SourceSpec("wordnet", max_items=300),
                            SourceSpec("fashion_mnist", max_items=300)],
                     **{**SETTINGS, "image_size": 32, "codebook_size": 32, "records_per_unit": 50, "num_workers": 2})
    assert report.records[f"webdataset:{Path(pattern).name}"]["train"] > 140
    assert sum(report.records[f"webdataset:{Path(pattern).name}"].values()) == 180
    assert report.throughput["workers"] == 2 and report.throughput["units"] == 3 * 2 + 6 + 6
    prepare(tmp_path / "stream", [SourceSpec("webdataset", pattern, max_items=180), SourceSpec("wordnet", max_items=300)],
                     **{**SETTINGS, "image_size": 32, "codebook_size": 32, "records_per_unit": 50})
    assert _content(tmp_path / "stream")["rows"][("pairs", "train")] == _content(data)["rows"][("pairs", "train")]
    run(deepspeed_cmd(2, "pretrain", "pretrain_tiny", f"data.dir={data}", f"run_dir={run_dir}", "train.steps=12",
                      "train.save_every=12", "train.eval_every=12", *TEST_OVERRIDES), timeout=600)
    records = read_metrics(run_dir, "loss")
    assert [r["step"] for r in records] == list(range(1, 13))
    first, last = (sum(r["vlm"] for r in part) / 3 for part in (records[:3], records[-3:]))
    assert last < first, (first, last)
