"""Fine-tuning throughput in one process against two (torchrun, gloo) on this machine.

Runs the same recipe (PELA on the digits Transformer, 60 steps) with `--nproc 1` and `--nproc 2`
back to back and reads samples/s of the fine-tuning loop from each report. One process uses all
cores' threads; torchrun gives each of its processes one thread (OMP_NUM_THREADS=1).

    python benchmarks/ddp.py [--out benchmarks/results/ddp.json]
"""
from __future__ import annotations

import json
import subprocess
import sys

from common import arguments, scratch, write_results
from compress.examples.training import train_digits_transformer

RECIPE = """\
seed: 0
data: {train: bundled:digits-tokens/train, eval: bundled:digits-tokens/test, batch_size: 64}
stages: [{method: pela, gamma: 1.0}]
finetune: {steps: 60, lr: 0.001}
bench: {batch_sizes: [1], warmup: 1, runs: 2}
"""


def main() -> None:
    args = arguments(__doc__).parse_args()
    work = scratch()
    model = work / "dt.pt"
    train_digits_transformer(model, epochs=5, progress=False)
    recipe = work / "recipe.yaml"
    recipe.write_text(RECIPE)
    rows = {}
    for nproc in (1, 2):
        out = work / f"out{nproc}"
        subprocess.run([sys.executable, "-m", "compress", "apply", "-r", str(recipe), str(model), "--out", str(out),
                        "-q", "--nproc", str(nproc)], check=True, capture_output=True)
        report = json.loads((out / "report.json").read_text())
        rows[nproc] = {"samples_per_s": report["finetune"]["samples_per_s"], "seconds": report["finetune"]["seconds"],
                       "final_loss": report["finetune"]["final_loss"], "metric": report["compressed"]["metric"]}
    print("| processes | fine-tuning samples/s | seconds for 60 steps | final loss | metric |")
    print("|---|---|---|---|---|")
    for nproc, r in rows.items():
        print(f"| {nproc} | {r['samples_per_s']:.0f} | {r['seconds']:.2f} | {r['final_loss']:.4f} | "
              f"{r['metric']['name']} {r['metric']['value']:.4f} |")
    print(f"\nscaling, two processes over one: {rows[2]['samples_per_s'] / rows[1]['samples_per_s']:.2f}x")
    write_results(args.out, rows)


if __name__ == "__main__":
    main()
