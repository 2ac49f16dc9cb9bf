"""Precision per layer on the three bundled examples: at int8 of the original's speed, does the
budget return a model at least as good as int8 of the original?

For each example one shipped recipe, its rank rule left to a budget over int8 of the original at
the larger batch, is run through `compress apply`: `speedup: 1` (as fast as int8 of the original)
and `1.1` with `precision: per_layer` (int8 or float chosen per layer with the rank), and `1.1`
with `precision: recipe` (every layer int8, as before). Each report measures the shipped model
beside the original and int8 of the original in one interleaved run: metric, ONNX bytes, speedup
over int8 with its 95 % interval. The recipes' own fine-tuning follows each allocation.

  - digits ResNet: recipes/svd.yaml, static quantization (QDQ, Conv included), batch 32;
  - digits Transformer: recipes/pela.yaml, dynamic quantization (MatMul, Gemm), batch 32;
  - CTR DeepFM: recipes/afm.yaml (its tables and hidden layers), dynamic quantization, batch 256.

    python benchmarks/precision.py [--only LABEL] [--out benchmarks/results/precision.json]

With --only (e.g. `--only CTR`), only the examples whose label holds it run, and their results
replace theirs in an existing --out file.
"""
from __future__ import annotations

import json

from common import arguments, load_recipe_dict, run_recipe, scratch, write_results

from compress.examples.training import train_ctr_deepfm, train_digits_resnet, train_digits_transformer
from compress.methods.rank_allocation import RULE_KEYS
from compress.report import baseline_verdict

CASES = [
    # label, recipe, quantize mode, trainer, batch sizes
    ("digits ResNet", "svd.yaml", "static", train_digits_resnet, [1, 32]),
    ("digits Transformer", "pela.yaml", "dynamic", train_digits_transformer, [1, 32]),
    ("CTR DeepFM", "afm.yaml", "dynamic", train_ctr_deepfm, [1, 256]),
]


RUNS = [(1.0, "per_layer"), (1.1, "per_layer"), (1.1, "recipe")]  # (speedup over int8, precision)


def budgeted(document: dict, mode: str, batches: list[int], speedup: float, precision: str) -> dict:
    """The recipe with its ranks left to a budget at int8 of the original's speed."""
    doc = json.loads(json.dumps(document))
    # every stage allocated (the CTR recipe's tables too: at their fixed rank 4 they are slower than
    # dense lookups, and no allocation of the rest then reaches int8's speed)
    doc["stages"] = [{k: v for k, v in s.items() if k not in RULE_KEYS} for s in doc["stages"]]
    doc["quantize"] = {"mode": mode}
    doc["budget"] = {"speedup": speedup, "over": "int8_original", "precision": precision, "batch": batches[-1]}
    doc["bench"] = {**doc.get("bench", {}), "batch_sizes": batches}
    doc["gates"] = {}
    return doc


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--only", default=None, help="only the examples whose label holds this")
    args = parser.parse_args()
    work = scratch()
    results = json.loads(args.out.read_text()) if args.only and args.out and args.out.exists() else {}
    for label, recipe, mode, train, batches in CASES:
        if args.only and args.only not in label:
            continue
        model = work / f"{recipe}.pt"
        train(model, progress=False)
        results[label] = {"recipe": recipe, "mode": mode, "batch": batches[-1], "rows": {}}
        for speedup, precision in RUNS:
            name = f"speedup {speedup:g} over int8, precision {precision}"
            try:
                report = run_recipe(budgeted(load_recipe_dict(recipe), mode, batches, speedup, precision), model,
                                    work, f"{recipe.removesuffix('.yaml')}-{speedup:g}-{precision}")
            except Exception as exc:  # noqa: BLE001 - a refusal (e.g. out of reach) is a finding
                results[label]["rows"][name] = {"error": f"{type(exc).__name__}: {exc}"}
                print(label, name, results[label]["rows"][name], flush=True)
                continue
            base = report["baselines"]["int8_original"]
            key = str(batches[-1])
            b = report["budget"]
            results[label].setdefault("original", {"metric": report["original"]["metric"]["value"],
                                                   "onnx_bytes": report["original"]["onnx_bytes"]})
            results[label]["rows"][name] = {
                "metric": report["compressed"]["metric"]["value"], "int8_original_metric": base["metric"]["value"],
                "original_metric": report["original"]["metric"]["value"],
                "onnx_bytes": report["compressed"]["onnx_bytes"], "int8_original_bytes": base["onnx_bytes"],
                "over_int8": base["compressed_speedup"][key], "int8_mode": base["mode"],
                "float_layers": b.get("float_layers"), "allocated_layers": b["allocated_layers"],
                "dense_layers": b["dense_layers"], "budget_met": b["met"], "over_original": b["over_original"],
                "verdict": baseline_verdict(report)}
            print(label, name, json.dumps(results[label]["rows"][name]), flush=True)
        write_results(args.out, results)
    print(table(results))


def table(results: dict) -> str:
    lines = ["| model | allocation | metric (int8 of the original) | ONNX bytes (int8 of the original) | "
             "over int8 of the original [95 %] | kept float / allocated | budget met |",
             "|---|---|---|---|---|---|---|"]
    for label, case in results.items():
        for name, row in case["rows"].items():
            if "error" in row:
                lines.append(f"| {label} | {name} | failed: {row['error'][:120]} | | | | |")
                continue
            o = row["over_int8"]
            kept = "-" if row["float_layers"] is None else str(len(row["float_layers"]))
            lines.append(f"| {label} | {name} | {row['metric']:.4f} ({row['int8_original_metric']:.4f}) | "
                         f"{row['onnx_bytes']:,} ({row['int8_original_bytes']:,}) | {o['speedup']:.2f}x "
                         f"[{o['ci'][0]:.2f}, {o['ci'][1]:.2f}] | {kept} / {row['allocated_layers']} | "
                         f"{row['budget_met']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
