"""Benchmark `vlmoe prepare` at scale: peak memory and images/s against the number of records and workers.

Writes a JSONL of N image-caption records over real image files (the embedded Tux Paint stamps and
emoji, re-keyed: each record its own JPEG at 224 px with a shifted hue, so no two files are the same),
then prepares it with 1 and 2 workers for each N, each run a fresh `vlmoe prepare` process, in
alternation (N=20k w1, w2, N=80k w1, w2). Prints the peak resident memory of the preparing
processes (the largest, and the main one) and the images/s of the unit phase, and the ratios the
scale issue asks for: peak(80k) / peak(20k) and images/s(2 workers) / images/s(1 worker).

    python scripts/bench_prepare.py                      # N = 20000 and 80000
    python scripts/bench_prepare.py --sizes 2000 8000    # a quick look
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def base_images(count: int) -> list:
    """Up to ``count`` embedded images (stamps, then emoji), RGB at 224 px."""
    from vlmoe.data.images import to_rgb
    from vlmoe.data.sources import SkipCounter, open_source

    images = []
    for name in ("tuxpaint_stamps", "noto_emoji"):
        for record in open_source(name, None, SkipCounter()):
            try:
                image = to_rgb(record["image"].open()).resize((224, 224))
            except Exception:  # an unreadable stamp: the bench just takes the next one
                continue
            images.append(image)
            if len(images) == count:
                return images
    return images


def write_jsonl(root: Path, size: int, bases: list) -> Path:
    """``size`` records, each its own JPEG file (a base image with its hue shifted by the record index)."""
    from PIL import Image

    (root / "img").mkdir(parents=True, exist_ok=True)
    lines = []
    for index in range(size):
        base = bases[index % len(bases)]
        shift = (index // len(bases)) * 7 % 256
        h, s, v = base.convert("HSV").split()
        image = Image.merge("HSV", (h.point(lambda value: (value + shift) % 256), s, v)).convert("RGB")
        image.save(root / "img" / f"{index:07d}.jpg", quality=90)
        lines.append(json.dumps({"image": f"img/{index:07d}.jpg", "text": f"picture {index}, hue shifted by {shift}"}))
    path = root / "records.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def run_prepare(jsonl: Path, out: Path, workers: int) -> dict:
    """One `vlmoe prepare` in a fresh process; its peak memory (getrusage of it and its workers)."""
    shutil.rmtree(out, ignore_errors=True)
    code = ("import resource, runpy, sys; sys.argv = ['vlmoe'] + sys.argv[1:]\n"
            "try:\n    runpy.run_module('vlmoe', run_name='__main__')\n"
            "finally:\n    print('MAXRSS_SELF', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "
            "'MAXRSS_CHILDREN', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, flush=True)")
    args = [sys.executable, "-c", code, "prepare", "pretrain_tiny", "model.preset=small", f"data.dir={out}",
            f"prepare.sources=[jsonl:{jsonl}]", f"prepare.num_workers={workers}", "prepare.text_vocab_size=200",
            "prepare.codebook_size=64", "prepare.tokenizer_fit_images=500", "prepare.val_fraction=0.02"]
    started = time.perf_counter()
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"prepare failed:\n{proc.stderr[-3000:]}")
    wall = time.perf_counter() - started
    marker = [line.split() for line in proc.stdout.splitlines() if line.startswith("MAXRSS_SELF")][-1]
    report = json.loads((out / "prepare_report.json").read_text())
    return {"main_mb": int(marker[1]) / 1024, "peak_mb": max(int(marker[1]), int(marker[3])) / 1024,
            "images_per_s": report["throughput"]["images_per_s"], "wall_s": wall,
            "images": report["throughput"]["images_written"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[20_000, 80_000])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--keep", help="a directory to keep the generated data in (default: a temporary one)")
    args = parser.parse_args()
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_prepare_"))
    bases = base_images(500)
    print(f"bench_prepare: {len(bases)} embedded base images, {os.cpu_count()} CPUs, data in {work}", flush=True)
    results = {}
    for size in args.sizes:
        jsonl = write_jsonl(work / f"jsonl{size}", size, bases)
        for workers in args.workers:
            results[(size, workers)] = run_prepare(jsonl, work / f"data{size}-w{workers}", workers)
            r = results[(size, workers)]
            print(f"  N={size:7d} workers={workers}: peak {r['peak_mb']:7.0f} MB (main {r['main_mb']:6.0f} MB), "
                  f"{r['images_per_s']:7.1f} images/s, {r['images']} images, wall {r['wall_s']:.0f} s", flush=True)
    small, large = min(args.sizes), max(args.sizes)
    print("\n| records | workers | peak MB | main MB | images/s |\n|---:|---:|---:|---:|---:|")
    for (size, workers), r in results.items():
        print(f"| {size} | {workers} | {r['peak_mb']:.0f} | {r['main_mb']:.0f} | {r['images_per_s']:.1f} |")
    for workers in args.workers:
        ratio = results[(large, workers)]["peak_mb"] / results[(small, workers)]["peak_mb"]
        print(f"peak memory N={large} / N={small}, {workers} worker(s): {ratio:.2f}x (target <= 1.2)")
    if len(args.workers) > 1:
        one, two = min(args.workers), max(args.workers)
        for size in args.sizes:
            speedup = results[(size, two)]["images_per_s"] / results[(size, one)]["images_per_s"]
            print(f"images/s {two} workers / {one} worker, N={size}: {speedup:.2f}x (target >= 1.6)")
    disk = sum(f.stat().st_size for f in (work / f"data{large}-w{args.workers[0]}" / "parts").rglob("*.arrow"))
    print(f"disk: {disk / results[(large, args.workers[0])]['images'] * 1e6 / 1e9:.1f} GB per million images "
          f"(224 px JPEG sources stored at 256 px max side, JPEG q95)")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
