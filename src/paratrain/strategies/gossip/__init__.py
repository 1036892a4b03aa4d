"""Decentralized gossip: `gossip.py` (D-PSGD / SGP, the strategy), `choco.py` (CHOCO-SGD's
compressed consensus)."""
