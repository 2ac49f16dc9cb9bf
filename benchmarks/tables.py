"""4-bit lookup tables on all-MiniLM-L6-v2: `quantize.tables` block sizes, asymmetric and
symmetric, on top of dynamic int8, against the float original: file size and the eval sentences'
embedding cosine and nearest-neighbour agreement (as benchmarks/realistic.py measures them).
Then where the time of int8 of the original goes: ONNX Runtime's profiler, kernel time by operator
type at batch 8, 64 tokens, 2 threads (what a faster-than-int8 model would have to cut).

    python benchmarks/tables.py --out benchmarks/results/tables.json
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import profile  # noqa: E402
from corpus import sentences  # noqa: E402
from realistic import embed, exported_original, minilm_folder, quality, text_feeds  # noqa: E402

from compress import hf, quantize  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(2)
    folder = minilm_folder()
    names = ["input_ids", "attention_mask", "token_type_ids"]
    eval_lines = sentences()[1024:1536]  # realistic.py's eval split
    tokenizer = hf.load_tokenizer(folder)
    feeds = text_feeds(tokenizer, eval_lines, 64, names)
    results = {"model": str(folder), "rows": []}
    with tempfile.TemporaryDirectory(prefix="compress-tables-") as tmp:
        path = exported_original(folder, feeds, Path(tmp) / "original.onnx")
        reference = embed(str(path), feeds)
        size = path.stat().st_size
        settings = [("int8 only", None)] + [(f"int8 + tables block {b}{' symmetric' if sym else ''}",
                                             {"bits": 4, "block_size": b, "symmetric": sym})
                                            for b in (32, 64, 128, 256) for sym in (False, True)]
        for label, tables in settings:
            out = Path(tmp) / "q.onnx"
            quantize.quantize(path, out, quantize.QuantizeSection(mode="dynamic", tables=tables), None)
            row = {"label": label, **quality(reference, embed(str(out), feeds)), "onnx_bytes": out.stat().st_size,
                   "smaller": round(size / out.stat().st_size, 3)}
            results["rows"].append(row)
            print(json.dumps(row), flush=True)
        results["float_bytes"] = size
        int8 = Path(tmp) / "int8.onnx"
        quantize.quantize(path, int8, quantize.QuantizeSection(mode="dynamic"), None)
        feed = text_feeds(tokenizer, eval_lines[:8], 8, names, padding="max_length")[0]
        results["int8_kernel_time_share"] = profile(int8, feed, threads=2, top=8)
        print("int8 of the original, kernel time by op type at batch 8, 64 tokens:",
              json.dumps(results["int8_kernel_time_share"]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print("| setting | ONNX MB | x smaller than float | cosine | neighbours |\n|---|---|---|---|---|")
    for row in results["rows"]:
        print(f"| {row['label']} | {row['onnx_bytes'] / 1e6:.1f} | {row['smaller']:.2f} | {row['cosine']:.4f} | "
              f"{row['neighbours']:.3f} |")


if __name__ == "__main__":
    main()
