"""AFM-initialised PELA against its parts, on the digits Transformer, at equal parameters.

Side by side, from the same original, with labels (recipes/pela.yaml's losses) and without
(recipes/pela-unlabeled.yaml's), at PELA's ranks (rho 2 on the blocks' Linear layers):
  - svd at PELA's ranks + the same fine-tuning (task loss, or output distillation without labels);
  - afm alone at PELA's ranks, no fine-tuning;
  - pela (init svd, the paper);
  - afm -> pela (init afm);
pela and afm -> pela after 2 and after 10 epochs (the shipped recipes' budget). Reported: test
accuracy, top-1 agreement and mean cosine of the logits to the original's.

    python benchmarks/compose.py [--seeds 1] [--out benchmarks/results/compose.json]
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


def quality(path, original_logits, test) -> dict:
    logits = predict(load_model(path).model, test, NAMES, 1024)
    return {"accuracy": round(float((logits.argmax(1) == test.tensors["target"]).float().mean()), 4),
            "agreement": round(float((logits.argmax(1) == original_logits.argmax(1)).float().mean()), 4),
            "cosine": round(float(F.cosine_similarity(logits, original_logits, dim=1).mean()), 4)}


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--seeds", type=int, default=1)
    args = parser.parse_args()
    work = scratch()
    model = work / "dt.pt"
    train_digits_transformer(model, progress=False)
    test = load_source("bundled:digits-tokens/test")
    original_logits = predict(load_model(model).model, test, NAMES, 1024)
    results = {"original": quality(model, original_logits, test), "runs": []}
    for labels, recipe in (("with labels", "pela.yaml"), ("without labels", "pela-unlabeled.yaml")):
        for seed in range(args.seeds):
            base = load_recipe_dict(recipe)
            base.update(seed=seed, gates={}, bench={"batch_sizes": [1], "warmup": 1, "runs": 5, "baselines": []})
            runs = {}
            for init in ("svd", "afm"):
                for epochs in (2, 10):
                    document = copy.deepcopy(base)
                    document["stages"][0]["init"] = init
                    document["finetune"]["epochs"] = epochs
                    label = f"pela init {init}, {epochs} epochs" if init == "svd" else f"afm -> pela, {epochs} epochs"
                    name = f"{recipe}-{init}-{epochs}-{seed}"
                    report = run_recipe(document, model, work, name)
                    runs[label] = {**quality(work / name / "model.pt", original_logits, test),
                                   "params": report["compressed"]["params"]}
            ranks = {r["name"]: r["rank"] for r in report["layers"] if r["action"] == "factorize"}
            afm = copy.deepcopy(base)
            afm["stages"] = [{"method": "afm", "rank": 1, "ranks": ranks, "targets": {"include": sorted(ranks)}}]
            afm["finetune"] = {"epochs": 0}
            report = run_recipe(afm, model, work, f"afm-{recipe}-{seed}")
            runs["afm alone, no fine-tuning"] = {**quality(work / f"afm-{recipe}-{seed}" / "model.pt", original_logits, test),
                                                 "params": report["compressed"]["params"]}
            svd = copy.deepcopy(base)
            svd["stages"] = [{"method": "svd", "rank": 1, "ranks": ranks, "targets": {"include": sorted(ranks)}}]
            if labels == "without labels":
                svd["finetune"]["distill"] = {"weight": 1.0, "loss": "kl", "temperature": 2.0}
            report = run_recipe(svd, model, work, f"svd-{recipe}-{seed}")
            runs["svd + 10 epochs of the same fine-tuning"] = {
                **quality(work / f"svd-{recipe}-{seed}" / "model.pt", original_logits, test),
                "params": report["compressed"]["params"]}
            for label, row in runs.items():
                print(f"{labels}, seed {seed}: {label}: {row}", flush=True)
            results["runs"].append({"labels": labels, "seed": seed, "rows": runs})
    write_results(args.out, results)


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
