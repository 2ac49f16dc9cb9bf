import os
import textwrap
from pathlib import Path

# Threads: every test process and every process it spawns gets a fixed, small number of compute
# threads (COMPRESS_TEST_THREADS, default 1), set before torch is imported. Left alone, each one
# takes every core, and beside other jobs on a 2-core machine the suite ran 15-20x slower
# (OpenMP threads spinning against each other). Spawned processes inherit the environment.
THREADS = os.environ.setdefault("COMPRESS_TEST_THREADS", "1")
for _name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_name] = THREADS
# latency budgets cache op latencies under the user's cache folder: the tests use their own, empty
# one, removed when the run ends
import atexit  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

os.environ["COMPRESS_CACHE_DIR"] = tempfile.mkdtemp(prefix="compress-test-cache-")
atexit.register(shutil.rmtree, os.environ["COMPRESS_CACHE_DIR"], True)

import pytest  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from click.testing import CliRunner  # noqa: E402

torch.set_num_threads(int(THREADS))
torch.set_num_interop_threads(1)

from compress.cli import cli
from compress.examples.training import train_digits_resnet

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def digits_model(tmp_path_factory) -> Path:
    """The bundled example, trained briefly (the tests need a real model, not a good one)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "digits.pt"
    train_digits_resnet(path, epochs=3, width=16, progress=False)
    return path


@pytest.fixture(scope="session")
def ctr_model(tmp_path_factory) -> Path:
    """The CTR example, trained for one epoch."""
    from compress.examples.training import train_ctr_deepfm

    path = tmp_path_factory.mktemp("ctr") / "ctr.pt"
    train_ctr_deepfm(path, epochs=1, progress=False)
    return path


@pytest.fixture(scope="session")
def transformer_model(tmp_path_factory) -> Path:
    """The digits Transformer example, trained for three epochs."""
    from compress.examples.training import train_digits_transformer

    path = tmp_path_factory.mktemp("dt") / "dt.pt"
    train_digits_transformer(path, epochs=3, progress=False)
    return path


def shortened(recipe: Path, tmp_path: Path, steps: int = 8) -> Path:
    """A shipped recipe cut to a few fine-tuning steps, one post-finetune epoch and a short
    benchmark, for the fast tier; `pytest -m slow` runs the recipes at full length."""
    document = yaml.safe_load(recipe.read_text())
    document["finetune"]["steps"] = steps
    for stage in document["stages"]:
        if stage.get("post_finetune"):
            stage["post_finetune"] = 1
    document["bench"] = {**document.get("bench", {}), "batch_sizes": [1, 8], "warmup": 1, "runs": 5}
    path = tmp_path / f"short-{recipe.name}"
    path.write_text(yaml.safe_dump(document))
    return path


@pytest.fixture(params=["short", pytest.param("full", marks=pytest.mark.slow)])
def shipped(request, tmp_path):
    """shipped("trp.yaml"): a copy of the shipped recipe (tests may add to it; the repository's file
    is never written), shortened (default tier) or as shipped (slow tier)."""
    def copy(name: str) -> Path:
        if request.param == "short":
            return shortened(REPO / "recipes" / name, tmp_path)
        path = tmp_path / f"full-{name}"
        path.write_text((REPO / "recipes" / name).read_text())
        return path

    return copy


@pytest.fixture
def apply_shipped(shipped, run_cli, tmp_path):
    """apply_shipped("trp.yaml", model) -> (output folder, report.json as a dict), after checking the
    run succeeded. The tests' models are trained briefly: the metric gate is loosened, not the checks."""
    import json

    def run(name: str, model: Path):
        out = tmp_path / Path(name).stem
        result = run_cli("apply", "--recipe", shipped(name), model, "--out", out, "-q", "--max-metric-drop", "1")
        assert result.exit_code == 0, result.stderr
        return out, json.loads((out / "report.json").read_text())

    return run


@pytest.fixture
def example_for(digits_model, ctr_model, transformer_model):
    """The bundled example each shipped recipe is written for."""
    by_recipe = {"afm": ctr_model, "pela": transformer_model, "pela-unlabeled": transformer_model,
                 "afm-pela": transformer_model, "group_envelope-transformer": transformer_model,
                 "group_envelope-depth": transformer_model}
    return lambda recipe: by_recipe.get(Path(recipe).stem, digits_model)


FAST_RECIPE = """\
data:
  train: bundled:digits/train
  calibration: bundled:digits/calibration
  eval: bundled:digits/test
  batch_size: 64
stages:
  - method: svd
    targets: {{types: [Conv2d], include: ["layer*"], exclude: ["*.shortcut.*"]}}
    scheme: spatial
    ratio: 0.5
finetune: {{steps: {steps}, lr: 0.001}}
bench: {{batch_sizes: [1, 8], warmup: 1, runs: 3}}
{extra}
"""


@pytest.fixture
def write_recipe(tmp_path):
    def write(text: str | None = None, *, steps: int = 4, extra: str = "", name: str = "recipe.yaml") -> Path:
        path = tmp_path / name
        body = FAST_RECIPE.format(steps=steps, extra=extra) if text is None else textwrap.dedent(text)
        path.write_text(body)
        return path

    return write


@pytest.fixture
def run_cli():
    def run(*args):
        return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)

    return run
