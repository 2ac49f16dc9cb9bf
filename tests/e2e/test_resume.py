"""A killed run resumes to the same result; Ctrl-C saves and exits 130; divergence keeps the last
good state."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from compress.checkpoint import load_model

RECIPE = """\
seed: 3
data: {train: bundled:digits/train, eval: bundled:digits/test, batch_size: 32}
stages:
  - method: trp
    scheme: spatial
    energy: 0.95
finetune: {steps: 60, optimizer: sgd, lr: 0.02, checkpoint_every: 4}
bench: {batch_sizes: [1], warmup: 1, runs: 2}
"""


def _run_until(recipe, model, out, signal_at: str):
    """Run apply in a subprocess that sends itself a signal right after a fine-tuning step (the
    loop's test hook), so the test never races the run: returns (exit code, stderr)."""
    env = {**os.environ, "COMPRESS_TEST_SIGNAL_AT_STEP": signal_at}
    proc = subprocess.run([sys.executable, "-m", "compress", "apply", "-r", str(recipe), str(model), "--out", str(out),
                           "-q"], capture_output=True, text=True, env=env, timeout=600)
    return proc.returncode, proc.stderr


def _state(out):
    return out.with_name(f".{out.name}.resume") / "state.pt"


def test_killed_run_resumes_to_the_same_result(digits_model, write_recipe, run_cli, tmp_path):
    recipe = write_recipe(RECIPE)
    straight = tmp_path / "straight"
    assert run_cli("apply", "-r", recipe, digits_model, "--out", straight, "-q").exit_code == 0
    killed = tmp_path / "killed"
    code, _ = _run_until(recipe, digits_model, killed, "14:KILL")  # the last state saved is step 12's
    assert code == -signal.SIGKILL
    state = _state(killed)
    assert not killed.exists() and torch.load(state, weights_only=True)["loop"]["step"] == 12
    result = run_cli("apply", "-r", recipe, digits_model, "--out", killed, "-q", "--resume")
    assert result.exit_code == 0, result.stderr
    a, b = load_model(straight / "model.pt").model.state_dict(), load_model(killed / "model.pt").model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bitwise, on the CPU
    reports = [json.loads((d / "report.json").read_text()) for d in (straight, killed)]
    assert reports[0]["compressed"]["metric"] == reports[1]["compressed"]["metric"]
    assert not state.parent.exists()  # finished: the saved state is gone
    assert not [p for p in tmp_path.iterdir() if ".partial" in p.name]  # no work folder of any naming


@pytest.mark.parametrize("name,code,words", [("INT", 130, "interrupted at step 5 of 60"),
                                             ("TERM", 143, "terminated (SIGTERM) at step 5 of 60")])
def test_ctrl_c_and_sigterm_save_and_exit(name, code, words, digits_model, write_recipe, run_cli, tmp_path):
    recipe = write_recipe(RECIPE)
    out = tmp_path / "out"
    returncode, stderr = _run_until(recipe, digits_model, out, f"5:{name}")
    assert returncode == code, stderr
    assert words in stderr and "rerun with --resume" in stderr and stderr.count("\n") == 1, stderr
    assert torch.load(_state(out), weights_only=True)["loop"]["step"] == 5  # saved at the signal, not at step 4
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]
    result = run_cli("apply", "-r", recipe, digits_model, "--out", out, "-q", "--resume")
    assert result.exit_code == 0, result.stderr


def test_resume_refuses_a_state_from_another_run(digits_model, write_recipe, run_cli, tmp_path):
    recipe = write_recipe(RECIPE)
    out = tmp_path / "out"
    result = run_cli("apply", "-r", recipe, digits_model, "--out", out, "-q", "--resume")
    assert result.exit_code == 2 and "no saved state" in result.stderr
    state = out.with_name(".out.resume") / "state.pt"
    state.parent.mkdir()
    torch.save(["not", "a", "state"], state)
    result = run_cli("apply", "-r", recipe, digits_model, "--out", out, "-q", "--resume")
    assert result.exit_code == 2 and "not a resume state written by compress" in result.stderr, result.stderr
    keys = ("loop", "model", "optimizer", "scheduler", "torch_rng", "methods")
    torch.save({"identity": {"seed": 99}, **{k: {} for k in keys}}, state)
    result = run_cli("apply", "-r", recipe, digits_model, "--out", out, "-q", "--resume")
    assert result.exit_code == 2 and "saved by a different run" in result.stderr


def test_divergence_keeps_the_last_good_state(digits_model, write_recipe, run_cli, tmp_path):
    recipe = write_recipe(RECIPE.replace("lr: 0.02, checkpoint_every: 4", "lr: 1.0e+6, checkpoint_every: 1")
                          .replace("method: trp", "method: svd").replace("    scheme: spatial\n    energy: 0.95\n", ""))
    out = tmp_path / "out"
    result = run_cli("apply", "-r", recipe, digits_model, "--out", out, "-q")
    assert result.exit_code == 2 and "diverged at step" in result.stderr and "last good state" in result.stderr
    state = torch.load(out.with_name(".out.resume") / "state.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert not out.exists()


def test_every_epoch_draws_a_new_data_order():
    from compress.data import Dataset
    from compress.finetune import finetune
    from compress.methods.base import Method
    from compress.recipe import FinetuneSection

    class Recorder(Method):
        name = "recorder"

        def __init__(self):
            super().__init__(None, 0)
            self.seen = []

        def loss(self, model, batch, outputs):
            self.seen.append(batch["index"].tolist())
            return {}

    data = Dataset({"x": torch.randn(16, 3), "index": torch.arange(16), "target": torch.randn(16, 1)}, "toy")
    recorder = Recorder()
    model = torch.nn.Linear(3, 1)
    finetune(model, data, ["x"], "target", FinetuneSection(epochs=3, lr=0.01), 8, methods=[recorder], progress=False)
    epochs = [sum(recorder.seen[i:i + 2], []) for i in (0, 2, 4)]
    assert all(sorted(e) == list(range(16)) for e in epochs)  # each epoch sees every sample once
    assert epochs[0] != epochs[1] != epochs[2]  # in a new order each time


def test_a_stopped_sweep_leaves_nothing_and_does_not_offer_a_resume(digits_model, write_recipe, tmp_path):
    recipe = write_recipe("""\
data: {train: bundled:digits/train, calibration: bundled:digits/calibration, eval: bundled:digits/test, batch_size: 32}
stages: [{method: svd, scheme: spatial, targets: {types: [Conv2d], include: ["layer*"], exclude: ["*.shortcut.*"]}}]
finetune: {steps: 60, optimizer: sgd, lr: 0.02, checkpoint_every: 4}
bench: {batch_sizes: [1], warmup: 1, runs: 2, baselines: []}
budget: {macs: 1.5, probes: 1}
""")
    env = {**os.environ, "COMPRESS_TEST_SIGNAL_AT_STEP": "3:TERM"}
    proc = subprocess.run([sys.executable, "-m", "compress", "sweep", "-r", str(recipe), str(digits_model),
                           "--budgets", "1.5", "--out", str(tmp_path / "sweep"), "-q"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 143, proc.stderr
    assert "terminated (SIGTERM) at step 3" in proc.stderr and "--resume" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml"]  # no sweep, work, lock or resume folder
