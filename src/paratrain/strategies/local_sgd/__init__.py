"""Local SGD and DiLoCo: `local_sgd.py` (the strategies), `replicas.py` (collectives over the live
replicas, retried over the survivors), `deadline.py` (time-bounded rounds: DropCompute)."""
