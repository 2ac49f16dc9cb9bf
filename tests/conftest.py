import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from compress.cli import cli
from compress.examples.digits import train_digits_resnet

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
    from compress.examples.ctr import train_ctr_deepfm

    path = tmp_path_factory.mktemp("ctr") / "ctr.pt"
    train_ctr_deepfm(path, epochs=1, progress=False)
    return path


@pytest.fixture(scope="session")
def transformer_model(tmp_path_factory) -> Path:
    """The digits Transformer example, trained for three epochs."""
    from compress.examples.digits_transformer import train_digits_transformer

    path = tmp_path_factory.mktemp("dt") / "dt.pt"
    train_digits_transformer(path, epochs=3, progress=False)
    return path


@pytest.fixture
def example_for(digits_model, ctr_model, transformer_model):
    """The bundled example each shipped recipe is written for."""
    by_recipe = {"afm": ctr_model, "pela": transformer_model, "pela-unlabeled": transformer_model}
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
