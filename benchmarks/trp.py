"""TRP against the uncompressed model and against `svd` at equal MACs, on the bundled CNN.

Side by side in one run, same seed and same fine-tuning budget:
  - the original digits ResNet (trained by `compress example digits-resnet`);
  - TRP with the channel scheme and with the spatial scheme (recipes/trp.yaml, scheme switched);
  - `svd` at exactly TRP's per-layer ranks (equal MACs) with the same fine-tuning epochs, optimizer
    and post-finetune epochs, for each scheme;
  - ONNX Runtime latency (batch 1 and 32) next to the MAC ratio, from the same reports;
  - the per-step cost of TRP (period 1) against the same fine-tuning loop without it.

    python benchmarks/trp.py [--out benchmarks/results/trp.json]
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch

from common import example_model, load_recipe_dict, percent, run_recipe, scratch
from compress.bench import profile_layers
from compress.checkpoint import load_model
from compress.data import load_source
from compress.finetune import finetune
from compress.methods.trp import Trp, TrpStage
from compress.recipe import FinetuneSection


def compressed_layer_macs(report: dict, method: str) -> tuple[int, int]:
    """MACs before and after over the layers the method projected or factorized."""
    rows = [r for r in report["layers"] if r["method"] == method and not (r.get("reason") or "").startswith("TRP default")]
    return sum(r["macs_before"] for r in rows), sum(r["macs_after"] for r in rows)


def svd_at_ranks(trp_recipe: dict, trp_report: dict, scheme: str) -> dict:
    """An svd recipe with TRP's final ranks, the same data and the same total fine-tuning."""
    stage = trp_recipe["stages"][0]
    ranks = {r["name"]: r["rank"] for r in trp_report["layers"] if r["action"] == "factorize"}
    document = copy.deepcopy(trp_recipe)
    document["name"] = f"svd-at-trp-ranks-{scheme}"
    document["stages"] = [{"method": "svd", "scheme": scheme, "ranks": ranks,
                           "targets": {"include": sorted(ranks)}, "rank": 1}]
    document["finetune"]["epochs"] = trp_recipe["finetune"]["epochs"] + stage.get("post_finetune", 0)
    return document


def step_overhead(model_path: Path, recipe: dict, steps: int = 40, rounds: int = 3) -> dict:
    """Seconds per optimizer step of the fine-tuning loop with and without TRP (period 1),
    alternated over several rounds on the same data; medians."""
    train = load_source("bundled:digits/train")
    cfg = FinetuneSection.model_validate({**recipe["finetune"], "epochs": 0, "steps": steps})
    timings = {"plain": [], "trp": []}
    for _ in range(rounds):
        for label in ("plain", "trp"):
            model = load_model(model_path).model
            methods = []
            if label == "trp":
                stage = TrpStage.model_validate({**recipe["stages"][0], "period": 1})
                method = Trp(stage, 0)
                method.plan(model, profile_layers(model, (train.head(1)["image"],)))
                method.prepare(model)
                methods = [method]
            result = finetune(model, train, ["image"], "target", cfg, 64, methods=methods, progress=False)
            timings[label].append(result.seconds / result.steps)
    plain, trp = statistics.median(timings["plain"]), statistics.median(timings["trp"])
    return {"plain_ms_per_step": round(1e3 * plain, 3), "trp_ms_per_step": round(1e3 * trp, 3),
            "ratio": round(trp / plain, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--energy", type=float, default=None, help="override the recipe's energy")
    args = parser.parse_args()
    torch.manual_seed(0)
    work = scratch()
    model, summary = example_model(work)
    base = load_recipe_dict("trp.yaml")
    if args.energy is not None:
        base["stages"][0]["energy"] = args.energy
    rows, results = [], {"example": summary, "recipe": base, "runs": {}}
    for scheme in ("channel", "spatial"):
        trp_recipe = copy.deepcopy(base)
        trp_recipe["stages"][0]["scheme"] = scheme
        trp_recipe["gates"] = {}
        trp = run_recipe(trp_recipe, model, work, f"trp-{scheme}")
        svd = run_recipe(svd_at_ranks(trp_recipe, trp, scheme), model, work, f"svd-{scheme}")
        for label, report in ((f"trp {scheme}", trp), (f"svd {scheme} at TRP's ranks", svd)):
            before, after = compressed_layer_macs(report, report["layers"][0]["method"])
            rows.append({
                "run": label,
                "accuracy": report["compressed"]["metric"]["value"],
                "drop_points": 100 * (report["original"]["metric"]["value"] - report["compressed"]["metric"]["value"]),
                "layer_mac_ratio": before / after,
                "model_mac_ratio": report["ratios"]["macs"],
                "param_ratio": report["ratios"]["params"],
                "speedup_b1": report["ratios"]["speedup"]["1"],
                "speedup_b32": report["ratios"]["speedup"]["32"],
            })
            results["runs"][label] = report
    overhead = step_overhead(model, base)
    results["overhead"] = overhead
    results["table"] = rows
    original = next(iter(results["runs"].values()))["original"]["metric"]["value"]
    print(f"original digits ResNet: test accuracy {percent(original)} "
          f"({original * 360:.0f}/360), {next(iter(results['runs'].values()))['original']['macs']:,} MACs per sample\n")
    print("| run | test accuracy | change (points) | MACs, compressed layers | MACs, whole model | params | ORT speedup b1 | ORT speedup b32 |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['run']} | {percent(r['accuracy'])} | {-r['drop_points']:+.2f} | {r['layer_mac_ratio']:.2f}x fewer | "
              f"{r['model_mac_ratio']:.2f}x fewer | {r['param_ratio']:.2f}x fewer | {r['speedup_b1']:.2f}x | {r['speedup_b32']:.2f}x |")
    print(f"\nper-step cost, period 1: plain fine-tuning {overhead['plain_ms_per_step']:.2f} ms, with TRP "
          f"{overhead['trp_ms_per_step']:.2f} ms: {overhead['ratio']:.2f}x")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
