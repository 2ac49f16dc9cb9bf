"""Models as third-party libraries ship them: a CTR model that returns click probabilities, and a
sentence-encoder-shaped model that returns an embedding in a dict.

1. The CTR example with a final sigmoid (as CTR libraries end their models), compressed with
   recipes/afm.yaml's stages without fine-tuning and with one epoch of fine-tuning on the labels,
   once with the output kind detected (`finetune.output: auto`, probabilities) and once forced to
   `logits` (what compress did before: binary cross-entropy "with logits" on probabilities).
   Reported: AUC in torch and from model.onnx, and how many distinct outputs remain on the test set.
2. The digits Transformer's encoder as a sentence encoder (`{"embedding": pooled features}`, picked
   with `model.output_key`), svd at rank 8 on its blocks, no labels: cosine and nearest-neighbour
   agreement with the original, without fine-tuning and after cosine distillation.

    python benchmarks/third_party.py [--out benchmarks/results/third_party.json]
"""
from __future__ import annotations

import json

import torch
from common import arguments, load_recipe_dict, run_recipe, scratch, write_results
from torch import nn

from compress.checkpoint import load_model
from compress.data import load_source
from compress.examples.training import train_ctr_deepfm, train_digits_transformer
from compress.exporting import onnx_predict


class ClickProbability(nn.Module):
    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self.out = nn.Sigmoid()

    def forward(self, fields):
        return self.out(self.base(fields))


class SentenceEncoder(nn.Module):
    """The digits Transformer without its classification head: a pooled embedding, in a dict."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, tokens, mask):
        m = self.model
        position = (m.rows + m.cols).reshape(1, -1, m.rows.shape[-1])
        x = m.embed(tokens) + position[:, : tokens.shape[1]]
        for block in m.blocks:
            x = block(x, mask)
        weights = mask.unsqueeze(-1).to(x.dtype)
        return {"tokens": x, "embedding": (m.norm(x) * weights).sum(1) / weights.sum(1).clamp_min(1.0)}


def ctr(work):
    base = work / "ctr.pt"
    train_ctr_deepfm(base, progress=False)
    model = work / "ctr-probability.pt"
    torch.save(ClickProbability(load_model(base).model), model)
    afm = load_recipe_dict("afm.yaml")
    for stage in afm["stages"]:
        stage["targets"]["include"] = [f"base.{p}" for p in stage["targets"]["include"]]
    test = load_source("bundled:ctr/test")
    rows = {}
    for label, epochs, output in [("afm, no fine-tuning", 0, "auto"), ("afm + 1 epoch, output auto", 1, "auto"),
                                  ("afm + 1 epoch, output forced to logits (before)", 1, "logits")]:
        document = json.loads(json.dumps(afm))
        document["finetune"] = {**document["finetune"], "epochs": epochs, "output": output}
        document["gates"] = {}
        document["bench"] = {"batch_sizes": [1, 256], "baselines": []}
        name = f"ctr-{epochs}-{output}"
        report = run_recipe(document, model, work, name, trust_checkpoint=True)
        outputs = onnx_predict(work / name / "model.onnx", test, ["fields"], 1024)
        rows[label] = {"output_kind": report["output"]["kind"], "auc_torch": report["compressed"]["metric"]["value"],
                       "auc_onnx": report["compressed"]["onnx_metric"]["value"],
                       "auc_original": report["original"]["metric"]["value"],
                       "distinct_outputs": int(torch.unique(outputs).numel()), "test_rows": len(test),
                       "outputs_at_exactly_0_or_1": int(((outputs == 0) | (outputs == 1)).sum())}
        print(label, rows[label], flush=True)
    return rows


def encoder(work):
    base = work / "dt.pt"
    train_digits_transformer(base, progress=False)
    model = work / "encoder.pt"
    torch.save(SentenceEncoder(load_model(base).model), model)
    rows = {}
    for label, steps in [("svd rank 8, no fine-tuning", 0), ("svd rank 8 + 200 steps of cosine distillation", 200)]:
        for metric in ("cosine", "neighbors"):
            document = {"model": {"output_key": "embedding"},
                        "data": {"train": "bundled:digits-tokens-unlabeled/train",
                                 "eval": "bundled:digits-tokens-unlabeled/test", "metric": metric},
                        "stages": [{"method": "svd", "rank": 8, "targets": {"include": ["model.blocks.*"]}}],
                        "finetune": {"steps": steps, "lr": 0.001, "distill": {"weight": 1.0, "loss": "cosine"}},
                        "bench": {"batch_sizes": [1], "runs": 5, "baselines": []}}
            report = run_recipe(document, model, work, f"enc-{steps}-{metric}", trust_checkpoint=True)
            rows.setdefault(label, {})[metric] = report["compressed"]["metric"]["value"]
            rows[label]["params_ratio"] = report["ratios"]["params"]
        print(label, rows[label], flush=True)
    return rows


def main() -> None:
    parser = arguments(__doc__)
    args = parser.parse_args()
    work = scratch()
    write_results(args.out, {"ctr_probability": ctr(work), "sentence_encoder": encoder(work)})


if __name__ == "__main__":
    main()
