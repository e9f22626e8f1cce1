"""Omni-SMoLA: soft mixtures of low-rank experts around frozen linears (torch only)."""
