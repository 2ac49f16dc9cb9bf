import pytest
import torch
from safetensors.torch import save_file

from compress import checkpoint
from compress.checkpoint import load_model, save_checkpoint
from compress.errors import UserError
from compress.examples.digits import FACTORY, digits_resnet
from compress.methods.svd import Svd, SvdStage
from compress.bench import profile_layers


def _model():
    torch.manual_seed(0)
    return digits_resnet(width=8).eval()


X = torch.rand(3, 1, 8, 8)


def test_safe_checkpoint_round_trip(tmp_path):
    model = _model()
    save_checkpoint(tmp_path / "m.pt", model, FACTORY, {"width": 8}, inputs=[{"name": "image", "shape": [1, 8, 8]}])
    loaded = load_model(tmp_path / "m.pt")
    assert loaded.factory == FACTORY and loaded.inputs[0]["name"] == "image"
    assert torch.equal(loaded.model(X), model(X))


def test_compressed_model_reloads_from_factory_and_edits_without_pickle(tmp_path):
    model = _model()
    method = Svd(SvdStage(method="svd", rank=3, scheme="spatial"), 0)
    method.plan(model, profile_layers(model, (X[:1],)))
    method.prepare(model)
    save_checkpoint(tmp_path / "c.pt", model, FACTORY, {"width": 8}, edits=method.edits())
    # the file loads with weights_only=True: no code runs
    raw = torch.load(tmp_path / "c.pt", weights_only=True)
    assert raw["edits"][0]["op"] == "factorize"
    loaded = load_model(tmp_path / "c.pt")
    assert torch.allclose(loaded.model(X), model(X), atol=1e-6)


def test_state_dict_and_safetensors_need_a_factory(tmp_path):
    model = _model()
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    save_file(model.state_dict(), str(tmp_path / "w.safetensors"))
    for name in ("sd.pt", "w.safetensors"):
        with pytest.raises(UserError, match="model.factory"):
            load_model(tmp_path / name)
        loaded = load_model(tmp_path / name, FACTORY, {"width": 8})
        assert torch.equal(loaded.model(X), model(X))


def test_pickled_module_needs_trust(tmp_path):
    model = _model()
    torch.save(model, tmp_path / "whole.pt")
    with pytest.raises(UserError, match="--trust-checkpoint"):
        load_model(tmp_path / "whole.pt")
    loaded = load_model(tmp_path / "whole.pt", trust=True)
    assert loaded.pickled and torch.equal(loaded.model(X), model(X))


@pytest.mark.parametrize("content,message", [
    (None, "model file not found"),
    (b"", "model file is empty"),
    (b"this is not a checkpoint at all", "not a checkpoint"),
])
def test_unreadable_files(tmp_path, content, message):
    path = tmp_path / "bad.pt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(UserError, match=message):
        load_model(path)


def test_truncated_checkpoint(tmp_path):
    save_checkpoint(tmp_path / "m.pt", _model(), FACTORY, {"width": 8})
    data = (tmp_path / "m.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="truncated"):
        load_model(tmp_path / "cut.pt")


def test_factory_that_does_not_import_or_fit(tmp_path):
    model = _model()
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    with pytest.raises(UserError, match="cannot import 'no_such_pkg.mod'"):
        load_model(tmp_path / "sd.pt", "no_such_pkg.mod:make", trusted=("no_such_pkg",))
    with pytest.raises(UserError, match="never trusted"):  # the tool's own modules: only its factories, by name
        load_model(tmp_path / "sd.pt", "compress.examples.digits:nope", trusted=("compress.examples",))
    with pytest.raises(UserError, match="expected 'package.module:callable'"):
        load_model(tmp_path / "sd.pt", "compress.examples.digits")
    with pytest.raises(UserError, match=r"weight 'stem.0.weight' has shape \[8, 1, 3, 3\], the model expects \[16"):
        load_model(tmp_path / "sd.pt", FACTORY, {"width": 16})
    state = model.state_dict()
    state["extra.weight"] = state.pop("fc.weight")
    torch.save(state, tmp_path / "renamed.pt")
    with pytest.raises(UserError, match="missing 'fc.weight'; unexpected 'extra.weight'"):
        load_model(tmp_path / "renamed.pt", FACTORY, {"width": 8})


def test_unknown_format_version_is_rejected(tmp_path):
    save_checkpoint(tmp_path / "m.pt", _model(), FACTORY, {"width": 8})
    raw = torch.load(tmp_path / "m.pt", weights_only=True)
    raw["version"] = 99
    torch.save(raw, tmp_path / "v99.pt")
    with pytest.raises(UserError, match="version 99 is not supported"):
        load_model(tmp_path / "v99.pt")


def test_save_is_atomic_on_failure(tmp_path, monkeypatch):
    def broken_save(obj, f, *a, **k):
        f.write(b"half")
        raise error

    monkeypatch.setattr(checkpoint.torch, "save", broken_save)
    # a full disk as the OS says it and as torch's zip writer says it: one line, nothing left behind
    for error in (OSError(28, "No space left on device"), RuntimeError("[enforce fail at inline_container.cc:858] "
                                                                          ". PytorchStreamWriter failed writing file")):
        with pytest.raises(UserError, match="cannot write"):
            save_checkpoint(tmp_path / "m.pt", _model(), FACTORY, {})
        assert list(tmp_path.iterdir()) == []
