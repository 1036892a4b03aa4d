"""The strategy lab: strategies run side by side on the same model, data and seed (`compare.py`),
and what they did shown as pictures (`report.py`, from the run directories `runs.py` reads)."""
