"""Nothing beside --out is followed or swept away: the lock, work folders and resume state are the
run's own, made exclusively and never through a link; sibling outputs and the user's files are
left byte for byte as they were; --force needs the marker; export never overwrites its input."""
import hashlib
import json
import os
import subprocess
import sys

import pytest

from compress import outdir

RECIPE = """\
data: {train: bundled:digits/train, calibration: bundled:digits/calibration, eval: bundled:digits/test, batch_size: 64}
stages: [{method: svd, scheme: spatial, ratio: 0.5, targets: {types: [Conv2d], include: ["layer*"], exclude: ["*.shortcut.*"]}}]
finetune: {steps: 3, lr: 0.001, checkpoint_every: 1}
bench: {batch_sizes: [1], warmup: 1, runs: 3, baselines: []}
"""


def one_line_error(result, code=2):
    assert result.exit_code == code, (result.exit_code, result.stderr, result.output)
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    return result.stderr


def snapshot(root):
    """Every path under root (links not followed) with its kind and content hash."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            if os.path.islink(path):
                out[path] = ("link", os.readlink(path))
            elif os.path.isfile(path):
                out[path] = ("file", hashlib.sha256(open(path, "rb").read()).hexdigest())
            elif os.path.isdir(path):
                out[path] = ("dir", None)
            else:
                out[path] = ("other", None)
    return out


@pytest.fixture
def setup(tmp_path, digits_model):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE)
    user = tmp_path / "user"
    user.mkdir()
    (user / "precious.txt").write_text("the user's own work\n")
    (user / "folder").mkdir()
    (user / "folder" / "notes.md").write_text("notes\n")
    return recipe, user


def dead_pid():
    """A pid that belonged to a process that has exited."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize("plant", ["symlink-file", "symlink-devnull", "hardlink", "fifo", "foreign-file", "folder"])
def test_a_planted_lock_is_refused_and_never_followed(plant, setup, tmp_path, digits_model, run_cli):
    recipe, user = setup
    out = tmp_path / "runs" / "svd"
    out.parent.mkdir()
    lock = out.parent / ".svd.lock"
    if plant == "symlink-file":
        lock.symlink_to(user / "precious.txt")
    elif plant == "symlink-devnull":
        lock.symlink_to("/dev/null")
    elif plant == "hardlink":
        os.link(user / "precious.txt", lock)
    elif plant == "fifo":
        os.mkfifo(lock)
    elif plant == "foreign-file":
        lock.write_text("my shopping list\n")
    else:
        lock.mkdir()
    before = snapshot(tmp_path)
    message = one_line_error(run_cli("apply", "-r", recipe, digits_model, "--out", out, "-q"))
    assert ".svd.lock" in message or "cannot write" in message
    assert snapshot(tmp_path) == before and not out.exists()


def test_a_planted_resume_folder_or_temp_link_is_never_written_through(setup, tmp_path, digits_model, run_cli):
    recipe, user = setup
    out = tmp_path / "svd"
    (tmp_path / ".svd.resume").symlink_to(user)  # a link where the resume state would go
    before = snapshot(user)
    message = one_line_error(run_cli("apply", "-r", recipe, digits_model, "--out", out, "-q"))
    assert ".svd.resume" in message
    assert snapshot(user) == before and not out.exists()
    (tmp_path / ".svd.resume").unlink()
    # the temp file's old fixed name, planted as a link into the user's files, is never followed
    (tmp_path / ".svd.resume").mkdir()
    (tmp_path / ".svd.resume" / "state.pt.tmp").symlink_to(user / "precious.txt")
    result = run_cli("apply", "-r", recipe, digits_model, "--out", out, "-q")
    assert result.exit_code == 0, result.stderr
    assert snapshot(user) == before


def test_a_planted_resume_state_link_is_not_read(setup, tmp_path, digits_model, run_cli):
    recipe, user = setup
    (tmp_path / ".svd.resume").mkdir()
    (tmp_path / ".svd.resume" / "state.pt").symlink_to(user / "precious.txt")
    message = one_line_error(run_cli("apply", "-r", recipe, digits_model, "--out", tmp_path / "svd", "-q",
                                     "--resume"))
    assert "not a resume state" in message


def test_sibling_outputs_and_their_work_are_never_swept(setup, tmp_path, digits_model, run_cli):
    recipe, user = setup
    runs = tmp_path / "runs"
    runs.mkdir()
    dead = dead_pid()
    # another job's live work for out/svd.v2, an older version's partial, a user's look-alike folder
    survivors = [runs / f".svd.v2.partial-{os.getpid()}-abc", runs / ".svd.v2.abc123.partial",
                 runs / f".svd.v2.partial-{dead}-abc", runs / ".svd.x.partial", runs / f".svd.partial-{dead}-a.b"]
    for folder in survivors:
        folder.mkdir()
        (folder / "work.txt").write_text("someone else's")
    stale = runs / f".svd.partial-{dead}-zz9"  # a killed run into this same --out
    stale.mkdir()
    (stale / "model.onnx").write_text("half")
    before = snapshot(runs)
    result = run_cli("apply", "-r", recipe, digits_model, "--out", runs / "svd", "-q")
    assert result.exit_code == 0, result.stderr
    after = snapshot(runs)
    for path, what in before.items():
        if not path.startswith(str(stale)):
            assert after.get(path) == what, path
    assert not stale.exists()
    assert sorted(p.name for p in runs.iterdir() if p.name.startswith(".svd.") and "v2" not in p.name) == sorted(
        p.name for p in survivors if "v2" not in p.name)


@pytest.mark.parametrize("name", ["*", ".*", "[a-z]*", "?"])
def test_a_glob_in_out_sweeps_nothing(name, setup, tmp_path, digits_model, run_cli):
    recipe, user = setup
    runs = tmp_path / "g2"
    runs.mkdir()
    for folder in (runs / ".mine.data.partial", runs / f".x.partial-{dead_pid()}-abc", runs / "keep"):
        folder.mkdir()
        (folder / "file.txt").write_text("mine")
    before = snapshot(runs)
    result = run_cli("apply", "-r", recipe, digits_model, "--out", runs / name, "-q")
    assert result.exit_code == 0, result.stderr
    after = snapshot(runs)
    assert all(after.get(p) == w for p, w in before.items())


@pytest.mark.parametrize("files", [("report.json", "compression.json", "model.pt"), ("report.json", "compression.json"),
                                   ("model.onnx",), ("report.md", "model.safetensors")])
def test_force_needs_the_marker(files, setup, tmp_path, digits_model, run_cli):
    recipe, _ = setup
    out = tmp_path / "out"
    out.mkdir()
    for name in files:
        (out / name).write_text(f"the user's {name}")
    before = snapshot(tmp_path)
    message = one_line_error(run_cli("apply", "-r", recipe, digits_model, "--out", out, "-q", "--force"))
    assert outdir.MARKER in message
    assert snapshot(tmp_path) == before


def test_force_replaces_a_marked_output(setup, tmp_path, digits_model, run_cli):
    recipe, _ = setup
    out = tmp_path / "out"
    assert run_cli("apply", "-r", recipe, digits_model, "--out", out, "-q").exit_code == 0
    assert (out / outdir.MARKER).is_file()
    result = run_cli("apply", "-r", recipe, digits_model, "--out", out, "-q", "--force")
    assert result.exit_code == 0, result.stderr
    # no work, old or lock folder is left beside it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "recipe.yaml", "user"]


@pytest.mark.parametrize("out", [".", "", "..", "sub/..", "./"])
def test_out_must_name_a_folder(out, setup, tmp_path, digits_model, run_cli, monkeypatch):
    recipe, _ = setup
    work = tmp_path / "cwd"
    (work / "sub").mkdir(parents=True)
    monkeypatch.chdir(work)
    before = snapshot(tmp_path)
    message = one_line_error(run_cli("apply", "-r", recipe, digits_model, "--out", out, "-q", "--force"))
    assert "name an output folder" in message or "holds the input" in message or "exists" in message
    assert snapshot(tmp_path) == before


def test_export_never_overwrites_its_input_or_breaks_an_output_folder(setup, tmp_path, digits_model, run_cli):
    recipe, _ = setup
    model = tmp_path / "model.pt"
    model.write_bytes(digits_model.read_bytes())
    before = snapshot(tmp_path)
    for target in (model, tmp_path / "." / "model.pt"):
        assert "is the input" in one_line_error(run_cli("export", model, "--out", target, "--force"))
    assert snapshot(tmp_path) == before
    out = tmp_path / "svd"
    assert run_cli("apply", "-r", recipe, digits_model, "--out", out, "-q").exit_code == 0
    before = snapshot(tmp_path)
    for target in (out / "model.safetensors", out / "model.onnx", out / "extra.onnx"):
        message = one_line_error(run_cli("export", out, "--out", target, "--force"))
        assert "is the input" in message or "output folder of compress apply" in message
    assert snapshot(tmp_path) == before


def test_lock_helpers_leave_nothing_behind(tmp_path):
    out = tmp_path / "o"
    with outdir.locked(out):
        lock = tmp_path / ".o.lock"
        assert lock.read_text() == str(os.getpid())
        work = outdir.make_work_dir(out)
        assert work.name.startswith(f".o.partial-{os.getpid()}-") and work.is_dir()
        outdir.remove_own_dir(work)
    assert list(tmp_path.iterdir()) == []


def test_duplicate_budget_folders_are_refused_before_any_run(tmp_path, digits_model, run_cli):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.replace("finetune: {steps: 3, lr: 0.001, checkpoint_every: 1}",
                                     "finetune: {steps: 0}") + "budget: {macs: 2.0}\n")
    message = one_line_error(run_cli("sweep", "-r", recipe, digits_model, "--budgets", "1.5,1.5000001",
                                     "--out", tmp_path / "sweep", "-q"))
    assert "would share the folder budget-1.5" in message
    assert not (tmp_path / "sweep").exists()
    assert json.dumps(sorted(p.name for p in tmp_path.iterdir())) == '["recipe.yaml"]'


def _fill_the_disk(monkeypatch, writer: str):
    """The disk is full from the moment `writer` runs: it fails as it does on a full disk
    (torch.save and the ONNX exporter raise RuntimeError, safetensors its own error), and the
    file system reports no free space."""
    import shutil
    from collections import namedtuple

    import safetensors.torch
    import torch
    from safetensors import SafetensorError

    import compress.exporting
    import compress.quantize
    import compress.report

    usage = namedtuple("usage", "total used free")
    real_usage = shutil.disk_usage
    full = []

    def disk_usage(path):
        return usage(1 << 40, 1 << 40, 0) if full else real_usage(path)

    def failing(error, real):
        def fail(*args, **kwargs):
            if writer == "torch.save" and args[0].get("format") != "compress.checkpoint":  # resume state
                return real(*args, **kwargs)
            full.append(True)
            raise error
        return fail

    monkeypatch.setattr(outdir.shutil, "disk_usage", disk_usage)
    target, error = {
        "onnx": ((compress.exporting.torch.onnx, "export"), RuntimeError("failed to write the model")),
        "torch.save": ((torch, "save"), RuntimeError("[enforce fail at inline_container.cc:858] . "
                                                     "PytorchStreamWriter failed writing file data/0")),
        "safetensors": ((safetensors.torch, "save_file"), SafetensorError("Error while serializing: "
                                                                          "IoError(No space left)")),
        "report": ((compress.report, "to_markdown"), OSError(28, "No space left on device")),
    }[writer]
    monkeypatch.setattr(*target, failing(error, getattr(*target)))


@pytest.mark.parametrize("writer", ["onnx", "torch.save", "safetensors", "report"])
def test_a_full_disk_is_one_line_and_leaves_nothing(writer, setup, tmp_path, digits_model, run_cli, monkeypatch):
    recipe, user = setup
    before = snapshot(tmp_path)
    _fill_the_disk(monkeypatch, writer)
    message = one_line_error(run_cli("apply", "-r", recipe, digits_model, "--out", tmp_path / "o", "-q"))
    assert "cannot write the outputs (No space left on device); nothing was written" in message
    after = snapshot(tmp_path)
    assert {p: v for p, v in after.items() if p in before} == before
    resume = {str(tmp_path / ".o.resume"), str(tmp_path / ".o.resume" / "state.pt")}  # kept for --resume
    assert set(after) - set(before) <= resume, sorted(set(after) - set(before))


@pytest.mark.parametrize("writer", ["onnx"])
def test_a_full_disk_in_export_is_one_line_and_leaves_nothing(writer, tmp_path, digits_model, run_cli, monkeypatch):
    _fill_the_disk(monkeypatch, writer)
    message = one_line_error(run_cli("export", digits_model, "--out", tmp_path / "m.onnx"))
    assert "cannot write the file (No space left on device); nothing was written" in message
    assert list(tmp_path.iterdir()) == []
