"""A killed run resumes to the same result; Ctrl-C saves and exits 130; divergence keeps the last
good state."""
import json
import os
import signal
import subprocess
import sys
import time

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


def _start(recipe, model, out):
    return subprocess.Popen([sys.executable, "-m", "compress", "apply", "-r", str(recipe), str(model), "--out", str(out),
                             "-q"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_state(out, min_step, proc, timeout=120):
    state = out.with_name(f".{out.name}.resume") / "state.pt"
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
        if state.exists():
            try:
                if torch.load(state, weights_only=True)["loop"]["step"] >= min_step:
                    return state
            except Exception:  # being replaced this very moment
                pass
        time.sleep(0.05)
    raise AssertionError("no saved state appeared")


def test_killed_run_resumes_to_the_same_result(digits_model, write_recipe, run_cli, tmp_path):
    recipe = write_recipe(RECIPE)
    straight = tmp_path / "straight"
    assert run_cli("apply", "-r", recipe, digits_model, "--out", straight, "-q").exit_code == 0
    killed = tmp_path / "killed"
    proc = _start(recipe, digits_model, killed)
    state = _wait_for_state(killed, 12, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not killed.exists() and state.exists()
    result = run_cli("apply", "-r", recipe, digits_model, "--out", killed, "-q", "--resume")
    assert result.exit_code == 0, result.stderr
    a, b = load_model(straight / "model.pt").model.state_dict(), load_model(killed / "model.pt").model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bitwise, on the CPU
    reports = [json.loads((d / "report.json").read_text()) for d in (straight, killed)]
    assert reports[0]["compressed"]["metric"] == reports[1]["compressed"]["metric"]
    assert not state.parent.exists()  # finished: the saved state is gone
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]


def test_ctrl_c_saves_and_exits_130(digits_model, write_recipe, run_cli, tmp_path):
    recipe = write_recipe(RECIPE)
    out = tmp_path / "out"
    proc = _start(recipe, digits_model, out)
    state = _wait_for_state(out, 4, proc)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "rerun with --resume" in stderr and stderr.count("\n") == 1
    assert state.exists() and not out.exists()
    result = run_cli("apply", "-r", recipe, digits_model, "--out", out, "-q", "--resume")
    assert result.exit_code == 0, result.stderr


def test_resume_refuses_a_state_from_another_run(digits_model, write_recipe, run_cli, tmp_path):
    recipe = write_recipe(RECIPE)
    out = tmp_path / "out"
    result = run_cli("apply", "-r", recipe, digits_model, "--out", out, "-q", "--resume")
    assert result.exit_code == 2 and "no saved state" in result.stderr
    state = out.with_name(".out.resume") / "state.pt"
    state.parent.mkdir()
    torch.save({"identity": {"seed": 99}}, state)
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
