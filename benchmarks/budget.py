"""Budgeted allocation against the best uniform rule at the same cost, and against AIMET.

Side by side in one run, from the same originals (test metric and agreement with the original):
  - quality: digits ResNet, svd (spatial scheme, the block convs of recipes/svd.yaml), MAC budgets
    1.94x, 2.43x and 3x, no fine-tuning: `budget: {macs: X}` with the layer sensitivity measured
    on the model's output at 1, 3 (the default at this size) and every candidate rank (`probes`),
    with and without the swap search that refines the choice on the model (`search`, default auto),
    as squared error (the default) or as the KL of the class distributions (`measure: metric`),
    scaled by the layer's own energy (`sensitivity: layer`), and weighted by the output's
    gradients (`sensitivity: gradient`); against uniform svd at the largest `ratio` whose MACs are
    at least as low (a grid of ratios, 0.01 apart, planned, not guessed); and, with
    `--aimet-python`, AIMET's greedy compression-ratio selection (spatial SVD, MAC cost, 10
    candidates per layer, evaluated on the calibration split; benchmarks/aimet_greedy.py, run in
    its own environment) at the same targets. Digits Transformer, afm on the blocks' Linear
    layers, MAC budgets 2x and 3x, same comparison (no AIMET: its SVD is for convolutions);
  - finetuned: the default budget (with fine-tuning: `recovery` 1, no swap search) and the
    least-damage allocation that was the default before (`recovery: 0`, with the swap search and
    without it) against the uniform rule at the same MACs, all with the same 3 epochs of
    fine-tuning (AdamW, cosine), 6 seeds each and their mean, on both models;
  - ctr: the CTR DeepFM, afm on its embedding tables and hidden MLP layers (recipes/afm.yaml's
    targets), `params` budgets 2x and 4x, test AUC, without and with 1 epoch of fine-tuning;
  - measured: the digits ResNet at `speedup: 1.3` and `1.6` at batch 32 against uniform svd at the
    same *measured* speedup (every model measured in one interleaved benchmark); and the digits
    Transformer with `quantize: dynamic` at `speedup: 1.5` against int8 of the original and
    uniform afm + int8 (speedups against the float original, as the report counts them);
  - envelope: group_envelope `keep: auto` at `params: 1.5` and `2` against the uniform `keep` at
    the same parameters, with the same shortened fine-tuning (4 epochs, then 2 after removal);
  - realistic: `speedup: 1.3` and `1.6` on the same architecture at width 384 (untrained: only the
    latency prediction is judged), and with `quantize: dynamic` 1.3x, 3.1x and 3.5x (int8 of the
    original alone is about 3x there), beside int8 of the original;
  - scale: the time `compress plan` takes to allocate a 100-layer model (the digits Transformer's
    architecture, 17 blocks of 6 Linear layers, untrained): a MAC budget with the default probes
    (auto: 1 per layer at 102 layers) and with 3, and a speedup budget (1.15x: at width 64 and batch
    32 no allocation reaches much more) with a cold and then a warm latency cache.

    python benchmarks/budget.py [--only PART] [--aimet-python /tmp/aimetenv/bin/python] \
        [--out benchmarks/results/budget.json]
"""
from __future__ import annotations

import copy
import os
import tempfile

import torch
from common import arguments, scratch, write_results

import compress
from compress import bench, exporting
from compress.checkpoint import load_model
from compress.data import load_source
from compress.errors import CompressError
from compress.examples.training import train_ctr_deepfm, train_digits_resnet, train_digits_transformer
from compress.finetune import predict
from compress.metrics import auc

RESNET = {"data": {"calibration": "bundled:digits/calibration", "eval": "bundled:digits/test", "batch_size": 64},
          "bench": {"batch_sizes": [1, 32], "baselines": []}}
RESNET_STAGE = {"method": "svd", "targets": {"types": ["Conv2d"], "include": ["layer*"], "exclude": ["*.shortcut.*"]},
                "scheme": "spatial"}
TRANSFORMER = {"data": {"calibration": "bundled:digits-tokens/calibration", "eval": "bundled:digits-tokens/test",
                        "batch_size": 64}, "bench": {"batch_sizes": [1, 32], "baselines": []}}
TRANSFORMER_STAGE = {"method": "afm", "targets": {"types": ["Linear"], "include": ["blocks.*"]}}
CTR = {"data": {"calibration": "bundled:ctr/calibration", "eval": "bundled:ctr/test", "batch_size": 256},
       "inputs": [{"name": "fields", "shape": [8], "dtype": "int64", "dynamic_axes": {}}],
       "bench": {"batch_sizes": [1, 256], "baselines": []}}
CTR_STAGE = {"method": "afm", "targets": {"include": ["embeddings.*", "mlp.0", "mlp.2"]}}
FINETUNE = {"epochs": 3, "optimizer": "adamw", "lr": 0.001, "schedule": "cosine"}
SEEDS = tuple(range(6))  # fine-tuned runs: 3 seeds left differences of one test digit in 360 to chance
MODELS = {  # label: (base recipe, stage, input names, bundled data, metric)
    "digits ResNet, svd spatial": (RESNET, RESNET_STAGE, ["image"], "digits", "accuracy"),
    "digits Transformer, afm": (TRANSFORMER, TRANSFORMER_STAGE, ["tokens", "mask"], "digits-tokens", "accuracy"),
    "CTR DeepFM, afm": (CTR, CTR_STAGE, ["fields"], "ctr", "auc"),
}


def quality(model, names, data, metric="accuracy") -> tuple:
    """(outputs on the test split, the test metric)."""
    test = load_source(f"bundled:{data}/test")
    outputs = predict(model, test, names, 1024)
    if metric == "auc":
        return outputs, auc(outputs.reshape(-1), test.tensors["target"])
    return outputs, float((outputs.argmax(1) == test.tensors["target"]).float().mean())


def agreement(outputs, reference, metric) -> float:
    """Top-1 agreement with the original (classes), or the correlation of the scores (a click model)."""
    if metric == "auc":
        return float(torch.corrcoef(torch.stack([outputs.reshape(-1), reference.reshape(-1)]))[0, 1])
    return float((outputs.argmax(1) == reference.argmax(1)).float().mean())


def uniform_at(model_path, base: dict, stage: dict, ratio_target: float, original: int,
               kind: str = "macs") -> tuple[dict, float]:
    """The largest uniform `ratio` whose planned MACs (params) are at most original / ratio_target."""
    for step in range(95, 0, -1):
        ratio = step / 100
        rows = compress.plan(model_path, {**base, "stages": [{**stage, "ratio": ratio}]})
        saved = sum(r[f"{kind}_before"] - r[f"{kind}_after"] for r in rows)
        if original / (original - saved) >= ratio_target:
            return {**stage, "ratio": ratio}, ratio
    raise SystemExit(f"no uniform ratio reaches {ratio_target}x {kind}")


def run(model_path, recipe: dict, label: str, reference) -> dict:
    base, _, names, data, metric = MODELS[label]
    result = compress.apply(model_path, copy.deepcopy(recipe))
    outputs, value = quality(result.model, names, data, metric)
    sample = result.context.sample
    return {metric: round(value, 4), "agreement": round(agreement(outputs, reference, metric), 4),
            "macs": bench.count_macs(result.model, sample), "params": bench.count_params(result.model),
            "budget_s": round(result.context.timings.get("budget", 0.0), 2)}


def compare(label, model_path, budgets, variants, kind: str = "macs", finetune: dict | None = None,
            seeds: tuple[int, ...] = (0,)) -> list[dict]:
    """Each budget variant and the uniform rule at the same MACs (params), optionally fine-tuned
    (with several seeds: one row per seed, then the mean)."""
    if len(seeds) > 1:
        rows = [dict(row, seed=seed) for seed in seeds
                for row in compare(label, model_path, budgets, variants, kind, finetune, (seed,))]
        return rows + mean_rows(rows)
    base, stage, names, data, metric = MODELS[label]
    base = {**base, "seed": seeds[0]}
    if finetune:
        base = {**base, "data": {**base["data"], "train": f"bundled:{data}/train"}, "finetune": finetune}
    original = load_model(model_path).model
    reference, value = quality(original, names, data, metric)
    sample = tuple(load_source(f"bundled:{data}/test").head(1)[n] for n in names)
    counts = {"macs": bench.count_macs(original, sample), "params": bench.count_params(original)}
    tuned = " + fine-tuning" if finetune else ""
    rows = [{"model": label, "run": "original", metric: round(value, 4), **counts}]
    for target in budgets:
        for name, extra in variants.items():
            recipe = {**base, "stages": [stage], "budget": {kind: target, **extra}}
            row = run(model_path, recipe, label, reference)
            rows.append({"model": label, "budget": target, "run": f"budget ({name}){tuned}", **row,
                         f"{kind}_ratio": round(counts[kind] / row[kind], 3)})
            print(rows[-1], flush=True)
        uniform, ratio = uniform_at(model_path, base, stage, target, counts[kind], kind)
        row = run(model_path, {**base, "stages": [uniform]}, label, reference)
        rows.append({"model": label, "budget": target, "run": f"uniform ratio {ratio}{tuned}", **row,
                     f"{kind}_ratio": round(counts[kind] / row[kind], 3)})
        print(rows[-1], flush=True)
    return rows


def mean_rows(rows: list[dict]) -> list[dict]:
    """One row per (model, budget, run) with the metrics averaged over the seeds."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["model"], row.get("budget"), row["run"]), []).append(row)
    out = []
    for (model, target, run), same in groups.items():
        keys = [k for k in ("accuracy", "agreement", "auc") if k in same[0]]
        out.append({"model": model, "budget": target, "run": run, "seeds": len(same), "mean": True,
                    **{k: round(sum(r[k] for r in same) / len(same), 4) for k in keys}})
        print(out[-1], flush=True)
    return out


def aimet(python: str, model_path, budgets) -> list[dict]:
    """AIMET's greedy selection in its own environment (benchmarks/aimet_greedy.py)."""
    import json
    import subprocess
    from pathlib import Path

    here = Path(__file__).resolve().parent
    out = scratch() / "aimet.json"
    env = {**os.environ, "PYTHONPATH": f"{here / 'aimet_stub'}{os.pathsep}{here.parent}"}
    subprocess.run([python, str(here / "aimet_greedy.py"), "--model", str(model_path), "--macs",
                    ",".join(str(b) for b in budgets), "--out", str(out)], check=True, env=env,
                   stdout=subprocess.DEVNULL)
    rows = json.loads(out.read_text())["rows"]
    for row in rows:
        print(row, flush=True)
    return rows


def measured(resnet, transformer) -> list[dict]:
    """Budgeted vs uniform at the same measured speedup, every model timed in one interleaved run."""
    rows = []
    for label, path, budgets, extra, ratios in (
            ("digits ResNet, svd spatial", resnet, (1.3, 1.6), {}, [r / 10 for r in range(2, 10)]),
            ("digits Transformer, afm", transformer, (1.05, 1.5),
             {"quantize": {"mode": "dynamic", "max_metric_drop": 1, "min_agreement": 0}},
             [r / 10 for r in range(2, 10)])):
        base, stage, names, data, metric = MODELS[label]
        base = {**base, "bench": {"batch_sizes": [32], "baselines": []}, **extra}
        work = scratch()  # one folder per model
        original = load_model(path).model
        reference, value = quality(original, names, data, metric)
        models = {}  # label -> (result, row)
        for target in budgets:
            try:
                result = compress.apply(path, {**base, "stages": [stage], "budget": {"speedup": target}})
            except CompressError as exc:  # out of reach: a finding, not a crash
                rows.append({"model": label, "run": f"budget speedup {target}", "error": str(exc)})
                print(rows[-1], flush=True)
                continue
            report = compress.export(result, work / f"budget-{target}").to_json()
            models[f"budget speedup {target}"] = (work / f"budget-{target}" / "model.onnx", result,
                                                  {"predicted": report["budget"]["predicted"],
                                                   "rounds": report["budget"]["rounds"]})
        for ratio in ratios:
            result = compress.apply(path, {**base, "stages": [{**stage, "ratio": ratio}]})
            compress.export(result, work / f"uniform-{ratio}")
            models[f"uniform ratio {ratio}"] = (work / f"uniform-{ratio}" / "model.onnx", result, {})
        onnx_original = work / "original.onnx"
        sample = result.context.sample
        exporting.export_onnx(original.eval(), sample, names, str(onnx_original), 17,
                              exporting.dynamic_axes_for(names, sample, {}, True))
        paths = {"original": str(onnx_original)}
        if extra:  # int8 of the original, the one-line alternative
            from compress.quantize import QuantizeSection, quantize

            quantize(onnx_original, work / "original.int8.onnx", QuantizeSection())
            paths["int8 of the original"] = str(work / "original.int8.onnx")
        paths.update({k: str(v[0]) for k, v in models.items()})
        test = load_source(f"bundled:{data}/test")
        feed = exporting.to_feed(names, tuple(test.head(32)[n] for n in names))
        timing = bench.measure(paths, {32: feed}, threads=1, warmup=10, runs=50)
        for name, path_onnx in paths.items():
            if name == "original":
                continue
            outputs = exporting.onnx_predict(path_onnx, test, names, 1024, 1)
            value = (auc(outputs.reshape(-1), test.tensors["target"]) if metric == "auc" else
                     float((outputs.argmax(1) == test.tensors["target"]).float().mean()))
            row = {"model": label, "run": name + (" + int8" if extra and name != "int8 of the original" else ""),
                   "speedup": timing.speedup[name]["32"], "speedup_ci": timing.speedup_ci[name]["32"],
                   metric: round(value, 4), "agreement": round(agreement(outputs, reference, metric), 4),
                   **(models[name][2] if name in models else {})}
            rows.append(row)
            print(row, flush=True)
    return rows


def envelope(resnet) -> list[dict]:
    """group_envelope keep: auto against the uniform keep at the same parameters, same training."""
    base = {"data": {**RESNET["data"], "train": "bundled:digits/train"}, "bench": RESNET["bench"],
            "finetune": {"epochs": 4, "optimizer": "sgd", "lr": 0.01, "momentum": 0.9, "weight_decay": 0.0001,
                         "schedule": "cosine"}}
    stage = {"method": "group_envelope", "round_to": 4, "lambda": 3.0, "post_finetune": 2}
    original = load_model(resnet).model
    reference, value = quality(original, ["image"], "digits")
    params = bench.count_params(original)
    untrained = {**base, "finetune": {"epochs": 0}}
    rows = []
    for target in (1.5, 2.0):
        keep = None
        for step in range(99, 5, -1):  # the largest uniform keep reaching the target, pruned without training
            result = compress.apply(resnet, {**untrained, "stages": [{**stage, "keep": step / 100,
                                                                        "post_finetune": 0}]})
            if params / bench.count_params(result.model) >= target:
                keep = step / 100
                break
        for name, chosen in (("budget (keep: auto)", {"keep": "auto"}), (f"uniform keep {keep}", {"keep": keep})):
            recipe = {**base, "stages": [{**stage, **chosen}], **({"budget": {"params": target}}
                                                                   if chosen["keep"] == "auto" else {})}
            result = compress.apply(resnet, recipe)
            outputs, accuracy = quality(result.model, ["image"], "digits")
            rows.append({"model": "digits ResNet, group_envelope", "budget": target, "run": name,
                         "accuracy": round(accuracy, 4), "agreement": round(agreement(outputs, reference,
                                                                                      "accuracy"), 4),
                         "params_ratio": round(params / bench.count_params(result.model), 3)})
            print(rows[-1], flush=True)
    return rows


REALISTIC = {"dim": 384, "depth": 4, "heads": 6, "hidden": 1536}  # as benchmarks/compose.py's realistic width


def realistic() -> list[dict]:
    """Latency budgets on the digits Transformer's architecture at width 384 (untrained: only the
    latency prediction is judged here), float and with `quantize: dynamic`: the prediction against
    the shipped model's measurement, and int8 of the original beside it."""
    from compress.checkpoint import save_checkpoint
    from compress.examples.digits_transformer import FACTORY, digits_transformer

    work = scratch()
    torch.manual_seed(0)
    path = work / "wide.pt"
    save_checkpoint(path, digits_transformer(**REALISTIC), FACTORY, REALISTIC,
                    inputs=[{"name": "tokens", "shape": [64], "dtype": "int64"},
                            {"name": "mask", "shape": [64], "dtype": "int64"}])
    rows = []
    int8 = {"quantize": {"mode": "dynamic", "max_metric_drop": 1, "min_agreement": 0}}
    # int8 of the original is already ~3x faster at this width: its targets start above that
    for label, extra, targets in (("float", {}, (1.3, 1.6)), ("int8 (quantize: dynamic)", int8, (1.3, 3.1, 3.5))):
        for target in targets:
            recipe = {**TRANSFORMER, "bench": {"batch_sizes": [32], "baselines": ["int8_original"]},
                      "stages": [{"method": "svd", "targets": TRANSFORMER_STAGE["targets"]}],
                      "budget": {"speedup": target}, **extra}
            try:
                result = compress.apply(path, recipe)
            except CompressError as exc:
                rows.append({"model": "Transformer width 384", "shipped": label, "budget": target, "error": str(exc)})
                print(rows[-1], flush=True)
                continue
            report = compress.export(result, work / f"{label[:4]}-{target}").to_json()
            b = report["budget"]
            baseline = report["baselines"]["int8_original"]
            rows.append({"model": "Transformer width 384", "shipped": label, "budget": target,
                         "predicted": b["predicted"], "measured_before_finetuning": b["history"][-1],
                         "measured": b["measured"], "speedup_ci": report["ratios"]["speedup_ci"]["32"],
                         "met": b["met"], "rounds": b["rounds"], "ops_measured": b.get("ops_measured"),
                         "int8_original_speedup": baseline.get("speedup", {}).get("32"),
                         "budget_s": round(report["timings_s"].get("budget", 0), 1)})
            print(rows[-1], flush=True)
    return rows


def allocation_time() -> list[dict]:
    """Seconds to plan a budget on a 102-Linear model (plan only: calibration, pricing, sensitivity,
    knapsack); the latency budget twice, the second time from the cache."""
    import time

    from compress.checkpoint import save_checkpoint
    from compress.examples.digits_transformer import FACTORY, digits_transformer

    work = scratch()
    kwargs = {"depth": 17}
    torch.manual_seed(0)
    model = digits_transformer(**kwargs)
    path = work / "deep.pt"
    save_checkpoint(path, model, FACTORY, kwargs, inputs=[{"name": "tokens", "shape": [64], "dtype": "int64"},
                                                         {"name": "mask", "shape": [64], "dtype": "int64"}])
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        os.environ["COMPRESS_CACHE_DIR"] = cache
        for label, section in (("macs 2x, default probes", {"macs": 2.0}),
                               ("macs 2x, probes 3", {"macs": 2.0, "probes": 3}),
                               ("speedup 1.15x, default probes, cold cache", {"speedup": 1.15}),
                               ("speedup 1.15x, default probes, warm cache", {"speedup": 1.15})):
            recipe = {**TRANSFORMER, "stages": [{"method": "svd", "targets": TRANSFORMER_STAGE["targets"]}],
                      "budget": section}
            start = time.perf_counter()
            rows_planned = compress.plan(path, recipe)
            seconds = time.perf_counter() - start
            allocated = sum(1 for r in rows_planned if "budget_cost" in r)
            rows.append({"budget": label, "layers": len(rows_planned), "allocated": allocated,
                         "plan_s": round(seconds, 1)})
            print(rows[-1], flush=True)
        del os.environ["COMPRESS_CACHE_DIR"]
    return rows


def main() -> None:
    parts = ["quality", "finetuned", "ctr", "measured", "envelope", "realistic", "scale"]
    parser = arguments(__doc__)
    parser.add_argument("--only", choices=parts, action="append", help="run only these parts (repeatable)")
    parser.add_argument("--aimet-python", default=None, help="a Python with aimet-torch (see aimet_greedy.py)")
    args = parser.parse_args()
    chosen = args.only or parts
    work = scratch()
    torch.manual_seed(0)
    resnet, transformer, ctr = work / "resnet.pt", work / "dt.pt", work / "ctr.pt"
    train_digits_resnet(resnet, progress=False)
    train_digits_transformer(transformer, progress=False)
    results = {}
    variants = {"output, 1 probe": {"probes": 1}, "output, 3 probes (default)": {}, "no swap search": {"search": 0},
                "output, every candidate": {"probes": 24}, "output, metric's divergence": {"measure": "metric"},
                "gradient": {"sensitivity": "gradient"}, "layer energy": {"sensitivity": "layer"}}
    if "quality" in chosen:
        rows = compare("digits ResNet, svd spatial", resnet, [1.94, 2.43, 3.0], variants)
        if args.aimet_python:
            rows += aimet(args.aimet_python, resnet, [1.94, 2.43, 3.0])
        rows += compare("digits Transformer, afm", transformer, [2.0, 3.0], variants)
        results["quality"] = rows
        write_results(args.out, results)  # after each part: a later part's failure keeps the earlier ones
    if "finetuned" in chosen:  # the default, and the variants that might survive fine-tuning better
        tuned = {"default": {}, "recovery: 0 (least damage, search)": {"recovery": 0},
                 "recovery: 0, search: 0": {"recovery": 0, "search": 0}}
        rows = compare("digits ResNet, svd spatial", resnet, [2.43, 3.0], tuned, finetune=FINETUNE, seeds=SEEDS)
        rows += compare("digits Transformer, afm", transformer, [2.0, 3.0], tuned, finetune=FINETUNE, seeds=SEEDS)
        results["finetuned"] = rows
        write_results(args.out, results)
    if "ctr" in chosen:
        train_ctr_deepfm(ctr, progress=False)
        rows = compare("CTR DeepFM, afm", ctr, [2.0, 4.0], {"default": {}}, kind="params")
        rows += compare("CTR DeepFM, afm", ctr, [2.0, 4.0], {"default": {}}, kind="params",
                        finetune={**FINETUNE, "epochs": 1})
        results["ctr"] = rows
        write_results(args.out, results)
    if "measured" in chosen:
        results["measured"] = measured(resnet, transformer)
        write_results(args.out, results)
    if "envelope" in chosen:
        results["envelope"] = envelope(resnet)
        write_results(args.out, results)
    if "realistic" in chosen:
        results["realistic"] = realistic()
        write_results(args.out, results)
    if "scale" in chosen:
        results["allocation_time"] = allocation_time()
    write_results(args.out, results)


if __name__ == "__main__":
    main()
