"""Feature-mimicking SVD (AFM) against plain `svd`, side by side on the same calibration data.

1. Without any fine-tuning, at equal parameters (svd gets AFM's exact per-layer ranks): output
   agreement with the original model (cosine similarity and MSE of the outputs, and AUC or
   accuracy and top-1 agreement) on the CTR example (embedding tables + MLP) and on the digits
   ResNet (3x3 convs).
2. The shipped recipe (recipes/afm.yaml, one epoch of fine-tuning) on the CTR example: model size,
   AUC against the original, and ONNX Runtime latency at batch 1 and 256 next to the MAC ratio.

    python benchmarks/afm.py [--out benchmarks/results/afm.json]
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn.functional as F
from common import arguments, load_recipe_dict, run_recipe, scratch, write_results

from compress.checkpoint import load_model
from compress.data import load_source
from compress.examples.training import train_ctr_deepfm
from compress.examples.training import train_digits_resnet
from compress.finetune import predict
from compress.metrics import auc


def outputs_of(path: Path, data, names) -> torch.Tensor:
    return predict(load_model(path).model, data, names, 1024)


def agreement(original: torch.Tensor, compressed: torch.Tensor, target: torch.Tensor) -> dict:
    if original.dim() == 1:  # one logit per sample: cosine over the centred logit vector
        a, b = original - original.mean(), compressed - compressed.mean()
        cosine = float(F.cosine_similarity(a, b, dim=0))
        quality = {"auc": auc(compressed, target), "auc_original": auc(original, target)}
    else:
        cosine = float(F.cosine_similarity(original, compressed, dim=1).mean())
        quality = {"accuracy": float((compressed.argmax(1) == target).float().mean()),
                   "accuracy_original": float((original.argmax(1) == target).float().mean()),
                   "top1_agreement": float((compressed.argmax(1) == original.argmax(1)).float().mean())}
    return {"cosine": cosine, "mse": float(((original - compressed) ** 2).mean()), **quality}


def compare(document: dict, model: Path, work: Path, label: str, data_source: str, names: list[str],
            svd_types: list[str], svd_scheme: str = "channel") -> dict:
    """AFM by `document` and svd at AFM's ranks, both without fine-tuning."""
    afm_doc = copy.deepcopy(document)
    afm_doc["finetune"] = {"epochs": 0}
    afm_doc["gates"] = {}
    afm = run_recipe(afm_doc, model, work, f"{label}-afm")
    svd_doc = copy.deepcopy(afm_doc)
    ranks = {r["name"]: r["rank"] for r in afm["layers"] if r["action"] == "factorize"}
    svd_doc["stages"] = [{"method": "svd", "scheme": svd_scheme, "rank": 1, "ranks": ranks,
                          "targets": {"include": sorted(ranks), "types": svd_types}}]
    svd = run_recipe(svd_doc, model, work, f"{label}-svd")
    data = load_source(data_source)
    target = data.tensors["target"]
    original = outputs_of(model, data, names)
    rows = {}
    for method, report in (("afm", afm), ("svd", svd)):
        rows[method] = {"params": report["compressed"]["params"], "params_original": report["original"]["params"],
                        **agreement(original, outputs_of(work / f"{label}-{method}" / "model.pt", data, names), target)}
    return rows


def main() -> None:
    parser = arguments(__doc__)
    args = parser.parse_args()
    torch.manual_seed(0)
    work = scratch()
    ctr_model, digits_model = work / "ctr.pt", work / "digits.pt"
    ctr_summary = train_ctr_deepfm(ctr_model, progress=False)
    digits_summary = train_digits_resnet(digits_model, progress=False)

    ctr_doc = load_recipe_dict("afm.yaml")
    digits_doc = {
        "name": "afm-digits", "data": {"calibration": "bundled:digits/calibration", "eval": "bundled:digits/test"},
        "stages": [{"method": "afm", "energy": 0.95,
                    "targets": {"types": ["Conv2d"], "include": ["layer*"], "exclude": ["*.shortcut.*"]}}],
    }
    results = {
        "ctr": compare(ctr_doc, ctr_model, work, "ctr", "bundled:ctr/test", ["fields"], ["Embedding", "Linear"]),
        "digits": compare(digits_doc, digits_model, work, "digits", "bundled:digits/test", ["image"], ["Conv2d"]),
    }
    for i, stage in enumerate(ctr_doc["stages"]):  # each CTR stage alone: where the difference comes from
        alone = copy.deepcopy(ctr_doc)
        alone["stages"] = [stage]
        results[f"ctr stage {i} alone ({', '.join(stage['targets']['include'])})"] = compare(
            alone, ctr_model, work, f"ctr-stage{i}", "bundled:ctr/test", ["fields"], ["Embedding", "Linear"])
    shipped = copy.deepcopy(ctr_doc)
    shipped["gates"] = {}
    full = run_recipe(shipped, ctr_model, work, "ctr-afm-finetuned")
    results["recipe"] = {k: full[k] for k in ("original", "compressed", "ratios", "parity")}
    results["examples"] = {"ctr": ctr_summary, "digits": digits_summary}

    print("Without fine-tuning, equal parameters (svd at AFM's per-layer ranks):\n")
    print("| model | method | params (original -> compressed) | output cosine | output MSE | quality |")
    print("|---|---|---|---|---|---|")
    tables = [("CTR DeepFM", results["ctr"]), ("digits ResNet", results["digits"])]
    tables += [(f"CTR DeepFM, {k.removeprefix('ctr ')}", v) for k, v in results.items() if k.startswith("ctr stage")]
    for model_name, rows in tables:
        for method, r in rows.items():
            if "auc" in r:
                quality = f"AUC {r['auc']:.4f} (original {r['auc_original']:.4f})"
            else:
                quality = (f"accuracy {100 * r['accuracy']:.2f}% (original {100 * r['accuracy_original']:.2f}%), "
                           f"top-1 agreement {100 * r['top1_agreement']:.2f}%")
            print(f"| {model_name} | {method} | {r['params_original']:,} -> {r['params']:,} | {r['cosine']:.4f} | "
                  f"{r['mse']:.4g} | {quality} |")
    o, c, ratios = full["original"], full["compressed"], full["ratios"]
    print(f"\nrecipes/afm.yaml (one epoch of fine-tuning) on the CTR example: params {o['params']:,} -> {c['params']:,} "
          f"({ratios['params']:.2f}x smaller), AUC {o['metric']['value']:.4f} -> {c['metric']['value']:.4f} "
          f"({c['metric']['value'] - o['metric']['value']:+.4f}), MACs {ratios['macs']:.2f}x fewer")
    print("| batch | original p50 ms | compressed p50 ms | speedup | MAC ratio |")
    print("|---|---|---|---|---|")
    for bs in o["latency_ms"]:
        print(f"| {bs} | {o['latency_ms'][bs]['p50']:.3f} | {c['latency_ms'][bs]['p50']:.3f} | "
              f"{ratios['speedup'][bs]:.2f}x | {ratios['macs']:.2f}x |")
    write_results(args.out, results)


if __name__ == "__main__":
    main()
