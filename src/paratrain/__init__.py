"""paratrain: train PyTorch models across processes and machines with every major strategy.

Python API:
    cfg = paratrain.load_config("configs/demo.toml", ["training.steps=100"])
    paratrain.launch(cfg, nproc=2)          # N local workers, like `paratrain run`
    paratrain.train(cfg, model=my_module)   # in this process, or as a torchrun rank
"""
from paratrain.config import Config, ConfigError, load_config

__all__ = ["Config", "ConfigError", "load_config", "launch", "train"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # `launch` and `train` import torch (3 s): a worker restarted after a deliberate end, or a
    # bad command line, is answered before that (restarts.py, cli.py).
    if name in ("launch", "train"):
        from paratrain import launcher

        return getattr(launcher, name)
    raise AttributeError(f"module 'paratrain' has no attribute {name!r}")
