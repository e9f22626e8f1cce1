"""Text (SentencePiece) and visual (k-means) tokenizers: ids, round trips, determinism, files."""
import json
import math
import subprocess
import sys
import textwrap

import pytest
import sentencepiece as spm
import torch

from vlmoe.data.text_tokenizer import TextTokenizer
from vlmoe.data.visual_tokenizer import (KMEANS_FILE, SPEC_FILE, KMeansVisualTokenizer, VisualTokenizer,
                                         load_visual_tokenizer, normalize_patches, patchify)

from conftest import REPO, TEST_OVERRIDES, launch_env

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "a grinning face with big eyes",
    "now is the winter of our discontent\nmade glorious summer by this sun of york",
    "that which is perceived or known or inferred to have its own distinct existence",
    "an emoji of a red apple on a white background",
    "to be or not to be that is the question",
] * 20


def _pieces(path):
    processor = spm.SentencePieceProcessor()
    processor.load(str(path))
    return [(processor.id_to_piece(i), processor.get_score(i)) for i in range(processor.get_piece_size())]


@pytest.fixture(scope="module")
def text_tokenizer(tmp_path_factory):
    return TextTokenizer.train(CORPUS, 50, tmp_path_factory.mktemp("tok") / "text.model")


def test_special_ids_are_fixed_and_reported(text_tokenizer):
    assert (text_tokenizer.pad_id, text_tokenizer.cls_id, text_tokenizer.sep_id, text_tokenizer.mask_id) == (0, 2, 3, 4)
    assert set(text_tokenizer.special_ids) == {0, 2, 3, 4}
    assert text_tokenizer.vocab_size == 50


def test_encode_wraps_in_cls_sep_and_round_trips(text_tokenizer):
    ids = text_tokenizer.encode("the quick brown fox", 64)
    assert ids[0] == text_tokenizer.cls_id and ids[-1] == text_tokenizer.sep_id
    assert all(i not in text_tokenizer.special_ids for i in ids[1:-1])
    assert all(0 <= i < text_tokenizer.vocab_size for i in ids)
    assert text_tokenizer.decode(ids) == "the quick brown fox"


def test_special_strings_in_raw_text_never_become_special_ids(text_tokenizer):
    ids = text_tokenizer.encode("[MASK] [PAD] [T_CLS] [T_SEP] fox", 64)
    assert ids.count(text_tokenizer.mask_id) == 0 and ids.count(text_tokenizer.pad_id) == 0
    assert ids.count(text_tokenizer.cls_id) == 1 and ids.count(text_tokenizer.sep_id) == 1


def test_truncation_keeps_sep_and_respects_max_len(text_tokenizer):
    long_text = " ".join(["the quick brown fox jumps over the lazy dog"] * 10)
    ids = text_tokenizer.encode(long_text, 12)
    assert len(ids) == 12 and ids[0] == text_tokenizer.cls_id and ids[-1] == text_tokenizer.sep_id
    assert text_tokenizer.encode(long_text, 2) == [text_tokenizer.cls_id, text_tokenizer.sep_id]
    with pytest.raises(ValueError, match="max_len"):
        text_tokenizer.encode("fox", 1)


def test_decode_drops_padding_and_mask(text_tokenizer):
    ids = text_tokenizer.encode("lazy dog", 16)
    padded = ids[:2] + [text_tokenizer.mask_id] + ids[2:] + [text_tokenizer.pad_id] * 5
    assert text_tokenizer.decode(padded) == "lazy dog"


def test_training_is_deterministic_and_load_matches(tmp_path, text_tokenizer):
    again = TextTokenizer.train(CORPUS, 50, tmp_path / "again.model")
    assert _pieces(again.path) == _pieces(text_tokenizer.path)
    loaded = TextTokenizer.load(text_tokenizer.path)
    for text in CORPUS[:6]:
        assert loaded.encode(text, 64) == text_tokenizer.encode(text, 64) == again.encode(text, 64)


def test_vocab_too_large_falls_back_to_smaller_vocab(tmp_path):
    tokenizer = TextTokenizer.train(["hello world", "a tiny corpus"], 5000, tmp_path / "small.model")
    assert 5 < tokenizer.vocab_size < 5000
    assert tokenizer.decode(tokenizer.encode("hello world", 16)) == "hello world"


def test_text_tokenizer_bad_input(tmp_path):
    with pytest.raises(ValueError, match="no non-empty text"):
        TextTokenizer.train(["", "  \n "], 100, tmp_path / "empty.model")
    with pytest.raises(ValueError, match=r"\.model"):
        TextTokenizer.train(CORPUS, 100, tmp_path / "wrong.bin")
    with pytest.raises(FileNotFoundError, match="missing.model"):
        TextTokenizer.load(tmp_path / "missing.model")
    garbage = tmp_path / "garbage.model"
    garbage.write_bytes(b"not a model at all")
    with pytest.raises(ValueError, match="garbage.model"):
        TextTokenizer.load(garbage)


def test_foreign_sentencepiece_model_is_refused(tmp_path):
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS), model_prefix=str(tmp_path / "plain"),
                                   vocab_size=60, hard_vocab_limit=False, minloglevel=2)
    with pytest.raises(ValueError, match="not a vlmoe text tokenizer"):
        TextTokenizer.load(tmp_path / "plain.model")


# ----------------------------------------------------------------------------------------- visual


def _images(count, size=16, seed=0):
    """Flat random colours in [-1, 1] with stripes: vertical in the first half, horizontal after."""
    generator = torch.Generator().manual_seed(seed)
    colours = torch.rand(count, 3, 1, 1, generator=generator) * 2 - 1
    pixels = colours.expand(count, 3, size, size).clone()
    pixels[: count // 2, :, :, ::2] = -1.0
    pixels[count // 2:, :, ::3, :] = 1.0
    return pixels


def test_patchify_order_and_normalisation():
    pixels = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    patches = patchify(pixels, 2)
    assert patches.shape == (2, 4, 12)
    # Second patch (row 0, column 1) of image 0, channel 0 holds pixels (0,2),(0,3),(1,2),(1,3).
    assert patches[0, 1, :4].tolist() == [2.0, 3.0, 6.0, 7.0]
    normalized = normalize_patches(torch.randn(5, 12) * 3 + 7)
    assert torch.allclose(normalized.mean(-1), torch.zeros(5), atol=1e-5)
    assert torch.allclose(normalized.std(-1, unbiased=False), torch.ones(5), atol=1e-2)
    with pytest.raises(ValueError, match="not divisible"):
        patchify(torch.zeros(1, 3, 5, 4), 2)


def test_kmeans_fits_deterministically_and_tokens_in_range():
    pixels = _images(40)
    first = KMeansVisualTokenizer.fit(pixels, patch_size=4, codebook_size=8, seed=3, iters=10)
    second = KMeansVisualTokenizer.fit(pixels, patch_size=4, codebook_size=8, seed=3, iters=10)
    assert torch.equal(first.centroids, second.centroids)
    assert isinstance(first, VisualTokenizer)
    codes = first.tokenize(pixels)
    assert codes.shape == (40, 16) and codes.dtype == torch.long
    assert int(codes.min()) >= 0 and int(codes.max()) < 8
    assert torch.equal(first.tokenize(pixels[:1]), codes[:1])  # same image -> same tokens, batch or not
    # Vertical and horizontal stripes normalise to different patterns: different codes.
    assert set(codes[0].tolist()).isdisjoint(set(codes[-1].tolist()))


def test_kmeans_reduces_quantisation_error_against_its_init():
    pixels = torch.rand(64, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    points = normalize_patches(patchify(pixels, 4)).reshape(-1, 48)

    def error(tokenizer):
        codes = tokenizer.tokenize(pixels).flatten()
        return float(((points - tokenizer.centroids[codes]) ** 2).sum(-1).mean())

    seeded_only = KMeansVisualTokenizer.fit(pixels, 4, 16, seed=0, iters=0)
    fitted = KMeansVisualTokenizer.fit(pixels, 4, 16, seed=0, iters=15)
    assert error(fitted) < 0.95 * error(seeded_only)


def test_kmeans_save_load_identical(tmp_path):
    pixels = _images(20)
    tokenizer = KMeansVisualTokenizer.fit(pixels, 4, 8, seed=0, iters=5)
    path = tmp_path / "visual.safetensors"
    tokenizer.save(path)
    loaded = load_visual_tokenizer(str(path))
    assert loaded.patch_size == 4 and loaded.codebook_size == 8
    assert torch.equal(loaded.centroids, tokenizer.centroids)
    assert torch.equal(loaded.tokenize(pixels), tokenizer.tokenize(pixels))


def test_kmeans_bad_input(tmp_path):
    with pytest.raises(ValueError, match="too few|cannot fit"):
        KMeansVisualTokenizer.fit(_images(1, size=8), 4, 16)
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_visual_tokenizer(str(tmp_path / "nope.safetensors"))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 32)
    with pytest.raises(ValueError, match="junk.safetensors"):
        load_visual_tokenizer(str(junk))
    with pytest.raises(ValueError, match="expected a .safetensors file"):
        load_visual_tokenizer("codebook.bin")


def test_python_factory_spec_plugs_in_a_user_tokenizer(tmp_path, monkeypatch):
    (tmp_path / "user_vqkd.py").write_text(textwrap.dedent("""
        import torch

        class FirstPixelTokenizer:
            codebook_size = 2
            patch_size = 4

            def tokenize(self, pixels):
                patches = pixels[:, 0, ::4, ::4]
                return (patches > 0).long().flatten(1)

        def make():
            return FirstPixelTokenizer()

        def not_a_tokenizer():
            return object()
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    tokenizer = load_visual_tokenizer("python:user_vqkd:make")
    assert tokenizer.tokenize(torch.ones(2, 3, 8, 8)).tolist() == [[1, 1, 1, 1]] * 2
    with pytest.raises(ValueError, match="lacks codebook_size"):
        load_visual_tokenizer("python:user_vqkd:not_a_tokenizer")
    with pytest.raises(ValueError, match="no callable 'missing'"):
        load_visual_tokenizer("python:user_vqkd:missing")
    with pytest.raises(ValueError, match="cannot import"):
        load_visual_tokenizer("python:no_such_module_xyz:make")
    sys.modules.pop("user_vqkd", None)


def _vlmoe(*args, timeout=300):
    env = {**launch_env(), "PYTHONPATH": str(REPO / "tests")}
    return subprocess.run([sys.executable, "-m", "vlmoe", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_config_plugs_in_a_visual_tokenizer_from_prepare_to_pretraining(tmp_path):
    """prepare.visual_tokenizer=python:module:factory: prepare records the plug-in instead of fitting
    k-means, pretraining predicts its codes, and the exported model carries its spec."""
    from visual_tokenizer_plugin import CODEBOOK_SIZE

    data, run_dir = tmp_path / "data", tmp_path / "run"
    small = ["prepare.sources=[wordnet,fashion_mnist,tuxpaint_stamps]", "prepare.max_items_per_source=60",
             "prepare.text_vocab_size=120", f"data.dir={data}"]
    bad = _vlmoe("prepare", "pretrain_tiny", *small, "prepare.visual_tokenizer=python:visual_tokenizer_plugin:make_wrong_patch")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr[-2000:]
    assert ("vlmoe: error: config key 'prepare.visual_tokenizer': python:visual_tokenizer_plugin:make_wrong_patch "
            "tokenizes 16-pixel patches but the model's patch_size is 8") in bad.stderr
    assert not data.exists()

    prepared = _vlmoe("prepare", "pretrain_tiny", *small, "prepare.visual_tokenizer=python:visual_tokenizer_plugin:make")
    assert prepared.returncode == 0, prepared.stderr[-3000:]
    assert (data / SPEC_FILE).is_file() and not (data / KMEANS_FILE).exists()
    report = json.loads((data / "prepare_report.json").read_text())
    assert report["visual_tokenizer"]["kind"] == "python" and report["visual_tokenizer"]["codebook_size"] == CODEBOOK_SIZE

    trained = _vlmoe("pretrain", "pretrain_tiny", f"data.dir={data}", f"run_dir={run_dir}", "train.steps=2",
                     "train.save_every=2", *TEST_OVERRIDES, "data.eval_batches=0")
    assert trained.returncode == 0, trained.stderr[-3000:]
    model = json.loads((run_dir / "model" / "model_config.json").read_text())
    assert model["model"]["codebook_size"] == CODEBOOK_SIZE
    assert json.loads((run_dir / "model" / SPEC_FILE).read_text()) == {
        "visual_tokenizer": "python:visual_tokenizer_plugin:make"}
    losses = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [math.isfinite(r["mim"]) for r in losses] == [True, True]  # cross-entropy over its 7 codes
