"""AFM-initialised PELA against its parts, at equal parameters, on a small and a realistic width.

Side by side, from the same original, with labels (recipes/pela.yaml's losses) and without
(recipes/pela-unlabeled.yaml's), at PELA's ranks (rho 2 on the blocks' Linear layers):
  - svd at PELA's ranks + the same fine-tuning (task loss, or output distillation without labels);
  - afm alone at PELA's ranks, no fine-tuning, calibrated three ways: every layer on the original
    (`sequential: false`), one block at a time (`blocks`), one layer at a time (`layers`), with the
    seconds calibration and factorization took;
  - pela (init svd, the paper);
  - afm -> pela: the chain form, an afm stage and then a pela stage on the same layers;
pela and afm -> pela after 3 and after 10 epochs (the shipped recipes' budget: 3 is "a third of the
steps"). Reported: test accuracy, top-1 agreement and mean cosine of the logits to the original's.

`--width digits`: the bundled digits Transformer (2 blocks, width 64). `--width realistic`: the same
architecture at width 384, FFN 1536, 6 heads, 4 blocks (7.1M parameters in the blocks), trained on
the digits tokens for `--train-epochs` first.

    python benchmarks/compose.py [--seeds 1] [--width digits|realistic] [--labels both|with|without]
                                 [--out benchmarks/results/compose.json]
"""
from __future__ import annotations

import copy
import json

import torch
import torch.nn.functional as F
from common import arguments, load_recipe_dict, run_recipe, scratch, write_results

from compress.checkpoint import load_model
from compress.data import load_source
from compress.examples.digits_transformer import FACTORY, digits_transformer
from compress.examples.training import train_digits_transformer, train_example
from compress.recipe import FinetuneSection
from compress.finetune import predict

NAMES = ["tokens", "mask"]


def quality(path, original_logits, test) -> dict:
    logits = predict(load_model(path).model, test, NAMES, 1024)
    return {"accuracy": round(float((logits.argmax(1) == test.tensors["target"]).float().mean()), 4),
            "agreement": round(float((logits.argmax(1) == original_logits.argmax(1)).float().mean()), 4),
            "cosine": round(float(F.cosine_similarity(logits, original_logits, dim=1).mean()), 4)}


REALISTIC = {"dim": 384, "depth": 4, "heads": 6, "hidden": 1536}


def train_realistic(path, epochs: int) -> None:
    train_example(path, name="digits-transformer-384", build=lambda: digits_transformer(**REALISTIC),
                  factory=FACTORY, kwargs=REALISTIC, dataset="digits-tokens",
                  inputs=[{"name": "tokens", "shape": [64], "dtype": "int64"},
                          {"name": "mask", "shape": [64], "dtype": "int64"}],
                  cfg=FinetuneSection(epochs=epochs, optimizer="adamw", lr=5e-4, weight_decay=0.05,
                                      schedule="cosine", clip_grad_norm=1.0),
                  batch_size=64, metric="accuracy", seed=0, progress=False, device=torch.device("cpu"))


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--width", choices=["digits", "realistic"], default="digits")
    parser.add_argument("--labels", choices=["both", "with", "without"], default="both")
    parser.add_argument("--train-epochs", type=int, default=15, help="training of the realistic-width original")
    args = parser.parse_args()
    work = scratch()
    model = work / "dt.pt"
    if args.width == "digits":
        train_digits_transformer(model, progress=False)
    else:
        train_realistic(model, args.train_epochs)
    test = load_source("bundled:digits-tokens/test")
    original_logits = predict(load_model(model).model, test, NAMES, 1024)
    results = {"width": args.width, "model_kwargs": {} if args.width == "digits" else REALISTIC,
               "original": quality(model, original_logits, test), "runs": []}
    print(f"original: {results['original']}", flush=True)
    settings = [("with labels", "pela.yaml"), ("without labels", "pela-unlabeled.yaml")]
    settings = [s for s in settings if args.labels == "both" or s[0].startswith(args.labels)]

    def measure(document, name):
        report = run_recipe(document, model, work, name)
        timings = report["timings_s"]
        return {**quality(work / name / "model.pt", original_logits, test), "params": report["compressed"]["params"],
                "compress_s": round(timings.get("calibrate", 0) + timings.get("prepare", 0), 2)}

    for labels, recipe in settings:
        for seed in range(args.seeds):
            base = load_recipe_dict(recipe)
            base.update(seed=seed, gates={}, bench={"batch_sizes": [1], "warmup": 1, "runs": 5, "baselines": []})
            pela_stage = {k: v for k, v in base["stages"][0].items() if k != "init"}
            runs = {}
            for epochs in (10, 3):
                document = copy.deepcopy(base)
                document["finetune"]["epochs"] = epochs
                runs[f"pela init svd, {epochs} epochs"] = measure(document, f"{recipe}-svd-{epochs}-{seed}")
                if epochs == 10:  # PELA's own ranks (rho 2): every other run uses them
                    ranks = {r["name"]: r["rank"] for r in json_layers(work / f"{recipe}-svd-{epochs}-{seed}")
                             if r["action"] == "factorize"}
                    targets = {"include": sorted(ranks)}
                afm = {"method": "afm", "rank": 1, "ranks": ranks, "targets": targets}
                document["stages"] = [afm, {**pela_stage, "targets": targets}]  # the chain
                runs[f"afm -> pela, {epochs} epochs"] = measure(document, f"{recipe}-chain-{epochs}-{seed}")
            for mode in (False, "blocks", "layers"):
                document = copy.deepcopy(base)
                document["stages"] = [{**afm, "sequential": mode}]
                document["finetune"] = {"epochs": 0}
                runs[f"afm alone (sequential: {str(mode).lower()}), no fine-tuning"] = measure(
                    document, f"afm-{recipe}-{mode}-{seed}")
            svd = copy.deepcopy(base)
            svd["stages"] = [{"method": "svd", "rank": 1, "ranks": ranks, "targets": targets}]
            if labels == "without labels":
                svd["finetune"]["distill"] = {"weight": 1.0, "loss": "kl", "temperature": 2.0}
            runs["svd + 10 epochs of the same fine-tuning"] = measure(svd, f"svd-{recipe}-{seed}")
            for label, row in runs.items():
                print(f"{labels}, seed {seed}: {label}: {row}", flush=True)
            results["runs"].append({"labels": labels, "seed": seed, "rows": runs})
    write_results(args.out, results)


def json_layers(folder):
    return json.loads((folder / "report.json").read_text())["layers"]


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
