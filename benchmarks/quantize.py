"""Int8 stacked on compression, against int8 of the original, on the three bundled examples.

For each example one shipped recipe with a `quantize:` section is run through `compress apply`,
which measures, side by side in one interleaved run: the original, int8 of the original (ONNX
Runtime's quantization of the original, same settings), the compressed float model and the
compressed int8 model: ONNX size, metric, ORT p50 at two batch sizes. Then ORT's profiler splits
each model's kernel time by operator type at the larger batch, to say which ops dominate.

  - digits ResNet: recipes/svd.yaml, static quantization (QDQ, Conv included);
  - digits Transformer: recipes/pela.yaml, dynamic quantization (MatMul, Gemm), and static QDQ
    (each factor's input quantized once, with calibrated ranges);
  - CTR DeepFM: recipes/afm.yaml, dynamic quantization.

    python benchmarks/quantize.py [--out benchmarks/results/quantize.json]
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

from common import arguments, load_recipe_dict, profile, run_recipe, scratch, write_results

from compress import exporting as export, quantize
from compress.checkpoint import load_model
from compress.data import load_source, split_batch
from compress.examples.training import train_ctr_deepfm, train_digits_resnet, train_digits_transformer
from compress.quantize import QuantizeSection

CASES = [
    # label, recipe, quantize mode, trainer, bundled data, input names, batch sizes
    ("digits ResNet", "svd.yaml", "static", train_digits_resnet, "digits", ["image"], [1, 32]),
    ("digits Transformer", "pela.yaml", "dynamic", train_digits_transformer, "digits-tokens", ["tokens", "mask"], [1, 32]),
    # the factorized Linears in static QDQ: the activation between two factors quantized once, not per call
    ("digits Transformer", "pela.yaml", "static", train_digits_transformer, "digits-tokens", ["tokens", "mask"], [1, 32]),
    ("CTR DeepFM", "afm.yaml", "dynamic", train_ctr_deepfm, "ctr", ["fields"], [1, 256]),
]


def main() -> None:
    parser = arguments(__doc__)
    args = parser.parse_args()
    work = scratch()
    results = {}
    for label, recipe, mode, train, dataset, names, batches in CASES:
        model = work / f"{recipe}.pt"
        train(model, progress=False)
        document = load_recipe_dict(recipe)
        document["quantize"] = {"mode": mode}
        document["bench"] = {**document.get("bench", {}), "batch_sizes": batches}
        document["gates"] = {}
        report = run_recipe(document, model, work, f"{recipe.removesuffix('.yaml')}-{mode}")
        out = work / f"{recipe.removesuffix('.yaml')}-{mode}"
        base = report["baselines"]["int8_original"]
        rows = {"original": report["original"], "int8 of the original": {**base, "params": report["original"]["params"]},
                "compressed float": report["compressed_float"], "compressed int8": report["compressed"]}
        # the original and its int8 version again, for the profiler (apply keeps only the compressed files)
        with tempfile.TemporaryDirectory() as tmp:
            original = load_model(model).model
            data = load_source(f"bundled:{dataset}/test")
            batch = split_batch(data.head(batches[-1]), names, "target")[0]
            original_onnx, int8_onnx = Path(tmp) / "original.onnx", Path(tmp) / "original.int8.onnx"
            export.export_onnx(original, tuple(t[:1] for t in batch), names, original_onnx, 17,
                               export.dynamic_axes_for(names, batch, {}, True))
            calibration = [export.to_feed(names, split_batch(b, names, "target")[0])
                           for b, _ in zip(load_source(f"bundled:{dataset}/calibration").batches(64), range(16))]
            quantize.quantize(original_onnx, int8_onnx, QuantizeSection(mode=mode), calibration)
            feed = export.to_feed(names, batch)
            profiles = {name: profile(path, feed) for name, path in [
                ("original", original_onnx), ("int8 of the original", int8_onnx),
                ("compressed float", out / "model.float.onnx"), ("compressed int8", out / "model.onnx")]}
        key = f"{label} ({recipe}, {mode})"
        results[key] = {
            "recipe": recipe, "mode": mode, "verdict_rows": {
                name: {"onnx_bytes": row["onnx_bytes"], "metric": (row.get("metric") or {}).get("value"),
                       "p50_ms": {bs: row["latency_ms"][bs]["p50"] for bs in row["latency_ms"]}}
                for name, row in rows.items()},
            "speedup_over_original": {"int8 of the original": base["speedup"], "compressed int8": report["ratios"]["speedup"]},
            "speedup_ci_over_original": {"int8 of the original": base["speedup_ci"],
                                         "compressed int8": report["ratios"]["speedup_ci"]},
            "compressed_int8_over_int8_original": base["compressed_speedup"],
            "fidelity": report["quantization"]["fidelity"], "quantized_ops": report["quantization"]["quantized_ops"],
            "kernel_time_share_at_largest_batch": profiles,
        }
        print(f"\n## {label} ({recipe}, {mode})\n")
        print("| model | ONNX bytes | metric | " + " | ".join(f"p50 ms b{bs}" for bs in batches) + " |")
        print("|---|---|---|" + "---|" * len(batches))
        for name, row in results[key]["verdict_rows"].items():
            print(f"| {name} | {row['onnx_bytes']:,} | {row['metric']} | "
                  + " | ".join(f"{row['p50_ms'][str(bs)]:.3f}" for bs in batches) + " |")
        print("compressed int8 over int8 of the original:", json.dumps(base["compressed_speedup"]))
        for name, shares in profiles.items():
            print(f"kernel time, {name}: " + ", ".join(f"{op} {share:.0%}" for op, share in shares.items()))
    write_results(args.out, results)


if __name__ == "__main__":
    main()
