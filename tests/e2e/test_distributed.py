"""Two processes with gloo (torchrun, CPU) end where one process ends, for svd and for a method
with regularizers (PELA). The model has no BatchNorm: per-process batch statistics are the one
thing DDP on the CPU cannot share (SyncBatchNorm needs CUDA)."""
import json
import os
import subprocess
import sys

import pytest

RECIPES = {
    "svd": """\
        stages: [{method: svd, rank: 8, targets: {include: ["blocks.*"]}}]
        """,
    "pela": """\
        stages: [{method: pela, gamma: 1.0}]
        """,
}
COMMON = """\
seed: 0
data: {train: bundled:digits-tokens/train, eval: bundled:digits-tokens/test, batch_size: 32}
finetune: {steps: 12, lr: 0.001}
bench: {batch_sizes: [1], warmup: 1, runs: 2}
"""


@pytest.mark.parametrize("method", sorted(RECIPES))
def test_two_processes_match_one(method, transformer_model, write_recipe, tmp_path):
    import textwrap

    recipe = write_recipe(COMMON + textwrap.dedent(RECIPES[method]))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    reports = {}
    for nproc in (1, 2):
        out = tmp_path / f"out{nproc}"
        done = subprocess.run([sys.executable, "-m", "compress", "apply", "-r", str(recipe), str(transformer_model),
                               "--out", str(out), "-q", "--nproc", str(nproc)],
                              capture_output=True, text=True, env=env, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        reports[nproc] = json.loads((out / "report.json").read_text())
        assert not (tmp_path / f".out{nproc}.resume").exists()
    one, two = reports[1], reports[2]
    assert two["finetune"]["steps"] == one["finetune"]["steps"] == 12
    assert two["finetune"]["final_loss"] == pytest.approx(one["finetune"]["final_loss"], rel=1e-3)
    assert two["compressed"]["metric"]["value"] == pytest.approx(one["compressed"]["metric"]["value"], abs=1 / 360 + 1e-9)
    assert [r["name"] for r in two["layers"]] == [r["name"] for r in one["layers"]]  # no "module." prefix
