"""DiLoCo's outer optimizer: which learning rate and momentum are stable on the built-in GPT, the
built-in MLP and a model paratrain never saw (GPT-2's architecture from transformers,
examples/huggingface_gpt2.py), at paratrain's default H.

For each model, one `paratrain compare` matrix: ddp as the reference, then DiLoCo at each outer
learning rate x Nesterov momentum. Printed per model: the final and best eval loss, the final
over ddp's, and "unstable" where the final eval loss is 5% or more above the best one seen (the
loss rose again: what a user saw with the paper's 0.7 / 0.9 on a small model). The defaults in
config.py are the setting that is stable on all three with the lowest worst ratio to ddp.

    python benchmarks/diloco_defaults.py [--steps 160] [--lrs 0.3,0.5,0.7,1.0] [--momenta 0,0.5,0.9]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = {
    "gpt": ["model.name=gpt", "model.n_layer=2", "model.d_model=64", "optimizer.name=adamw", "optimizer.lr=3e-3",
            "training.global_batch_size=32"],
    "mlp": ["model.name=mlp", "data.name=synthetic", "optimizer.name=sgd", "optimizer.lr=0.05",
            "optimizer.momentum=0.9", "training.global_batch_size=32"],
    "hf-gpt2": ["model.name=custom", "model.factory=examples.huggingface_gpt2:build",
                "model.loss=examples.huggingface_gpt2:loss", "data.name=custom",
                "data.factory=examples.huggingface_gpt2:dataset", "optimizer.name=adamw", "optimizer.lr=3e-3",
                "training.global_batch_size=32"],
}


def matrix(model: str, steps: int, lrs: list[float], momenta: list[float]) -> str:
    common = [*MODELS[model], f"training.steps={steps}", f"training.eval_every={steps // 8}", "training.eval_batches=4",
              "checkpoint.enabled=false"]
    lines = [f"nproc = 2\nset = {json.dumps(common)}\n", '[[entry]]\nname = "ddp"\nset = ["strategy.name=ddp"]\n']
    for lr in lrs:
        for mom in momenta:
            sets = ["strategy.name=diloco", f"strategy.local_sgd.outer_lr={lr}",
                    f"strategy.local_sgd.outer_momentum={mom}",
                    f"strategy.local_sgd.outer_nesterov={str(mom > 0).lower()}"]
            lines.append(f'[[entry]]\nname = "lr{lr}-m{mom}"\nset = {json.dumps(sets)}\n')
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=160)
    ap.add_argument("--lrs", default="0.3,0.5,0.7,1.0")
    ap.add_argument("--momenta", default="0,0.5,0.9")
    ap.add_argument("--models", default=",".join(MODELS))
    args = ap.parse_args()
    lrs = [float(x) for x in args.lrs.split(",")]
    momenta = [float(x) for x in args.momenta.split(",")]
    worst: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models.split(","):
            path = Path(tmp) / f"{model}.toml"
            path.write_text(matrix(model, args.steps, lrs, momenta))
            print(f"== {model}: {len(lrs) * len(momenta) + 1} runs", flush=True)
            subprocess.run([sys.executable, "-m", "paratrain", "compare", str(path), "--out", str(Path(tmp) / model),
                            "--json"], cwd=ROOT, stdout=subprocess.DEVNULL, check=False)
            rows = json.loads((Path(tmp) / model / "compare.json").read_text())["entries"]
            ref = next(r for r in rows if r["name"] == "ddp")["final_eval_loss"]
            print(f"{'setting':>12} {'final':>8} {'best':>8} {'/ ddp':>7}")
            for r in rows:
                if r["error"]:
                    print(f"{r['name']:>12} failed: {r['error']}")
                    continue
                final, best = r["final_eval_loss"], r["best_eval_loss"]
                unstable = final >= 1.05 * best
                print(f"{r['name']:>12} {final:8.4f} {best:8.4f} {final / ref:7.3f}{'  unstable' if unstable else ''}",
                      flush=True)
                if r["name"] != "ddp":
                    worst[r["name"]] = max(worst.get(r["name"], 0.0), float("inf") if unstable else final / ref)
    ranked = sorted(worst.items(), key=lambda kv: kv[1])
    print("worst final / ddp over the models (inf: unstable on one):")
    for name, ratio in ranked:
        print(f"  {name:>12} {ratio:.3f}")


if __name__ == "__main__":
    main()
