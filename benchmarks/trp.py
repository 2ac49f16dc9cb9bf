"""TRP against the uncompressed model and against `svd` at equal MACs, on the bundled CNN.

Side by side in one run, same seed and same fine-tuning budget:
  - the original digits ResNet (trained by `compress example digits-resnet`);
  - TRP with the channel scheme and with the spatial scheme (recipes/trp.yaml, scheme and energy
    switched);
  - `svd` at exactly TRP's per-layer ranks (equal MACs), and `svd` with its own rule (one parameter
    ratio for all layers) at no more MACs than TRP, each with the same fine-tuning epochs and
    optimizer as TRP's fine-tuning plus post-finetune epochs, for each scheme;
  - every run repeated for several fine-tuning seeds (the test set has 360 images: one image is
    0.28 points), with the test cross-entropy as a finer measure;
  - ONNX Runtime latency (batch 1 and 32) next to the MAC ratio, from the same reports;
  - the per-step cost of TRP (period 1) against the same fine-tuning loop without it.

    python benchmarks/trp.py [--out benchmarks/results/trp.json]
"""
from __future__ import annotations

import copy
import statistics
from pathlib import Path

import torch
from common import (
    arguments,
    example_model,
    load_recipe_dict,
    percent,
    run_recipe,
    scratch,
    write_results,
)

from compress.bench import profile_layers
from compress.checkpoint import load_model
from compress.data import load_source
from compress.finetune import finetune, predict
from compress.methods.trp import Trp, TrpStage
import compress
from compress.recipe import FinetuneSection


def compressed_layer_macs(report: dict, method: str) -> tuple[int, int]:
    """MACs before and after over the layers the method projected or factorized (TRP: all its
    targets; svd: the layers it was pointed at, which are the ones TRP factorized)."""
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


def svd_uniform_at_macs(trp_recipe: dict, trp_report: dict, scheme: str, model: Path, work: Path) -> dict:
    """An svd recipe with its own rank rule (one parameter ratio for every layer) whose compressed
    layers cost at most TRP's MACs, found by bisection over plans; same fine-tuning budget."""
    targets = sorted(r["name"] for r in trp_report["layers"] if r["action"] == "factorize")
    budget = sum(r["macs_after"] for r in trp_report["layers"] if r["action"] == "factorize")
    document = copy.deepcopy(trp_recipe)
    document["name"] = f"svd-uniform-{scheme}"
    document["finetune"]["epochs"] = trp_recipe["finetune"]["epochs"] + trp_recipe["stages"][0].get("post_finetune", 0)

    def macs_at(ratio: float) -> int:
        document["stages"] = [{"method": "svd", "scheme": scheme, "ratio": ratio, "targets": {"include": targets}}]
        rows = compress.plan(model, document)
        return sum(r["macs_after"] for r in rows if r["name"] in targets)

    low, high = 1e-3, 1.0
    for _ in range(20):
        mid = (low + high) / 2
        low, high = (mid, high) if macs_at(mid) <= budget else (low, mid)
    macs_at(low)
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


def test_nll(out_dir: Path) -> float:
    """Mean cross-entropy of a run's compressed model on the test split (finer-grained than accuracy)."""
    return test_nll_of_checkpoint(out_dir / "model.pt")


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--channel-energy", type=float, default=0.95, help="TRP energy with the channel scheme")
    parser.add_argument("--spatial-energy", type=float, default=0.97, help="TRP energy with the spatial scheme")
    parser.add_argument("--seeds", type=int, default=3, help="fine-tuning seeds per run (same original model)")
    args = parser.parse_args()
    torch.manual_seed(0)
    work = scratch()
    model, summary = example_model(work)
    base = load_recipe_dict("trp.yaml")
    energies = {"channel": args.channel_energy, "spatial": args.spatial_energy}
    runs: dict[str, list[dict]] = {}
    for seed in range(args.seeds):
        for scheme in ("channel", "spatial"):
            trp_recipe = copy.deepcopy(base)
            trp_recipe["stages"][0]["scheme"] = scheme
            trp_recipe["stages"][0]["energy"] = energies[scheme]
            trp_recipe["gates"] = {}
            trp_recipe["seed"] = seed
            trp = run_recipe(trp_recipe, model, work, f"trp-{scheme}")
            trp["test_nll"] = test_nll(work / f"trp-{scheme}")
            svd = run_recipe(svd_at_ranks(trp_recipe, trp, scheme), model, work, f"svd-{scheme}")
            svd["test_nll"] = test_nll(work / f"svd-{scheme}")
            uniform = run_recipe(svd_uniform_at_macs(trp_recipe, trp, scheme, model, work), model, work,
                                 f"svd-uniform-{scheme}")
            uniform["test_nll"] = test_nll(work / f"svd-uniform-{scheme}")
            runs.setdefault(f"trp {scheme} (energy {energies[scheme]})", []).append(trp)
            runs.setdefault(f"svd {scheme}, TRP's ranks", []).append(svd)
            runs.setdefault(f"svd {scheme}, one ratio for all layers, same MACs", []).append(uniform)
    rows = []
    for label, reports in runs.items():
        accuracies = [r["compressed"]["metric"]["value"] for r in reports]
        layer_ratios = [b / a for b, a in (compressed_layer_macs(r, r["layers"][0]["method"]) for r in reports)]
        # svd rows count the same layers as TRP's (their targets are the layers TRP factorized)
        mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
        rows.append({
            "run": label, "accuracy_mean": mean(accuracies), "accuracy_min": min(accuracies),
            "accuracy_max": max(accuracies), "test_nll": mean([r["test_nll"] for r in reports]),
            "layer_mac_ratio": mean(layer_ratios), "model_mac_ratio": mean([r["ratios"]["macs"] for r in reports]),
            "param_ratio": mean([r["ratios"]["params"] for r in reports]),
            "speedup_b1": mean([r["ratios"]["speedup"]["1"] for r in reports]),
            "speedup_b32": mean([r["ratios"]["speedup"]["32"] for r in reports]),
        })
    overhead = step_overhead(model, base)
    first = next(iter(runs.values()))[0]
    original = first["original"]["metric"]["value"]
    original_nll = test_nll_of_checkpoint(model)
    print(f"original digits ResNet: test accuracy {percent(original)} ({original * 360:.0f}/360), test NLL "
          f"{original_nll:.4f}, {first['original']['macs']:,} MACs per sample; {args.seeds} fine-tuning seeds per run\n")
    print("| run | test accuracy, mean (min-max) | change (points) | test NLL | MACs, compressed layers | "
          "MACs, whole model | params | ORT speedup b1 | ORT speedup b32 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['run']} | {percent(r['accuracy_mean'])} ({percent(r['accuracy_min'])}-{percent(r['accuracy_max'])}) | "
              f"{100 * (r['accuracy_mean'] - original):+.2f} | {r['test_nll']:.4f} | {r['layer_mac_ratio']:.2f}x fewer | "
              f"{r['model_mac_ratio']:.2f}x fewer | {r['param_ratio']:.2f}x fewer | {r['speedup_b1']:.2f}x | "
              f"{r['speedup_b32']:.2f}x |")
    print(f"\nper-step cost, period 1: plain fine-tuning {overhead['plain_ms_per_step']:.2f} ms, with TRP "
          f"{overhead['trp_ms_per_step']:.2f} ms: {overhead['ratio']:.2f}x")
    results = {"example": summary, "original_test_nll": original_nll, "recipe": base, "table": rows,
                   "overhead": overhead, "reports": runs}
    write_results(args.out, results)


def test_nll_of_checkpoint(path: Path) -> float:
    """Mean cross-entropy of a checkpoint's model on the bundled digits test split."""
    test = load_source("bundled:digits/test")
    logits = predict(load_model(path).model, test, ["image"], 256)
    return float(torch.nn.functional.cross_entropy(logits, test.tensors["target"]))


if __name__ == "__main__":
    main()
