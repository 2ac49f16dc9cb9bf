"""Hostile input is normal input: a checkpoint, compression.json, recipe or data file from a
stranger never runs code, never allocates without bound, never touches a file the tool did not
write; every such failure is exit 2, one line, nothing written."""
import fcntl
import json
import os
import sys

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import compress
from compress.checkpoint import save_artifact, save_checkpoint
from compress.cli import main
from compress.errors import Terminated, UserError
from compress.examples.digits import FACTORY, digits_resnet

INPUTS = [{"name": "image", "shape": [1, 8, 8], "dtype": "float32"}]


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A digits ResNet of width 8 as a safe checkpoint and as an artifact folder."""
    root = tmp_path_factory.mktemp("small")
    torch.manual_seed(0)
    model = digits_resnet(width=8).eval()
    save_checkpoint(root / "model.pt", model, FACTORY, {"width": 8}, inputs=INPUTS)
    (root / "artifact").mkdir()
    save_artifact(root / "artifact", model, FACTORY, {"width": 8}, [], INPUTS)
    return root


def tampered_checkpoint(small, tmp_path, **changes):
    raw = torch.load(small / "model.pt", weights_only=True)
    raw.update(changes)
    path = tmp_path / "evil.pt"
    torch.save(raw, path)
    return path


def tampered_artifact(small, tmp_path, **changes):
    folder = tmp_path / "evil-artifact"
    folder.mkdir(exist_ok=True)
    description = json.loads((small / "artifact" / "compression.json").read_text())
    description.update(changes)
    (folder / "compression.json").write_text(json.dumps(description))
    (folder / "model.safetensors").write_bytes((small / "artifact" / "model.safetensors").read_bytes())
    return folder


def one_line_error(result, code=2):
    assert result.exit_code == code, (result.exit_code, result.stderr, result.output)
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert "Traceback" not in result.stderr and "internal error" not in result.stderr
    return result.stderr


def evil_factories(tmp_path):
    """(factory, kwargs, what must survive / not appear) for calls that would do harm."""
    marker = tmp_path / "marker"
    victim = tmp_path / "victim"
    victim.mkdir(exist_ok=True)
    (victim / "precious.txt").write_text("mine")
    return marker, victim, [
        ("os:system", {"command": f"touch {marker}"}),
        ("posix:system", {"command": f"touch {marker}"}),
        ("shutil:rmtree", {"path": str(victim)}),
        ("builtins:exec", {"source": f"open({str(marker)!r}, 'w').close()"}),
        ("subprocess:call", {"args": ["touch", str(marker)]}),
        ("compress.examples.digits:torch.load", {"f": str(marker)}),
        ("compress.examples.digits:nn.Module.__init__", {}),
        ("compress.examples.digits:__builtins__.exec", {"source": "1"}),
        ("compress.examples:bundled_data", {"spec": "digits"}),
        # the examples' training functions write files: only their model factories are trusted
        ("compress.examples.training:train_digits_resnet", {"path": str(marker), "epochs": 1}),
        ("compress.examples.training:train_example", {"path": str(marker)}),
    ]


@pytest.mark.parametrize("source", ["checkpoint", "artifact"])
def test_no_factory_named_by_a_file_runs_code(source, small, tmp_path, write_recipe, run_cli):
    marker, victim, cases = evil_factories(tmp_path)
    recipe = write_recipe()
    for factory, kwargs in cases:
        if source == "checkpoint":
            model = tampered_checkpoint(small, tmp_path, factory=factory, kwargs=kwargs)
        else:
            model = tampered_artifact(small, tmp_path, factory=factory, kwargs=kwargs)
        for args in (["inspect", model], ["export", model, "--out", tmp_path / "m.onnx"],
                     ["plan", "-r", recipe, model], ["apply", "-r", recipe, model, "--out", tmp_path / "out", "-q"],
                     ["recipe", "check", recipe, model],
                     ["inspect", model, "--trust-factory", "compress.examples"]):  # trusting it trusts no os.system
            message = one_line_error(run_cli(*args))
            assert "factory" in message, message
        with pytest.raises(UserError):
            compress.load(model)
        with pytest.raises(UserError):
            compress.load(model, trust_factories=["compress.examples"])
        assert not marker.exists() and (victim / "precious.txt").exists(), factory
    assert not (tmp_path / "out").exists() and not (tmp_path / "m.onnx").exists()


def test_only_the_examples_model_factories_are_trusted_by_default():
    from compress.examples import FACTORIES, ctr, digits, digits_transformer
    from compress.trust import resolve_factory

    assert {digits.FACTORY, ctr.FACTORY, digits_transformer.FACTORY} == set(FACTORIES)
    for reference in FACTORIES:
        assert callable(resolve_factory(reference, ()))
    for reference in ("compress.examples.digits:digits_split", "compress.examples.digits:BasicBlock"):
        with pytest.raises(UserError, match="never trusted"):
            resolve_factory(reference, ())
        with pytest.raises(UserError, match="never trusted"):  # a caller's prefixes cannot reach the tool itself
            resolve_factory(reference, ("compress.examples",))


def test_trusting_the_standard_library_is_refused(small, tmp_path, run_cli):
    marker, _, _ = evil_factories(tmp_path)
    model = tampered_checkpoint(small, tmp_path, factory="os:system", kwargs={"command": f"touch {marker}"})
    for prefix in ("os", "shutil", "builtins", "subprocess", "os.path"):
        message = one_line_error(run_cli("inspect", model, "--trust-factory", prefix))
        assert "standard library" in message
    # they load code, pickles or files named in their arguments, or dispatch to other callables
    for prefix in ("torch", "torch.hub", "compress", "compress.checkpoint", "compress.examples", "numpy", "yaml",
                   "joblib", "click", "dill", "cloudpickle", "pandas", "numpy.lib"):
        message = one_line_error(run_cli("inspect", model, "--trust-factory", prefix))
        assert "never trusted" in message, prefix
    assert run_cli("inspect", tampered_checkpoint(small, tmp_path)).exit_code == 0  # the bundled factory, by name
    trainer = tampered_checkpoint(small, tmp_path, factory="compress.examples.training:train_digits_resnet",
                                  kwargs={"path": str(tmp_path / "written.pt"), "epochs": 1})
    assert "never trusted" in one_line_error(run_cli("inspect", trainer))
    assert not (tmp_path / "written.pt").exists()
    with pytest.raises(UserError, match="standard library"):
        compress.load(model, trust_factories=["os"])
    assert not marker.exists()


def test_an_untrusted_module_is_not_even_imported(small, tmp_path, run_cli, write_recipe, monkeypatch):
    marker = tmp_path / "imported"
    (tmp_path / "strangers_models.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n"
        "from compress.examples.digits import DigitsResNet, digits_resnet\n"
        "def build(width):\n    return digits_resnet(width=width)\n"
        "class Net(DigitsResNet):\n    @classmethod\n    def from_config(cls, width):\n        return cls(width, 10)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    model = tampered_checkpoint(small, tmp_path, factory="strangers_models:build")
    message = one_line_error(run_cli("inspect", model))
    assert "not trusted, so nothing was imported" in message and "--trust-factory strangers_models" in message
    assert not marker.exists() and "strangers_models" not in sys.modules
    # a recipe cannot trust anything: `recipe check` refuses one that tries, and imports nothing
    recipe = write_recipe(extra="model: {factory: 'strangers_models:build', trust: [strangers_models]}")
    assert "a recipe cannot trust code" in one_line_error(run_cli("recipe", "check", recipe))
    assert "a recipe cannot trust code" in one_line_error(run_cli("recipe", "check", recipe, model))
    assert not marker.exists()
    recipe = write_recipe(name="named.yaml", extra="model: {factory: 'strangers_models:build'}")
    assert run_cli("recipe", "check", recipe).exit_code == 0
    assert not marker.exists()
    # with a model it follows the same rules: refused without trust ...
    plain = write_recipe(name="plain.yaml")
    assert "not trusted" in one_line_error(run_cli("recipe", "check", plain, model))
    assert not marker.exists()
    # ... and the user's own trust makes it work, from the flag only
    result = run_cli("inspect", model, "--trust-factory", "strangers_models", "--json")
    assert result.exit_code == 0, result.stderr
    assert marker.exists() and json.loads(result.stdout)["total"]["params"] > 0
    assert run_cli("recipe", "check", recipe, model, "--trust-factory", "strangers_models").exit_code == 0
    # a model class's classmethod constructor (how transformers builds models) is allowed too
    constructor = tampered_checkpoint(small, tmp_path, factory="strangers_models:Net.from_config")
    assert run_cli("inspect", constructor, "--trust-factory", "strangers_models").exit_code == 0
    sys.modules.pop("strangers_models", None)


def test_kwargs_are_bounded_json_like_data(small, tmp_path, run_cli):
    for kwargs, words in [({"width": 10**6}, "would build a model of"), ({"width": 2**70}, "out of range"),
                          ({"width": float("nan")}, "not a finite number"), ({"width": "x" * 5000}, "characters"),
                          ({"width": torch.zeros(3)}, "only JSON-like values"), (["width"], "must be a mapping"),
                          ({"__class__": 1}, "not a keyword argument name"), ({"width": [[[[[[[[[[1]]]]]]]]]]}, "nested"),
                          ({"width": 8, "trust_remote_code": True}, "turns on loading code"),
                          ({"width": 8, "config": {"Trust-Remote-Code": 1}}, "turns on loading code"),
                          ({"width": 8, "opts": [{"allow_pickle": True}]}, "turns on loading code"),
                          ({"width": 8, "weights_only": False}, "turns on loading code")]:
        model = tampered_checkpoint(small, tmp_path, kwargs=kwargs)
        assert words in one_line_error(run_cli("inspect", model)), kwargs


@pytest.mark.parametrize("edit,words", [
    ({"op": "factorize", "name": "layer1.0.conv1", "rank": -3, "scheme": "channel"}, "rank must be an integer from 1 to 8"),
    ({"op": "factorize", "name": "layer1.0.conv1", "rank": 10**12, "scheme": "channel"}, "rank must be an integer"),
    ({"op": "factorize", "name": "layer1.0.conv1", "rank": True, "scheme": "channel"}, "rank must be an integer"),
    ({"op": "factorize", "name": "layer1.0.conv1", "rank": 4, "scheme": "diagonal"}, "scheme must be one of"),
    ({"op": "factorize", "name": "layer1.0.bn1", "rank": 4}, "is a BatchNorm2d"),
    ({"op": "factorize", "name": "nowhere", "rank": 4}, "has no layer 'nowhere'"),
    ({"op": "prune_channels", "root": "stem.0", "idxs": [0, 99]}, "distinct channel indices"),
    ({"op": "prune_channels", "root": "stem.0", "idxs": [-1]}, "distinct channel indices"),
    ({"op": "prune_channels", "root": "stem.0", "idxs": list(range(8))}, "leaving at least one channel"),
    ({"op": "rm -rf"}, "not known to this version"),
])
def test_tampered_edits_are_refused_before_allocation(edit, words, small, tmp_path, run_cli):
    for model in (tampered_checkpoint(small, tmp_path, edits=[edit]), tampered_artifact(small, tmp_path, edits=[edit])):
        assert words in one_line_error(run_cli("inspect", model))


@pytest.mark.parametrize("inputs,words", [
    ([{"name": "image", "shape": [100000, 100000, 100], "dtype": "float32"}], "refusing to allocate"),
    ([{"name": "image", "shape": [1, 8, 8], "dtype": "complex128"}], "is not valid"),
    ([{"name": "image", "shape": [-1, 8, 8]}], "is not valid"),
    ("image", "must be a list"),
])
def test_tampered_inputs_are_refused(inputs, words, small, tmp_path, run_cli):
    for model in (tampered_checkpoint(small, tmp_path, inputs=inputs), tampered_artifact(small, tmp_path, inputs=inputs)):
        assert words in one_line_error(run_cli("inspect", model))


def test_artifact_weights_must_lie_beside_it(small, tmp_path, run_cli):
    folder = tampered_artifact(small, tmp_path, weights="../../etc/passwd")
    assert "must name a file beside it" in one_line_error(run_cli("inspect", folder))


def test_an_oversized_compression_json_is_not_read(small, tmp_path, run_cli, monkeypatch):
    from compress import checkpoint

    folder = tampered_artifact(small, tmp_path)
    monkeypatch.setattr(checkpoint, "MAX_DESCRIPTION_BYTES", 100)  # the real bound is 64 MB
    assert "is not a compression.json (at most 100)" in one_line_error(run_cli("inspect", folder))


# ---- --out, --force and files the tool did not write ----

def test_force_never_replaces_a_folder_of_the_users_files(digits_model, write_recipe, run_cli, tmp_path):
    recipe = write_recipe()
    out = tmp_path / "proj"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "report.json").write_text("{}")  # looks a little like an output: still not ours
    message = one_line_error(run_cli("apply", "-r", recipe, digits_model, "--out", out, "--force", "-q"))
    assert "compress did not write: notes.txt" in message and "nothing was touched" in message
    assert (out / "notes.txt").read_text() == "mine" and sorted(p.name for p in out.iterdir()) == ["notes.txt", "report.json"]
    # the folder that holds the input model is refused even when it is otherwise empty of foreign files
    home = tmp_path / "home"
    home.mkdir()
    model = home / "model.pt"
    model.write_bytes(digits_model.read_bytes())
    assert "holds the input" in one_line_error(run_cli("apply", "-r", recipe, model, "--out", home, "--force", "-q"))
    assert model.exists()
    # a previous output is replaced with --force, and only then
    first = tmp_path / "first"
    assert run_cli("apply", "-r", recipe, digits_model, "--out", first, "-q").exit_code == 0
    assert "pass --force" in one_line_error(run_cli("apply", "-r", recipe, digits_model, "--out", first, "-q"))
    assert run_cli("apply", "-r", recipe, digits_model, "--out", first, "--force", "-q").exit_code == 0
    assert (first / ".compress-output").exists() and not [p for p in tmp_path.iterdir() if ".old-" in p.name]


def test_out_must_be_a_folder(digits_model, write_recipe, run_cli, tmp_path):
    recipe = write_recipe()
    plain = tmp_path / "plain.txt"
    plain.write_text("mine")
    link = tmp_path / "link"
    link.symlink_to(tmp_path)
    for out in (os.devnull, plain, link):
        for force in ([], ["--force"]):
            message = one_line_error(run_cli("apply", "-r", recipe, digits_model, "--out", out, "-q", *force))
            assert "not a folder" in message or "symbolic link" in message
    for args in (["export", digits_model, "--out", os.devnull, "--force"], ["example", "digits-resnet", os.devnull, "--force"]):
        assert "not a regular file" in one_line_error(run_cli(*args))
    assert plain.read_text() == "mine" and os.path.exists(os.devnull) and not os.path.isfile(os.devnull)


def test_a_second_run_into_the_same_out_fails_at_once(digits_model, write_recipe, run_cli, tmp_path):
    out = tmp_path / "out"
    lock = tmp_path / ".out.lock"
    with open(lock, "w") as held:  # what a running `apply` holds
        held.write("4242")
        held.flush()
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        message = one_line_error(run_cli("apply", "-r", write_recipe(), digits_model, "--out", out, "-q"))
    assert "another compress apply or sweep (pid 4242)" in message
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]


def test_unwritable_parent_is_a_user_error(digits_model, write_recipe, run_cli, tmp_path, monkeypatch):
    recipe = write_recipe()
    parent = tmp_path / "file-not-folder"
    parent.write_text("")
    assert "cannot use as output folder" in one_line_error(run_cli("apply", "-r", recipe, digits_model, "--out",
                                                                    parent / "out", "-q"))
    from compress import outdir

    def read_only(*args, **kwargs):  # what a read-only parent folder does to the temporary folder (root ignores modes)
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(outdir.tempfile, "mkdtemp", read_only)
    message = one_line_error(run_cli("apply", "-r", recipe, digits_model, "--out", tmp_path / "out", "-q"))
    assert "cannot write the outputs (Permission denied); nothing was written" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file-not-folder", "recipe.yaml"]


def test_sigterm_outside_fine_tuning_leaves_nothing(digits_model, write_recipe, run_cli, tmp_path, monkeypatch):
    from compress import exporting as export

    def terminated(*args, **kwargs):
        raise Terminated()

    monkeypatch.setattr(export, "export_onnx", terminated)
    result = run_cli("apply", "-r", write_recipe(), digits_model, "--out", tmp_path / "out", "-q")
    assert "terminated (SIGTERM); no output was written" in one_line_error(result, 143)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml"]


# ---- data ----

@pytest.mark.parametrize("data,words", [
    ({"image": torch.full((8, 1, 8, 8), float("nan"))}, "'image' holds 512 non-finite values (NaN or Inf) in 8 samples, the first at index 0"),
    ({"image": torch.cat([torch.zeros(5, 1, 8, 8), torch.full((3, 1, 8, 8), float("inf"))])}, "the first at index 5"),
    ({"image": torch.zeros(8, 1, 8, 8), "target": torch.tensor([0, 1, 12, 3, 4, 5, 6, 7])},
     "1 labels 'target' lie outside the model's 10 classes [0, 10), the first at index 2 (value 12)"),
    ({"image": torch.zeros(8, 1, 8, 8), "target": torch.tensor([0, -1, 2, 3, 4, 5, 6, 7])}, "the first at index 1 (value -1)"),
    ({"image": torch.zeros(8, 1, 8, 8), "target": torch.rand(8)}, "are float32 values but the model outputs 10 classes"),
    ({"image": torch.zeros(8, 1, 8, 8, dtype=torch.complex64)}, "dtype complex64"),
])
def test_bad_data_is_named_before_training(data, words, digits_model, write_recipe, run_cli, tmp_path):
    torch.save(data, tmp_path / "data.pt")
    recipe = write_recipe("data: {train: data.pt, eval: data.pt}\nstages: [{method: svd, ratio: 0.5}]\nfinetune: {steps: 2}\n")
    assert words in one_line_error(run_cli("apply", "-r", recipe, digits_model, "--out", tmp_path / "out", "-q"))
    assert not (tmp_path / "out").exists()


def test_random_bytes_as_data_and_as_model(digits_model, write_recipe, run_cli, tmp_path):
    noise = np.random.default_rng(0).bytes(4096)
    (tmp_path / "data.safetensors").write_bytes(noise)
    recipe = write_recipe("data: {train: data.safetensors}\nstages: [{method: svd, ratio: 0.5}]\n")
    assert "not a readable .safetensors tensor file" in one_line_error(run_cli("plan", "-r", recipe, digits_model))
    (tmp_path / "noise.pt").write_bytes(noise)
    message = one_line_error(run_cli("inspect", tmp_path / "noise.pt"))
    assert "not a checkpoint" in message and "--trust-checkpoint" not in message  # never push toward the unsafe flag


# ---- recipes ----

BOMB = "".join(f"{k}: &{k} [" + ",".join([f"*{p}"] * 9 if p else ['"lol"'] * 9) + "]\n"
               for p, k in zip([None, "a", "b", "c", "d", "e", "f", "g", "h"], "abcdefghi")) + "stages: *i\n"


@pytest.mark.parametrize("text,words", [
    (BOMB, "expands to more than 50,000 nodes"),
    ("stages: " + "[" * 10000 + "]" * 10000, "nested deeper than 32 levels"),
    ("stages: [{method: svd}]\nseed: 1\nseed: 2\n", "duplicate key 'seed'"),
    ("stages: [{method: svd}]\nexport: {parity: {atol: .inf}}\n", "export.parity.atol: Input should be a finite number"),
    ("stages: [{method: svd}]\nfinetune: {lr: .nan}\n", "finetune.lr: Input should be a finite number"),
    ("stages: [{method: svd}]\nfinetune: {distill: {weight: .inf}}\n", "finetune.distill.weight: Input should be a finite"),
    ("stages: [{method: svd}]\nseed: 99999999999999999999999\n", "seed: Input should be less than or equal to 4294967295"),
    ("stages: [{method: svd}]\nmodel: {trust: [os]}\n", "standard library"),
    ("stages: [{method: svd}]\ninputs: [{name: x, shape: [100000, 100000, 100]}]\n", "refusing to allocate it"),
    ("stages: [{method: " + "x" * 100000 + "}]\n", "unknown method"),
])
def test_hostile_recipes_fail_fast_in_one_short_line(text, words, run_cli, tmp_path, digits_model):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text)
    result = run_cli("recipe", "check", recipe)
    message = one_line_error(result)
    assert words in message and len(message) < 600, message[:600]


def test_recipe_files_are_capped(run_cli, tmp_path):
    recipe = tmp_path / "big.yaml"
    recipe.write_text("stages: [{method: svd}]\n" + "# padding\n" * 200_000)
    assert "bytes such a file may have" in one_line_error(run_cli("recipe", "check", recipe))


# ---- command line ----

def run_main(capsys, monkeypatch, *args):
    """The console script itself (click's own usage errors included), in this process."""
    monkeypatch.setattr(sys, "argv", ["compress", *map(str, args)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    return exit_info.value.code, capsys.readouterr().err


@pytest.mark.parametrize("args,words", [
    (["apply", "-r", "r.yaml", "m.pt", "--min-speedup", "nan"], "'nan' is not a finite number > 0"),
    (["apply", "-r", "r.yaml", "m.pt", "--max-metric-drop", "-1"], "is not a finite number >= 0"),
    (["apply", "-r", "r.yaml", "m.pt", "--seed", str(2**70)], "--seed"),
    (["example", "digits-resnet", "x.pt", "--epochs", "-3"], "--epochs"),
    (["bench", "a.onnx", "--runs", "0"], "--runs"),
    (["no-such-verb"], "No such command"),
])
def test_usage_errors_are_one_line_exit_2(args, words, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    code, err = run_main(capsys, monkeypatch, *args)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and words in err, err
    assert list(tmp_path.iterdir()) == []


def test_device_and_nproc_mistakes(digits_model, write_recipe, run_cli, tmp_path, capsys, monkeypatch):
    recipe = write_recipe()
    assert "--device 'garbage'" in one_line_error(run_cli("apply", "-r", recipe, digits_model, "--out",
                                                          tmp_path / "out", "--device", "garbage", "-q"))
    code, err = run_main(capsys, monkeypatch, "apply", "-r", recipe, digits_model, "--out", tmp_path / "out",
                         "--nproc", "3", "-q")
    assert code == 2 and err.count("\n") == 1 and "batch_size 64 must be divisible" in err, err
    assert not (tmp_path / "out").exists()


def test_bench_refuses_what_it_cannot_compare_or_fit(digits_model, run_cli, tmp_path):
    onnx_path = tmp_path / "m.onnx"
    assert run_cli("export", digits_model, "--out", onnx_path).exit_code == 0
    (tmp_path / "notes.onnx").write_text("not a model")
    assert "not a loadable ONNX model" in one_line_error(run_cli("bench", onnx_path, tmp_path / "notes.onnx", "-q"))
    other = tmp_path / "other.onnx"
    torch.onnx.export(torch.nn.Linear(3, 2), (torch.zeros(1, 3),), str(other), input_names=["x"], dynamo=False)
    assert "bench compares models with the same inputs" in one_line_error(run_cli("bench", onnx_path, other, "-q"))
    assert "needs about" in one_line_error(run_cli("bench", onnx_path, "--batch-sizes", "100000000", "-q"))


def test_apply_refuses_a_bench_batch_that_cannot_fit(digits_model, write_recipe, run_cli, tmp_path):
    recipe = write_recipe()
    text = recipe.read_text().replace("bench: {batch_sizes: [1, 8]", "bench: {batch_sizes: [1, 100000000]")
    recipe.write_text(text)
    message = one_line_error(run_cli("apply", "-r", recipe, digits_model, "--out", tmp_path / "out", "-q"))
    assert "bench.batch_sizes: batch size 100,000,000 needs about" in message


def test_the_same_model_twice_is_two_labels_never_run_twice_in_a_row(digits_model, run_cli, tmp_path, monkeypatch):
    """Behaviour, not timing (the noise side is test_speedup_interval_...): the same file given twice
    gets its own label and session, and within each batch size the two run back to back in pairs,
    one after the other, never one session twice in a row (its second run would find its weights
    in the caches)."""
    import compress.bench

    onnx_path = tmp_path / "m.onnx"
    assert run_cli("export", digits_model, "--out", onnx_path).exit_code == 0
    order, real = [], compress.bench.make_session

    class Logged:
        def __init__(self, session, index):
            self.session, self.index = session, index

        def run(self, *args):
            order.append(self.index)
            return self.session.run(*args)

        def __getattr__(self, name):
            return getattr(self.session, name)

    made = []

    def make_session(path, threads):
        made.append(path)
        return Logged(real(path, threads), len(made) - 1)

    monkeypatch.setattr(compress.bench, "make_session", make_session)
    result = run_cli("bench", onnx_path, onnx_path, "--batch-sizes", "8", "--runs", "6", "--warmup", "1", "--json", "-q")
    assert result.exit_code == 0, result.output
    measured = json.loads(result.stdout)
    assert set(measured["latency_ms"]) == {str(onnx_path), f"{onnx_path}#1"} and len(set(order)) == 2
    first = order[0]
    timed = [int(i != first) for i in order[4:]]  # after one first run each and one warmup round each
    pairs = [tuple(timed[i:i + 2]) for i in range(0, len(timed), 2)]
    assert len(pairs) >= 6 and all(p == (0, 1) for p in pairs)
    assert all(a != b for a, b in zip(order[2:], order[3:]))  # from the warmup on
    lo, hi = measured["speedup_ci"][f"{onnx_path}#1"]["8"]
    assert lo <= measured["speedup"][f"{onnx_path}#1"]["8"] <= hi


@pytest.mark.parametrize("count", [1, 2, 3, 4, 7])
def test_rounds_turn_so_that_no_model_runs_twice_in_a_row(count):
    from compress.bench import round_order

    labels = [f"m{i}" for i in range(count)]
    rounds = [round_order(labels, k) for k in range(3 * count)]
    assert all(sorted(r) == labels for r in rounds)
    runs = [label for r in rounds for label in r]
    assert count == 1 or all(a != b for a, b in zip(runs, runs[1:]))
    if count >= 3:  # every model takes every place, first included
        assert all({r[place] for r in rounds} == set(labels) for place in range(count))


def test_speedup_interval_is_paired_and_covers_exchangeable_noise():
    from compress.bench import speedup_interval

    rng = np.random.default_rng(1)
    shared = rng.lognormal(0, 0.3, 400)  # machine load that hits both runs of a pair
    a = shared * rng.lognormal(0, 0.02, 400)
    b = shared * rng.lognormal(0, 0.02, 400)
    b[::37] *= 20  # bursts of noise like the one that once read as a 3.3x "speedup"
    lo, hi = speedup_interval(a, b)
    assert lo <= 1.0 <= hi and hi - lo < 0.2
    lo, hi = speedup_interval(a * 1.5, b)  # a real 1.5x is seen as one
    assert 1.3 < lo <= 1.5 <= hi < 1.7


def test_min_speedup_gate_uses_the_lower_bound():
    from types import SimpleNamespace

    from compress.pipeline import Options, check_gates
    from compress.recipe import GatesSection

    report = SimpleNamespace(ratios=SimpleNamespace(speedup={"8": 1.3}, speedup_ci={"8": [0.9, 1.7]}))
    gate = check_gates(report, GatesSection(min_speedup=1.2), Options()).checked[0]
    assert gate.value == 0.9 and gate.estimate == 1.3 and not gate.passed


# ---- the property: whatever a stranger puts in the file, exit 0 or 2, never a bug, never a marker ----

def _mutations(tmp_path):
    marker = str(tmp_path / "marker")
    factories = st.one_of(
        st.sampled_from(["os:system", "builtins:exec", "shutil:rmtree", "subprocess:run", "posix:system",
                         FACTORY, "compress.examples.digits:os.system", "compress.examples.digits:BasicBlock",
                         "compress.examples.ctr:deepfm", "compress.examples:bundled_data", "compress.cli:main",
                         "compress.examples.digits", ":", "", "compress.examples.digits:digits_split"]),
        st.text(max_size=30), st.integers(), st.none())
    values = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(),
                                    st.text(max_size=20), st.just(f"touch {marker}")),
                          lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                          max_leaves=8)
    kwargs = st.one_of(st.dictionaries(st.sampled_from(["width", "command", "path", "source", "dim", "hidden", "x"]),
                                       values, max_size=3), values)
    edit = st.fixed_dictionaries({"op": st.sampled_from(["factorize", "prune_channels", "other"])},
                                 optional={"name": st.sampled_from(["layer1.0.conv1", "fc", "stem.0", "stem.1", "", "x"]),
                                           "root": st.sampled_from(["stem.0", "layer1.0.conv1", "fc", "nowhere"]),
                                           "rank": st.one_of(st.integers(-5, 40), st.floats(), st.booleans()),
                                           "scheme": st.sampled_from(["channel", "spatial", "other"]),
                                           "idxs": st.lists(st.integers(-3, 20), max_size=10), "bias": values})
    return marker, st.fixed_dictionaries({}, optional={"factory": factories, "kwargs": kwargs,
                                                       "edits": st.one_of(st.lists(edit, max_size=3), values)})


@pytest.mark.parametrize("source", ["checkpoint", "artifact"])
def test_mutated_files_exit_0_or_2_and_run_nothing(source, small, tmp_path_factory, run_cli):
    tmp_path = tmp_path_factory.mktemp("fuzz")
    marker, changes = _mutations(tmp_path)

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    @given(changes)
    def check(change):
        make = tampered_checkpoint if source == "checkpoint" else tampered_artifact
        model = make(small, tmp_path, **change)
        result = run_cli("inspect", model, "--json")
        assert result.exit_code in (0, 2), (change, result.stderr)
        if result.exit_code == 2:
            one_line_error(result)
        try:
            compress.load(model)
        except UserError:
            pass
        assert not os.path.exists(marker), change

    check()


def test_force_replaces_a_text_models_output_with_its_tokenizer(tmp_path):
    """A Hugging Face model's output holds its tokenizer's files beside model.onnx: compress wrote them."""
    from compress import outdir

    out = tmp_path / "out"
    out.mkdir()
    for name in (outdir.MARKER, "model.onnx", "report.json", "tokenizer.json", "vocab.txt", "tokenizer_config.json"):
        (out / name).write_text("x")
    outdir.check_out(out, True)  # no error: every file is one compress writes
    (out / "notes.txt").write_text("mine")
    with pytest.raises(outdir.UserError, match="did not write: notes.txt"):
        outdir.check_out(out, True)
