"""Phi Phi^T heatmaps per layer and modality from a saved adapter (paper appendix B, Fig. 4).

Rows of Phi are l2-normalised first (the router uses norm(Phi)), so each map is the cosine
similarity between experts' routing vectors: near identity = experts route differently.
Command line: ``python -m smola.heatmaps ADAPTER_DIR OUT_DIR``.
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Union

import torch

from smola.adapter_io import read_adapter_tensors

MODALITY_TITLES = {"mm": "multimodal experts", "v": "vision experts", "t": "text experts"}


def phi_grams(tensors: dict[str, torch.Tensor]) -> dict[tuple[str, str], torch.Tensor]:
    """(layer name, modality) -> norm(Phi) norm(Phi)^T [E, E] for every ``*.phi`` tensor.

    Modality is the branch name before ``phi`` (mm, v, t); a plain SMoLALinear is "mm".
    """
    grams = {}
    for name, phi in tensors.items():
        if not name.endswith(".phi") and name != "phi":
            continue
        parts = name.split(".")[:-1]
        modality = parts.pop() if parts and parts[-1] in MODALITY_TITLES else "mm"
        rows = torch.nn.functional.normalize(phi.float(), dim=-1)
        grams[(".".join(parts) or "model", modality)] = rows @ rows.t()
    return grams


def write_heatmaps(adapter_dir: Union[str, Path], out_dir: Union[str, Path]) -> list[Path]:
    """One PNG per (layer, modality) in out_dir, named ``{layer}.{modality}.png``; returns the paths."""
    grams = phi_grams(read_adapter_tensors(adapter_dir))
    if not grams:
        raise ValueError(f"{adapter_dir}: the adapter holds no SMoLA routing matrix (no '*.phi' tensor)")
    import matplotlib  # lazily: plotting is optional

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for (layer, modality), gram in sorted(grams.items()):
        fig, ax = plt.subplots(figsize=(4, 3.4))
        image = ax.imshow(gram.numpy(), cmap="viridis", vmin=-1.0, vmax=1.0)
        ax.set_title(f"{layer}\n{MODALITY_TITLES[modality]}: $\\Phi\\Phi^T$", fontsize=8)
        ax.set_xlabel("expert")
        ax.set_ylabel("expert")
        fig.colorbar(image, ax=ax)
        fig.tight_layout()
        path = out_dir / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', layer)}.{modality}.png"
        fig.savefig(path, dpi=80)
        plt.close(fig)
        paths.append(path)
    return paths


def main(argv: Union[list[str], None] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("adapter_dir")
    parser.add_argument("out_dir")
    args = parser.parse_args(argv)
    paths = write_heatmaps(args.adapter_dir, args.out_dir)
    print(f"wrote {len(paths)} heatmaps to {args.out_dir}")


if __name__ == "__main__":
    main()
