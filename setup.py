"""vlmoe: one DeepSpeed trainer for sparse VL-MoE, Omni-SMoLA and soft-versus-sparse studies.

Install torch first on a CPU machine (``pip install torch==2.13.0``): an unpinned torch
requirement would otherwise pull a multi-GB CUDA build. GPU users keep their CUDA torch;
the range below accepts it.
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
        "torch>=2.1",
        "deepspeed>=0.14",
        "transformers>=4.40",
        "accelerate>=0.26",  # transformers builds its models partitioned under ZeRO-3 only with it
        "datasets>=2.18",
        "sentencepiece>=0.1.99",
        "pyyaml>=6",
        "pillow>=9",
        "numpy",
        "safetensors>=0.4",
        "tensorboard>=2.14",
        "tqdm",
        "matplotlib",  # study plots and Phi Phi^T heatmaps
        "easy-vqa",  # offline VQA data (images and questions ship in the wheel): the vqa and nlvr2 tasks
    ],
    extras_require={
        "test": ["pytest>=7", "pytest-timeout"],
    },
    entry_points={"console_scripts": ["vlmoe=vlmoe.cli:main"]},
)
