"""Calibration and fine-tuning cost at a realistic width, against the plain computation.

A Transformer encoder of realistic width (4 blocks, width 384, FFN 1536, 6 heads, 64 tokens:
7.2M parameters in the blocks), built by the digits Transformer's factory, on the digits tokens.
AFM targets every Linear of the blocks (query/key/value, output, FFN up and down). Side by side in
one run, over the same calibration batches:
  - a plain forward pass (no hooks), the floor;
  - AFM's statistics as they were: every layer's *output* moments, float64 products;
  - as they are now: input moments for layers wider at the output (shared by query/key/value),
    float32 products accumulated in float64;
and the largest relative difference of the covariances between the two paths. Then fine-tuning:
samples/s of compress's loop (svd at rank 96 on the blocks, output distillation from the frozen
original) against a hand-written step of the same student (forward, teacher forward without
gradients, MSE, backward, AdamW step), same batches.

    python benchmarks/scale.py [--batches 16] [--out benchmarks/results/scale.json]
"""
from __future__ import annotations

import time

import torch
from common import arguments, write_results

from compress.data import load_source
from compress.examples.digits_transformer import digits_transformer
from compress.methods.afm import collect_moments


def finetune_throughput(model, data, batch_size: int, steps: int = 20) -> dict:
    import copy

    import torch.nn.functional as F

    from compress.data import Dataset
    from compress.finetune import finetune
    from compress.layers import factorize
    from compress.methods.base import replace_module
    from compress.recipe import FinetuneSection

    subset = Dataset({k: v for k, v in data.head(batch_size * steps).items() if k != "target"}, "tokens")
    student = copy.deepcopy(model)
    for name, module in list(student.named_modules()):
        if name.startswith("blocks.") and isinstance(module, torch.nn.Linear):
            replace_module(student, name, factorize(module, 96))
    teacher = copy.deepcopy(model).eval()
    cfg = FinetuneSection(steps=steps, lr=1e-4, schedule="constant", distill={"weight": 1.0, "loss": "mse"})
    loop = finetune(copy.deepcopy(student), subset, ["tokens", "mask"], "target", cfg, batch_size,
                    teacher=teacher, progress=False)
    plain = copy.deepcopy(student).train()
    optimizer = torch.optim.AdamW(plain.parameters(), lr=1e-4)
    start = time.perf_counter()
    for batch in subset.batches(batch_size):
        with torch.no_grad():
            reference = teacher(batch["tokens"], batch["mask"])
        loss = F.mse_loss(plain(batch["tokens"], batch["mask"]), reference)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    plain_s = time.perf_counter() - start
    plain_rate = batch_size * steps / plain_s
    return {"finetune_loop_samples_per_s": round(loop.samples_per_s, 1), "plain_step_samples_per_s": round(plain_rate, 1),
            "finetune_loop_cost_vs_plain": round(plain_rate / loop.samples_per_s, 2)}


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--batches", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = digits_transformer(dim=384, depth=4, heads=6, hidden=1536).eval()
    names = [n for n, m in model.named_modules() if n.startswith("blocks.") and isinstance(m, torch.nn.Linear)]
    data = load_source("bundled:digits-tokens/train")
    batches_list = [(b["tokens"], b["mask"]) for b, _ in zip(data.batches(args.batch_size), range(args.batches))]
    batches = lambda: iter(batches_list)  # noqa: E731
    params = sum(p.numel() for n, p in model.named_parameters() if n.startswith("blocks."))

    def timed(fn, repeat=2):
        best = float("inf")
        for _ in range(repeat):
            start = time.perf_counter()
            out = fn()
            best = min(best, time.perf_counter() - start)
        return best, out

    with torch.no_grad():
        forward_s, _ = timed(lambda: [model(*b) for b in batches_list])
    old_s, old = timed(lambda: collect_moments(model, names, batches, derive=False, exact=True))
    new_s, new = timed(lambda: collect_moments(model, names, batches))
    worst = max(float((new[n].covariance() - old[n].covariance()).norm() / old[n].covariance().norm()) for n in names)
    results = {"block_params": params, "layers": len(names), "batches": args.batches, "batch_size": args.batch_size,
               "tokens_per_batch": args.batch_size * 64, "forward_s": round(forward_s, 3),
               "afm_output_moments_float64_s": round(old_s, 3), "afm_now_s": round(new_s, 3),
               "ratio_before": round(old_s / forward_s, 2), "ratio_now": round(new_s / forward_s, 2),
               "speedup": round(old_s / new_s, 2), "max_relative_covariance_difference": worst,
               "threads": torch.get_num_threads()}
    results.update(finetune_throughput(model, data, args.batch_size))
    for k, v in results.items():
        print(f"{k}: {v}")
    write_results(args.out, results)


if __name__ == "__main__":
    main()
