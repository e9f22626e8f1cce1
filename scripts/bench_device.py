"""The --device option the benchmarks share: CPU by default, or a CUDA device made current."""
from __future__ import annotations

import argparse

import torch


def add_device_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", help="cpu (default) or a CUDA device: cuda, cuda:1")


def bench_device(parser: argparse.ArgumentParser, name: str) -> torch.device:
    """The device ``name`` names; a CUDA one is checked and made current (by index: set_device needs one)."""
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            parser.error(f"--device {name}: torch {torch.__version__} sees no CUDA device")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    return device
