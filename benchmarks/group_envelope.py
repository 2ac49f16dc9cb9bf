"""Group envelope sparsity against magnitude (L2) channel pruning at the same channel counts, on
the bundled CNN, side by side: same original model, same seed, same fine-tuning epochs.

  - group_envelope by recipes/group_envelope.yaml (8 epochs of proximal fine-tuning, hard
    projection, removal, 3 post-finetune epochs);
  - the peer: Torch-Pruning's MagnitudePruner (group L2 importance) removing the same number of
    channels from every group at once, then 11 epochs of the same fine-tuning;
  - test accuracy, MACs, and ONNX Runtime latency at batch 1 and 32 against the MAC ratio.

    python benchmarks/group_envelope.py [--out benchmarks/results/group_envelope.json]
"""
from __future__ import annotations

from pathlib import Path

import torch
from common import (
    arguments,
    example_model,
    load_recipe_dict,
    run_recipe,
    scratch,
    write_results,
)

from compress import bench, exporting as export
from compress.checkpoint import load_model
from compress.data import load_source
from compress.finetune import finetune, predict
from compress.metrics import score
from compress.recipe import FinetuneSection


def magnitude_peer(model_path: Path, report: dict, recipe: dict, work: Path) -> dict:
    import torch_pruning as tp

    torch.manual_seed(recipe.get("seed", 0))
    model = load_model(model_path).model
    train, test = load_source("bundled:digits/train"), load_source("bundled:digits/test")
    sample = (train.head(1)["image"],)
    rows = [r for r in report["layers"] if r["action"] == "prune"]
    ratios = {model.get_submodule(r["name"]): 1 - r["kept"] / r["channels"] for r in rows}
    pruner = tp.pruner.MagnitudePruner(model, sample, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                       pruning_ratio_dict=ratios, ignored_layers=[model.fc])
    pruner.step()
    epochs = recipe["finetune"]["epochs"] + recipe["stages"][0].get("post_finetune", 0)
    cfg = FinetuneSection.model_validate({**recipe["finetune"], "epochs": epochs})
    finetune(model, train, ["image"], "target", cfg, recipe["data"]["batch_size"], progress=False, seed=recipe.get("seed", 0))
    model.eval()
    accuracy = score("accuracy", predict(model, test, ["image"], 256), test.tensors["target"], None)
    onnx_path = work / "peer.onnx"
    export.export_onnx(model, sample, ["image"], onnx_path, 17, {"image": {0: "batch"}, "output": {0: "batch"}})
    return {"accuracy": accuracy, "macs": bench.count_macs(model, sample), "params": bench.count_params(model),
            "onnx": str(onnx_path)}


def main() -> None:
    parser = arguments(__doc__)
    args = parser.parse_args()
    work = scratch()
    model, summary = example_model(work)
    recipe = load_recipe_dict("group_envelope.yaml")
    recipe["gates"] = {}
    report = run_recipe(recipe, model, work, "group-envelope")
    peer = magnitude_peer(model, report, recipe, work)
    # the peer's latency, measured beside the original in the same way as the report's
    test = load_source("bundled:digits/test")
    feeds = {bs: export.to_feed(["image"], (test.head(bs)["image"],)) for bs in (1, 32)}
    original_onnx = work / "original.onnx"
    export.export_onnx(load_model(model).model, (test.head(1)["image"],), ["image"], original_onnx, 17,
                       {"image": {0: "batch"}, "output": {0: "batch"}})
    lat = bench.latency({"original": str(original_onnx), "envelope": str(work / "group-envelope" / "model.onnx"),
                         "peer": peer["onnx"]}, feeds, threads=1, warmup=10, runs=100)
    o = report["original"]
    rows = [("group_envelope", report["compressed"]["metric"]["value"], report["compressed"]["macs"],
             report["compressed"]["params"], lat["envelope"]),
            ("magnitude L2 peer (Torch-Pruning)", peer["accuracy"], peer["macs"], peer["params"], lat["peer"])]
    print(f"original digits ResNet: test accuracy {100 * o['metric']['value']:.2f}%, {o['macs']:,} MACs, "
          f"{o['params']:,} params; kept channels per group: "
          + ", ".join(f"{r['name']} {r['kept']}/{r['channels']} (prox zeroed {r['prox_zeroed']}, projection cut {r['projection_cut']})"
                      for r in report["layers"] if r["action"] == "prune") + "\n")
    print("| run | test accuracy | change (points) | MACs | params | ORT speedup b1 | ORT speedup b32 | speedup b32 / MAC ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for name, acc, macs, params, latency in rows:
        ratio = o["macs"] / macs
        s1 = lat["original"]["1"]["p50"] / latency["1"]["p50"]
        s32 = lat["original"]["32"]["p50"] / latency["32"]["p50"]
        print(f"| {name} | {100 * acc:.2f}% | {100 * (acc - o['metric']['value']):+.2f} | {ratio:.2f}x fewer | "
              f"{o['params'] / params:.2f}x fewer | {s1:.2f}x | {s32:.2f}x | {s32 / ratio:.2f} |")
    write_results(args.out, {"example": summary, "report": report, "peer": peer, "latency": lat})


if __name__ == "__main__":
    main()
