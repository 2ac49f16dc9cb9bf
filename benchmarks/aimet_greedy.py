"""AIMET's greedy per-layer compression-ratio selection (spatial SVD, MAC cost) on the digits ResNet:
the peer `benchmarks/budget.py` compares `budget: {macs: X}` with. Not a dependency of compress:
run it with an environment that has aimet-torch, e.g.

    python3 -m venv /tmp/aimetenv && . /tmp/aimetenv/bin/activate
    pip install torch==2.13.0 && pip install --no-deps aimet-torch==2.42.0
    pip install jinja2 pyyaml "bokeh<=3.6.3" cvxpy holoviews hvplot jsonschema matplotlib networkx \
        onnx onnx_ir onnxscript osqp pandas psutil pybind11 safetensors scikit-learn scipy tensorboard \
        tqdm onnxruntime click pydantic torch-pruning
    PYTHONPATH=benchmarks/aimet_stub:. python benchmarks/aimet_greedy.py --model resnet.pt --macs 2.43

`benchmarks/aimet_stub` stands in for torchvision: the index's torchvision wheels for torch 2.13
need CUDA libraries (the CPU build of torch cannot load their operators), and aimet-torch imports
torchvision only to name a few of its classes in lookup tables; spatial SVD never calls it.

Settings as the issue's figure: every block conv (`layer*`, not the shortcuts, the stem or the
classifier) may be compressed, 10 candidate ratios per layer, each evaluated on the calibration
split (accuracy), target = compressed / original MACs. The MACs and accuracy printed are counted
by compress on the result, as for compress's own runs.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch

from compress import bench
from compress.checkpoint import load_model
from compress.data import load_source
from compress.finetune import predict


def accuracy(model, data) -> tuple[torch.Tensor, float]:
    logits = predict(model, data, ["image"], 1024)
    return logits, float((logits.argmax(1) == data.tensors["target"]).float().mean())


def main() -> None:
    from aimet_common.defs import CompressionScheme, CostMetric, GreedySelectionParameters
    from aimet_torch.compress import ModelCompressor
    from aimet_torch.defs import SpatialSvdParameters

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--macs", default="1.94,2.43,3", help="MAC ratios original/compressed, comma-separated")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    calibration, test = load_source("bundled:digits/calibration"), load_source("bundled:digits/test")
    sample = (test.tensors["image"][:1],)
    rows = []
    for ratio in [float(x) for x in args.macs.split(",")]:
        model = load_model(args.model).model.eval()
        reference, base = accuracy(model, test)
        original_macs = bench.count_macs(model, sample)
        ignore = [m for n, m in model.named_modules()
                  if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and not (n.startswith("layer") and "shortcut" not in n)]

        def evaluate(m, iterations, use_cuda=False):
            return accuracy(m.eval(), calibration)[1]

        greedy = GreedySelectionParameters(target_comp_ratio=1 / ratio, num_comp_ratio_candidates=10)
        params = SpatialSvdParameters(SpatialSvdParameters.Mode.auto,
                                      SpatialSvdParameters.AutoModeParams(greedy, modules_to_ignore=ignore))
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as folder:  # AIMET writes its eval-score pickles under ./data
            here = os.getcwd()
            os.chdir(folder)
            try:
                compressed, _ = ModelCompressor.compress_model(model, evaluate, 1, (1, 1, 8, 8),
                                                               CompressionScheme.spatial_svd, CostMetric.mac, params)
            finally:
                os.chdir(here)
        seconds = time.perf_counter() - start
        logits, acc = accuracy(compressed.eval(), test)
        macs = bench.count_macs(compressed, sample)
        rows.append({"model": "digits ResNet, svd spatial", "budget": ratio, "run": "AIMET greedy (spatial SVD, MACs)",
                     "accuracy": round(acc, 4), "agreement": round(float((logits.argmax(1) == reference.argmax(1))
                                                                          .float().mean()), 4),
                     "macs": macs, "mac_ratio": round(original_macs / macs, 3), "budget_s": round(seconds, 2),
                     "original_accuracy": round(base, 4)})
        print(rows[-1], flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
