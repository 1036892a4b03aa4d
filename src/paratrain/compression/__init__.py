"""Communication compression: codecs (codecs.py) and where they plug in (adapters.py).

`strategy.compression` picks a codec; ddp registers its DDP comm hook, diloco compresses its
pseudo-gradient before averaging. See the module docstrings for the algorithms and papers.
"""
from paratrain.compression.codecs import Codec, CodecState, make_codec

__all__ = ["Codec", "CodecState", "make_codec"]
