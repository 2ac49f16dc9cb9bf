"""Int8 settings on all-MiniLM-L6-v2, each scored as benchmarks/realistic.py scores (the eval
sentences' embedding cosine to the float original, nearest-neighbour agreement) with its file size:

  - calibration: ONNX Runtime's static QDQ with each calibration method (minmax, percentile,
    entropy) on the same 16 batches of 32 calibration sentences, beside dynamic int8, with the
    seconds each quantization took;
  - tables: `quantize.tables` (the lookup tables in 4 bits) at each block size, asymmetric and
    symmetric, on top of dynamic int8;
  - where the time of int8 of the original goes: ONNX Runtime's profiler, kernel time by operator
    type at batch 8, 64 tokens, 2 threads (what a faster-than-int8 model would have to cut).

    python benchmarks/int8_settings.py --out benchmarks/results/int8_settings.json
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import profile  # noqa: E402
from realistic import embed, encoder_script, exported_original, quality, text_feeds  # noqa: E402

from compress import quantize  # noqa: E402

NAMES = ["input_ids", "attention_mask", "token_type_ids"]


def settings() -> dict[str, list[tuple[str, quantize.QuantizeSection]]]:
    calibration = [("dynamic", quantize.QuantizeSection(mode="dynamic"))] + [
        (f"static {m}", quantize.QuantizeSection(mode="static", calibrate_method=m))
        for m in ("minmax", "percentile", "entropy")]
    tables = [(f"int8 + tables block {b}{' symmetric' if sym else ''}",
               quantize.QuantizeSection(mode="dynamic", tables={"bits": 4, "block_size": b, "symmetric": sym}))
              for b in (32, 64, 128, 256) for sym in (False, True)]
    return {"calibration": calibration, "tables": tables}


def main() -> None:
    args, folder, found, tokenizer = encoder_script(__doc__)  # realistic.py's splits: calibration, then eval
    # one length for every calibration batch, as compress's own calibration batches keep the data
    # set's padding: ONNX Runtime's histogram calibrators (percentile, entropy) need one shape
    calibration = text_feeds(tokenizer, found[:16 * 32], 32, NAMES, padding="max_length")
    eval_lines = found[1024:1536]
    feeds = text_feeds(tokenizer, eval_lines, 64, NAMES)
    results: dict = {"model": str(folder)}
    with tempfile.TemporaryDirectory(prefix="compress-int8-") as tmp:
        path = exported_original(folder, feeds, Path(tmp) / "original.onnx")
        reference = embed(str(path), feeds)
        results["float_bytes"] = size = path.stat().st_size
        for part, rows in settings().items():
            results[part] = []
            for label, cfg in rows:
                out = Path(tmp) / "q.onnx"
                start = time.perf_counter()
                quantize.quantize(path, out, cfg, calibration if cfg.mode == "static" else None)
                row = {"label": label, "seconds": round(time.perf_counter() - start, 1),
                       **quality(reference, embed(str(out), feeds)), "onnx_bytes": out.stat().st_size,
                       "smaller": round(size / out.stat().st_size, 3)}
                results[part].append(row)
                print(part, json.dumps(row), flush=True)
        int8 = Path(tmp) / "int8.onnx"
        quantize.quantize(path, int8, quantize.QuantizeSection(mode="dynamic"), None)
        feed = text_feeds(tokenizer, eval_lines[:8], 8, NAMES, padding="max_length")[0]
        results["int8_kernel_time_share"] = profile(int8, feed, threads=2, top=8)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print("| setting | ONNX MB | x smaller than float | cosine | neighbours | quantize s |\n|---|---|---|---|---|---|")
    for row in results["calibration"] + results["tables"]:
        print(f"| {row['label']} | {row['onnx_bytes'] / 1e6:.1f} | {row['smaller']:.2f} | {row['cosine']:.4f} | "
              f"{row['neighbours']:.3f} | {row['seconds']:.0f} |")
    print("int8 of the original, kernel time by op type at batch 8, 64 tokens:",
          json.dumps(results["int8_kernel_time_share"]))


if __name__ == "__main__":
    main()
