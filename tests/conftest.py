"""Every test sees the same machine: no calibration from the developer's home (`paratrain calibrate`
writes ~/.config/paratrain/machine.toml, and a run's summary then carries the planner's prediction).
A test that wants one writes its own and points PARATRAIN_CALIBRATION at it."""
import os

os.environ["PARATRAIN_CALIBRATION"] = os.path.join(os.path.dirname(__file__), "no-calibration.toml")
