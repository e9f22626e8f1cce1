"""Visual tokenizers: image patches -> discrete codes, the targets of masked image modeling.

VL-MoE / BEiT-3 predict the codes of BEiT v2's VQ-KD tokenizer. That checkpoint cannot ship
offline, so the stand-in is `KMeansVisualTokenizer`: k-means over per-patch-normalised patch
pixels, fitted on the training images by `prepare` (deterministic for a given seed).

Plugging in another tokenizer (BEiT v2 VQ-KD from a local checkpoint, for example): write a
factory with no arguments that returns an object with the `VisualTokenizer` protocol, and
name it as "python:package.module:factory", e.g.

    # my_tokenizers.py, importable on PYTHONPATH
    def beit_v2_vqkd():
        model = load_my_vqkd("/ckpt/vqkd_encoder_base_decoder_3x768x12_clip.pth")
        return VQKDAdapter(model, patch_size=16, codebook_size=8192)   # has .tokenize(pixels)

    load_visual_tokenizer("python:my_tokenizers:beit_v2_vqkd")

and in a config, ``prepare.visual_tokenizer: python:my_tokenizers:beit_v2_vqkd``: `vlmoe prepare`
then records the spec in the data directory (SPEC_FILE) instead of fitting k-means, and
pretraining loads it from there (the module must be importable on every rank).

`tokenize` receives pixels as produced by `vlmoe.data.images.image_to_tensor` (RGB scaled to
[-1, 1]); a wrapper re-normalises them if its model expects something else.
"""
from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Optional, Protocol, runtime_checkable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

_FORMAT = "vlmoe-kmeans-visual-tokenizer"
# what `vlmoe prepare` writes into the data directory: the fitted k-means codebook, or (for a
# plug-in, which is code and a checkpoint of its own) the spec that loads it
KMEANS_FILE = "visual_tokenizer.safetensors"
SPEC_FILE = "visual_tokenizer.json"
# Variance floor for per-patch normalisation, in [-1, 1] pixel units: keeps near-flat
# patches from having their noise blown up into arbitrary codes.
_PATCH_VARIANCE_FLOOR = 1e-2
# Assignment is done in chunks of this many patches to bound the [chunk, K] distance matrix.
_ASSIGN_CHUNK = 65536


@runtime_checkable
class VisualTokenizer(Protocol):
    """Anything that maps pixels to one code per patch."""

    codebook_size: int
    patch_size: int

    def tokenize(self, pixels: torch.Tensor) -> torch.Tensor:
        """FloatTensor[B, 3, H, W] in [-1, 1] -> LongTensor[B, (H/p) * (W/p)], row-major patches."""
        ...


def patchify(pixels: torch.Tensor, patch_size: int) -> torch.Tensor:
    """FloatTensor[B, C, H, W] -> FloatTensor[B, (H/p)*(W/p), C*p*p], patches in row-major order."""
    if pixels.dim() != 4:
        raise ValueError(f"expected pixels of shape [B, C, H, W], got {tuple(pixels.shape)}")
    batch, channels, height, width = pixels.shape
    if height % patch_size or width % patch_size:
        raise ValueError(f"image size {height}x{width} is not divisible by patch size {patch_size}")
    patches = pixels.unfold(2, patch_size, patch_size).unfold(3, patch_size, patch_size)
    # [B, C, H/p, W/p, p, p] -> [B, H/p, W/p, C, p, p]
    patches = patches.permute(0, 2, 3, 1, 4, 5)
    return patches.reshape(batch, (height // patch_size) * (width // patch_size), channels * patch_size**2)


def normalize_patches(patches: torch.Tensor) -> torch.Tensor:
    """Per-patch zero mean, unit variance (with a variance floor); shape kept [..., D]."""
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True, unbiased=False)
    return (patches - mean) / torch.sqrt(var + _PATCH_VARIANCE_FLOOR)


def _nearest(points: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For points [N, D] and centroids [K, D]: (index LongTensor[N], squared distance FloatTensor[N])."""
    indices, distances = [], []
    centroid_norms = (centroids * centroids).sum(dim=1)
    for chunk in points.split(_ASSIGN_CHUNK):
        squared = (chunk * chunk).sum(dim=1, keepdim=True) - 2.0 * chunk @ centroids.T + centroid_norms
        best, index = squared.min(dim=1)
        indices.append(index)
        distances.append(best.clamp_min(0.0))
    return torch.cat(indices), torch.cat(distances)


def _kmeans_plus_plus(points: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding: each next centroid drawn with probability proportional to D^2."""
    first = torch.randint(len(points), (1,), generator=generator)
    centroids = points[first]
    closest = ((points - centroids[0]) ** 2).sum(dim=1)
    for _ in range(count - 1):
        total = closest.sum()
        if total <= 0:  # fewer distinct points than centroids: repeat one, k-means keeps it empty
            index = torch.randint(len(points), (1,), generator=generator)
        else:
            index = torch.multinomial(closest / total, 1, generator=generator)
        centroids = torch.cat([centroids, points[index]])
        closest = torch.minimum(closest, ((points - points[index]) ** 2).sum(dim=1))
    return centroids


class KMeansVisualTokenizer(torch.nn.Module):
    """Nearest-centroid codes of per-patch-normalised patch pixels.

    Attributes:
        centroids: FloatTensor[codebook_size, 3 * patch_size**2] (a buffer: moves with .to()).
    """

    def __init__(self, centroids: torch.Tensor, patch_size: int) -> None:
        super().__init__()
        if centroids.dim() != 2 or centroids.shape[1] != 3 * patch_size**2:
            raise ValueError(f"centroids must be [K, {3 * patch_size**2}] for patch size {patch_size}, "
                             f"got {tuple(centroids.shape)}")
        self.register_buffer("centroids", centroids.float().contiguous())
        self.patch_size = patch_size
        self.codebook_size = centroids.shape[0]

    @classmethod
    def fit(cls, pixels: torch.Tensor, patch_size: int, codebook_size: int, seed: int = 0,
            iters: int = 20) -> "KMeansVisualTokenizer":
        """Fit on FloatTensor[B, 3, H, W] images in [-1, 1]; deterministic for a given seed.

        k-means++ seeding, then `iters` Lloyd steps; a cluster left empty is re-seeded with
        the patch farthest from its centroid.
        """
        if codebook_size < 2:
            raise ValueError(f"codebook_size must be at least 2, got {codebook_size}")
        points = normalize_patches(patchify(pixels.float(), patch_size)).reshape(-1, 3 * patch_size**2)
        if len(points) < codebook_size:
            raise ValueError(f"{len(points)} patches cannot fit a codebook of {codebook_size}: "
                             "give more images or a smaller codebook")
        generator = torch.Generator().manual_seed(seed)
        centroids = _kmeans_plus_plus(points, codebook_size, generator)
        for _ in range(iters):
            assignment, distance = _nearest(points, centroids)
            counts = torch.bincount(assignment, minlength=codebook_size)
            sums = torch.zeros_like(centroids).index_add_(0, assignment, points)
            filled = counts > 0
            centroids[filled] = sums[filled] / counts[filled, None].float()
            empty = torch.nonzero(~filled).flatten()
            if len(empty):
                centroids[empty] = points[distance.topk(len(empty)).indices]
        return cls(centroids, patch_size)

    @torch.no_grad()
    def tokenize(self, pixels: torch.Tensor) -> torch.Tensor:
        """FloatTensor[B, 3, H, W] in [-1, 1] -> LongTensor[B, (H/p) * (W/p)]."""
        patches = normalize_patches(patchify(pixels.to(self.centroids), self.patch_size))
        codes, _ = _nearest(patches.reshape(-1, patches.shape[-1]), self.centroids)
        return codes.reshape(patches.shape[0], patches.shape[1])

    def save(self, path: str | Path) -> None:
        """Write centroids and patch size to a .safetensors file."""
        save_file({"centroids": self.centroids.cpu()}, str(path),
                  metadata={"format": _FORMAT, "patch_size": str(self.patch_size)})

    @classmethod
    def load(cls, path: str | Path) -> "KMeansVisualTokenizer":
        """Read a file written by `save`; a clear error for anything else."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"visual tokenizer file not found: {path}")
        try:
            tensors = load_file(str(path))
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{path}: not a safetensors file: {e}") from e
        if metadata.get("format") != _FORMAT or "centroids" not in tensors or "patch_size" not in metadata:
            raise ValueError(f"{path}: not a k-means visual tokenizer (metadata {metadata}, keys {sorted(tensors)})")
        return cls(tensors["centroids"], int(metadata["patch_size"]))


def load_visual_tokenizer(spec: str) -> VisualTokenizer:
    """A .safetensors k-means file, or "python:package.module:factory" (see module docstring)."""
    if spec.startswith("python:"):
        module_name, _, factory_name = spec[len("python:"):].rpartition(":")
        if not module_name or not factory_name:
            raise ValueError(f"visual tokenizer spec {spec!r}: expected 'python:package.module:factory'")
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise ValueError(f"visual tokenizer spec {spec!r}: cannot import {module_name!r}: {e}") from e
        factory = getattr(module, factory_name, None)
        if not callable(factory):
            raise ValueError(f"visual tokenizer spec {spec!r}: {module_name} has no callable {factory_name!r}")
        tokenizer = factory()
        if not isinstance(tokenizer, VisualTokenizer):
            raise ValueError(f"visual tokenizer spec {spec!r}: factory returned {type(tokenizer).__name__}, "
                             "which lacks codebook_size, patch_size or tokenize()")
        return tokenizer
    if spec.endswith(".safetensors"):
        return KMeansVisualTokenizer.load(spec)
    raise ValueError(f"visual tokenizer spec {spec!r}: expected a .safetensors file or 'python:module:factory'")


def prepared_visual_tokenizer_file(data_dir: Path) -> Optional[Path]:
    """The visual tokenizer `vlmoe prepare` left in ``data_dir``: its k-means file, its plug-in
    spec file, or None."""
    for name in (KMEANS_FILE, SPEC_FILE):
        if (data_dir / name).is_file():
            return data_dir / name
    return None


def save_spec(path: Path, spec: str) -> None:
    """Record a plug-in tokenizer's "python:..." spec (SPEC_FILE) for pretraining to load."""
    path.write_text(json.dumps({"visual_tokenizer": spec}) + "\n", encoding="utf-8")


def load_prepared_visual_tokenizer(path: Path) -> VisualTokenizer:
    """Load what ``prepared_visual_tokenizer_file`` found: a k-means file, or a plug-in by its spec."""
    if path.suffix != ".json":
        return load_visual_tokenizer(str(path))
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))["visual_tokenizer"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: not a visual tokenizer spec written by `vlmoe prepare` ({exc})") from exc
    return load_visual_tokenizer(spec)
