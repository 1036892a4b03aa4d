"""A Hugging Face `transformers` model, built from its config (nothing downloaded), trained by
paratrain like any other module: configs/hf_gpt2.toml names these three functions.

`transformers` is not a paratrain dependency: `pip install transformers` to run this.
"""
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

VOCAB, LENGTH = 48, 16


def build(n_layer: int = 2, n_embd: int = 32, n_head: int = 2):
    """GPT-2's architecture, small: a causal language model over VOCAB tokens."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=VOCAB, n_positions=LENGTH, n_layer=n_layer, n_embd=n_embd, n_head=n_head,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config)


def loss(output, target: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy on the model's logits (a transformers model returns a ModelOutput)."""
    logits = output.logits if hasattr(output, "logits") else output
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))


def dataset(split: str, cfg) -> TensorDataset:
    """Arithmetic sequences modulo VOCAB (start and stride random): learnable from the context."""
    g = torch.Generator().manual_seed(0 if split == "train" else 1)
    n = 2048 if split == "train" else 256
    start, stride = torch.randint(0, VOCAB, (n, 1), generator=g), torch.randint(1, 5, (n, 1), generator=g)
    seq = (start + stride * torch.arange(LENGTH + 1)) % VOCAB
    return TensorDataset(seq[:, :-1], seq[:, 1:])
