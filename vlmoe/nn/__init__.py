"""Building blocks that both the backbone (`vlmoe.model`) and the MoE layers (`vlmoe.moe`) use:
ZeRO-3-safe weight init, the dense FFN, and the task scope that labels forward calls for
per-task metrics. A leaf: nothing here imports the packages that use it."""
