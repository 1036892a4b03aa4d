"""Pipeline parallelism: `pipeline.py` (the strategies: pipeline, model_parallel), `split.py`
(where to cut the model), `instrument.py` (timing each micro-batch's work on a stage)."""
