"""`paratrain plan --sweep-devices`: "how many devices, of which kind".

For each device kind and count, the planner's best plan (search.py): time per step, throughput,
scaling efficiency against the smallest count, MFU, and for a token budget the hours and the cost
at a price per device-hour; printed as a table or JSON, and drawn as a PNG with matplotlib.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from paratrain.config import ConfigError
from paratrain.planner.commands import cluster_for, duration
from paratrain.planner.hardware import DEVICES
from paratrain.planner.model import ModelProfile
from paratrain.planner.search import search


def sweep_command(args, profile: ModelProfile, batch: int, devices: list[str]) -> int:
    """Time per step, throughput, scaling efficiency and cost for each device count and kind."""
    counts = _counts(args.sweep_devices)
    prices = _prices(args.price or "")
    rows = []
    for kind in devices:
        if kind == "local":
            raise ConfigError("--sweep-devices: sweeps compare presets (" + ", ".join(sorted(DEVICES))
                              + "), not 'local'")
        base = None
        for n in counts:
            cluster = cluster_for(kind, n, args.per_node, prices.get(kind, 0.0))
            found = search(profile, cluster, batch, args.dtype or "bf16", runnable=args.runnable, asynchronous=False)
            best = found.best
            if best is None:
                rows.append({"device": kind, "devices": n, "fits": False})
                continue
            per_device = best.samples_per_s / n
            base = base or (n, per_device)
            tokens_per_s = best.samples_per_s * max(1, profile.seq)
            hours = args.tokens / tokens_per_s / 3600 if args.tokens else None
            rows.append({"device": kind, "devices": n, "fits": True, "plan": best.plan.describe(),
                         "step_s": best.step_s, "samples_per_s": best.samples_per_s, "tokens_per_s": tokens_per_s,
                         "scaling_efficiency": per_device / base[1], "mfu": best.mfu, "hours": hours,
                         "cost": hours * n * prices[kind] if hours is not None and kind in prices else None})
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        _print_sweep(profile, batch, rows, args.tokens)
    if args.out:
        plot_sweep(rows, Path(args.out), f"{profile.name}, global batch {batch}")
        print(f"plot: {args.out}", file=sys.stderr)
    return 0


def _counts(text: str) -> list[int]:
    try:
        counts = [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        raise ConfigError(f"--sweep-devices {text!r}: must be device counts separated by commas, "
                          "e.g. 8,64,512") from None
    if not counts or any(c < 1 for c in counts):
        raise ConfigError(f"--sweep-devices {text!r}: every count must be an integer >= 1")
    return sorted(set(counts))


def _prices(text: str) -> dict:
    prices = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        kind, sep, value = part.partition("=")
        try:
            prices[kind] = float(value)
        except ValueError:
            raise ConfigError(f"--price {text!r}: must be device=price per device-hour, e.g. h100=3.5") from None
        if not sep or prices[kind] < 0:
            raise ConfigError(f"--price {text!r}: must be device=price per device-hour, e.g. h100=3.5")
    return prices


def _print_sweep(profile: ModelProfile, batch: int, rows: list[dict], tokens: float) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{profile.name}, global batch {batch}" + (f", {tokens:.3g} tokens" if tokens else ""))
    for col in ("device", "devices", "best plan", "step", "tokens/s", "scaling eff.", "MFU", "hours", "cost"):
        table.add_column(col, justify="left" if col in ("device", "best plan") else "right")
    for r in rows:
        if not r["fits"]:
            table.add_row(r["device"], str(r["devices"]), "nothing fits", *["-"] * 6)
            continue
        table.add_row(r["device"], str(r["devices"]), r["plan"], duration(r["step_s"]), f"{r['tokens_per_s']:,.0f}",
                      f"{r['scaling_efficiency']:.0%}", f"{r['mfu']:.1%}",
                      "-" if r["hours"] is None else f"{r['hours']:,.1f}",
                      "-" if r["cost"] is None else f"${r['cost']:,.0f}")
    Console(width=160).print(table)


def plot_sweep(rows: list[dict], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    costs = any(r.get("cost") is not None for r in rows)
    hours = any(r.get("hours") is not None for r in rows)
    fig, axes = plt.subplots(1, 3 if costs or hours else 2, figsize=(16 if costs or hours else 11, 4))
    for kind in dict.fromkeys(r["device"] for r in rows):
        mine = [r for r in rows if r["device"] == kind and r["fits"]]
        if not mine:
            continue
        x = [r["devices"] for r in mine]
        axes[0].plot(x, [r["tokens_per_s"] for r in mine], "o-", label=kind)
        axes[1].plot(x, [r["scaling_efficiency"] for r in mine], "o-", label=kind)
        if costs or hours:
            key = "cost" if costs else "hours"
            axes[2].plot(x, [r[key] for r in mine], "o-", label=kind)
    axes[0].set(xscale="log", yscale="log", xlabel="devices", ylabel="tokens / s (predicted)", title="throughput")
    axes[1].set(xscale="log", xlabel="devices", ylabel="per-device throughput / smallest count's",
                title="scaling efficiency", ylim=(0, 1.1))
    if costs or hours:
        axes[2].set(xscale="log", xlabel="devices", ylabel="$ for the token budget" if costs else "hours",
                    title="cost of the token budget" if costs else "time to the token budget")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
