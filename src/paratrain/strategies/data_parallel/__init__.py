"""Data parallelism: every rank trains on its slice of each batch. `ddp.py` (DDP, gradient
all-reduce), `zero.py` (ZeRO-1 on ZeroRedundancyOptimizer, ZeRO-2/3 on FSDP2)."""
