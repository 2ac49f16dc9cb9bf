"""Trust comes from the person running the tool, never from a file: a recipe, checkpoint or
compression.json that names a loader (yaml, numpy, click, joblib, compress itself) runs nothing,
whatever it says it trusts, and no flag can trust a loader. A marker file shows execution."""
import json
import sys
import textwrap

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import compress
from compress.checkpoint import save_checkpoint
from compress.errors import UserError
from compress.examples.digits import FACTORY, digits_resnet
from compress.trust import check_kwargs, resolve_factory

INPUTS = [{"name": "image", "shape": [1, 8, 8], "dtype": "float32"}]
LOADERS = ["yaml", "numpy", "numpy.lib", "joblib", "click", "dill", "cloudpickle", "pandas", "torch", "torch.hub",
           "compress", "compress.examples", "compress.checkpoint", "os", "subprocess", "importlib", "pickle", "builtins"]


def one_line_error(result, code=2):
    assert result.exit_code == code, (result.exit_code, result.stderr, result.output)
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert "Traceback" not in result.stderr
    return result.stderr


@pytest.fixture(scope="module")
def state_dict(tmp_path_factory):
    path = tmp_path_factory.mktemp("sd") / "model.safetensors"
    from safetensors.torch import save_file

    torch.manual_seed(0)
    save_file(digits_resnet(width=8).state_dict(), str(path))
    return path


def evil_factories(marker):
    """(factory, kwargs) that would run a shell command if called."""
    return [
        ("yaml:unsafe_load", {"stream": f"!!python/object/apply:os.system ['touch {marker}']"}),
        ("yaml:load", {"stream": f"!!python/object/apply:os.system ['touch {marker}']", "Loader": None}),
        ("click:edit", {"text": "x", "editor": f"touch {marker}; true", "require_save": False}),
        ("click.termui:edit", {"text": "x", "editor": f"touch {marker}; true"}),
        ("numpy:load", {"file": str(marker) + ".npy", "allow_pickle": True}),
        ("compress.examples:training.train_digits_resnet", {"path": str(marker), "epochs": 1}),
        ("compress.examples.training:train_digits_resnet", {"path": str(marker), "epochs": 1}),
        ("compress.checkpoint:load", {"path": str(marker), "trust_checkpoint": True}),
        ("torch.hub:load", {"repo_or_dir": str(marker), "model": "x"}),
    ]


CASES = [(f, i) for i in range(9) for f in ("recipe", "recipe+trust", "flag")]


@pytest.mark.parametrize("how,index", CASES)
def test_a_recipe_naming_a_loader_runs_nothing(how, index, state_dict, tmp_path, run_cli):
    marker = tmp_path / "marker"
    factory, kwargs = evil_factories(marker)[index]
    trust = f", trust: [{factory.partition(':')[0]}]" if how == "recipe+trust" else ""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(textwrap.dedent(f"""\
        model: {{factory: {json.dumps(factory)}, kwargs: {json.dumps(kwargs)}{trust}}}
        inputs: [{{name: image, shape: [1, 8, 8]}}]
        data: {{train: bundled:digits/train}}
        stages: [{{method: svd, ratio: 0.5}}]
        """))
    flag = ["--trust-factory", factory.partition(":")[0]] if how == "flag" else []
    for args in (["recipe", "check", recipe], ["recipe", "check", recipe, state_dict],
                 ["plan", "-r", recipe, state_dict], ["inspect", state_dict, "-r", recipe],
                 ["apply", "-r", recipe, state_dict, "--out", tmp_path / "out", "-q"]):
        if how != "recipe+trust" and args[:2] == ["recipe", "check"] and len(args) == 3:
            assert run_cli(*args).exit_code == 0  # names a factory, imports nothing
            continue
        message = one_line_error(run_cli(*args, *(flag if args[0] != "recipe" or len(args) == 4 else [])))
        assert "trust" in message, message
        if how == "flag":
            assert "never trusted" in message or "standard library" in message, message
        else:  # never a suggestion of a flag that is itself refused
            assert "--trust-factory yaml" not in message and "--trust-factory numpy" not in message, message
    assert not marker.exists() and not (tmp_path / "out").exists()
    assert not list(tmp_path.glob("marker*"))


@pytest.mark.parametrize("prefix", LOADERS)
def test_no_flag_trusts_a_loader(prefix, state_dict, run_cli, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {{factory: '{FACTORY}', kwargs: {{width: 8}}}}\ninputs: [{{name: image, shape: [1, 8, 8]}}]\n"
                      "stages: [{method: svd}]\n")
    message = one_line_error(run_cli("inspect", state_dict, "-r", recipe, "--trust-factory", prefix))
    assert "never trusted" in message or "standard library" in message
    assert f"--trust-factory {prefix} " not in message.replace(f"--trust-factory {prefix!r}", "")
    with pytest.raises(UserError, match="never trusted|standard library"):
        compress.load(state_dict, trust_factories=[prefix])


@pytest.mark.parametrize("prefix", LOADERS)
def test_a_recipe_cannot_trust_anything(prefix, run_cli, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {{trust: [{prefix}]}}\nstages: [{{method: svd}}]\n")
    message = one_line_error(run_cli("recipe", "check", recipe))
    assert "a recipe cannot trust code" in message and f"--trust-factory {prefix} " not in message


def test_api_trust_arguments_are_typed(tmp_path):
    torch.manual_seed(0)
    model = digits_resnet(width=8)
    path = tmp_path / "whole.pt"
    torch.save(model, path)  # a pickle: loads only with trust_checkpoint=True
    for value in ("false", "no", 1, None, [True]):
        with pytest.raises(UserError, match="trust_checkpoint: expected True or False"):
            compress.load(path, trust_checkpoint=value)
    assert isinstance(compress.load(path, trust_checkpoint=True), torch.nn.Module)
    # a string is one prefix, never a sequence of letters
    with pytest.raises(UserError, match="torch has functions"):
        compress.load(path, trust_factories="torch")
    for value in (42, {"mypkg": True}.keys().__iter__()):
        with pytest.raises(UserError, match="trust_factories"):
            compress.load(path, trust_factories=value)
    with pytest.raises(UserError, match="trust_factories"):
        compress.load(path, trust_factories=[42])
    with pytest.raises(UserError, match="trust_checkpoint"):
        compress.plan(model, "stages: [{method: svd}]\n", trust_checkpoint="false")


def test_attribute_paths_pass_through_classes_only(tmp_path, monkeypatch):
    package = tmp_path / "userpkg"
    package.mkdir()
    (package / "__init__.py").write_text("from . import sub\n")
    (package / "sub.py").write_text(
        "from torch import nn\n"
        "def build():\n    return nn.Linear(2, 2)\n"
        "class Net(nn.Linear):\n    @classmethod\n    def make(cls):\n        return cls(2, 2)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(UserError, match="passes through classes only"):
        resolve_factory("userpkg:sub.build", ("userpkg",))
    assert resolve_factory("userpkg.sub:build", ("userpkg",)).__name__ == "build"
    assert resolve_factory("userpkg.sub:Net.make", ("userpkg",)).__name__ == "make"
    for name in ("userpkg", "userpkg.sub"):
        sys.modules.pop(name, None)


@pytest.mark.parametrize("kwargs", [
    {"trust_remote_code": True}, {"Trust_Remote_Code": True}, {"cfg": {"TRUST-REMOTE-CODE": "yes"}},
    {"config": {"trust_remote_code": True}}, {"a": [{"b": {"trustRemoteCode": 1}}]},
    {"allow_pickle": True}, {"opts": {"Allow_Pickle": True}}, {"weights_only": False},
    {"load": {"Weights_Only": False}}, {"trust_checkpoint": True}, {"cfg": {"use_safetensors": False}},
])
def test_code_loading_kwargs_are_refused_at_any_depth_in_any_case(kwargs):
    with pytest.raises(UserError, match="turns on loading code"):
        check_kwargs(kwargs, "userpkg:build")


def test_harmless_values_of_those_keys_pass():
    for kwargs in ({"trust_remote_code": False}, {"config": {"weights_only": True}}, {"allow_pickle": None}):
        assert check_kwargs(kwargs, "userpkg:build") == kwargs


def test_a_factory_registered_by_an_installed_distribution_is_trusted_by_name(tmp_path, monkeypatch, state_dict,
                                                                               run_cli):
    marker = tmp_path / "imported"
    (tmp_path / "plugpkg.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n"
        "from compress.examples.digits import digits_resnet\n"
        "def build(width):\n    return digits_resnet(width=width)\n"
        "def other(width):\n    return digits_resnet(width=width)\n")
    dist = tmp_path / "plugpkg-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: plugpkg\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[compress.models]\ndigits = plugpkg:build\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    recipe = tmp_path / "r.yaml"
    for factory, code in (("plugpkg:other", 2), ("plugpkg:build", 0)):
        recipe.write_text(f"model: {{factory: '{factory}', kwargs: {{width: 8}}}}\n"
                          "inputs: [{name: image, shape: [1, 8, 8]}]\nstages: [{method: svd}]\n")
        result = run_cli("inspect", state_dict, "-r", recipe)
        assert result.exit_code == code, result.stderr
        assert marker.exists() == (code == 0)  # the unregistered one was not even imported
    sys.modules.pop("plugpkg", None)


def test_a_checkpoint_cannot_reach_the_tool_itself(tmp_path, run_cli):
    torch.manual_seed(0)
    model = digits_resnet(width=8).eval()
    for factory in ("compress.examples.digits:torch.load", "compress.examples:training.train_example",
                    "compress.examples.digits:BasicBlock", "compress.trust:build_model"):
        path = tmp_path / "evil.pt"
        save_checkpoint(path, model, FACTORY, {"width": 8}, inputs=INPUTS)
        raw = torch.load(path, weights_only=True)
        raw["factory"] = factory
        torch.save(raw, path)
        message = one_line_error(run_cli("inspect", path))
        assert "never trusted" in message, message


FACTORY_PARTS = st.sampled_from(["yaml", "numpy", "click", "os", "compress", "compress.examples", "compress.examples.digits",
                                 "torch", "joblib", "subprocess", "builtins", "pickle", "shutil", "importlib"])
ATTRS = st.sampled_from(["unsafe_load", "load", "edit", "system", "digits_resnet", "training.train_digits_resnet",
                         "torch.load", "hub.load", "rmtree", "exec", "import_module", "loads", "Popen", "nn.Module"])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(module=FACTORY_PARTS, attr=ATTRS, trust=st.lists(FACTORY_PARTS, max_size=2),
       key=st.sampled_from(["stream", "command", "editor", "path", "file", "Trust_Remote_Code", "allow_pickle"]),
       where=st.sampled_from(["checkpoint", "recipe", "artifact"]))
def test_mutated_factories_never_run_code(module, attr, trust, key, where, tmp_path_factory, run_cli):
    """Any factory a file names, with any trust it claims and any flag: exit 0 or 2, and no marker."""
    tmp = tmp_path_factory.mktemp("fuzz")
    marker = tmp / "marker"
    kwargs = {key: f"!!python/object/apply:os.system ['touch {marker}']" if key == "stream" else f"touch {marker}"}
    factory = f"{module}:{attr}"
    torch.manual_seed(0)
    model = digits_resnet(width=8).eval()
    path = tmp / "model.pt"
    save_checkpoint(path, model, FACTORY, {"width": 8}, inputs=INPUTS)
    raw = torch.load(path, weights_only=True)
    if where == "checkpoint":
        raw.update(factory=factory, kwargs=kwargs, trust=trust)
        torch.save(raw, path)
    recipe = tmp / "recipe.yaml"
    model_section = (f"model: {{factory: {json.dumps(factory)}, kwargs: {json.dumps(kwargs)}, trust: {json.dumps(trust)}}}\n"
                     if where == "recipe" else "")
    recipe.write_text(model_section + "inputs: [{name: image, shape: [1, 8, 8]}]\nstages: [{method: svd}]\n")
    target = path
    if where == "artifact":
        from compress.checkpoint import save_artifact

        target = tmp / "artifact"
        target.mkdir()
        save_artifact(target, model, FACTORY, {"width": 8}, [], INPUTS)
        description = json.loads((target / "compression.json").read_text())
        description.update(factory=factory, kwargs=kwargs, trust=trust)
        (target / "compression.json").write_text(json.dumps(description))
    flags = [a for p in trust for a in ("--trust-factory", p)]
    for args in (["inspect", target, "-r", recipe, *flags], ["recipe", "check", recipe, target, *flags]):
        result = run_cli(*args)
        assert result.exit_code in (0, 2), (args, result.stderr)
        assert result.exit_code == 0 or result.stderr.count("\n") == 1, result.stderr
    assert not marker.exists()
