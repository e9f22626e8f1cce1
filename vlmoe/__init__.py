"""vlmoe: sparse vision-language MoE (VL-MoE) and Omni-SMoLA on one DeepSpeed trainer."""

__version__ = "0.1.0"
