"""Data sources: tensor files and the bundled example data, and batching.

A data set is a dict of tensors with equal first dimension: the model's forward arguments by
name, plus an optional target. Files are read without unpickling anything: `.pt` with
`weights_only=True`, `.npz` with `allow_pickle=False`, `.safetensors` natively.
"""
from __future__ import annotations

import math
import pickle
import zipfile
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from .errors import UserError, first_line
from .files import FileRefused, check_zip

BUNDLED_PREFIX = "bundled:"
DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
          "int64": torch.int64, "int32": torch.int32, "bool": torch.bool}


class Dataset:
    """Named tensors sharing their first dimension, with the source they came from."""

    def __init__(self, tensors: dict[str, torch.Tensor], source: str):
        if not tensors:
            raise UserError(f"{source}: holds no tensors")
        odd = next((k for k in tensors if not isinstance(k, str)), None)
        if odd is not None:
            raise UserError(f"{source}: key {odd!r} is a {type(odd).__name__}; keys name the model's inputs and the "
                            "target, so they must be strings")
        for key, tensor in tensors.items():
            if tensor.layout != torch.strided or tensor.device.type == "meta":
                what = "a meta tensor (no data)" if tensor.device.type == "meta" else f"a {tensor.layout} tensor"
                raise UserError(f"{source}: {key!r} is {what}; store it as a dense tensor")
        lengths = {k: v.shape[0] if v.dim() else None for k, v in tensors.items()}
        if None in lengths.values() or len(set(lengths.values())) != 1:
            raise UserError(f"{source}: tensors must share their first (sample) dimension, got {lengths}")
        if next(iter(lengths.values())) == 0:
            raise UserError(f"{source}: holds zero samples")
        for key, tensor in tensors.items():
            check_values(tensor, source, key)
        self.tensors = tensors
        self.source = source
        self.padding: str | None = None  # tokenized text: the side its padding is on ("right" or "left")

    def padded(self, side: str) -> "Dataset":
        """This set, marked as tokenized text padded on `side` (its `attention_mask` says where):
        `batches(trim=True)` then cuts each batch to its longest example."""
        if "attention_mask" not in self.tensors or self.tensors["attention_mask"].dim() != 2:
            raise ValueError("only tokenized text (a 2-D attention_mask) is padded")
        self.padding = "left" if side == "left" else "right"
        return self

    def __len__(self) -> int:
        return next(iter(self.tensors.values())).shape[0]

    def keys(self) -> list[str]:
        return list(self.tensors)

    def batches(self, batch_size: int, shuffle: bool = False, generator: torch.Generator | None = None,
                drop_last: bool = False, trim: bool = False) -> Iterator[dict[str, torch.Tensor]]:
        """Batches in order (or shuffled); with `trim`, tokenized text is cut to each batch's longest
        example (padding to the longest in the batch, not in the whole set). Outputs per token then
        differ in length from batch to batch, so evaluation keeps the whole set's padding."""
        n = len(self)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        stop = n - n % batch_size if drop_last and n >= batch_size else n
        for start in range(0, stop, batch_size):
            idx = order[start:start + batch_size]
            batch = {k: v[idx] for k, v in self.tensors.items()}
            yield self._trimmed(batch) if trim and self.padding else batch

    def _trimmed(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        mask = batch["attention_mask"]
        used = torch.nonzero(mask.any(0)).flatten()
        if used.numel() == 0:
            return batch
        width = mask.shape[1]
        keep = slice(0, int(used[-1]) + 1) if self.padding == "right" else slice(int(used[0]), width)
        return {k: v[:, keep] if v.dim() >= 2 and v.shape[1] == width else v for k, v in batch.items()}

    def subset(self, index: torch.Tensor, what: str) -> "Dataset":
        """The samples at `index`, as a data set of their own named `what` of this one."""
        out = Dataset({k: v[index] for k, v in self.tensors.items()}, f"{self.source} ({what})")
        out.padding = self.padding
        return out

    def split(self, calibration: int, evaluation: int, seed: int) -> dict[str, "Dataset"]:
        """Disjoint train, calibration and eval sets, shuffled by `seed` (the same on every run)."""
        n = len(self)
        if calibration + evaluation >= n:
            raise UserError(f"{self.source}: {n:,} examples, too few for data.split (calibration {calibration:,} + eval "
                            f"{evaluation:,}, and at least one left to train)")
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        return {"calibration": self.subset(order[:calibration], "split: calibration"),
                "eval": self.subset(order[calibration:calibration + evaluation], "split: eval"),
                "train": self.subset(order[calibration + evaluation:], "split: train")}

    def head(self, count: int) -> dict[str, torch.Tensor]:
        """The first `count` samples (repeated cyclically when the set is smaller)."""
        idx = torch.arange(count) % len(self)
        return {k: v[idx] for k, v in self.tensors.items()}


def load_source(source: str) -> Dataset:
    """Load a data source: a tensor file or `bundled:NAME/SPLIT`."""
    if source.startswith(BUNDLED_PREFIX):
        from .examples import bundled_data

        return Dataset(bundled_data(source[len(BUNDLED_PREFIX):]), source)
    path = Path(source)
    if not path.is_file():
        raise UserError(f"{source}: data file not found")
    if path.stat().st_size == 0:
        raise UserError(f"{source}: data file is empty")
    suffix = path.suffix.lower()
    try:
        if suffix == ".npz":
            try:
                check_zip(path, compressed_ok=True)  # np.savez_compressed deflates; its size is still bounded
            except FileRefused as exc:
                raise UserError(f"{source}: not a usable data file: {exc}") from None
            with np.load(path, allow_pickle=False) as archive:
                tensors = {}
                for k in archive.files:
                    array = archive[k]
                    if array.dtype.kind not in "biuf":
                        raise UserError(f"{source}: {k!r} holds {array.dtype} values (text or objects); data must "
                                        "be numbers: tokenize text, and store class labels as integers")
                    tensors[k] = torch.from_numpy(np.ascontiguousarray(array))
        elif suffix == ".safetensors":
            from safetensors import SafetensorError
            from safetensors.torch import load_file

            try:
                tensors = load_file(str(path))
            except SafetensorError as exc:
                raise ValueError(str(exc)) from None
        elif suffix in (".pt", ".pth"):
            try:
                check_zip(path)
            except FileRefused as exc:
                raise UserError(f"{source}: not a usable data file: {exc}") from None
            tensors = torch.load(path, map_location="cpu", weights_only=True)
        else:
            raise UserError(f"{source}: unknown data format {suffix!r}; use .pt, .npz or .safetensors (or text: .txt, "
                            ".jsonl, .csv, with a model that brings a tokenizer)")
    except UserError:
        raise
    except (pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError, ValueError, OSError, EOFError) as exc:
        raise UserError(f"{source}: not a readable {suffix} tensor file ({first_line(exc)})") from None
    if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
        raise UserError(f"{source}: expected a mapping of names to tensors")
    return Dataset({k: _default_dtype(v) for k, v in tensors.items()}, source)


SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32,
                    torch.int16, torch.int8, torch.uint8, torch.bool)


def check_values(tensor: torch.Tensor, source: str, key: str) -> None:
    """A data tensor must have a plain dtype and hold only finite values; the error names the key,
    how many values and samples are bad, and the first bad sample."""
    if tensor.dtype not in SUPPORTED_DTYPES:
        raise UserError(f"{source}: {key!r} has dtype {str(tensor.dtype).removeprefix('torch.')}, which compress "
                        "does not train or export; store it as float32, int64 or bool")
    if not tensor.is_floating_point():
        return
    bad = ~torch.isfinite(tensor)
    if bad.any():
        per_sample = bad.reshape(tensor.shape[0], -1).any(dim=1)
        first = int(per_sample.nonzero()[0, 0])
        raise UserError(f"{source}: {key!r} holds {int(bad.sum()):,} non-finite values (NaN or Inf) in "
                        f"{int(per_sample.sum()):,} samples, the first at index {first}; fix or remove those samples")


def _default_dtype(tensor: torch.Tensor) -> torch.Tensor:
    # NumPy defaults to float64; models almost always want float32.
    return tensor.float() if tensor.dtype == torch.float64 else tensor


def split_batch(batch: dict[str, torch.Tensor], input_names: list[str], target: str):
    """(positional model inputs, target or None) from a batch."""
    return tuple(batch[n] for n in input_names), batch.get(target)


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


MAX_SAMPLE_ELEMENTS = 1 << 26  # one sample of one input: 64M elements (256 MB of float32)


def sample_size_error(name: str, shape) -> str | None:
    """Why an input of this per-sample shape cannot be allocated, or None: the one bound that a
    checkpoint's, a compression.json's and a recipe's input descriptions are all held to."""
    if math.prod(shape) > MAX_SAMPLE_ELEMENTS:
        return (f"input {name!r} has shape {list(shape)}, over {MAX_SAMPLE_ELEMENTS:,} elements per sample; "
                "refusing to allocate it")
    return None


def synthetic_sample(specs: list[dict]) -> tuple[torch.Tensor, ...]:
    """One sample per input spec when there is no data: standard normal floats, zero integers
    (a valid index for any embedding table)."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for s in specs:
        error = sample_size_error(s["name"], s["shape"])
        if error:
            raise UserError(error)
        dtype = DTYPES[s.get("dtype", "float32")]
        shape = (1, *s["shape"])
        out.append(torch.randn(shape, generator=gen).to(dtype) if dtype.is_floating_point else torch.zeros(shape, dtype=dtype))
    return tuple(out)
