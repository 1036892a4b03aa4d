"""paratrain: train PyTorch models across processes and machines with every major strategy.

Python API:
    cfg = paratrain.load_config("configs/demo.toml", ["training.steps=100"])
    result = paratrain.launch(cfg, nproc=2)  # N local workers, like `paratrain run`
    result.exit_code, result.run_dir, result.summary, result.checkpoint
    model = paratrain.load_model(result.run_dir)  # the trained model, one plain nn.Module
    paratrain.train(cfg, model=my_module)    # in this process, or as a torchrun rank
"""
from paratrain.config import Config, ConfigError, load_config

__all__ = ["Config", "ConfigError", "load_config", "launch", "load_model", "train"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # `launch` and `train` import torch (3 s): a worker restarted after a deliberate end, or a
    # bad command line, is answered before that (restarts.py, cli.py).
    if name in ("launch", "train"):
        from paratrain import launcher

        return getattr(launcher, name)
    if name == "load_model":
        from paratrain.results import load_model

        return load_model
    raise AttributeError(f"module 'paratrain' has no attribute {name!r}")
