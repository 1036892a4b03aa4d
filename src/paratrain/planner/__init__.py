"""The planner: predict every plan's step time and memory, rank them, explain the winner, run it.

One module per concern:
  model.py        per-block FLOPs, memory traffic, saved activations, parameters (meta device, or
                  a transformer's closed form)
  hardware.py     devices and links: presets with their sources, or this machine calibrated
  calibrate.py    `paratrain calibrate`: matmul FLOP/s, memory bandwidth, arithmetic kinds, the
                  update, alpha/beta per collective
  collectives.py  the alpha-beta time of each collective
  schedule.py     a pipeline step simulated in the order torch's schedules run it
  plan.py         a plan (layout, schedule, ZeRO stage, family) and its estimate
  cost.py         one plan's predicted step and memory
  search.py       every valid plan, filtered by memory, ranked, the winner explained
  commands.py     `paratrain plan` (tables, JSON), `calibrate`, `strategy.name = "auto"`, a run's prediction
  sweep.py        `paratrain plan --sweep-devices`: device counts and kinds, cost, the plot
"""
