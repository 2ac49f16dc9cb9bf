"""PELA against the original and against `svd` + the same fine-tuning at equal parameters, on the
digits Transformer (rho = 2 on its Linear layers), with and without labels.

Side by side in one run, same seed and epochs:
  - PELA with labels (recipes/pela.yaml) and without (recipes/pela-unlabeled.yaml);
  - `svd` at PELA's exact per-layer ranks (equal parameters), fine-tuned for the same epochs with
    the same optimizer: with labels on the task loss, without labels by output distillation (KL);
  - test accuracy (the label-free students are scored on the labelled test split too), output
    agreement with the original (mean cosine similarity of the logits, top-1 agreement), and
    ONNX Runtime latency at batch 1 and 32 next to the MAC ratio.

    python benchmarks/pela.py [--out benchmarks/results/pela.json]
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from common import arguments, load_recipe_dict, run_recipe, scratch, write_results

from compress.checkpoint import load_model
from compress.data import load_source
from compress.examples.training import train_digits_transformer
from compress.finetune import predict

NAMES = ["tokens", "mask"]


def svd_twin(pela_doc: dict, pela_report: dict) -> dict:
    """svd at PELA's ranks with PELA's data and fine-tuning (output KL distillation without labels)."""
    document = copy.deepcopy(pela_doc)
    ranks = {r["name"]: r["rank"] for r in pela_report["layers"] if r["action"] == "factorize"}
    document["name"] = pela_doc["name"].replace("pela", "svd")
    document["stages"] = [{"method": "svd", "rank": 1, "ranks": ranks, "targets": {"include": sorted(ranks)}}]
    return document


def main() -> None:
    parser = arguments(__doc__)
    args = parser.parse_args()
    torch.manual_seed(0)
    work = scratch()
    model = work / "dt.pt"
    summary = train_digits_transformer(model, progress=False)
    test = load_source("bundled:digits-tokens/test")
    target = test.tensors["target"]
    original = predict(load_model(model).model, test, NAMES, 256)
    rows, reports = [], {}
    for recipe, labels in (("pela.yaml", "with labels"), ("pela-unlabeled.yaml", "without labels")):
        pela_doc = load_recipe_dict(recipe)
        pela_doc["gates"] = {}
        pela = run_recipe(pela_doc, model, work, f"pela-{labels}")
        svd = run_recipe(svd_twin(pela_doc, pela), model, work, f"svd-{labels}")
        for method, report in (("pela", pela), ("svd + same fine-tuning", svd)):
            logits = predict(load_model(work / f"{'pela' if method == 'pela' else 'svd'}-{labels}" / "model.pt").model,
                             test, NAMES, 256)
            rows.append({
                "run": f"{method}, {labels}",
                "accuracy": float((logits.argmax(1) == target).float().mean()),
                "cosine": float(F.cosine_similarity(logits, original, dim=1).mean()),
                "top1_agreement": float((logits.argmax(1) == original.argmax(1)).float().mean()),
                "params": report["compressed"]["params"], "param_ratio": report["ratios"]["params"],
                "mac_ratio": report["ratios"]["macs"], "speedup": report["ratios"]["speedup"],
            })
            reports[rows[-1]["run"]] = report
    accuracy = float((original.argmax(1) == target).float().mean())
    print(f"original digits Transformer: test accuracy {100 * accuracy:.2f}%, "
          f"{reports[rows[0]['run']]['original']['params']:,} params\n")
    print("| run | test accuracy | change (points) | output cosine | top-1 agreement | params | MACs | ORT speedup b1 | ORT speedup b32 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['run']} | {100 * r['accuracy']:.2f}% | {100 * (r['accuracy'] - accuracy):+.2f} | {r['cosine']:.4f} | "
              f"{100 * r['top1_agreement']:.2f}% | {r['param_ratio']:.2f}x fewer | {r['mac_ratio']:.2f}x fewer | "
              f"{r['speedup']['1']:.2f}x | {r['speedup']['32']:.2f}x |")
    write_results(args.out, {"example": summary, "original_accuracy": accuracy, "table": rows, "reports": reports})


if __name__ == "__main__":
    main()
