"""Every test sees the same machine: no calibration from the developer's home (`paratrain calibrate`
writes ~/.config/paratrain/machine.toml, and a run's summary then carries the planner's prediction).
A test that wants one writes its own and points PARATRAIN_CALIBRATION at it.

And every process a test starts (workers, launchers, spawned ranks) imports torchvision beside
the CPU build of torch: tests/shims/sitecustomize.py, put on PYTHONPATH here and installed in
this process too."""
import importlib.util
import os
import sys

os.environ["PARATRAIN_CALIBRATION"] = os.path.join(os.path.dirname(__file__), "no-calibration.toml")

_SHIMS = os.path.join(os.path.dirname(__file__), "shims")
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_SHIMS, os.environ.get("PYTHONPATH")) if p)
_here = getattr(sys.modules.get("sitecustomize"), "__file__", "") or ""
if "torchvision" not in sys.modules and not _here.startswith(_SHIMS):  # this process (unless started with it)
    _spec = importlib.util.spec_from_file_location("_torchvision_shim", os.path.join(_SHIMS, "sitecustomize.py"))
    sys.modules[_spec.name] = importlib.util.module_from_spec(_spec)  # kept: it holds the declared ops
    _spec.loader.exec_module(sys.modules[_spec.name])
