"""Tensor parallelism: `parallelize.py` (Megatron's split of a GPT over DTensor, and the bytes it
sends), `tensor.py` (the strategy)."""
