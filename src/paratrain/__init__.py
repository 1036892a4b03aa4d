"""paratrain: train PyTorch models across processes and machines with every major strategy.

Python API:
    cfg = paratrain.load_config("configs/demo.toml", ["training.steps=100"])
    paratrain.launch(cfg, nproc=2)          # N local workers, like `paratrain run`
    paratrain.train(cfg, model=my_module)   # in this process, or as a torchrun rank
"""
from paratrain.config import Config, ConfigError, load_config
from paratrain.launch import launch, train

__all__ = ["Config", "ConfigError", "load_config", "launch", "train"]
__version__ = "0.1.0"
