"""The README's quick start over several seeds: how much its figures move from seed to seed.

For each seed: `compress example digits-resnet --seed S`, then `compress apply --recipe
recipes/svd.yaml --seed S` on that model (the same code, in-process). Reports the test accuracy of
the original and of the compressed model, and of the exported model.onnx, per seed, with the
spread. On one machine and seed the run is deterministic on the CPU; across machines, float
summation order (thread count, CPU vector width) changes the last bits of training, which after 15 +
5 epochs moves accuracy by a test image or two (one image is 0.28 points).

    python benchmarks/quickstart.py [--seeds 5] [--out benchmarks/results/quickstart.json]
"""
from __future__ import annotations

import statistics

from common import arguments, example_model, load_recipe_dict, run_recipe, scratch, write_results


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args()
    work = scratch()
    rows = []
    for seed in range(args.seeds):
        model, summary = example_model(work / f"seed{seed}", seed=seed)
        document = load_recipe_dict("svd.yaml") | {"seed": seed}
        report = run_recipe(document, model, work / f"seed{seed}", "svd")
        c = report["compressed"]
        rows.append({"seed": seed, "original": summary["test_accuracy"], "compressed": c["metric"]["value"],
                     "onnx": c["onnx_metric"]["value"], "params_ratio": report["ratios"]["params"],
                     "macs_ratio": report["ratios"]["macs"], "speedup": report["ratios"]["speedup"]})
        print(f"seed {seed}: original {rows[-1]['original']:.4f}, svd {rows[-1]['compressed']:.4f} "
              f"(model.onnx {rows[-1]['onnx']:.4f})", flush=True)
    spread = {key: {"min": min(r[key] for r in rows), "max": max(r[key] for r in rows),
                    "mean": round(statistics.mean(r[key] for r in rows), 4)} for key in ("original", "compressed")}
    print("| | min | mean | max |\n|---|---|---|---|")
    for key, s in spread.items():
        print(f"| {key} test accuracy | {s['min']:.4f} | {s['mean']:.4f} | {s['max']:.4f} |")
    write_results(args.out, {"runs": rows, "spread": spread})


if __name__ == "__main__":
    main()
