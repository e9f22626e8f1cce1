"""vlmoe: one DeepSpeed trainer for sparse VL-MoE, Omni-SMoLA and soft-versus-sparse studies.

Install torch first on a CPU machine (``pip install torch==2.13.0``): an unpinned torch
requirement would otherwise pull a multi-GB CUDA build. GPU users keep their CUDA torch;
the range below accepts it.

The floors are what the code needs; ``scripts/constraints.txt`` pins the exact versions the
tests pass with (``scripts/setup_env.sh`` and the Docker image install with it).
"""
from setuptools import find_packages, setup

setup(
    name="vlmoe",
    version="0.1.0",
    description="Sparse VL-MoE and Omni-SMoLA on DeepSpeed: pretraining, fine-tuning, studies",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["vlmoe", "vlmoe.*", "smola", "smola.*"]),
    package_data={"vlmoe": ["configs/*.yaml", "studies/*.yaml"]},
    install_requires=[
        # torch.serialization.add_safe_globals and weights_only loading (the checkpoint loader)
        "torch>=2.4",
        # 0.15.4 is the first release with DeepSpeed PR 6546: expert gradients under ZeRO-1/2 with
        # expert parallelism were ep_size times too large before it
        "deepspeed>=0.15.4",
        # transformers 5 turns its torch support off below torch 2.6: with torch 2.4 / 2.5 keep 4.x
        "transformers>=4.40",
        # transformers builds its models partitioned under ZeRO-3 only with it; transformers 5
        # refuses its DeepSpeed integration with accelerate < 1.1
        "accelerate>=1.1",
        "datasets>=2.18",
        "sentencepiece>=0.1.99",
        "pyyaml>=6",
        "pillow>=9.1",  # Image.Resampling
        "numpy",
        "safetensors>=0.4",
        "tensorboard>=2.14",
        "tqdm",
        "matplotlib",  # study plots and Phi Phi^T heatmaps
        "easy-vqa",  # offline VQA data (images and questions ship in the wheel): the vqa and nlvr2 tasks
        "webdataset>=0.2.57",  # tar shards as a source; its grouping's error handler works from 0.2.57
    ],
    extras_require={
        "test": ["pytest>=7", "pytest-timeout", "peft"],  # peft: adapters load with PEFT itself
    },
    entry_points={"console_scripts": ["vlmoe=vlmoe.__main__:run"]},
)
