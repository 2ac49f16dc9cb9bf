"""Helpers shared by the benchmarks: train the bundled example, run recipes in-process."""
from __future__ import annotations

import argparse
import copy
import json
import tempfile
from pathlib import Path

import yaml

import compress
from compress.examples.training import train_digits_resnet

REPO = Path(__file__).resolve().parents[1]


def example_model(workdir: Path, seed: int = 0) -> tuple[Path, dict]:
    path = workdir / "digits-resnet.pt"
    summary = train_digits_resnet(path, seed=seed, progress=False)
    return path, summary


def load_recipe_dict(name: str) -> dict:
    return yaml.safe_load((REPO / "recipes" / name).read_text())


def run_recipe(document: dict, model: Path, workdir: Path, label: str, trust_checkpoint: bool = False) -> dict:
    """Run a recipe given as a dict as `compress apply` does, through the public API; its report."""
    result = compress.apply(model, copy.deepcopy(document), trust_checkpoint=trust_checkpoint)
    return compress.export(result, workdir / label, force=True).to_json()


def scratch() -> Path:
    return Path(tempfile.mkdtemp(prefix="compress-bench-"))


def percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def arguments(doc: str) -> argparse.ArgumentParser:
    """The benchmark's command line: its docstring as help, and --out for the JSON results."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    return parser


def write_results(path: Path | None, results: dict) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2, default=str) + "\n")


def profile(path: Path, feed: dict, runs: int = 20, threads: int = 1, top: int = 5) -> dict[str, float]:
    """Share of kernel time by operator type (the `top` largest), from ONNX Runtime's profiler."""
    import collections

    import onnxruntime as ort

    options = ort.SessionOptions()
    options.enable_profiling = True
    options.intra_op_num_threads = threads
    with tempfile.TemporaryDirectory(prefix="compress-profile-") as folder:  # not beside the model: its
        options.profile_file_prefix = str(Path(folder) / "profile")        # folder may be a compress output
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        for _ in range(runs):
            session.run(None, feed)
        events = json.loads(Path(session.end_profiling()).read_text())
    by_op = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            by_op[e["args"]["op_name"]] += e["dur"]
    total = sum(by_op.values()) or 1
    return {op: round(us / total, 3) for op, us in by_op.most_common(top)}
