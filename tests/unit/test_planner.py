"""The planner (src/paratrain/planner): its counts against the model, its pipeline simulation
against the schedules' theory and its own full simulation, its memory against ZeRO's formulas,
its ranking on a case with an obvious answer, and `paratrain plan` / `calibrate` as typed."""
import json
import random
from dataclasses import replace

import pytest
import torch

from paratrain.memory import SavedBytes
from paratrain.models.gpt import GPT, cross_entropy
from paratrain.planner import collectives as cc
from paratrain.planner import schedule as S
from paratrain.planner.cost import estimate
from paratrain.planner.footprint import memory
from paratrain.planner.hardware import Calibration, Cluster, Device, Link, preset
from paratrain.planner.model import profile_module, transformer
from paratrain.planner.plan import Plan
from paratrain.planner.search import search
from tests.helpers import ROOT, cli

CALIBRATION = """device = "cpu"
cores = 2
memory_Bps = 1.5e10
memory_bytes = 2.5e10
op_s = 4e-6
measured_at = "test"
update = [5e-5, 4e-9]
dtensor_update = [5e-4, 6e-9]
tensor_parallel = [5e-3, 6e-3, 4e-3, 7e-3]
split_backward = [1e-3, 0.1]
compute_factor = 1.1
compute_curve = [[256, 1.3], [512, 1.1]]
tp_factor = 1.3
pp_factor = 1.2
wake_s = 2e-3
zero1_sync = [3e-4, 4e-10]
ddp = [1e-3, 2e-9]

[fsdp]
zero2 = [3e-3, 4e-3]
zero3 = [3e-3, 6e-3]
replicate = [2e-3, 3e-3, 1e-3, 5e-4]

[matmul_flops]
fp32 = 5e10
bf16 = 1e9

[kinds]
gelu = [1e-9, 2e-9]
attention = [1e-9, 4e-9]

[pipeline_action]
1f1b = 4e-4
zbv = 6e-4

[pipeline_send]
1f1b = 1e-3
gpipe = 2e-3

[fsdp_factor]
zero2 = 1.5
zero3 = 1.25

[links.loopback]
all_reduce = [1e-4, 1e9]
all_gather = [1e-4, 1e9]
reduce_scatter = [1e-4, 1e9]
p2p = [1e-4, 1e9]
"""


def test_meta_profile_of_the_gpt_matches_the_closed_form():
    """FlopCounterMode on the meta device counts what 24sh^2 + 4s^2h per layer says, and the
    parameters are the model's own, to the unit (no weight allocated)."""
    with torch.device("meta"):
        model = GPT(65, n_layer=3, n_head=4, d_model=128, block_size=64)
    x = torch.zeros(1, 64, dtype=torch.long)
    measured = profile_module(model, x, cross_entropy, torch.zeros(1, 64, dtype=torch.long))
    closed = transformer(3, 128, 4, 65, 64, bytes_per_value=4)
    assert measured.params == closed.params == sum(p.numel() for p in model.parameters())
    assert [b.flops for b in measured.blocks] == [b.flops for b in closed.blocks]
    assert [b.attn_flops for b in measured.blocks] == [b.attn_flops for b in closed.blocks]
    assert measured.last.flops == closed.last.flops  # the head's 2shv
    # Saved activations, counted under FakeTensorMode (the CPU's fused attention chosen, as a run
    # chooses it; the meta device decomposes attention and saves its s x s weights): what autograd
    # keeps on a real forward, each storage once, as memory.py measures them. The paper's
    # sh(34 + 5as/h) counts Megatron's tensors (dropout masks, separate copies), not this GPT's.
    from torch._subclasses.fake_tensor import FakeTensorMode

    fake = FakeTensorMode()
    with fake:
        faked = GPT(65, n_layer=3, n_head=4, d_model=128, block_size=64)
    measured = profile_module(faked, x, cross_entropy, torch.zeros(1, 64, dtype=torch.long), fake=fake)
    torch.manual_seed(0)
    real = GPT(65, n_layer=3, n_head=4, d_model=128, block_size=64)
    saved = SavedBytes(real.parameters())
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
        cross_entropy(real(x), torch.zeros(1, 64, dtype=torch.long))
    counted = measured.first.saved + measured.last.saved + sum(b.saved for b in measured.blocks)
    assert abs(counted - saved.peak) / saved.peak < 0.02, (counted, saved.peak)


def test_a_trillion_parameter_model_profiles_on_the_meta_device():
    with torch.device("meta"):
        model = GPT(51200, n_layer=2, n_head=160, d_model=25600, block_size=2048)
    p = profile_module(model, torch.zeros(1, 2048, dtype=torch.long))
    assert p.blocks[0].params == 12 * 25600**2 + 4 * 25600  # a layer of the 1T model: 7.9 G parameters


@pytest.mark.parametrize("schedule,virtual", [("gpipe", 1), ("1f1b", 1), ("interleaved_1f1b", 2)])
@pytest.mark.parametrize("m", [2, 4, 8, 16])
def test_equal_stages_give_the_schedules_theory(schedule, virtual, m):
    """Free communication, forward 1 and backward 2 per stage: the bubble is (p-1)/(vm + p-1)."""
    p = 2
    sim = S.simulate(schedule, p, m, virtual, [1 / virtual] * (p * virtual), [2 / virtual] * (p * virtual),
                     [0.0] * (p * virtual))
    assert sim.bubble == pytest.approx((p - 1) / (virtual * m + p - 1))


def test_one_f_one_b_holds_min_m_p_minus_rank_micro_batches():
    for p, m in ((2, 4), (4, 8), (4, 3 * 4)):
        held = S.peak_held("1f1b", p, m, 1)
        assert held == tuple(float(min(m, p - r)) for r in range(p))
    assert S.peak_held("gpipe", 4, 8, 1) == (8.0,) * 4


def test_zero_bubble_schedules_idle_less_than_one_f_one_b():
    p, m = 4, 8
    one = S.simulate("1f1b", p, m, 1, [1.0] * p, [2.0] * p, [0.0] * p).bubble
    for schedule in ("interleaved_zb", "zbv"):
        assert S.simulate(schedule, p, m, 2, [0.5] * 2 * p, [1.0] * 2 * p, [0.0] * 2 * p).bubble < one / 2


def test_long_pipelines_extrapolate_to_the_full_simulation():
    """Past the warm-up a schedule repeats: the extended line equals the full simulation, exactly
    for equal stages and within 2% when stage times differ by up to 30%."""
    random.seed(1)
    for schedule, v in (("1f1b", 1), ("gpipe", 1), ("interleaved_1f1b", 2), ("zbv", 2)):
        p, m = 4, 48
        n = p * v
        equal = ([1.0] * n, [2.0] * n, [0.02] * n)
        assert S.simulate(schedule, p, m, v, *equal).makespan == pytest.approx(S._simulate(schedule, p, m, v,
                                                                                            *equal).makespan)
        f = [1 + 0.3 * random.random() for _ in range(n)]
        uneven = (f, [2 * x for x in f], [0.05 * random.random() for _ in range(n)])
        full = S._simulate(schedule, p, m, v, *uneven).makespan
        assert S.simulate(schedule, p, m, v, *uneven).makespan == pytest.approx(full, rel=0.02)


def test_collectives_are_the_ring_algorithms():
    link = Link(1e-5, 1e9)
    assert cc.all_reduce(1e9, 4, link) == pytest.approx(6e-5 + 1.5)
    assert cc.all_gather(1e9, 4, link) == cc.reduce_scatter(1e9, 4, link) == pytest.approx(3e-5 + 0.75)
    assert cc.all_reduce(1e9, 1, link) == 0.0


def test_model_states_follow_zeros_formulas():
    """fp32 AdamW, P parameters, N ranks: ddp 16P, ZeRO-1 4P + 4P + 8P/N, ZeRO-2 and 3 16P/N (FSDP2
    shards the parameters in both); ZeRO-2 holds every gathered parameter (4P) from forward to backward."""
    from paratrain.planner.cost import _Layout

    model, n = transformer(4, 256, 4, 100, 32, bytes_per_value=4), 4
    cluster = preset("h100", n)
    P = model.params
    for zero, per_param in ((0, 16), (1, 8 + 8 / n), (2, 16 / n), (3, 16 / n)):
        mem = memory(_Layout.of(Plan(dp=n, zero=zero), model, cluster, 8))
        assert mem["params"] + mem["grads"] + mem["optimizer"] == pytest.approx(per_param * P)
    assert memory(_Layout.of(Plan(dp=n, zero=2), model, cluster, 8))["buffers"] == pytest.approx(4 * P)


def test_a_model_that_fits_one_device_on_a_slow_link_is_not_pipelined():
    """Two single-GPU nodes joined by 100 Mbit/s, a GPT-2 small that fits one GPU: sending every
    micro-batch across a pipeline's boundary or every step's gradient costs more than the compute,
    so DiLoCo's one exchange every H steps (or a compressed all-reduce) comes first, ahead of the
    best pipeline."""
    h100 = preset("h100", 2)
    slow = Link(1e-4, 100e6 / 8, "100 Mbit/s")
    cluster = Cluster(h100.device, 2, 1, slow, slow)
    model = transformer(12, 768, 12, 50257, 1024)
    found = search(model, cluster, 16, "bf16")
    assert found.best.plan.family in ("local_sgd", "diloco") or found.best.plan.codec != "none"
    pipelined = [e for e in found.ranked if e.plan.pp > 1]
    assert pipelined and pipelined[0].step_s > 2 * found.best.step_s


def test_published_scale_plan_is_predicted_within_ten_percent():
    """Korthikanti et al. 2022, Table 5: the 1T model on 512 A100-80GB, sequence parallelism and
    selective recomputation, 71.49 s an iteration (the benchmark prints all eight rows)."""
    model = transformer(128, 25600, 160, 51200, 2048)
    plan = Plan(dp=1, pp=64, tp=8, microbatches=512, schedule="1f1b", recompute="selective",
                sequence_parallel=True, dtype="bf16", p2p_scatter=True, sp_regather=True)
    est = estimate(plan, model, preset("a100-80gb", 512), 512)
    assert est.fits and est.step_s == pytest.approx(71.49, rel=0.10)
    # Megatron's backward all-gathers each split linear's input again: half of forward's
    # tensor-parallel traffic more (an all-gather is half an all-reduce), all of it exposed
    kept = estimate(replace(plan, sp_regather=False), model, preset("a100-80gb", 512), 512)
    assert est.comm_s == pytest.approx(kept.comm_s * 1.25, rel=1e-6) and est.step_s > kept.step_s


@pytest.fixture
def calibrated(tmp_path, monkeypatch):
    path = tmp_path / "machine.toml"
    path.write_text(CALIBRATION)
    monkeypatch.setenv("PARATRAIN_CALIBRATION", str(path))
    return {"PARATRAIN_CALIBRATION": str(path)}


def test_calibration_round_trips_through_toml(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(CALIBRATION)
    cal = Calibration.load(path)
    again = tmp_path / "d.toml"
    again.write_text(cal.to_toml())
    assert Calibration.load(again) == cal and cal.link("loopback").beta_Bps == 1e9
    assert cal.kinds["gelu"] == [1e-9, 2e-9] and cal.update == [5e-5, 4e-9]
    assert cal.tensor_parallel == [5e-3, 6e-3, 4e-3, 7e-3] and cal.pipeline_action == {"1f1b": 4e-4, "zbv": 6e-4}
    # more ranks than cores: each pays its share of them, fixed costs included
    shared = cal.cluster(4).device
    assert shared.tp_fixed_s == (1e-2, 1.2e-2, 8e-3, 1.4e-2) and shared.pipeline_action_s["zbv"] == 1.2e-3
    assert cal.split_backward == [1e-3, 0.1] and shared.split_backward_s == (2e-3, 0.1)
    assert cal.compute_factor == 1.1 and cal.fsdp["zero3"] == [3e-3, 6e-3] and cal.zero1_sync == [3e-4, 4e-10]
    assert shared.fsdp_fixed_s["zero2"] == (6e-3, 8e-3) and shared.zero1_sync_s == (6e-4, 8e-10)
    assert shared.fsdp_fixed_s["replicate"] == (4e-3, 6e-3, 2e-3, 1e-3)
    assert cal.fsdp_factor == shared.fsdp_factor == {"zero2": 1.5, "zero3": 1.25}
    assert cal.pp_factor == shared.pp_factor == 1.2
    assert cal.compute_curve == [[256, 1.3], [512, 1.1]] and shared.compute_curve == ((256, 1.3), (512, 1.1))
    # the factor at a forward's size: the small point's below it, the large one's above, between in log(tokens)
    assert shared.factor(128) == 1.3 and shared.factor(1024) == shared.factor(512) == 1.1
    assert shared.factor(362) == pytest.approx(1.2, rel=1e-2) and replace(shared, compute_curve=()).factor(128) == 1.1
    assert cal.cluster(2).device.pipeline_send_s == {"1f1b": 1e-3, "gpipe": 2e-3}
    assert shared.pipeline_send_s == {}  # where ranks outnumber cores, wake_s is that wait
    assert cal.tp_factor == shared.tp_factor == 1.3 and cal.ddp == [1e-3, 2e-9] and shared.ddp_s == (2e-3, 4e-9)
    # a point-to-point message waits for its receiver's core only where ranks outnumber cores
    assert cal.cluster(4).intra.ab("p2p")[0] == pytest.approx(1e-4 + 2e-3)
    assert cal.cluster(4).intra.ab("all_reduce")[0] == cal.cluster(2).intra.ab("p2p")[0] == 1e-4


def test_a_split_backward_costs_what_calibrate_measured_on_zero_bubble_schedules_only(tmp_path):
    """torch's zero-bubble runtime walks the autograd graph twice (I, then W): per block and in
    proportion to the backward, beyond one whole backward; 1F1B's backward is whole."""
    path = tmp_path / "c.toml"
    path.write_text(CALIBRATION)
    with_split = Calibration.load(path).cluster(2)
    without = Cluster(replace(with_split.device, split_backward_s=()), 2, 2, with_split.intra, with_split.inter)
    model = transformer(4, 128, 4, 65, 64)
    for schedule, virtual, costs_more in (("zbv", 2, True), ("interleaved_zb", 2, True), ("1f1b", 1, False)):
        plan = Plan(pp=2, microbatches=4, schedule=schedule, virtual=virtual)
        a, b = estimate(plan, model, with_split, 16), estimate(plan, model, without, 16)
        assert (a.step_s > b.step_s) == costs_more and (a.step_s >= b.step_s), schedule


def test_plan_prints_json_ranked_by_step_time(tmp_path, calibrated):
    out = cli(["plan", str(ROOT / "configs/demo.toml"), "--devices", "2", "--json"], cwd=tmp_path,
              env=calibrated, timeout=120)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    times = [p["step_s"] for p in report["plans"]]
    assert times == sorted(times) and report["considered"] >= len(times) > 0
    assert report["why"].startswith(report["plans"][0]["plan"]["describe"] + " beats ")


@pytest.mark.parametrize("args,says", [
    (["--transformer", "layers=2,hidden=64"], "missing heads, vocab, seq"),
    (["--transformer", "layers=2,hidden=64,heads=5,vocab=10,seq=8"], "must be divisible by heads"),
    (["--transformer", "layers=two"], "key=positive integer"),
    (["--transformer", "layers=2,hidden=64,heads=4,vocab=10,seq=8"], "--global-batch: give the samples"),
    (["--transformer", "layers=2,hidden=64,heads=4,vocab=10,seq=8", "--global-batch", "8", "--device", "tpu"],
     "--device 'tpu': must be"),
    (["--transformer", "layers=2,hidden=64,heads=4,vocab=10,seq=8", "--global-batch", "8", "--device", "h100",
      "--devices", "0"], "--devices 0: must be an integer >= 1"),
    (["--transformer", "layers=96,hidden=12288,heads=96,vocab=51200,seq=2048", "--device", "a100-40gb",
      "--devices", "1", "--global-batch", "8"], "no plan fits: the smallest of"),
])
def test_bad_plan_input_is_one_line_and_exit_2(tmp_path, args, says):
    out = cli(["plan", *args], cwd=tmp_path, timeout=120)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and says in out.stderr, out.stderr


def test_bad_calibrate_input_is_one_line_and_exit_2_before_measuring(tmp_path):
    out = cli(["calibrate", "--repeats", "0", "--out", str(tmp_path / "m.toml")], cwd=tmp_path, timeout=60)
    assert out.returncode == 2 and out.stderr == "paratrain: error: --repeats 0: must be an integer >= 1\n"
    assert not (tmp_path / "m.toml").exists()


def test_the_benchmark_keeps_nothing_over_a_folder_already_written(tmp_path):
    """`benchmarks/planner.py --keep DIR` names its runs and calibrations the same each time: a DIR
    with anything in it gets one line and exit code 2, before any run, and what it holds stays."""
    import subprocess
    import sys

    from tests.helpers import ENV

    (tmp_path / "machine-0-small.toml").write_text("kept")
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "planner.py"), "--keep", str(tmp_path),
                          "--only", "ddp"], capture_output=True, text=True, env=ENV, timeout=60)
    assert out.returncode == 2 and out.stderr == f"--keep {tmp_path}: not an empty folder; name a new or empty one\n"
    assert [f.name for f in tmp_path.iterdir()] == ["machine-0-small.toml"]
    assert (tmp_path / "machine-0-small.toml").read_text() == "kept"


def test_device_sweep_prints_scaling_and_draws_it(tmp_path):
    png = tmp_path / "sweep.png"
    out = cli(["plan", "--transformer", "layers=24,hidden=2048,heads=16,vocab=50257,seq=2048", "--global-batch",
               "512", "--device", "a100,h100", "--sweep-devices", "8,64", "--tokens", "1e9", "--price",
               "a100=1.8,h100=3.5", "--out", str(png), "--json"], cwd=tmp_path, timeout=180)
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    assert {(r["device"], r["devices"]) for r in rows} == {("a100", 8), ("a100", 64), ("h100", 8), ("h100", 64)}
    h100, a100 = ({r["devices"]: r for r in rows if r["device"] == d} for d in ("h100", "a100"))
    assert h100[8]["tokens_per_s"] > a100[8]["tokens_per_s"] and h100[8]["scaling_efficiency"] == 1.0
    assert a100[64]["cost"] == pytest.approx(a100[64]["hours"] * 64 * 1.8)
    assert png.stat().st_size > 10_000


def test_device_presets_name_their_sources():
    """Every preset constant has its source beside it: the module says where each came from."""
    import inspect

    from paratrain.planner import hardware

    text = inspect.getsource(hardware)
    for needle in ("MAMF", "BabelStream", "nccl-tests", "datasheet", "tuning.cc", "Wave Quantization"):
        assert needle in text
    assert isinstance(preset("h200", 8).device, Device) and preset("h200", 8).device.memory_bytes == 141e9


def test_a_straggler_slows_every_synchronous_plan_but_not_asp_workers():
    model, cluster = transformer(4, 256, 4, 100, 64), preset("h100", 4)
    ddp, slow = estimate(Plan(dp=4), model, cluster, 16), estimate(Plan(dp=4), model, cluster, 16, slowdown=3)
    assert slow.compute_s == pytest.approx(3 * ddp.compute_s)
    asp = Plan(dp=3, family="parameter_server", servers=1, mode="asp")
    healthy, straggling = estimate(asp, model, cluster, 15), estimate(asp, model, cluster, 15, slowdown=3)
    assert straggling.step_s == healthy.step_s  # the fast workers keep their pace
    assert straggling.samples_per_s == pytest.approx(healthy.samples_per_s * (2 + 1 / 3) / 3)
    assert straggling.staleness == 6 and healthy.staleness == 2
    local = estimate(Plan(dp=4, family="diloco", sync_every=16), model, cluster, 16)
    assert local.bytes_per_step == pytest.approx(ddp.bytes_per_step / 16) and local.staleness == 15


def test_a_calibrated_cpu_times_arithmetic_kinds_per_element_and_the_update_per_tensor():
    """GeLU, layer norm, softmax and attention's scores are charged at their calibrated seconds per
    element in place of their bytes, forward and backward; the update costs a fixed amount per
    parameter tensor (DTensor's under FSDP2, a shard of the tensors under ZeroRedundancyOptimizer)."""
    from dataclasses import replace

    from torch._subclasses.fake_tensor import FakeTensorMode

    fake = FakeTensorMode()
    with fake:
        model = GPT(65, n_layer=2, n_head=4, d_model=64, block_size=32)
    x = torch.zeros(1, 32, dtype=torch.long)
    profile = profile_module(model, x, cross_entropy, torch.zeros(1, 32, dtype=torch.long), fake=fake)
    elements = {}
    for b in profile.blocks:
        for kind, e, _ in b.kinds:
            elements[kind] = elements.get(kind, 0) + e
    assert set(elements) == {"gelu", "layer_norm", "attention"}
    assert elements["gelu"] == 2 * 32 * 4 * 64  # per sample: 2 layers, 32 tokens, 4 x 64 wide
    assert elements["attention"] == 2 * 4 * 32 * 32  # 2 layers, 4 heads, 32 x 32 scores
    assert profile.params == sum(p.numel() for p in model.parameters())
    assert profile.first.tensors + profile.last.tensors + sum(b.tensors for b in profile.blocks) == len(
        list(model.parameters()))
    base = Device("cpu", {"fp32": 1e15}, {"fp32": 1e15}, 1e12, 1e18)  # products and bytes near free
    timed = replace(base, kind_s={k: (1e-6, 2e-6) for k in ("gelu", "layer_norm", "attention", "softmax")},
                    update_s=(1e-3, 0.0), dtensor_update_s=(5e-3, 0.0))
    net = Link(0.0, 1e18)
    kinds = sum(e for b in (profile.first, *profile.blocks, profile.last) for _, e, _ in b.kinds)
    plain = estimate(Plan(), profile, Cluster(base, 1, 1, net, net), 4)
    charged = estimate(Plan(), profile, Cluster(timed, 1, 1, net, net), 4)
    assert charged.compute_s - plain.compute_s == pytest.approx(4 * kinds * 3e-6, rel=1e-3)
    tensors = len(list(model.parameters()))
    for zero, per_tensor in ((0, 1e-3), (1, 1e-3 / 2), (2, 5e-3), (3, 5e-3)):
        est = estimate(Plan(dp=2, zero=zero), profile, Cluster(timed, 2, 2, net, net), 4)
        assert est.optimizer_s == pytest.approx(tensors * per_tensor)
    # hybrid's dp axis is FSDP2 even where it replicates: DTensor's cost per tensor, on a stage's tensors
    from paratrain.planner.cost import _Layout

    hybrid = Plan(dp=2, pp=2, microbatches=2, schedule="1f1b")
    on_stage = _Layout.of(hybrid, profile, Cluster(timed, 4, 4, net, net), 4).local_tensors
    assert 0 < on_stage < tensors
    assert estimate(hybrid, profile, Cluster(timed, 4, 4, net, net), 4).optimizer_s == pytest.approx(on_stage * 5e-3)


def test_a_calibrated_cpu_scales_compute_by_a_whole_step_and_charges_what_each_framework_costs():
    """Compute is scaled by what a whole model's forward and backward measured over its calibrated
    parts; ZeroRedundancyOptimizer's step costs its calibrated seconds per tensor and per byte
    beyond AdamW's; FSDP2 its calibrated fixed cost per block and at the ends, in place of its
    collectives' start-up, and under hybrid (FSDP2 replicating over dp) in each micro-batch."""
    profile = transformer(4, 64, 4, 128, 32)
    base = Device("cpu", {"fp32": 1e11}, {"fp32": 1e11}, 1e12, 1e10, op_s=5e-6, op_backward_s=5e-6)
    net = Link(0.0, 1e18)
    plain = estimate(Plan(), profile, Cluster(base, 1, 1, net, net), 8)
    scaled = estimate(Plan(), profile, Cluster(replace(base, compute_factor=1.25), 1, 1, net, net), 8)
    assert scaled.compute_s == pytest.approx(1.25 * plain.compute_s, rel=1e-9)
    assert scaled.optimizer_s == plain.optimizer_s  # the update is calibrated whole
    # by the factor at a forward's size: 8 samples of 32 tokens take the curve's 256-token point
    curve = replace(base, compute_factor=1.25, compute_curve=((256, 1.5), (512, 1.0)))
    small = estimate(Plan(), profile, Cluster(curve, 1, 1, net, net), 8)
    assert small.compute_s == pytest.approx(1.5 * plain.compute_s, rel=1e-9)
    large = estimate(Plan(), profile, Cluster(curve, 1, 1, net, net), 16)
    assert large.compute_s == pytest.approx(estimate(Plan(), profile, Cluster(base, 1, 1, net, net), 16).compute_s)

    tensors = profile.first.tensors + profile.last.tensors + sum(b.tensors for b in profile.blocks)
    zero1 = Plan(dp=2, zero=1)
    broadcasts = estimate(zero1, profile, Cluster(replace(base, zero1_sync_s=(1e-3, 2e-9)), 2, 2, net, net), 8)
    free = estimate(zero1, profile, Cluster(replace(base, zero1_sync_s=(0.0, 0.0)), 2, 2, net, net), 8)
    assert broadcasts.comm_s - free.comm_s == pytest.approx(tensors * 1e-3 + profile.params * 4 * 2e-9, rel=1e-6)

    slow_start = Link(1e-3, 1e18)  # a start-up only: where FSDP2's fixed costs were calibrated it is theirs
    for zero, gathers in ((2, 1), (3, 2)):
        plan = Plan(dp=2, zero=zero)
        collectives = estimate(plan, profile, Cluster(base, 2, 2, slow_start, slow_start, overlap=0.0), 8)
        fixed = replace(base, fsdp_fixed_s={f"zero{zero}": (3e-3, 4e-3)})
        calibrated = estimate(plan, profile, Cluster(fixed, 2, 2, slow_start, slow_start, overlap=0.0), 8)
        units = 4 + 1  # a unit per block and the root
        assert calibrated.comm_s - collectives.comm_s == pytest.approx(3e-3 + 4 * 4e-3 - units * (1 + gathers) * 1e-3)

    # whole steps' factor on FSDP2's bytes (its collectives beyond their start-up, the copies around
    # them): the fixed costs stay as calibrated, and a link other than the one it was measured on
    # takes the link's own figures
    bytes_only = Link(0.0, 1e9, "loopback")
    for zero in (2, 3):
        plan = Plan(dp=2, zero=zero)
        fixed = replace(base, fsdp_fixed_s={f"zero{zero}": (3e-3, 4e-3)})
        at = {k: estimate(plan, profile, Cluster(replace(fixed, fsdp_factor={f"zero{zero}": k}), 2, 2, bytes_only,
                                                 bytes_only, overlap=0.0), 8).comm_s for k in (0.0, 1.0, 1.5)}
        assert at[0.0] == pytest.approx(3e-3 + 4 * 4e-3)
        assert at[1.5] - at[0.0] == pytest.approx(1.5 * (at[1.0] - at[0.0])) and at[1.0] > at[0.0]
        elsewhere = replace(bytes_only, name="testbed-100mbit")
        assert estimate(plan, profile, Cluster(replace(fixed, fsdp_factor={f"zero{zero}": 1.5}), 2, 2, elsewhere,
                                               elsewhere, overlap=0.0), 8).comm_s == pytest.approx(at[1.0])

    # hybrid's replicated dp axis: FSDP2's hooks in every micro-batch's actions, the first one's surplus once
    hybrid = Plan(dp=2, pp=2, microbatches=4, schedule="1f1b")
    hooks = replace(base, fsdp_fixed_s={"replicate": (5e-3, 3e-3, 1e-3, 0.5e-3)})
    without = estimate(hybrid, profile, Cluster(base, 4, 4, net, net, overlap=0.0), 8)
    with_hooks = estimate(hybrid, profile, Cluster(hooks, 4, 4, net, net, overlap=0.0), 8)
    # 2 blocks a stage (the simulation rounds its durations: rel)
    assert with_hooks.compute_s - without.compute_s == pytest.approx(4 * (1e-3 + 2 * 0.5e-3), rel=1e-4)
    assert with_hooks.comm_s - without.comm_s == pytest.approx((5e-3 - 1e-3) + 2 * (3e-3 - 0.5e-3))


def test_fsdps_calibrated_fixed_costs_are_its_surplus_over_the_same_gpt_unsharded(monkeypatch):
    """cost.py charges the model's own operators (op_s) wherever FSDP2 runs, so what
    `fsdp_seconds` stores is FSDP2's surplus: each timing less the unsharded GPT's, timed alike
    (here with stand-in timings: 1 ms + 0.5 ms a block unsharded; FSDP2 adds 2 ms + 3 ms a block,
    and replicating, 1 ms + 0.25 ms a block for each further micro-batch)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from paratrain.planner import framework

    def stand_in(fn, repeats=None, before=None):
        calls = []
        forward = GPT.forward
        monkeypatch.setattr(GPT, "forward", lambda self, x: calls.append(self) or forward(self, x))
        fn()
        monkeypatch.setattr(GPT, "forward", forward)
        seconds = 0.0
        for i, model in enumerate(calls):
            n = len(model.layers)
            seconds += 1e-3 + 0.5e-3 * n
            if type(model).__name__.startswith("FSDP"):  # fully_shard swaps in a subclass
                seconds += (2e-3 + 3e-3 * n) if i == 0 else (1e-3 + 0.25e-3 * n)
        return seconds

    monkeypatch.setattr("paratrain.planner.calibrate._median", stand_in)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        got = framework.fsdp_seconds(init_device_mesh("cpu", (1,)), "cpu")
    finally:
        dist.destroy_process_group()
    assert got["zero2"] == pytest.approx([2e-3, 3e-3]) and got["zero3"] == pytest.approx([2e-3, 3e-3])
    assert got["replicate"] == pytest.approx([2e-3, 3e-3, 1e-3, 0.25e-3])


def test_calibrate_recovers_fsdps_factor_on_its_bytes_from_whole_sharded_steps(tmp_path):
    """`fsdp_factors` finds, per ZeRO stage, the factor at which the planner's sharded step exceeds
    its plain one by what whole steps measured: from steps the planner itself predicts at a known
    factor, that factor; none below 0 where the fixed costs alone explain the steps."""
    from paratrain.config import load_config
    from paratrain.planner.commands import profile_config
    from paratrain.planner.wholestep import STEP_BATCH, STEP_MODELS, fsdp_factors

    path = tmp_path / "c.toml"
    path.write_text(CALIBRATION)
    cal = replace(Calibration.load(path), fsdp_factor={})
    profiles = [profile_config(load_config(None, list(sets))) for sets in STEP_MODELS]
    truth = {"zero2": 1.7, "zero3": 0.6}
    steps = {"plain": [0.1, 0.3]}
    for name, k in truth.items():
        cluster = replace(cal, fsdp_factor={name: k}).cluster(2)
        steps[name] = [p + estimate(Plan(dp=2, zero=int(name[-1])), profile, cluster, 2 * STEP_BATCH).comm_s
                       for p, profile in zip(steps["plain"], profiles)]
    got = fsdp_factors(steps, cal)
    assert got == pytest.approx(truth, rel=1e-6)
    assert fsdp_factors({**steps, "zero2": steps["plain"]}, cal)["zero2"] == 0.0


def test_calibrates_compute_factor_is_a_whole_step_over_the_planners_sum_of_its_parts(tmp_path):
    from paratrain.planner.wholestep import compute_factor

    path = tmp_path / "c.toml"
    path.write_text(CALIBRATION)
    cal = Calibration.load(path)
    one = compute_factor([1.0], cal)  # measured: 1 s on the first model
    assert compute_factor([2.0], cal) == pytest.approx(2 * one) and 1 / one > 0  # 1 / one: the predicted seconds
    # whatever factor the calibration already holds, the parts are added up without it
    assert compute_factor([1.0], replace(cal, compute_factor=3.0)) == pytest.approx(one)
    # both models: their seconds over both predictions (the second, twice the width, predicted longer)
    both = compute_factor([1.0, 1.0], cal)
    assert 0 < both < one and compute_factor([2.0, 2.0], cal) == pytest.approx(2 * both)
    # and at half the batch (a micro-batch's size): the same seconds for half the work, a larger factor,
    # whatever curve the calibration already holds
    from paratrain.planner.wholestep import SMALL_BATCH, STEP_BATCH, compute_curve

    for held in (cal, replace(cal, compute_curve=[[256, 5.0], [512, 0.1]])):
        curve = compute_curve({"plain": [1.0, 1.0], "small": [1.0, 1.0]}, held)
        assert [t for t, _ in curve] == [SMALL_BATCH * 64, STEP_BATCH * 64] and curve[1][1] == pytest.approx(both)
        assert curve[0][1] == pytest.approx(compute_factor([1.0, 1.0], cal, SMALL_BATCH)) and curve[0][1] > both


def test_ddps_cost_is_solved_from_its_two_models_surplus():
    from paratrain.planner.wholestep import ddp_cost

    steps = {"gradient_bytes": [4e6, 16e6], "plain": [0.02, 0.07], "ddp": [0.02 + 1e-3 + 4e6 * 2e-9,
                                                                         0.07 + 1e-3 + 16e6 * 2e-9]}
    assert ddp_cost(steps) == pytest.approx([1e-3, 2e-9])


def test_ddps_calibrated_all_reduce_replaces_the_links_for_ddp_and_zero1_alone():
    """Where DDP's all-reduce in backward was calibrated (per step and per gradient byte), ddp and
    ZeRO-1 (DDP under ZeroRedundancyOptimizer) pay exactly that in place of the link's all-reduce;
    a codec's hook, FSDP2 and local SGD keep their own costs."""
    profile = transformer(4, 64, 4, 128, 32)
    base = Device("cpu", {"fp32": 1e11}, {"fp32": 1e11}, 1e12, 1e10)
    link = Link(1e-3, 1e9, "loopback")  # the link DDP's cost was measured on
    calibrated = replace(base, ddp_s=(5e-3, 3e-9))
    testbed = Link(1e-3, 1e7, "testbed-100mbit")  # another: its own all-reduce
    assert (estimate(Plan(dp=2), profile, Cluster(calibrated, 2, 2, testbed, testbed, overlap=0.0), 8).step_s
            == estimate(Plan(dp=2), profile, Cluster(base, 2, 2, testbed, testbed, overlap=0.0), 8).step_s)
    for plan in (Plan(dp=2), Plan(dp=2, zero=1), Plan(dp=2, microbatches=2)):
        link_only = estimate(plan, profile, Cluster(base, 2, 2, link, link, overlap=0.0), 8)
        charged = estimate(plan, profile, Cluster(calibrated, 2, 2, link, link, overlap=0.0), 8)
        assert charged.comm_s - link_only.comm_s == pytest.approx(
            5e-3 + profile.params * 4 * 3e-9 - cc.all_reduce(profile.params * 4, 2, link), rel=1e-6)
        assert charged.compute_s == link_only.compute_s
    for plan in (Plan(dp=2, zero=2), Plan(dp=2, family="local_sgd", sync_every=4)):
        assert (estimate(plan, profile, Cluster(calibrated, 2, 2, link, link, overlap=0.0), 8).step_s
                == estimate(plan, profile, Cluster(base, 2, 2, link, link, overlap=0.0), 8).step_s)
    # a codec's hook replaces the all-reduce, not DDP's reducer: its cost a step, less the start-up
    powersgd = Plan(dp=2, codec="powersgd")
    assert (estimate(powersgd, profile, Cluster(calibrated, 2, 2, link, link, overlap=0.0), 8).comm_s
            - estimate(powersgd, profile, Cluster(base, 2, 2, link, link, overlap=0.0), 8).comm_s
            == pytest.approx(5e-3 - 2 * 1e-3))


def test_local_sgd_and_parameter_server_pay_their_protocols_copies_at_memory_bandwidth():
    """A local SGD / DiLoCo sync reads and writes the parameters' bytes SYNC_PASSES times around
    its all-reduce, once every H steps; a parameter server's worker flattens its gradient and
    copies the pulled parameters in (2 passes each), and a BSP server copies, adds, averages
    and flattens (2 + 3 per further worker + 2 + 2 passes of its shard)."""
    from paratrain.planner.cost import SYNC_PASSES

    profile = transformer(4, 64, 4, 128, 32)
    nbytes = profile.params * 4
    link = Link(1e-4, 1e9)

    def comm(plan, memory_Bps):
        dev = Device("cpu", {"fp32": 1e11}, {"fp32": 1e11}, 1e12, memory_Bps)
        return estimate(plan, profile, Cluster(dev, plan.devices, plan.devices, link, link), 8).comm_s

    for family, h in (("local_sgd", 4), ("diloco", 2)):
        plan = Plan(dp=2, family=family, sync_every=h)
        assert comm(plan, 1e9) - comm(plan, 1e18) == pytest.approx(SYNC_PASSES[family] * nbytes / 1e9 / h, rel=1e-6)
    bsp = Plan(dp=3, family="parameter_server", servers=1, mode="bsp")
    assert comm(bsp, 1e9) - comm(bsp, 1e18) == pytest.approx((4 * nbytes + (2 + 3 * 2 + 2 + 2) * nbytes) / 1e9,
                                                            rel=1e-6)
    two = Plan(dp=2, family="parameter_server", servers=2, mode="asp")
    assert comm(two, 1e9) - comm(two, 1e18) == pytest.approx((4 * nbytes + 2 * nbytes / 2) / 1e9, rel=1e-6)


def test_the_trainers_small_all_reduces_are_charged_to_the_plans_that_make_them():
    """Where the update was calibrated (paratrain's trainer), a plan whose ranks step together pays
    an all-reduce of a few floats over the world for the non-finite check and one for whether to
    stop, one over dp for the loss's mean where dp > 1 and one over pp for a pipeline's loss;
    local SGD and the parameter server, whose replicas decide alone, pay none."""
    profile = transformer(4, 64, 4, 128, 32)
    dev = Device("cpu", {"fp32": 1e11}, {"fp32": 1e11}, 1e12, 1e10, update_s=(1e-3, 0.0))

    def small(plan, start=1e-3):  # a link of a start-up only: an all-reduce on n ranks costs 2 (n - 1) ms
        def update(link):
            return estimate(plan, profile, Cluster(dev, plan.devices, plan.devices, link, link), 8).optimizer_s
        return update(Link(start, 1e18)) - update(Link(0.0, 1e18))

    ms = 1e-3
    assert small(Plan(dp=2)) == pytest.approx(3 * 2 * ms)  # world twice, dp once (n = 2: 2 ms each)
    assert small(Plan(tp=2)) == pytest.approx(2 * 2 * ms)
    assert small(Plan(pp=2, microbatches=4, schedule="1f1b")) == pytest.approx(3 * 2 * ms, rel=1e-3)
    assert small(Plan(dp=2, pp=2, microbatches=4, schedule="1f1b")) == pytest.approx((2 * 6 + 2 + 2) * ms, rel=1e-3)
    assert small(Plan(dp=2, family="local_sgd", sync_every=4)) == 0.0
    # not where the update was not calibrated (a preset: the trainer's costs are not its)
    uncalibrated = replace(dev, update_s=(0.0, 0.0))
    assert estimate(Plan(dp=2), profile, Cluster(uncalibrated, 2, 2, Link(1e-3, 1e18), Link(1e-3, 1e18)),
                    8).optimizer_s == estimate(Plan(dp=2), profile, Cluster(uncalibrated, 2, 2, Link(0.0, 1e18),
                                                                            Link(0.0, 1e18)), 8).optimizer_s


def test_tp_factor_scales_what_tensor_parallelism_pays_beyond_its_fixed_costs(tmp_path):
    """A tensor-parallel plan's arithmetic, bytes and all-reduces' bytes scale by the calibrated
    `tp_factor`, its fixed costs and its update do not, nor does a plan without tensor
    parallelism; calibrate's `tp_factor` is the measured step beyond the fixed costs over the
    planner's rest, whatever factor the calibration held."""
    from paratrain.planner.wholestep import tp_factor

    profile = transformer(4, 64, 4, 128, 32)
    base = Device("cpu", {"fp32": 1e11}, {"fp32": 1e11}, 1e12, 1e10, tp_fixed_s=(3e-3, 5e-3, 1e-3, 2e-3))
    link = Link(1e-4, 1e8)

    def fwd_bwd(factor, plan=Plan(tp=2)):
        est = estimate(plan, profile, Cluster(replace(base, tp_factor=factor), 2, 2, link, link), 8)
        return est.step_s - est.optimizer_s, est.optimizer_s

    (none, update0), (one, update1), (two, update2) = fwd_bwd(0.0), fwd_bwd(1.0), fwd_bwd(2.0)
    assert none == pytest.approx(4 * (1e-3 + 2e-3) + 3e-3 + 5e-3)  # the fixed costs alone
    assert two - none == pytest.approx(2 * (one - none)) and update0 == update1 == update2
    assert fwd_bwd(1.0, Plan(dp=2)) == fwd_bwd(2.0, Plan(dp=2))

    from paratrain.config import load_config
    from paratrain.planner.commands import plan_of, profile_config
    from paratrain.planner.wholestep import STEP_BATCH, STEP_SETS

    path = tmp_path / "c.toml"
    path.write_text(CALIBRATION)
    cal = Calibration.load(path)
    cfg = load_config(None, [*STEP_SETS, "strategy.name=tensor", f"training.global_batch_size={2 * STEP_BATCH}"])
    for held in (1.0, 3.0):
        factor = tp_factor(0.5, replace(cal, tp_factor=held))  # measured: 0.5 s
        assert factor > 0 and factor == pytest.approx(tp_factor(0.5, cal))
        est = estimate(plan_of(cfg, 2), profile_config(cfg), replace(cal, tp_factor=factor).cluster(2), 2 * STEP_BATCH)
        assert est.step_s - est.optimizer_s == pytest.approx(0.5)  # the factor reproduces the measured step


def test_pp_factor_and_the_cost_per_send_scale_a_pipeline_and_are_recovered_from_measured_steps(tmp_path):
    """A pipeline stage's forward and backward scale by the calibrated `pp_factor` (its sends and
    update do not, nor does a plan without a pipeline); each message between stages pays its
    schedule's calibrated cost per send (1F1B's where its own was not measured), more micro-batches
    more of them; calibrate's `pipeline_costs` recovers the factor and both schedules' costs from
    steps the planner itself predicts with them, whatever the calibration held before."""
    from paratrain.planner.wholestep import PIPELINE_RUNS, _predicted, pipeline_costs, pipeline_sets, stage_compute

    profile = transformer(4, 64, 4, 128, 32)
    base = Device("cpu", {"fp32": 1e11}, {"fp32": 1e11}, 1e12, 1e10, op_s=5e-6, op_backward_s=5e-6)
    link = Link(1e-4, 1e9)
    pipe = Plan(pp=2, microbatches=4, schedule="1f1b")

    def run(plan, factor, send=None):
        dev = replace(base, pp_factor=factor, pipeline_send_s=send or {})
        return estimate(plan, profile, Cluster(dev, 2, 2, link, link), 8)

    one, two = run(pipe, 1.0), run(pipe, 2.0)
    # each rank's busy time: its stages' compute, doubled, and its sends, not (the simulation's rounding aside)
    assert 1.8 * one.compute_s < two.compute_s < 2 * one.compute_s and two.optimizer_s == one.optimizer_s
    assert two.step_s > one.step_s
    assert run(Plan(dp=2), 2.0).step_s == run(Plan(dp=2), 1.0).step_s
    sends = {"1f1b": 2e-3, "gpipe": 5e-3}
    assert run(Plan(dp=2), 1.0, sends).step_s == run(Plan(dp=2), 1.0).step_s
    for schedule, cost in (("1f1b", 2e-3), ("gpipe", 5e-3), ("interleaved_1f1b", 2e-3)):
        v = 2 if schedule == "interleaved_1f1b" else 1
        grown = [run(Plan(pp=2, microbatches=m, schedule=schedule, virtual=v), 1.0, sends).step_s
                 - run(Plan(pp=2, microbatches=m, schedule=schedule, virtual=v), 1.0).step_s for m in (2, 8)]
        assert cost <= grown[0] < grown[1], (schedule, grown)  # at least one send on the critical path

    path = tmp_path / "c.toml"
    path.write_text(CALIBRATION)
    cal = Calibration.load(path)

    def measured(truth) -> dict:  # the steps, and the busier rank's time in its actions (no sends)
        steps = {f"{s} m{m}": _predicted(truth, pipeline_sets(s, m)) for s, m in PIPELINE_RUNS}
        return steps | {f"{s} m{m} busy": truth.pp_factor * stage_compute(truth, pipeline_sets(s, m))
                        for s, m in PIPELINE_RUNS}

    truth = measured(replace(cal, pp_factor=1.4, pipeline_send={"1f1b": 1.5e-3, "gpipe": 3e-3}))
    for held in (replace(cal, pp_factor=1.0), replace(cal, pp_factor=3.0, pipeline_send={"1f1b": 9e-3})):
        factor, send = pipeline_costs(truth, held)
        assert factor == pytest.approx(1.4, rel=1e-3)
        assert send["1f1b"] == pytest.approx(1.5e-3, rel=1e-2) and send["gpipe"] == pytest.approx(3e-3, rel=1e-2)
    # steps that the link alone explains: no cost per send
    factor, send = pipeline_costs(measured(replace(cal, pp_factor=1.4, pipeline_send={})), cal)
    assert factor == pytest.approx(1.4, rel=1e-3) and send["1f1b"] < 1e-5 and send["gpipe"] < 1e-5
    # slower actions make a larger factor, not costlier sends
    slower = measured(replace(cal, pp_factor=2.0, pipeline_send={}))
    assert pipeline_costs(slower, cal)[0] == pytest.approx(2.0, rel=1e-3)


def test_a_calibrated_tensor_parallel_gpt_pays_its_fixed_costs_per_block_and_at_its_ends():
    """Where the built-in GPT's tensor-parallel fixed costs were calibrated (DTensor's dispatch and
    the small all-reduces' latency inside), a tp plan's forward and backward pay them per block and
    once for the ends, in place of a DTensor cost per operator; its all-reduces add only their
    bytes (and ring steps past two ranks) on top, the embedding's sum and the head's gradient included."""
    from dataclasses import replace

    profile = transformer(4, 64, 4, 128, 32)
    base = Device("cpu", {"fp32": 1e15}, {"fp32": 1e15}, 1e12, 1e18)
    fixed = replace(base, tp_fixed_s=(3e-3, 5e-3, 1e-3, 2e-3))
    link = Link(1e-3, 1e18)  # a latency only: with fixed costs calibrated it is theirs
    plan = Plan(tp=2)
    plain = estimate(plan, profile, Cluster(base, 2, 2, link, link), 8)
    calibrated = estimate(plan, profile, Cluster(fixed, 2, 2, link, link), 8)
    assert plain.comm_s == pytest.approx(2 * 4 * 2 * 2e-3)  # 2 all-reduces per block each way, 2 alphas each
    assert calibrated.comm_s == pytest.approx(0.0, abs=1e-9)
    assert calibrated.compute_s == pytest.approx(plain.compute_s + 4 * (1e-3 + 2e-3) + 3e-3 + 5e-3, rel=1e-6)
    # the bytes of the embedding's all-reduce (and the head's gradient) are charged: one boundary each way
    slow = Link(1e-3, 1e6)
    with_bytes = estimate(plan, profile, Cluster(fixed, 2, 2, slow, slow), 8)
    block = profile.in_dtype(4).blocks[0]  # the plan computes in fp32
    per_block = 2 * cc.all_reduce(block.tp_bytes * 8, 2, slow) - 2 * 2e-3
    ends = cc.all_reduce(block.boundary * 8, 2, slow) - 2e-3
    assert with_bytes.comm_s == pytest.approx(2 * (4 * per_block + ends), rel=1e-6)


@pytest.mark.parametrize("schedule,virtual", [("gpipe", 1), ("1f1b", 1), ("interleaved_1f1b", 2), ("zbv", 2)])
def test_a_pipeline_runtimes_cost_per_action_is_simulated_and_recovered_by_calibration(schedule, virtual):
    """A cost per action lengthens every action (F and B alike: the same as adding it to each
    stage's forward and backward where the backward is not split); calibrate's solver recovers it
    from a step measured with it."""
    from paratrain.planner.framework import PIPELINE_MICROBATCHES, pipeline_action_seconds

    n, a = 2 * virtual, 4e-4
    f, b, send = [1e-3] * n, [2e-3] * n, [1e-4] * n
    with_action = S.simulate(schedule, 2, 8, virtual, f, b, send, action=a)
    assert with_action.makespan > S.simulate(schedule, 2, 8, virtual, f, b, send).makespan
    if schedule in ("gpipe", "1f1b"):
        added = S.simulate(schedule, 2, 8, virtual, [x + a for x in f], [x + a for x in b], send)
        assert with_action.makespan == pytest.approx(added.makespan, rel=1e-4)  # the cache keys round
    tiny = [1e-6] * n
    measured = S.simulate(schedule, 2, PIPELINE_MICROBATCHES, virtual, tiny, tiny, send, action=a).makespan
    assert pipeline_action_seconds({schedule: measured, "p2p": 1e-4})[schedule] == pytest.approx(a, rel=1e-3)


def test_a_parameter_server_workers_gradients_are_measured_while_it_holds_them():
    """A worker has no optimizer (its servers step) and lets its gradients go after pushing them:
    its model states are taken at that moment, gradients included, as other strategies' are at
    their optimizer step; the saved activations are each storage once."""
    from types import SimpleNamespace

    from paratrain.memory import held, measured

    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    worker = SimpleNamespace(optimizer=None, module=model)
    into = {}
    with measured(worker, into):
        model(torch.randn(32, 8)).square().sum().backward()
        model.zero_grad(set_to_none=True)  # as the worker does once it has pushed
    params = sum(p.numel() * 4 for p in model.parameters())
    assert into["states"] == {"params": params, "grads": params}
    # the input (for the first weight's gradient), tanh's output (saved by tanh and by the second
    # linear: one storage, counted once) and the output (for square's backward)
    assert into["activations"] == 4 * (32 * 8 + 32 * 16 + 32 * 4)
    assert held(into) == 2 * params + into["activations"]
    assert "zero_grad" not in vars(model)  # the module is left as it was
