"""Every user mistake in data, labels, recipe numbers and files a stranger made is one line, exit 2,
nothing written; what a user means (int32 labels, [N, 1] labels) is taken as meant."""
import json
import os

import numpy as np
import pytest
import torch

import compress
from compress.errors import UserError
from compress.examples import bundled_data

STAGES = "stages: [{method: svd, ratio: 0.5, targets: {types: [Conv2d], include: ['layer*']}}]"


@pytest.fixture(scope="module")
def digits():
    d = bundled_data("digits/train")
    return d["image"][:128], d["target"][:128]


def one_line_error(result, code=2):
    assert result.exit_code == code, (result.exit_code, result.stderr, result.output)
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert "internal error" not in result.stderr
    return result.stderr


def recipe_for(tmp_path, data="data.pt", data_extra="", extra=""):
    path = tmp_path / "recipe.yaml"
    path.write_text(f"data: {{train: {data}, batch_size: 32{data_extra}}}\n{STAGES}\nfinetune: {{steps: 1}}\n"
                    f"bench: {{batch_sizes: [1], runs: 3, warmup: 1, baselines: []}}\n{extra}\n")
    return path


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.int32, torch.uint8, torch.int64])
@pytest.mark.parametrize("shape", ["flat", "column"])
def test_integer_labels_of_any_width_and_column_labels_are_taken_as_meant(dtype, shape, digits, tmp_path, run_cli,
                                                                         digits_model):
    x, y = digits
    labels = y.to(dtype)
    torch.save({"image": x, "target": labels.reshape(-1, 1) if shape == "column" else labels}, tmp_path / "data.pt")
    result = run_cli("plan", "-r", recipe_for(tmp_path), digits_model)
    assert result.exit_code == 0, result.stderr
    from compress.context import check_labels

    used = check_labels(torch.zeros(1, 10), labels.reshape(-1, 1) if shape == "column" else labels, "d", "target", None)
    assert used.dtype == torch.int64 and used.shape == (len(y),) and torch.equal(used, y)


def test_zero_one_integer_labels_of_a_one_output_model_are_binary():
    from compress.context import check_labels

    used = check_labels(torch.zeros(1, 1), torch.tensor([0, 1, 1], dtype=torch.int32), "d", "y", None)
    assert used.dtype == torch.float32 and used.tolist() == [0.0, 1.0, 1.0]
    with pytest.raises(UserError, match="not one score per class"):  # cross_entropy on one output: a loss of 399
        check_labels(torch.zeros(1, 1), torch.tensor([0, 3, 7]), "d", "y", None)


DATA_CASES = {
    "labels out of range, metric agreement": ({"target": "y + 20"}, ", metric: agreement", "", "lie outside"),
    "labels out of range, loss mse": ({"target": "y + 20"}, "", "finetune: {steps: 1, loss: mse}", "lie outside"),
    "metric auc with class labels": ({}, ", metric: auc", "", "data.metric auc compares each output"),
    "metric mse with class labels": ({}, ", metric: mse", "", "data.metric mse compares each output"),
    "loss bce on 10 classes": ({}, "", "finetune: {steps: 1, loss: bce}", "finetune.loss bce compares each output"),
    "loss mse on 10 classes": ({}, "", "finetune: {steps: 1, loss: mse}", "finetune.loss mse compares each output"),
    "accuracy without labels": ({"target": None}, ", metric: accuracy", "", "needs labels"),
    "auc without labels": ({"target": None}, ", metric: auc", "", "needs labels"),
    "target names an input": ({}, ", target: image", "inputs: [{name: image, shape: [1, 8, 8]}]", "also one of"),
    "float labels for accuracy": ({"target": "y.float() + 0.5"}, ", metric: accuracy", "", "needs class indices"),
    "labels of the wrong shape": ({"target": "y.reshape(-1, 1).repeat(1, 3)"}, "", "", "per sample"),
    "integer key": ({0: "x"}, "", "", "must be strings"),
    "sparse input": ({"image": "x.to_sparse()"}, "", "", "dense tensor"),
    "bool labels": ({"target": "y > 4"}, ", metric: accuracy", "", "needs class indices"),
}


@pytest.mark.parametrize("case", list(DATA_CASES))
def test_data_mistakes_are_one_line(case, digits, tmp_path, run_cli, digits_model):
    x, y = digits
    changes, data_extra, extra, words = DATA_CASES[case]
    tensors = {"image": x, "target": y}
    for key, expression in changes.items():
        if expression is None:
            tensors.pop(key)
        else:
            tensors[key] = eval(expression, {"x": x, "y": y})  # noqa: S307 - the test's own expressions
    if 0 in changes:
        tensors.pop("image")
    torch.save(tensors, tmp_path / "data.pt")
    if "steps: 1" in extra:
        path = recipe_for(tmp_path, data_extra=data_extra)
        path.write_text(path.read_text().replace("finetune: {steps: 1}\n", extra + "\n"))
    else:
        path = recipe_for(tmp_path, data_extra=data_extra, extra=extra)
    for verb in (["plan", "-r", path, digits_model], ["apply", "-r", path, digits_model, "--out", tmp_path / "o", "-q"]):
        assert words in one_line_error(run_cli(*verb)), case
    assert not (tmp_path / "o").exists()


def test_text_arrays_in_npz_are_refused(digits, tmp_path, run_cli, digits_model):
    x, _ = digits
    np.savez(tmp_path / "data.npz", image=x.numpy(), target=np.array(["cat"] * len(x)))
    assert "text or objects" in one_line_error(run_cli("plan", "-r", recipe_for(tmp_path, data="data.npz"), digits_model))


def test_a_meta_tensor_is_refused(tmp_path):
    from compress.data import Dataset

    with pytest.raises(UserError, match="meta tensor"):
        Dataset({"image": torch.zeros(4, 1, 8, 8, device="meta")}, "<memory>")


def test_nan_weights_are_refused_before_any_work(digits_model, tmp_path, run_cli, digits):
    raw = torch.load(digits_model, weights_only=True)
    raw["state_dict"]["stem.0.weight"] = raw["state_dict"]["stem.0.weight"].clone().fill_(float("inf"))
    torch.save(raw, tmp_path / "bad.pt")
    x, y = digits
    torch.save({"image": x, "target": y}, tmp_path / "data.pt")
    message = one_line_error(run_cli("apply", "-r", recipe_for(tmp_path), tmp_path / "bad.pt", "--out",
                                     tmp_path / "o", "-q"))
    assert "'stem.0.weight' holds 144 non-finite values" in message and not (tmp_path / "o").exists()


@pytest.mark.parametrize("text,words", [
    ("seed: " + "9" * 5000, "number too long"),
    ("bench: {threads: 100000}", "bench.threads: Input should be less than or equal to 1024"),
    ("bench: {runs: 100000000}", "bench.runs"),
    ("finetune: {steps: 99999999999}", "finetune.steps"),
    ("export: {parity: {atol: 1.0e+300}}", "export.parity.atol: Input should be less than or equal to 1"),
    ("stages: [{method: svd, rank: true}]", "stages[0].rank: Input should be a valid integer (got True)"),
    ("stages: [{method: svd, rank: 1.0e+30}]", "stages[0].rank: Input should be a valid integer"),
    ("quantize: {calibration_batches: 10000000}", "quantize.calibration_batches"),
    ("seed: true", "seed: Input should be a valid integer"),
])
def test_recipe_numbers_are_bounded_and_typed(text, words, tmp_path, run_cli):
    path = tmp_path / "recipe.yaml"
    body = text if text.startswith("stages") else f"{STAGES}\n{text}"
    path.write_text(body + "\n")
    assert words in one_line_error(run_cli("recipe", "check", path))


@pytest.mark.parametrize("kind", ["fifo", "devzero"])
def test_a_recipe_that_is_not_a_regular_file_never_hangs(kind, tmp_path, run_cli):
    path = tmp_path / "recipe.yaml"
    if kind == "fifo":
        os.mkfifo(path)
    else:
        path.symlink_to("/dev/zero")
    assert "not a regular file" in one_line_error(run_cli("recipe", "check", path))


@pytest.mark.parametrize("content,words", [
    ("[" * 200_000 + "]" * 200_000, "nested deeper than 64 levels"),
    ('{"format": "compress.artifact", "version": ' + "9" * 400 + "}", "integer of 400 digits"),
    ('{"format": "compress.artifact", "version": true, "factory": null, "edits": []}', "version True"),
    ('{"format": "compress.artifact", "version": 1.0, "factory": null, "edits": []}', "version 1.0"),
    ('{"format": "compress.artifact", "version": NaN}', "NaN"),
])
def test_a_hostile_compression_json_is_one_line(content, words, tmp_path, run_cli):
    folder = tmp_path / "artifact"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"")
    (folder / "compression.json").write_text(content)
    assert words in one_line_error(run_cli("inspect", folder))


@pytest.mark.parametrize("kind", ["fifo", "devzero", "deep", "bigint"])
def test_a_hostile_latency_cache_is_ignored(kind, tmp_path):
    from compress.opcost import OpCosts

    path = tmp_path / "cache.json"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "devzero":
        path.symlink_to("/dev/zero")
    elif kind == "deep":
        path.write_text("[" * 200_000 + "]" * 200_000)
    else:
        path.write_text(json.dumps({"a": 1}).replace("1", "9" * 400))
    assert OpCosts(path=path).entries == {}


@pytest.mark.parametrize("seed", [2**70, "0", True, -1, 1.5])
def test_api_seed_is_typed_and_bounded(seed, digits_model):
    with pytest.raises(UserError, match="seed: expected an integer"):
        compress.apply(str(digits_model), STAGES + "\n", seed=seed)


@pytest.mark.parametrize("data", [[1, 2], "bundled:digits/train", 42])
def test_api_data_must_be_a_mapping_of_roles(data, digits_model):
    with pytest.raises(UserError, match="data: expected a mapping"):
        compress.plan(str(digits_model), STAGES + "\n", data=data)


@pytest.mark.parametrize("what", ["model", "data"])
def test_a_corrupted_checkpoint_or_data_file_is_refused_by_its_crc(what, digits_model, digits, tmp_path, run_cli):
    x, y = digits
    source = digits_model if what == "model" else tmp_path / "clean.pt"
    if what == "data":
        torch.save({"image": x, "target": y}, source)
    raw = bytearray(source.read_bytes())
    middle = len(raw) // 2
    raw[middle:middle + 4096] = bytes(b ^ 0x5A for b in raw[middle:middle + 4096])  # 4 KB flipped
    bad = tmp_path / "bad.pt"
    bad.write_bytes(bytes(raw))
    if what == "model":
        message = one_line_error(run_cli("inspect", bad))
    else:
        message = one_line_error(run_cli("plan", "-r", recipe_for(tmp_path, data="bad.pt"), digits_model))
    assert "CRC" in message or "damaged" in message, message


def test_a_stage_whose_exclusions_leave_nothing_is_refused(digits, tmp_path, run_cli, digits_model):
    x, y = digits
    torch.save({"image": x, "target": y}, tmp_path / "data.pt")
    path = recipe_for(tmp_path)
    path.write_text(path.read_text().replace("include: ['layer*']}", "include: ['layer*'], exclude: ['*']}"))
    assert "leaves none of the" in one_line_error(run_cli("plan", "-r", path, digits_model))


@pytest.mark.parametrize("key", ["labels", "label", "y"])
def test_labels_under_another_key_are_not_silently_dropped(key, digits, tmp_path, run_cli, digits_model):
    x, y = digits
    torch.save({"image": x, key: y}, tmp_path / "data.pt")
    path = recipe_for(tmp_path, extra="inputs: [{name: image, shape: [1, 8, 8]}]")
    assert f"set data.target: {key}" in one_line_error(run_cli("plan", "-r", path, digits_model))
    path = recipe_for(tmp_path, data_extra=f", target: {key}")
    assert run_cli("plan", "-r", path, digits_model).exit_code == 0


def test_data_that_contradicts_the_declared_inputs_is_refused(digits, tmp_path, run_cli, digits_model):
    x, y = digits
    torch.save({"image": x[:, :, :4, :], "target": y}, tmp_path / "data.pt")  # [1, 4, 8] against [1, 8, 8]
    path = recipe_for(tmp_path, extra="inputs: [{name: image, shape: [1, 8, 8]}]")
    message = one_line_error(run_cli("plan", "-r", path, digits_model))
    assert "samples of shape [1, 4, 8], but the inputs declare [1, 8, 8]" in message


@pytest.mark.parametrize("verb", ["inspect", "plan"])
def test_declared_inputs_too_large_for_memory_are_refused_before_any_forward(verb, digits_model, tmp_path, run_cli,
                                                                               monkeypatch):
    """The size of one forward pass is traced on the meta device and held against the memory
    available before the model runs on anything (a [1, 8192, 8192] input used to run for minutes)."""
    import compress.bench
    import compress.system

    raw = torch.load(digits_model, weights_only=True)
    raw["inputs"] = [{"name": "image", "shape": [1, 1024, 1024], "dtype": "float32"}]
    torch.save(raw, tmp_path / "big.pt")
    monkeypatch.setattr(compress.system, "available_memory", lambda: 1 << 30)
    ran = []
    monkeypatch.setattr(compress.bench, "count_macs", lambda *a: ran.append(a) or 0)
    args = ("inspect", tmp_path / "big.pt")
    if verb == "plan":
        (tmp_path / "r.yaml").write_text("inputs: [{name: image, shape: [1, 1024, 1024]}]\n"
                                         "stages: [{method: svd, ratio: 0.5}]\n")
        args = ("plan", "-r", tmp_path / "r.yaml", tmp_path / "big.pt")
    message = one_line_error(run_cli(*args))
    assert "one sample needs about" in message and "refusing to run the model" in message and not ran


def test_activation_bytes_are_traced_without_allocating():
    from compress import bench

    model = torch.nn.Sequential(torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.ReLU())
    x = torch.zeros(1, 1, 32, 32)
    assert bench.activation_bytes_per_sample(model, (x,)) == 4 * 32 * 32 * (1 + 16 + 16)
    devices = []
    model.register_forward_pre_hook(lambda m, args: devices.append(args[0].device.type))
    huge = torch.zeros(1, 1, 1 << 12, 1 << 12)  # for real, 2 GiB of activations
    assert bench.activation_bytes_per_sample(model, (huge,)) == 4 * (1 << 24) * 33
    assert devices == ["meta"]  # traced on meta only, never run for real


def test_bench_at_a_size_the_model_cannot_take_is_one_line(transformer_model, tmp_path, run_cli):
    """The exported Transformer declares a dynamic sequence axis; its position table stops at 64."""
    onnx_path = tmp_path / "tf.onnx"
    assert run_cli("export", transformer_model, "--out", onnx_path).exit_code == 0
    message = one_line_error(run_cli("bench", onnx_path, "--dim", "sequence=128", "--runs", "3", "--warmup", "1"))
    assert "ONNX Runtime cannot run it on tokens [1, 128]" in message and "64 by 128" in message
    assert run_cli("bench", onnx_path, "--dim", "sequence=32", "--runs", "3", "--warmup", "1").exit_code == 0


def test_export_of_a_checkpoint_whose_declared_inputs_do_not_fit_is_one_line(transformer_model, tmp_path, run_cli):
    raw = torch.load(transformer_model, weights_only=True)
    raw["inputs"] = raw["inputs"][:1]  # tokens without the mask the forward needs
    torch.save(raw, tmp_path / "one.pt")
    message = one_line_error(run_cli("export", tmp_path / "one.pt", "--out", tmp_path / "one.onnx"))
    assert "the checkpoint's declared inputs" in message and "'mask'" in message
    assert not (tmp_path / "one.onnx").exists()


def test_a_torchscript_model_is_refused_by_file_and_in_memory(tmp_path, run_cli):
    from compress.examples.digits import digits_resnet

    scripted = torch.jit.script(digits_resnet().eval())
    torch.jit.save(scripted, tmp_path / "scripted.pt")
    for extra in ([], ["--trust-checkpoint"]):
        assert "TorchScript archive" in one_line_error(run_cli("inspect", tmp_path / "scripted.pt", *extra))
    recipe = {"inputs": [{"name": "image", "shape": [1, 8, 8]}], "stages": [{"method": "svd", "ratio": 0.5}]}
    with pytest.raises(UserError, match="TorchScript module"):
        compress.plan(scripted, recipe)


def _deflated(path, payload_bytes):
    """A zip archive shaped like a torch.save file, with one member deflated: 64 MB of zeros in a
    few tens of KB."""
    import zipfile

    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("model/data.pkl", b"\x80\x02}q\x00.")
        archive.writestr("model/data/0", b"\0" * payload_bytes, compress_type=zipfile.ZIP_DEFLATED)


@pytest.mark.parametrize("role", ["model", "data"])
def test_compressed_members_in_a_torch_file_are_refused_before_inflating(role, tmp_path, run_cli, digits_model):
    _deflated(tmp_path / "bomb.pt", 64 << 20)
    assert (tmp_path / "bomb.pt").stat().st_size < 1 << 20
    if role == "model":
        message = one_line_error(run_cli("inspect", tmp_path / "bomb.pt"))
    else:
        message = one_line_error(run_cli("plan", "-r", recipe_for(tmp_path, data="bomb.pt"), digits_model))
    assert "holds compressed members" in message


def test_a_compressed_npz_declaring_more_than_memory_is_refused(tmp_path, run_cli, digits_model, monkeypatch):
    import compress.system

    x, y = bundled_data("digits/train")["image"][:64], bundled_data("digits/train")["target"][:64]
    np.savez_compressed(tmp_path / "data.npz", image=x.numpy(), target=y.numpy())
    assert run_cli("plan", "-r", recipe_for(tmp_path, data="data.npz"), digits_model).exit_code == 0
    monkeypatch.setattr(compress.system, "available_memory", lambda: 1 << 10)
    assert "more than half the memory" in one_line_error(run_cli("plan", "-r", recipe_for(tmp_path, data="data.npz"),
                                                                  digits_model))
