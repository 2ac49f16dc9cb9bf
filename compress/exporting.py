"""ONNX export, structural check, and parity against the torch model on real data.

Uses torch's TorchScript-based exporter (`dynamo=False`): it needs no extra dependency, handles
dynamic batch and sequence axes through `dynamic_axes`, and exports the factorized layers as
plain Gemm/Conv ops. The graph exposes the model's primary output (the tensor itself, the first
of a tuple, or `logits`), which is what the metric and the parity check look at.
"""
from __future__ import annotations

import contextlib
import errno
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .data import Dataset
from .errors import UserError, first_line
from .metrics import primary_output

OUTPUT_NAME = "output"


class PrimaryOutput(nn.Module):
    """Wraps a model so that it returns only its primary output tensor."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *inputs):
        return primary_output(self.model(*inputs))


def dynamic_axes_for(input_names: list[str], sample_inputs: tuple[torch.Tensor, ...], declared: dict[str, dict[int, str]],
                     dynamic_batch: bool) -> dict[str, dict[int, str]]:
    """Batch axis on every input and the output; a sequence axis on 2-D integer inputs (token ids,
    masks) unless the recipe declares the input's axes itself."""
    axes: dict[str, dict[int, str]] = {}
    for name, tensor in zip(input_names, sample_inputs):
        entry = {0: "batch"} if dynamic_batch else {}
        if name in declared:
            entry.update(declared[name])
        elif tensor.dim() == 2 and not tensor.is_floating_point():
            entry[1] = "sequence"
        if entry:
            axes[name] = entry
    if dynamic_batch:
        axes[OUTPUT_NAME] = {0: "batch"}
    return axes


def export_onnx(model: nn.Module, sample_inputs: tuple[torch.Tensor, ...], input_names: list[str], path: str | Path,
                opset: int = 17, dynamic_axes: dict[str, dict[int, str]] | None = None,
                eager_attention: bool = False) -> None:
    """Export on the CPU in eval mode, then run onnx.checker on the file. `eager_attention`: a
    Hugging Face model's attention exported as its plain ops (softmax of the scores), the pattern
    ONNX Runtime's transformer optimizer fuses, not as scaled_dot_product_attention."""
    import onnx

    from .hf import eager_attention as eager

    wrapped = PrimaryOutput(model).cpu().eval()
    inputs = tuple(t.cpu() for t in sample_inputs)
    with warnings.catch_warnings(), (eager(model) if eager_attention else contextlib.nullcontext()):
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(wrapped, inputs, str(path), input_names=input_names, output_names=[OUTPUT_NAME],
                              dynamic_axes=dynamic_axes or {}, opset_version=opset, dynamo=False,
                              do_constant_folding=True)
        except Exception as exc:  # the exporter raises many types; the user needs the first line
            from .outdir import disk_full

            if disk_full(Path(path)):  # how a full disk looks from inside the exporter: an OSError to the caller
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)) from exc
            raise UserError(f"ONNX export failed: {first_line(exc, 200)}") from exc
    onnx.checker.check_model(str(path), full_check=True)


def verify(model: nn.Module, path: str | Path, input_names: list[str], batch: tuple[torch.Tensor, ...],
           atol: float, rtol: float, threads: int = 1, what: str = "model.onnx") -> Parity:
    """Run the exported `path` in ONNX Runtime on a real `batch` and compare with the torch model
    (the check both `apply` and `export` make); ParityError when they disagree beyond tolerance."""
    with torch.no_grad():
        reference = primary_output(model.eval()(*batch))
    return check_parity(parity(reference, run(path, to_feed(input_names, batch), threads), atol, rtol), what)


def run(path: str | Path, feed: dict[str, np.ndarray], threads: int = 1) -> torch.Tensor:
    """The ONNX model's `output` on one feed."""
    from .bench import make_session

    return torch.from_numpy(make_session(str(path), threads).run([OUTPUT_NAME], feed)[0])


def check_parity(result: Parity, what: str = "model.onnx") -> Parity:
    """`result` of `parity` if it passed, else ParityError (exit 4) saying by how much it failed."""
    from .errors import ParityError

    if not result.passed:
        raise ParityError(f"{what} disagrees with the torch model: max abs diff {result.max_abs_diff:.3g}, "
                          f"max rel diff {result.max_rel_diff:.3g} over export.parity (atol {result.atol}, "
                          f"rtol {result.rtol}); no ONNX model kept")
    return result


def to_feed(input_names: list[str], inputs: tuple[torch.Tensor, ...]) -> dict[str, np.ndarray]:
    return {n: t.detach().cpu().numpy() for n, t in zip(input_names, inputs)}


def onnx_predict(path: str | Path, data: Dataset, input_names: list[str], batch_size: int, threads: int = 1) -> torch.Tensor:
    """The ONNX model's output on every sample of `data`, in order."""
    from .bench import make_session

    session = make_session(str(path), threads)
    outs = [session.run([OUTPUT_NAME], to_feed(input_names, tuple(b[n] for n in input_names)))[0]
            for b in data.batches(batch_size)]
    return torch.from_numpy(np.concatenate(outs))


@dataclass
class Parity:
    """An ONNX model's outputs against the torch model's on the same real inputs."""

    samples: int
    max_abs_diff: float
    max_rel_diff: float  # relative to max(|torch|, 1e-6)
    atol: float
    rtol: float
    passed: bool  # |torch - onnx| <= atol + rtol |torch| everywhere
    sequence_lengths: list[int] | None = None  # the lengths checked, where the inputs have a dynamic sequence axis


def worse(a: Parity, b: Parity, lengths: list[int]) -> Parity:
    """One parity over two checks: the larger differences, passed only if both passed."""
    return Parity(a.samples, max(a.max_abs_diff, b.max_abs_diff), max(a.max_rel_diff, b.max_rel_diff), a.atol, a.rtol,
                  a.passed and b.passed, sorted(set(lengths)))


def shortest(batch: tuple[torch.Tensor, ...], input_names: list[str], axes: dict[str, dict[int, str]]
             ) -> tuple[torch.Tensor, ...] | None:
    """`batch` cut to its shortest example (the fewest tokens its `attention_mask` keeps) along the
    dynamic sequence axis of tokenized text, or None when the inputs are not tokenized text (an
    integer input of another model may have a fixed meaning along axis 1) or the batch is that
    short already."""
    if "attention_mask" not in input_names or batch[input_names.index("attention_mask")].dim() != 2:
        return None
    dynamic = [i for i, n in enumerate(input_names) if 1 in axes.get(n, {}) and batch[i].dim() == 2]
    if input_names.index("attention_mask") not in dynamic:
        return None
    length = batch[dynamic[0]].shape[1]
    short = max(1, int(batch[input_names.index("attention_mask")].sum(1).min()))
    if short >= length:
        return None
    return tuple(t[:, :short] if i in dynamic else t for i, t in enumerate(batch))


def at_length(batch: tuple[torch.Tensor, ...], input_names: list[str], axes: dict[str, dict[int, str]],
              length: int) -> tuple[torch.Tensor, ...]:
    """`batch` at `length` tokens along the dynamic sequence axis of tokenized text: cut when
    longer; when shorter, each row repeated (its attention mask with it) until it is that long, so
    the runtime sees real token ids in the same share of padding. Refused (UserError) for inputs that are not
    tokenized text with a dynamic sequence axis."""
    dynamic = [i for i, n in enumerate(input_names) if 1 in axes.get(n, {}) and batch[i].dim() == 2]
    if "attention_mask" not in input_names or input_names.index("attention_mask") not in dynamic:
        raise UserError("bench.seq_lens and budget.seq_len apply to tokenized text (inputs with an attention_mask "
                        "and a dynamic sequence axis); this model's inputs are "
                        f"{', '.join(input_names)}")
    out = list(batch)
    for i in dynamic:
        t = batch[i]
        if t.shape[1] >= length:
            out[i] = t[:, :length]
        else:
            out[i] = t.repeat(1, -(-length // t.shape[1]))[:, :length]
    return tuple(out)


def parity(reference: torch.Tensor, candidate: torch.Tensor, atol: float, rtol: float) -> Parity:
    """Max absolute and relative difference; passed when |a - b| <= atol + rtol |a| everywhere."""
    ref = reference.double()
    cand = candidate.double().reshape(ref.shape)
    diff = (ref - cand).abs()
    rel = diff / ref.abs().clamp_min(1e-6)  # relative to |ref|, floored so exact zeros do not divide by 0
    return Parity(samples=int(ref.shape[0]) if ref.dim() else 1,
                  max_abs_diff=float(diff.max()) if diff.numel() else 0.0,
                  max_rel_diff=float(rel.max()) if rel.numel() else 0.0,
                  atol=atol, rtol=rtol, passed=bool((diff <= atol + rtol * ref.abs()).all()))
