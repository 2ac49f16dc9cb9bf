"""Static int8 calibration on all-MiniLM-L6-v2: ONNX Runtime's QDQ with each calibration method
(minmax, percentile, entropy) on the same 16 batches of calibration sentences, beside dynamic
int8, scored as benchmarks/realistic.py scores (eval sentences' embedding cosine to the float
original, nearest-neighbour agreement), with the seconds calibration took.

    python benchmarks/calibration.py --out benchmarks/results/calibration.json
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

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
    found = sentences()  # realistic.py's splits: calibration, eval
    tokenizer = hf.load_tokenizer(folder)
    # one length for every calibration batch, as compress's own calibration feeds have (the data set's
    # padding): ONNX Runtime's histogram calibrators (percentile, entropy) need one shape
    calibration = text_feeds(tokenizer, found[:16 * 32], 32, names, padding="max_length")
    eval_feeds = text_feeds(tokenizer, found[1024:1536], 64, names)
    results = {"model": str(folder), "rows": []}
    with tempfile.TemporaryDirectory(prefix="compress-calibration-") as tmp:
        path = exported_original(folder, eval_feeds, Path(tmp) / "original.onnx")
        reference = embed(str(path), eval_feeds)
        settings = [("dynamic", quantize.QuantizeSection(mode="dynamic"))] + [
            (f"static {m}", quantize.QuantizeSection(mode="static", calibrate_method=m))
            for m in ("minmax", "percentile", "entropy")]
        for label, cfg in settings:
            out = Path(tmp) / "q.onnx"
            start = time.perf_counter()
            quantize.quantize(path, out, cfg, calibration if cfg.mode == "static" else None)
            row = {"label": label, "seconds": round(time.perf_counter() - start, 1),
                   **quality(reference, embed(str(out), eval_feeds)), "onnx_bytes": out.stat().st_size}
            results["rows"].append(row)
            print(json.dumps(row), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print("| int8 | cosine | neighbours | quantize s |\n|---|---|---|---|")
    for row in results["rows"]:
        print(f"| {row['label']} | {row['cosine']:.4f} | {row['neighbours']:.3f} | {row['seconds']:.0f} |")


if __name__ == "__main__":
    main()
