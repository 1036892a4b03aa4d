"""Config loading, overrides and the table of invalid inputs (no processes)."""
import dataclasses

import pytest

from paratrain.cli import main
from paratrain.config import Config, ConfigError, load_config
from paratrain.strategies.layout import layout


def test_defaults_are_valid_and_frozen():
    cfg = load_config()
    assert cfg == Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.training.steps = 3


def test_toml_file_and_overrides(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[model]\nname = "mlp"\n[data]\nname = "synthetic"\n[training]\nsteps = 7\n')
    cfg = load_config(path, ["training.steps=9", "optimizer.betas=[0.8, 0.9]", "strategy.ddp.bucket_mb=4",
                             "run.name=my-run"])
    assert (cfg.model.name, cfg.training.steps, cfg.optimizer.betas) == ("mlp", 9, (0.8, 0.9))
    assert cfg.strategy.ddp.bucket_mb == 4.0 and isinstance(cfg.strategy.ddp.bucket_mb, float)
    assert cfg.run.name == "my-run"  # bare words are strings


def test_round_trip_through_dict():
    cfg = load_config(None, ["model.name=custom", "model.factory=a.b:c", "model.loss=a.b:d",
                             "model.options={width=3}", "data.name=custom", "data.factory=a.b:e"])
    from paratrain.config import from_dict

    assert from_dict(cfg.to_dict()) == cfg


def test_shipped_configs_are_valid():
    """... and every entry of the shipped comparison matrices (configs/compare/) on its process count."""
    from pathlib import Path

    from paratrain.lab.compare import read_matrix

    configs = Path(__file__).parents[2].joinpath("configs")
    for path in sorted(configs.glob("*.toml")):
        cfg = load_config(path)
        layout(cfg, cfg.run.nproc)
    matrices = sorted(configs.glob("compare/*.toml"))
    assert matrices
    for path in matrices:
        for entry in read_matrix([str(path)], [], None).entries:
            cfg = load_config(entry.config, entry.sets)
            if cfg.strategy.name != "auto":  # auto's layout is the planner's, on the calibrated machine
                layout(cfg, entry.nproc)


def _refused(argv: list[str], message: str, tmp_path, capsys) -> None:
    """`paratrain ARGV` (run from tmp_path): exit code 2, that one line, no traceback, nothing written."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not (tmp_path / "runs").exists()


def _sets(sets: list[str]) -> list[str]:
    return [a for s in sets for a in ("--set", s)]


# (what the user passes, the words the one-line error must contain)
INVALID = [
    (["training.steps=0"], "training.steps = 0: must be an integer >= 1"),
    (["training.steps=ten"], "training.steps = 'ten': must be an integer"),
    (["training.steps=2.5"], "training.steps = 2.5: must be an integer"),
    (["optimizer.lr=-0.1"], "optimizer.lr = -0.1: must be a number > 0"),
    (["optimizer.name=lion"], "optimizer.name = 'lion': must be one of sgd, adam, adamw"),
    (["strategy.name=magic"], "strategy.name = 'magic': must be one of"),
    (["model.dropout=1.5"], "model.dropout = 1.5: must be a number in [0, 1)"),
    (["model.d_model=100", "model.n_head=3"], "model.d_model = 100: must be divisible by model.n_head = 3"),
    (["model.colour=red"], "model.colour: unknown key; allowed: name, factory"),
    (["trainin.steps=3"], "trainin: unknown key; did you mean 'training'? allowed: model, data"),
    (["training=3"], "training must be a table"),
    (["optimizer.betas=[0.9]"], "optimizer.betas = [0.9]: must be a list of 2 numbers"),
    (["checkpoint.enabled=maybe"], "checkpoint.enabled = 'maybe': must be true or false"),
    (["training.global_batch_size=10", "training.grad_accum_steps=4"],
     "training.global_batch_size = 10: must be divisible by training.grad_accum_steps = 4"),
    (["model.name=custom"], "model.factory: required when model.name = 'custom'"),
    (["model.name=custom", "model.factory=not a path"],
     "model.factory = 'not a path': must be 'package.module:function'"),
    (["data.name=text"], "data.path: required when data.name = 'text'"),
    (["data.name=text", "data.path=/no/such/file.txt"], "data.path = '/no/such/file.txt': no such file"),
    (["model.name=mlp"], "data.name = 'pydoc': model.name = 'mlp' takes data.name = 'synthetic'"),
    (["data.eval_fraction=1"], "data.eval_fraction = 1: must be a number in (0, 1)"),
    (["optimizer.warmup_steps=500", "training.steps=100"],
     "optimizer.warmup_steps = 500: must be < training.steps = 100"),
    (["optimizer.nesterov=true"], "optimizer.nesterov = true: needs optimizer.name = 'sgd'"),
    (["run.device=tpu"], "run.device = 'tpu': must be one of auto, cpu, cuda"),
    (["run.timeout_s=0"], "run.timeout_s = 0: must be a number of seconds >= 1"),
    (["run.timeout_s=1e-9"], "run.timeout_s = 1e-09: must be a number of seconds >= 1"),
    (["optimizer.lr=inf"], "optimizer.lr = inf: must be a finite number"),
    (["optimizer.lr=nan"], "optimizer.lr = nan: must be a finite number"),
    (["optimizer.betas=[inf, 0.9]"], "optimizer.betas = inf: must be a finite number"),
    (["faults.delay_s=-inf"], "faults.delay_s = -inf: must be a finite number"),
    (["run.name=../../x"], "run.name = '../../x': must be a plain name"),
    (["run.name=a/b"], "run.name = 'a/b': must be a plain name"),
    (["run.name=.hidden"], "run.name = '.hidden': must be a plain name"),
    (['run.name=""'], "run.name = '': must be a plain name"),
    (["run.name=.."], "run.name = '..': must be a plain name"),
    (["run.name=."], "run.name = '.': must be a plain name"),
    (["run.name=a\\b"], "run.name = 'a\\\\b': must be a plain name"),
    (["training.on_nonfinite=ignore"], "training.on_nonfinite = 'ignore': must be one of stop, skip"),
    (["faults.nan_at_step=x"], "faults.nan_at_step = 'x': must be an integer"),
    (["strategy.ddp.bucket_mb=0"], "strategy.ddp.bucket_mb = 0: must be a number > 0"),
    (["training.steps"], "--set 'training.steps': expected section.key=value"),
    (["optimizer.betas=[1.5, 0.9]"], "optimizer.betas = [1.5, 0.9]: must be two numbers in [0, 1)"),
    (["strategy.zero.mixed_precision=fp16"], "strategy.zero.mixed_precision = 'fp16': must be one of off, bf16"),
    (["fault_tolerance.replica_groups=1"], "fault_tolerance.replica_groups = 1: must be 0 (off) or an integer >= 2"),
    (["fault_tolerance.replica_groups=2", "fault_tolerance.min_replicas=3"],
     "fault_tolerance.min_replicas = 3: must be <= fault_tolerance.replica_groups = 2"),
    (["fault_tolerance.lighthouse=host:29510"], "fault_tolerance.lighthouse = 'host:29510': must be http://host:port"),
    (["model.hiden=8"], "model.hiden: unknown key; did you mean 'model.hidden'? allowed: name, factory"),
    (["strategy.pipeline.micro_batches=2"], "did you mean 'strategy.pipeline.microbatches'?"),
    (["model.sync_batchnorm=true", "strategy.name=gossip"], "model.sync_batchnorm = true: for strategies that step "
     "together over a data-parallel group (ddp, zero1, zero2, zero3, hybrid, single); strategy.name = 'gossip'"),
    (["model.sync_batchnorm=true", "fault_tolerance.replica_groups=2"],
     "model.sync_batchnorm = true: not with fault_tolerance.replica_groups"),
]


@pytest.mark.parametrize("sets,message", INVALID, ids=[s[0][0] for s in INVALID])
def test_invalid_config_gives_one_clear_line(sets, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as err:
        load_config(None, sets)
    assert message in str(err.value)
    _refused(["run", *_sets(sets)], message, tmp_path, capsys)


WORLD_INVALID = [
    (["strategy.name=parameter_server", "training.on_nonfinite=skip"], 3,
     "training.on_nonfinite = 'skip': parameter_server takes 'stop'"),
    (["strategy.name=ddp", "strategy.pp=2"], 2, "strategy.pp = 2: only strategy.name = 'hybrid' takes degrees"),
    (["strategy.name=single"], 2, "strategy.name = 'single': runs on 1 process, not 2"),

    (["strategy.name=ddp", "training.global_batch_size=9"], 2,
     "training.global_batch_size = 9: must be divisible by data-parallel ranks x grad_accum_steps = 2 x 1"),
]


@pytest.mark.parametrize("sets,nproc,message", WORLD_INVALID)
def test_invalid_for_the_process_count(sets, nproc, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as err:
        layout(load_config(None, sets), nproc)
    assert message in str(err.value)
    _refused(["run", "--nproc", str(nproc), *_sets(sets)], message, tmp_path, capsys)


@pytest.mark.parametrize("sets,nproc,message", [
    (["strategy.name=zero3"], 2, "fault_tolerance.replica_groups = 2: per-step fault tolerance serves strategy.name = "
     "'ddp', 'local_sgd', 'diloco', 'hybrid'; 'zero3' restarts from its newest checkpoint"),
    (["model.name=gpt", "strategy.name=hybrid", "strategy.pp=2"], 2, "fault_tolerance.replica_groups = 2: each "
     "replica group of hybrid is one pp x tp mesh of 2 processes; start 4 processes (--nproc 4), not 2"),
    (["model.name=gpt", "strategy.name=hybrid", "strategy.pp=2", "strategy.dp_mode=shard"], 4,
     "strategy.dp = 0, strategy.dp_mode = 'shard': with fault_tolerance.replica_groups the replica groups are "
     "hybrid's dp axis"),
    ([], 4, "fault_tolerance.replica_groups = 2: each replica group of ddp is one process; start 2 processes "
     "(--nproc 2), not 4"),
    ([], 3, "fault_tolerance.replica_groups = 2: must divide the number of processes, 3"),
    (["strategy.name=diloco", "fault_tolerance.replica_groups=3"], 3,
     "fault_tolerance.min_replicas = 1: diloco as 3 replica groups needs a majority, min_replicas >= 2"),
    (["strategy.name=local_sgd", "fault_tolerance.replica_groups=4", "fault_tolerance.min_replicas=2"], 4,
     "fault_tolerance.min_replicas = 2: local_sgd as 4 replica groups needs a majority, min_replicas >= 3"),
    (["strategy.compression.codec=fp16"], 2, "strategy.compression.codec = 'fp16': fault_tolerance.replica_groups "
     "averages gradients through torchft, uncompressed"),
])
def test_replica_groups_are_checked_before_workers(sets, nproc, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _refused(["run", "--nproc", str(nproc), *_sets(["fault_tolerance.replica_groups=2", *sets])], message, tmp_path,
             capsys)


@pytest.mark.parametrize("sets,nproc,message", [
    (["model.name=mlp", "data.name=synthetic", "data.num_samples=100"], 2,
     "training.global_batch_size = 32: the eval split holds only 10 samples"),
    (["model.name=custom", "model.factory=tests.user_code:build_model", "model.loss=tests.user_code:loss",
      "data.name=synthetic", "strategy.name=pipeline", "strategy.pipeline.microbatches=4"], 4,
     "strategy: 4 pipeline stages (4 ranks x 1) for a model of 3 blocks"),
])
def test_data_and_model_are_checked_before_workers(sets, nproc, message, tmp_path, capsys, monkeypatch):
    """Found by building the data and the model (on the meta device) in the launcher."""
    monkeypatch.chdir(tmp_path)
    layout(load_config(None, sets), nproc)  # the config alone looks fine
    _refused(["run", "--nproc", str(nproc), *_sets(sets)], message, tmp_path, capsys)


@pytest.mark.parametrize("argv,message", [
    (["run", "missing.toml"], "config file 'missing.toml' does not exist"),
    (["run", "--nproc", "0"], "--nproc 0: must be an integer >= 1"),
    (["run", "--nproc", "two"], "argument --nproc: invalid int value: 'two'"),
    (["fly"], "invalid choice: 'fly'"),
    (["run", "--resume"], "--resume: give a checkpoint or run directory, or set run.dir"),
])
def test_invalid_command_line(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        raise SystemExit(main(argv))
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_invalid_toml_file(tmp_path, capsys):
    path = tmp_path / "bad.toml"
    path.write_text("[training\nsteps = 3\n")
    assert main(["run", str(path)]) == 2
    assert f"config file '{path}' is not valid TOML" in capsys.readouterr().err


@pytest.mark.parametrize("toml,message", [
    ("[optimizer]\nlr = inf\n", "optimizer.lr = inf: must be a finite number"),
    ("[faults]\ndelay_s = nan\n", "faults.delay_s = nan: must be a finite number"),
    ("[optimizer]\nbetas = [0.9, -inf]\n", "optimizer.betas = -inf: must be a finite number"),
])
def test_non_finite_numbers_in_a_toml_file(toml, message, tmp_path, capsys, monkeypatch):
    """TOML has inf and nan literals; no float key takes them."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.toml").write_text(toml)
    _refused(["run", "c.toml"], message, tmp_path, capsys)


# Broken user code, written next to the run (the current directory): (module source, sets, message).
USER_MODEL = "import torch.nn as nn\ndef build(width=1):\n    return nn.Linear(10, width)\n"
# Blocks in an nn.ModuleList: a pipeline traces the model (pipeline/split.py).
BLOCKS = """import torch.nn as nn
class Blocks(nn.Module):
    def __init__(self, tie):
        super().__init__()
        self.first, self.out = nn.Linear(10, 10), nn.Linear(10, 10 if tie else 1)
        self.blocks = nn.ModuleList(nn.Linear(10, 10) for _ in range(4))
        if tie:
            self.out.weight = self.first.weight
    def forward(self, x):
        x = self.first(x)
        for b in self.blocks:
            x = b(x)
        return self.out({end})
def build(width=4, tie=False):
    return Blocks(tie)
"""
BROKEN = [
    ("def build(:\n", [], "model.factory = 'usr:build': importing 'usr' failed: SyntaxError"),
    ("import numpy\nraise RuntimeError('no GPU here')\n", [],
     "importing 'usr' failed: RuntimeError: no GPU here at"),
    ("import no_such_dependency_xyz\n", [], "importing 'usr' failed: ModuleNotFoundError: No module named"),
    ("def build(width=4):\n    raise ValueError('bad width')\n", [],
     "model.factory = 'usr:build' raised ValueError: bad width at"),
    ("def build(width=4):\n    return 'a model'\n", [],
     "model.factory = 'usr:build': returned str, not a torch.nn.Module"),
    (USER_MODEL, ["model.options={widht=8}"], "got an unexpected keyword argument 'widht' (model.options is passed as "
                                              "keyword arguments; it takes: width)"),
    (USER_MODEL + "import torch.nn.functional as F\ndef loss(o, t):\n    return F.mse_loss(o @ o, t)\n",
     ["model.loss=usr:loss"], "model.loss = 'usr:loss': the loss of the model's output and the data's targets fails"),
    (USER_MODEL + "def loss(o, t):\n    return o - t\n", ["model.loss=usr:loss"],
     "model.loss = 'usr:loss': must return a scalar tensor, returned (2, 1)"),
    ("import torch.nn as nn\ndef build(width=4):\n    return nn.Linear(10, 5)\n",
     ["model.loss=torch.nn.functional:cross_entropy"],
     "model.loss = 'torch.nn.functional:cross_entropy': the loss of the model's output and the data's targets fails"),
    ("import torch.nn as nn\ndef build(width=4):\n    return nn.Linear(7, 1)\n", [],
     "model.factory = 'usr:build': forward on one batch of the data fails: RuntimeError"),
    ("import torch.nn as nn\ndef build(width=4):\n    return nn.ReLU()\n", [],
     "model.factory = 'usr:build': the model has no trainable parameters"),
    (BLOCKS.format(end="-x if x.sum() > 0 else x"), ["strategy.name=pipeline"],
     "model: Blocks cannot be traced into pipeline stages by torch.distributed.pipelining: "),
    (USER_MODEL + "def data(split, cfg):\n    raise OSError('no such bucket')\n",
     ["data.name=custom", "data.factory=usr:data"], "data.factory = 'usr:data' raised OSError: no such bucket at"),
    (USER_MODEL + "def data(split, cfg):\n    return 42\n", ["data.name=custom", "data.factory=usr:data"],
     "data.factory('train'): returned int; expected a map-style Dataset"),
]


@pytest.mark.parametrize("source,sets,message", BROKEN, ids=[m.split(":")[-1][:30] for _, _, m in BROKEN])
def test_broken_user_code_is_one_line_naming_it(source, sets, message, tmp_path, capsys, monkeypatch):
    """Imported from the current directory, as `python -m` would; the error names key, file and line."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "usr.py").write_text(source)
    monkeypatch.setattr("sys.path", list(__import__("sys").path))
    __import__("sys").modules.pop("usr", None)
    sets = ["model.name=custom", "model.factory=usr:build", "model.loss=torch.nn.functional:mse_loss",
            "data.name=synthetic", "data.num_samples=160", "training.global_batch_size=8", *sets]
    _refused(["run", "--nproc", "2", *_sets(sets)], message, tmp_path, capsys)


def test_a_tied_model_traced_into_more_than_two_sharded_stages_is_refused(tmp_path, capsys, monkeypatch):
    """Its tied copies are summed over the pp ranks shard by shard: a middle stage holds none."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "usr.py").write_text(BLOCKS.format(end="x"))
    monkeypatch.setattr("sys.path", list(__import__("sys").path))
    __import__("sys").modules.pop("usr", None)
    sets = ["model.name=custom", "model.factory=usr:build", "model.loss=torch.nn.functional:mse_loss",
            "model.options={tie=true}", "strategy.name=hybrid",
            "strategy.pp=4", "data.name=synthetic", "data.num_samples=160", "training.global_batch_size=8"]
    _refused(["run", "--nproc", "8", *_sets(sets)], "strategy.pp = 4: Blocks ties ['first.weight', 'out.weight'], "
             "whose copies on its pipeline stages are kept equal across them; with a sharded dp axis that needs "
             "every pp rank to hold one: use pp = 2, or dp = 1", tmp_path, capsys)
    # its blocks found: as many stages as it has blocks, no more
    _refused(["run", "--nproc", "8", *_sets([*sets, "model.options={tie=false}", "strategy.pp=8",
                                              "strategy.pipeline.schedule=gpipe"])],
             "strategy: 8 pipeline stages (8 ranks x 1) for a model of 4 blocks", tmp_path, capsys)


@pytest.mark.parametrize("sets,message", [
    (["run.device=cuda"], "run.device = 'cuda': no CUDA device is visible"),
    (["model.name=gpt", "data.name=text", "data.path=latin1.txt"], "data.path = 'latin1.txt': not UTF-8 text (byte 3"),
])
def test_environment_and_data_errors_before_workers(sets, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") * 100)
    if "run.device=cuda" in sets:
        import torch
        if torch.cuda.is_available():
            pytest.skip("a CUDA device is visible here")
    _refused(["run", "--nproc", "2", *_sets(sets)], message, tmp_path, capsys)


def test_tensorboard_without_its_package_is_refused_before_workers(tmp_path, capsys, monkeypatch):
    """run.tensorboard needs the tensorboard package (an extra): without it, one line before any worker."""
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard"
                        else find_spec(name, *a))
    monkeypatch.chdir(tmp_path)
    _refused(["run", "--nproc", "2", *_sets(["run.tensorboard=true"])],
             "run.tensorboard = true: torch's SummaryWriter needs the tensorboard package", tmp_path, capsys)


@pytest.mark.parametrize("sets,message", [
    (["model.factory=no_such_module_xyz:build"], "model.factory = 'no_such_module_xyz:build': cannot import module"),
    (["model.loss=torch.nn.functional:no_such_loss"], "module 'torch.nn.functional' has no attribute 'no_such_loss'"),
    (["model.loss=torch:__version__"], "'__version__' is not callable"),
])
def test_user_code_that_does_not_import_fails_before_workers(sets, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sets = ["model.name=custom", "model.factory=torch.nn:Linear", "model.loss=torch.nn.functional:mse_loss",
            "data.name=synthetic", *sets]
    _refused(["run", "--nproc", "2", *_sets(sets)], message, tmp_path, capsys)


@pytest.mark.parametrize("source,sets,message", [
    ("def build(width=4):\n    raise ValueError('bad width')\n", [],
     "model.factory = 'usr:build' raised ValueError: bad width at"),
    ("import torch.nn as nn\ndef build(width=4):\n    return nn.ReLU()\n", [],
     "model.factory = 'usr:build': the model has no trainable parameters"),
    (USER_MODEL, ["run.device=cuda"], "run.device = 'cuda': no CUDA device is visible"),
    (USER_MODEL, ["model.name=gpt", "data.name=text", "data.path=latin1.txt"],
     "data.path = 'latin1.txt': not UTF-8 text (byte 3"),
], ids=["raises", "no-parameters", "cuda", "not-utf8"])
def test_single_process_run_refuses_before_writing(source, sets, message, tmp_path, capsys, monkeypatch):
    """strategy.name = 'single' trains in the launcher's own process: the same checks, before a run directory."""
    import sys

    monkeypatch.chdir(tmp_path)
    (tmp_path / "usr.py").write_text(source)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") * 100)
    if "run.device=cuda" in sets:
        import torch
        if torch.cuda.is_available():
            pytest.skip("a CUDA device is visible here")
    monkeypatch.setattr("sys.path", list(sys.path))
    sys.modules.pop("usr", None)
    sets = ["strategy.name=single", "model.name=custom", "model.factory=usr:build",
            "model.loss=torch.nn.functional:mse_loss", "data.name=synthetic", "training.global_batch_size=8", *sets]
    _refused(["run", "--nproc", "1", *_sets(sets)], message, tmp_path, capsys)


def test_config_prints_every_default_and_describes_every_key(tmp_path, capsys, monkeypatch):
    """`paratrain config`: the resolved config as TOML, which loads back to the same config; and
    `--describe`: every key of the dataclasses with type, default, allowed values and a meaning."""
    import tomllib

    from paratrain.reference import keys

    monkeypatch.chdir(tmp_path)
    assert main(["config", "--set", "strategy.name=zero3", "--set", "model.options={width = 8}"]) == 0
    text = capsys.readouterr().out
    (tmp_path / "all.toml").write_text(text)
    assert load_config(str(tmp_path / "all.toml"), []) == load_config(
        None, ["strategy.name=zero3", "model.options={width = 8}"])
    flat = tomllib.loads(text)
    assert flat["training"]["eval_batches"] == 4 and flat["strategy"]["pipeline"]["schedule"] == "1f1b"
    every = [k.name for k in keys()]
    for name in every:  # every key written, with its value
        section = flat
        for part in name.split("."):
            section = section[part]
    assert main(["config", "--describe"]) == 0
    described = capsys.readouterr().out
    for k in keys():
        assert k.meaning, k.name  # a comment beside each field in config.py
        assert f"{k.name} ({k.type}, default " in described
    assert "strategy.ps.mode (string, default \"ssp\"; allowed: \"bsp\", \"asp\", \"ssp\")" in described
    assert sorted(p.name for p in tmp_path.iterdir()) == ["all.toml"]  # nothing else written


def test_the_readmes_configuration_table_names_every_key():
    """The README's table of sections and keys, checked against the dataclasses: no key missing,
    none that does not exist."""
    import re
    from pathlib import Path

    from paratrain.reference import keys

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    table = readme.split("## Configuration", 1)[1].split("\n\n", 2)[2].split("\n\n", 1)[0]
    listed = set()
    for row in table.splitlines()[2:]:
        section, cells = re.match(r"\| `([a-z_]+)` \| (.*) \|$", row).groups()
        for key in re.findall(r"`\[?([a-z_.]+)\]?`", re.sub(r"\([^()]*\)", "", cells)):
            listed.add(key if key.startswith(section + ".") else f"{section}.{key}")
    want = {k.name for k in keys()}
    # the strategy's sub-tables are named as tables ([strategy.ddp]): their keys by --describe
    tables = {n for n in listed if n.count(".") == 1 and any(w.startswith(n + ".") for w in want)}
    covered = {w for w in want if w in listed or any(w.startswith(t + ".") for t in tables)}
    assert covered == want, sorted(want - covered)
    assert listed - tables <= want, sorted(listed - tables - want)


def test_version_and_a_one_worker_parameter_server_warning(capsys):
    from paratrain.launcher import advice

    with pytest.raises(SystemExit) as out:
        main(["--version"])
    assert out.value.code == 0 and capsys.readouterr().out.startswith("paratrain ")
    ps = load_config(None, ["strategy.name=parameter_server"])
    (said,) = advice(ps, 2)
    assert "on 2 processes is one worker and its server(s)" in said
    assert advice(ps, 3) == [] and advice(load_config(None, []), 2) == []


def test_eval_batches_all_is_every_whole_held_out_batch(tmp_path):
    """51 held-out samples (10% of 512) in global batches of 8: 6 whole batches, the 3 left over
    out. "all" evaluates on the same 6 as eval_batches = 6, and not on what 1 sees."""
    import paratrain
    from tests.helpers import MLP

    def eval_loss(n):
        cfg = load_config(None, [*MLP, "strategy.name=single", "training.steps=2", "training.global_batch_size=8",
                                 f"training.eval_batches={n}", f"run.dir={tmp_path / str(n)}"])
        return paratrain.train(cfg).summary["eval_loss"]

    assert eval_loss("all") == eval_loss(6) != eval_loss(1)
