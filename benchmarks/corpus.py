"""An unlabeled English corpus from text present on any machine with compress installed: the
docstrings of Python's standard library and of compress's own dependencies (numpy, torch,
scikit-learn, onnx, pydantic, click, ...), split into sentences, filtered to prose (a capital
letter, at least six words, no code punctuation), deduplicated, shuffled with a fixed seed and
cut into disjoint train / calibration / eval files of one sentence a line.

    python benchmarks/corpus.py --out /tmp/corpus            # train.txt, calibration.txt, eval.txt
    python benchmarks/corpus.py --one-file sentences.txt      # all of them in one file (data.split cuts it)

The sentences are technical English (documentation prose), not web text: the realistic
benchmark says so wherever it quotes a figure measured on them.
"""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import random
import re
import sys
import warnings
from pathlib import Path

PACKAGES = ("numpy", "torch", "sklearn", "onnx", "pydantic", "click", "yaml", "tqdm", "safetensors")
SENTENCE = re.compile(r"(?<=[.!?])\s+")
PROSE = re.compile(r"^[A-Z][a-z]+ [^<>{}|=_`*#\\\[\]@$~^]+[.!?]$")


def docstrings(limit_modules: int = 4000):
    """Every docstring of the standard library's and the dependencies' modules and their members."""
    names = sorted(sys.stdlib_module_names)
    for package in PACKAGES:
        try:
            root = importlib.import_module(package)
        except ImportError:
            continue
        names.append(package)
        names += sorted(m.name for m in pkgutil.walk_packages(root.__path__, package + ".", onerror=lambda _: None)
                        if "test" not in m.name and "._" not in m.name)[:600]
    seen = 0
    for name in names:
        if name.startswith("_") or "antigravity" in name or "this" == name or seen >= limit_modules:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                module = importlib.import_module(name)
        except BaseException:  # noqa: BLE001 - a module that does not import here is simply left out
            continue
        seen += 1
        for obj in [module] + [getattr(module, a, None) for a in dir(module) if not a.startswith("_")]:
            doc = getattr(obj, "__doc__", None)
            if isinstance(doc, str):
                yield doc


def sentences() -> list[str]:
    found = set()
    for doc in docstrings():
        for paragraph in re.split(r"\n\s*\n", doc):
            text = " ".join(paragraph.split())
            for sentence in SENTENCE.split(text):
                if 40 <= len(sentence) <= 300 and sentence.count(" ") >= 6 and PROSE.match(sentence):
                    found.add(sentence)
    ordered = sorted(found)
    random.Random(0).shuffle(ordered)
    return ordered


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", type=Path, help="a folder for train.txt, calibration.txt and eval.txt")
    where.add_argument("--one-file", type=Path, help="one file of every sentence")
    parser.add_argument("--calibration", type=int, default=1024)
    parser.add_argument("--eval", type=int, default=512)
    args = parser.parse_args()
    found = sentences()
    if args.one_file:
        args.one_file.parent.mkdir(parents=True, exist_ok=True)
        args.one_file.write_text("\n".join(found) + "\n")
        print(f"{len(found)} sentences in {args.one_file}")
        return
    if len(found) < args.calibration + args.eval + 1000:
        raise SystemExit(f"only {len(found)} sentences found")
    args.out.mkdir(parents=True, exist_ok=True)
    splits = {"calibration.txt": found[:args.calibration],
              "eval.txt": found[args.calibration:args.calibration + args.eval],
              "train.txt": found[args.calibration + args.eval:]}
    for name, lines in splits.items():
        (args.out / name).write_text("\n".join(lines) + "\n")
    print(f"{len(found)} sentences: " + ", ".join(f"{name} {len(lines)}" for name, lines in splits.items()))


if __name__ == "__main__":
    main()
