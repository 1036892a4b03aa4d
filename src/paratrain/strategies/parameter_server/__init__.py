"""Parameter server: `worker.py` (the strategy on training ranks), `server.py` (the serving ranks'
loop, started in place of the trainer), `protocol.py` (messages, shard layout), `codec.py`
(compressed push and pull)."""
