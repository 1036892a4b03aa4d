"""Per-step metrics as JSON lines (one file per rank), live progress, and the closing summary.

Each rank writes `metrics/rank<R>.jsonl`: one record per step (loss, learning rate, throughput,
time split into data / compute / communication / optimizer / waiting, bytes sent) and one per
evaluation. Steps count from 1 everywhere (records, progress lines, checkpoints, messages): step N
is the N-th optimizer step, its record is written once it is done, and an evaluation or checkpoint
"at step N" is of the model after it. With `run.tensorboard`, the same scalars through torch's
SummaryWriter. Rank 0 shows a rich progress bar at a terminal, plain periodic lines otherwise.
"""
from __future__ import annotations

import json
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class StepStats:
    """What a strategy's `train_step` reports for one step on this rank; `MetricsLog` records it."""
    loss: float  # mean over the global batch where the step communicates; else this rank's own (extra["loss_ranks"])
    samples: int  # processed by this rank
    tokens: int
    compute_s: float = 0.0  # forward + backward (with whatever communication it could not hide)
    comm_s: float = 0.0  # time inside collectives; for DDP it overlaps compute
    optim_s: float = 0.0
    wait_s: float = 0.0  # waiting for other ranks (asynchronous strategies)
    bytes_sent: int = 0  # payload this rank put on the wire
    extra: dict = field(default_factory=dict)  # strategy-specific numbers, merged into the step record
    skipped: bool = False  # a straggler dropped this step's computation to keep pace (nothing computed)


# (TensorBoard tag, step record key): what `run.tensorboard` writes per step
TENSORBOARD = (("train/loss", "loss"), ("train/lr", "lr"), ("throughput/samples_per_s", "samples_per_s"),
               ("throughput/tokens_per_s", "tokens_per_s"), ("comm/bytes_sent", "bytes_sent"),
               ("time/step_s", "step_s"), ("time/compute_s", "compute_s"), ("time/comm_s", "comm_s"),
               ("time/wait_s", "wait_s"), ("time/optim_s", "optim_s"), ("time/data_s", "data_s"))


class MetricsLog:
    def __init__(self, run_dir: Path, rank: int, start_step: int = 0, keep_all: bool = False,
                 tensorboard: bool = False):
        self.path = Path(run_dir) / "metrics" / f"rank{rank}.jsonl"
        # torch's own writer; purge_step drops what a previous start logged past the checkpoint resumed
        # (the checkpoint of step N keeps steps 1..N)
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard" / f"rank{rank}"),
                                    purge_step=start_step + 1 if start_step else None)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.step_times: list[float] = []
        self.bytes_sent = 0
        self.uncompressed = 0.0  # what the bytes sent would have been without a codec
        self.samples = self.tokens = 0
        self.last: dict = {}
        self.last_eval: float | None = None
        self.last_metrics: dict = {}  # the last evaluation's metrics by name (evaluation.py)
        self.nonfinite_skipped = 0  # updates skipped under training.on_nonfinite = "skip"
        self.steps_this_start = 0  # the summary counts the whole run; this, the steps since the resume
        resumed = start_step or keep_all
        until = float("inf") if keep_all else start_step
        kept = records_through(self.path, until) if resumed and self.path.exists() else ""
        if resumed:  # resume: the records before the checkpoint stay, and count in the summary
            self.path.write_text(kept)
            for rec in map(json.loads, kept.splitlines()):
                self._count(rec)
        self.file = open(self.path, "a" if resumed else "w", buffering=1)  # a line per step survives a crash

    def log_step(self, step: int, stats: StepStats, lr: float, data_s: float, step_s: float,
                 global_samples: int, tokens_per_sample: int) -> dict:
        """`samples`/`tokens` in `stats` are this rank's; throughput is the whole job's, as this rank
        sees it (a step a straggler dropped trained nothing here: it counts no samples). A NaN loss
        (a dropped step's own) is not the run's final loss; a dropped sync step's mean over the
        ranks that computed it is."""
        if stats.skipped:
            global_samples = 0
        fields = asdict(stats)
        extra = fields.pop("extra")  # flat in the record, beside the common fields
        rec = {"kind": "step", "step": step, "time": time.time(), "lr": lr, "step_s": step_s, "data_s": data_s,
               **fields, **extra, "samples_per_s": global_samples / step_s}
        if tokens_per_sample:
            rec["tokens_per_s"] = global_samples * tokens_per_sample / step_s
        self.file.write(json.dumps(rec) + "\n")
        self._count(rec)
        self.steps_this_start += 1
        if self.tb is not None:
            for tag, key in TENSORBOARD:
                if isinstance(rec.get(key), (int, float)) and not math.isnan(rec[key]):
                    self.tb.add_scalar(tag, rec[key], step)
        return rec

    def _count(self, rec: dict) -> None:
        """Add one record to the run's totals (records written before a resume included)."""
        if rec["kind"] == "eval":
            self.last_eval = rec["eval_loss"]
            self.last_metrics = {k.removeprefix("eval_"): v for k, v in rec.items()
                                 if k.startswith("eval_") and k != "eval_loss"}
            return
        self.nonfinite_skipped += bool(rec.get("nonfinite"))
        step_s, nbytes = rec.get("step_s", 0.0), rec.get("bytes_sent", 0)
        self.step_times.append(step_s)
        self.bytes_sent += nbytes
        self.uncompressed += nbytes * rec.get("compression_ratio", 1.0)
        self.samples += round(rec.get("samples_per_s", 0.0) * step_s)
        self.tokens += round(rec.get("tokens_per_s", 0.0) * step_s)
        if not math.isnan(rec.get("loss", math.nan)):
            self.last = rec

    def log_eval(self, step: int, evals: dict) -> None:
        """`evals`: {"eval_loss": ..., "eval_<metric>": ...} (evaluation.py)."""
        rec = {"kind": "eval", "step": step, **evals}
        self.file.write(json.dumps(rec) + "\n")
        self.file.flush()
        self._count(rec)
        if self.tb is not None:
            for key, value in evals.items():
                self.tb.add_scalar(f"eval/{key.removeprefix('eval_')}", value, step)
            self.tb.flush()

    def summary(self) -> dict:
        t = sorted(self.step_times) or [0.0]
        total = sum(t)
        out = {"steps": len(self.step_times), "steps_this_start": self.steps_this_start,
               "final_loss": self.last.get("loss"), "eval_loss": self.last_eval,
               "eval_metrics": self.last_metrics,
               "nonfinite_skipped": self.nonfinite_skipped,
               "step_s_mean": statistics.fmean(t), "step_s_median": t[(len(t) - 1) // 2],
               # past the first step (start-up): what a step costs on average, synchronisations included
               "step_s_steady": statistics.fmean(self.step_times[1:] or self.step_times or [0.0]),
               "step_s_p90": t[int(0.9 * (len(t) - 1))],
               "samples_per_s": self.samples / total if total else 0.0,
               "bytes_sent_per_step": self.bytes_sent / max(1, len(self.step_times)),
               "compression_ratio": self.uncompressed / self.bytes_sent if self.bytes_sent else None}
        if self.tokens:
            out["tokens_per_s"] = self.tokens / total
        return out

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def records_through(path: Path, step: int) -> str:
    """The whole lines of a metrics file with records of steps 1..`step` (a resume's history)."""
    return "".join(line + "\n" for line in Path(path).read_text().splitlines() if _step_of(line) <= step)


def _step_of(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError):  # a line half-written when the run died
        return float("inf")


class Progress:
    """A rich bar at a terminal, a plain line every `every` steps elsewhere, or nothing."""

    def __init__(self, mode: str, total: int, start: int, every: int, enabled: bool):
        if mode == "auto":
            mode = "bar" if sys.stdout.isatty() else "lines"
        self.mode = mode if enabled else "off"
        self.total, self.every = total, every
        if self.mode == "bar":
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as Bar

            self.bar = Bar(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                           TextColumn("{task.fields[info]}"), TimeRemainingColumn())
            self.task = self.bar.add_task("train", total=total, completed=start, info="")
            self.bar.start()

    def update(self, rec: dict, evals: dict | None) -> None:
        step = rec["step"]
        tokens = "tokens_per_s" in rec
        rate = f"{rec['tokens_per_s']:,.0f} tok/s" if tokens else f"{rec['samples_per_s']:,.0f} samples/s"
        said = "".join(f"  {k.removeprefix('eval_')} {v:.4g}" for k, v in (evals or {}).items() if k != "eval_loss")
        info = f"loss {rec['loss']:.4f}" + (f"  eval {evals['eval_loss']:.4f}{said}" if evals else "") \
            + f"  {rate}  {1000 * rec['step_s']:.0f} ms/step"
        if self.mode == "bar":
            self.bar.update(self.task, completed=step, info=info)
        elif self.mode == "lines" and (step % self.every == 0 or step == self.total or evals is not None):
            print(f"step {step}/{self.total}  {info}", flush=True)

    def close(self) -> None:
        if self.mode == "bar":
            self.bar.stop()


def predicted(cfg, processes: int, summary: dict) -> dict:
    """The planner's step time and memory for this run beside the measured ones, with the relative
    errors, and the model FLOP utilisation (achieved model FLOP/s over the calibrated peak, as
    torchtitan and Megatron report MFU). Empty without a calibration (`paratrain calibrate`)."""
    from paratrain.planner.commands import predict

    try:
        p = predict(cfg, processes)
    except Exception as e:  # noqa: BLE001 - a prediction must not fail a run that has trained
        print(f"paratrain: planner: no prediction for this run ({type(e).__name__}: {e})", file=sys.stderr)
        return {}
    if p is None:
        return {}
    step, memory = summary["step_s_steady"], max((m for m in summary["memory_bytes_per_rank"] if m), default=None)
    return {"predicted_step_s": p["step_s"], "step_error": p["step_s"] / step - 1 if step else None,
           "predicted_memory_bytes": p["memory_bytes"], "measured_memory_bytes": memory,
           "memory_error": p["memory_bytes"] / memory - 1 if memory else None,
           "mfu": p["model_flops"] / step / p["peak_flops"] if step else None, "predicted_plan": p["plan"]}


def print_summary(summary: dict, bytes_per_rank: list[float], run_dir: Path, title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(justify="right")
    rows = [("steps", f"{summary['steps']}"),
            ("final train loss", f"{summary['final_loss']:.4f}" if summary["final_loss"] is not None else "-"),
            ("final eval loss", f"{summary['eval_loss']:.4f}" if summary["eval_loss"] is not None else "-"),
            *((f"final eval {name}", f"{value:.4g}") for name, value in (summary.get("eval_metrics") or {}).items()),
            ("step time mean / p90", f"{1000 * summary['step_s_mean']:.1f} / {1000 * summary['step_s_p90']:.1f} ms")]
    if "tokens_per_s" in summary:
        rows.append(("throughput (all ranks)", f"{summary['tokens_per_s']:,.0f} tokens/s"))
    rows.append(("throughput (all ranks)" if "tokens_per_s" not in summary else "",
                 f"{summary['samples_per_s']:,.1f} samples/s"))
    rows.append(("bytes sent / step, per rank", ", ".join(_human_bytes(b) for b in bytes_per_rank)))
    if summary.get("compression_ratio") not in (None, 1.0):
        rows.append(("compression (rank 0)", f"{summary['compression_ratio']:.1f}x fewer bytes than uncompressed"))
    if "predicted_step_s" in summary:
        rows.append(("step time: planner / measured mean",
                     f"{1000 * summary['predicted_step_s']:.1f} / {1000 * summary['step_s_steady']:.1f} ms "
                     f"({summary['step_error']:+.0%})"))
        if summary.get("measured_memory_bytes"):
            rows.append(("memory per rank: planner / measured", f"{_human_bytes(summary['predicted_memory_bytes'])} / "
                         f"{_human_bytes(summary['measured_memory_bytes'])} ({summary['memory_error']:+.0%})"))
        rows.append(("model FLOP utilisation (MFU)", f"{summary['mfu']:.1%} of the calibrated peak"))
    if summary.get("nonfinite_skipped"):
        rows.append(("non-finite steps skipped", f"{summary['nonfinite_skipped']}"))
    rows.append(("run directory", str(run_dir)))
    for k, v in rows:
        table.add_row(k, v)
    Console().print(table)


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
