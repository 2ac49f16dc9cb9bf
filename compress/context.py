"""Loading and validation, the pipeline's first step: the recipe, the model and the data, checked
against each other before anything is computed (inputs that fit, labels that mean what the loss
and the metric take them to mean, outputs of a known kind, a forward pass that fits in memory).
`load_context` gives the `Context` every later step reads; `Compressed` is what execution hands
to publishing."""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import bench, budget as budgeting, exporting, metrics, quantize
from .checkpoint import LoadedModel, load_model
from .data import Dataset, load_source, split_batch, synthetic_sample
from .hf import TextModel, load_tokenizer
from .text import is_text, load_text
from .errors import UserError, first_line
from .finetune import predict
from .losses import detect_output_kind
from .methods import Method
from .metrics import choose_metric, primary_output, score
from .recipe import LoadedRecipe
from .trust import trusted_prefixes


@dataclass
class Options:
    """What the command line adds to a recipe."""

    seed: int | None = None
    device: str = "cpu"
    trust_checkpoint: bool = False
    trust_factories: tuple[str, ...] = ()
    progress: bool = True
    resume: bool = False
    max_metric_drop: float | None = None
    min_speedup: float | None = None
    min_size_ratio: float | None = None


@dataclass
class Context:
    """Everything loaded before planning: the model, data, input names and shapes."""

    recipe: LoadedRecipe
    loaded: LoadedModel
    input_names: list[str]
    sample: tuple[torch.Tensor, ...]  # one real (or synthetic) sample, batch size 1
    data: dict[str, Dataset | None]
    target: str
    timings: dict[str, float] = field(default_factory=dict)
    output: dict = field(default_factory=lambda: {"kind": "logits", "reason": "default"})  # losses.detect_output_kind
    # what calibration (and a budget's input statistics) left on each stage, by stage: a sweep's runs share it
    calibrated: dict = field(default_factory=dict)


@contextmanager
def timed(timings: dict[str, float], name: str):
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = round(timings.get(name, 0.0) + time.perf_counter() - start, 3)


METRIC_TOLERANCE = 1e-3  # torch and model.onnx metrics further apart than this get a warning


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise UserError(f"--device {name!r}: expected cpu, cuda, cuda:N or auto") from None
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name!r}: compress fine-tunes on cpu or cuda (cuda:N), or auto")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


ROLES = ("train", "calibration", "eval")


def load_context(recipe: LoadedRecipe, model: str | Path | nn.Module | LoadedModel, options: Options,
                 data: dict | None = None) -> Context:
    """Load (or take) the model and the data and check that they fit. `model` is a file or folder, or
    a model in memory; `data` maps roles (train, calibration, eval) to data sets given in memory
    (Dataset, or a dict of tensors), overriding the recipe's sources for those roles."""
    timings: dict[str, float] = {}
    r = recipe.recipe
    with timed(timings, "load"):
        if isinstance(model, LoadedModel):
            loaded = model
        elif isinstance(model, nn.Module):
            loaded = LoadedModel(model.eval(), "<in memory>")
        else:
            loaded = load_model(model, r.model.factory, r.model.kwargs, trust=options.trust_checkpoint,
                                trusted=trusted_prefixes(options.trust_factories), task=r.model.task,
                                output=r.model.output)
        if isinstance(loaded.model, torch.jit.ScriptModule) or any(
                isinstance(m, torch.jit.ScriptModule) for m in loaded.model.modules()):
            raise UserError(f"{loaded.path}: is (or holds) a TorchScript module; compress rewrites a model's modules, "
                            "which a scripted model cannot have done to it: pass the eager model instead")
        _check_weights(loaded.model, loaded.path)
        if data is not None and not isinstance(data, dict):
            raise UserError(f"data: expected a mapping of roles (train, calibration, eval) to data sets, not "
                            f"{type(data).__name__}")
        data = _load_data(recipe, {role: _in_memory(d, role) for role, d in (data or {}).items()}, loaded.tokenizer)
        metrics.OUTPUT_KEY.set(r.model.output_key)
        try:  # a context that fails to load leaves no output key behind for the next one
            input_names, sample = _inputs(r, loaded, data, r.data.target)
            per_sample = check_inputs(loaded.model, input_names, sample, data, r.data.target, r)
            evaluated = data["eval"]
            if r.data.metric in ("accuracy", "auc") and evaluated is not None and r.data.target not in evaluated.keys():
                raise UserError(f"data.metric {r.data.metric} needs labels, and {evaluated.source} has no key "
                                f"{r.data.target!r} (data.target); add them, or use metric: agreement, cosine or neighbors")
            output = find_output_kind(loaded.model, input_names, sample, data, r)
            bench.check_fits(r.bench.batch_sizes, _at_longest(r, input_names, sample, per_sample), "bench.batch_sizes")
            if any(d is not None for d in data.values()):
                bench.check_fits([r.data.batch_size], per_sample, "data.batch_size")
            if r.quantize is not None:  # mistakes in the quantize section fail now, not after fine-tuning
                quantize.check_section(r.quantize, [n for n, _ in loaded.model.named_modules() if n],
                                       data["calibration"] is not None, loaded.model)
        except BaseException:
            metrics.OUTPUT_KEY.set(None)
            raise
    return Context(recipe, loaded, input_names, sample, data, r.data.target, timings, output)


def _load_data(recipe: LoadedRecipe, given: dict[str, Dataset], tokenizer_folder: str | None = None
               ) -> dict[str, Dataset | None]:
    """The data set of each role: given in memory, or the recipe's source (each file read once;
    text tokenized by data.tokenizer, by default the model folder's); calibration defaults to
    train, eval to calibration, in memory as in the recipe."""
    r = recipe.recipe
    sources = {"train": r.data.train, "calibration": r.data.calibration or r.data.train}
    sources["eval"] = r.data.eval or sources["calibration"]
    cache: dict[str, Dataset] = {}
    tokenizers: dict = {}
    data: dict[str, Dataset | None] = {}
    for role, source in sources.items():
        if role in given:
            data[role] = given[role]
        elif source is None:
            data[role] = None
        else:
            resolved = recipe.resolve(source)
            if resolved not in cache:
                cache[resolved] = (_load_text(recipe, resolved, tokenizer_folder, tokenizers) if is_text(resolved)
                                   else load_source(resolved))
            data[role] = cache[resolved]
    split = r.data.split
    if split is not None and data["train"] is not None and "train" not in given:
        parts = data["train"].split(split.calibration, split.eval, split.seed)
        data.update({role: given.get(role, part) for role, part in parts.items()})
    if "train" in given and "calibration" not in given and r.data.calibration is None:
        data["calibration"] = given["train"]
    if "eval" not in given and r.data.eval is None and ("calibration" in given or "train" in given):
        data["eval"] = data["calibration"]
    return data


def _load_text(recipe: LoadedRecipe, source: str, tokenizer_folder: str | None, tokenizers: dict) -> Dataset:
    d = recipe.recipe.data
    if d.tokenizer != "auto":
        tokenizer_folder = recipe.resolve(d.tokenizer)
    elif tokenizer_folder is None:
        raise UserError(f"{source}: text data needs a tokenizer, and the model brings none; set data.tokenizer to "
                        "the folder of the model's tokenizer")
    if tokenizer_folder not in tokenizers:  # loaded once for every text file of the recipe
        tokenizers[tokenizer_folder] = load_tokenizer(tokenizer_folder)
    return load_text(source, tokenizers[tokenizer_folder], d.text_keys, d.label_key, d.target, d.max_length,
                     d.max_examples)


def _check_weights(model: nn.Module, source) -> None:
    """Weights must be finite: NaN or Inf make every decomposition fail and every metric meaningless."""
    for name, tensor in (*model.named_parameters(), *model.named_buffers()):
        if tensor.is_floating_point() and tensor.device.type != "meta" and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise UserError(f"{source}: weight {name!r} holds {bad:,} non-finite values (NaN or Inf); the model "
                            "cannot be compressed or measured: fix or retrain it")


def _in_memory(source, role: str) -> Dataset:
    if role not in ROLES:
        raise UserError(f"data role {role!r}: expected one of {', '.join(ROLES)}")
    if isinstance(source, Dataset):
        return source
    if isinstance(source, dict) and source and all(isinstance(v, torch.Tensor) for v in source.values()):
        return Dataset(dict(source), f"<{role} data in memory>")
    if isinstance(source, (str, Path)):
        return load_source(str(source))
    raise UserError(f"data {role}: expected a Dataset, a dict of tensors or a file path, not {type(source).__name__}")


LABEL_NAMES = {"label", "labels", "y", "targets", "target", "class", "classes", "class_label", "class_labels"}


AFFINE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Bilinear, nn.Embedding)


def find_output_kind(model: nn.Module, names: list[str], sample, data, r) -> dict:
    """What the model returns (logits, probabilities, log-probabilities), from the recipe or from the
    model's last module and its outputs on up to 256 samples of the data."""
    if r.finetune.output != "auto":
        return {"kind": r.finetune.output, "reason": "set in the recipe (finetune.output)"}
    if isinstance(model, TextModel) and model.output != "logits":
        return {"kind": "embeddings", "reason": f"auto: the encoder's pooled output (model.output {model.output})"}
    source = next((d for d in (data["calibration"], data["train"], data["eval"]) if d is not None), None)
    inputs = sample if source is None else tuple(source.head(min(256, len(source)))[n] for n in names)
    leaves = [m for m in model.modules() if not list(m.children())]
    seen = []
    handle = leaves[-1].register_forward_hook(lambda m, a, out: seen.append(out)) if leaves else None
    try:
        with torch.no_grad():
            outputs = primary_output(model.eval()(*inputs))
    finally:
        if handle is not None:
            handle.remove()
    # the output is the last module's own (nothing applied after it): known to be unbounded when that
    # module is affine, whatever values the sample happens to take
    raw = bool(seen) and isinstance(seen[-1], torch.Tensor) and seen[-1].shape == outputs.shape and \
        torch.equal(seen[-1].float(), outputs.float())
    kind, reason = detect_output_kind(model, outputs, affine_output=raw and isinstance(leaves[-1], AFFINE))
    return {"kind": kind, "reason": f"auto: {reason}"}


def _inputs(r, loaded: LoadedModel, data: dict[str, Dataset | None], target: str):
    """Input names in call order and one sample: from the recipe, else the checkpoint, else the data."""
    specs = [s.model_dump() for s in r.inputs] if r.inputs else loaded.inputs
    some = next((d for d in data.values() if d is not None), None)
    declared = {s["name"] for s in specs or []}
    for d in data.values():  # labels under another name would be silently dropped (distillation instead)
        if d is None or target in d.keys() or "target" in r.data.model_fields_set:  # a key the user chose
            continue
        lookalike = next((k for k in d.keys() if k not in declared and k.lower() in LABEL_NAMES), None)
        if lookalike is not None:
            raise UserError(f"{d.source}: has no key {target!r} (data.target) but holds {lookalike!r}; if those are "
                            f"the labels, set data.target: {lookalike}")
    if specs:
        names = [s["name"] for s in specs]
        if target in names:
            raise UserError(f"data.target {target!r} is also one of the model's inputs; name the labels' key "
                            "(data.target) or the inputs differently")
    elif some is not None:
        names = [k for k in some.keys() if k != target]
    else:
        raise UserError("cannot tell the model's inputs: add `inputs:` or `data:` to the recipe")
    if some is not None:
        for d in data.values():
            if d is None:
                continue
            missing = [n for n in names if n not in d.keys()]
            if missing:
                raise UserError(f"{d.source}: has no key {missing[0]!r} for model input (keys: {', '.join(d.keys())}); "
                                f"rename it or set `inputs:` in the recipe")
            for spec in specs if r.inputs else []:  # the data must be what the recipe declares
                shape, dynamic = spec.get("shape"), {int(a) for a in (spec.get("dynamic_axes") or {})}
                have = list(d.tensors[spec["name"]].shape[1:])
                if shape is not None and (len(have) != len(shape) or any(
                        h != w for axis, (h, w) in enumerate(zip(have, shape), start=1) if axis not in dynamic)):
                    raise UserError(f"{d.source}: {spec['name']!r} has samples of shape {have}, but the inputs "
                                    f"declare {list(shape)}; fix the data or the declared shape")
        first = some.head(1)
        return names, tuple(first[n] for n in names)
    return names, synthetic_sample(specs)


def check_inputs(model: nn.Module, names: list[str], sample, data=None, target: str = "target", r=None,
                 what: str = "recipe inputs") -> int:
    """Bytes one sample's forward pass keeps alive, after refusing inputs whose forward would not fit
    in memory (traced on the meta device first, before the model runs on anything real) and data
    that does not fit the model (`_check_fit`)."""
    per_sample = bench.activation_bytes_per_sample(model, sample, meta_only=True)
    if per_sample is not None:
        bench.check_fits([1], per_sample, what)
    _check_fit(model, names, sample, data or {}, target, r, what)
    return per_sample if per_sample is not None else bench.activation_bytes_per_sample(model, sample)


def _check_fit(model: nn.Module, names: list[str], sample, data, target: str, r=None,
               what: str = "recipe inputs") -> None:
    """Run one sample of every data source through the model, so that misfitting data fails now,
    with the source's name; then check the labels against the model's output (class indices in
    range, no real-valued labels for a class output)."""
    checks = {d.source: (d, tuple(d.head(1)[n] for n in names)) for d in data.values() if d is not None}
    for source, (dataset, inputs) in (checks or {what: (None, sample)}).items():
        try:
            with torch.no_grad():
                raw = model.eval()(*inputs)
                output = primary_output(raw)
        except Exception as exc:  # any error inside the user's forward means the data does not fit
            shapes = ", ".join(f"{n} {list(t.shape[1:])} {str(t.dtype).removeprefix('torch.')}"
                               for n, t in zip(names, inputs))
            raise UserError(f"{source}: inputs ({shapes}) do not fit the model: {first_line(exc)}") from None
        if r is not None and r.model.output_key is not None and isinstance(raw, torch.Tensor):
            raise UserError(f"model.output_key {r.model.output_key!r} is set, but the model returns a single tensor, "
                            "which has no keys; remove model.output_key")
        if dataset is not None and target in dataset.keys():
            dataset.tensors[target] = check_labels(output, dataset.tensors[target], source, target, r)


def check_labels(output: torch.Tensor, labels: torch.Tensor, source: str, key: str, r) -> torch.Tensor:
    """The labels as training and scoring will use them, checked against the model's output (one
    sample of it) and the recipe's loss and metric: integer labels of any width become int64, 0/1
    integers for a one-output model become float, [N, 1] class labels become [N]. Every
    contradiction is a one-line error naming the key and what uses it."""
    out = tuple(output.shape[1:])  # per sample
    classes = out[-1] if len(out) >= 1 and out[-1] > 1 else None
    loss = r.finetune.loss if r is not None else "auto"
    metric = r.data.metric if r is not None else "auto"
    integer = not labels.is_floating_point() and labels.dtype != torch.bool
    if integer:
        labels = labels.long()
        if classes is None and int(torch.tensor(out).prod()) == 1 and bool(((labels == 0) | (labels == 1)).all()):
            labels = labels.float()  # 0/1 labels of a one-output (binary) model
            integer = False
    if classes is not None and labels.dim() == 2 and labels.shape[1] == 1 and len(out) == 1:
        labels = labels[:, 0]  # [N, 1] class labels, as numpy often writes them
    per_label = tuple(labels.shape[1:])
    users = []  # what takes the labels as class indices
    if loss == "cross_entropy" or (loss == "auto" and integer):
        users.append(f"finetune.loss {loss}")
    if metric == "accuracy" or (metric == "auto" and integer):
        users.append(f"data.metric {metric}")
    if users:  # the labels are class indices
        what = " and ".join(users)
        if classes is None:
            raise UserError(f"{source}: {what} takes labels {key!r} as class indices, but the model outputs "
                            f"{list(out)} per sample, not one score per class; choose a loss and metric for this "
                            "output (bce/auc for one 0/1 output as float labels, mse for values)")
        if not integer:
            raise UserError(f"{source}: labels {key!r} are {str(labels.dtype).removeprefix('torch.')} values but "
                            f"{what} needs class indices for the model's {classes} classes; store them as integers")
        if per_label != out[:-1]:
            raise UserError(f"{source}: labels {key!r} have shape {list(per_label)} per sample, but the model's "
                            f"output {list(out)} needs {list(out[:-1])} class indices per sample ({what})")
        bad = (labels < 0) | (labels >= classes)
        if bad.any():
            first = int(bad.reshape(labels.shape[0], -1).any(dim=1).nonzero()[0, 0])
            raise UserError(f"{source}: {int(bad.sum()):,} labels {key!r} lie outside the model's {classes} classes "
                            f"[0, {classes}), the first at index {first} (value {int(labels[first].reshape(-1)[0])})")
    values = []  # what compares the labels with the outputs value by value
    if loss in ("bce", "mse") or (loss == "auto" and not integer):
        values.append(f"finetune.loss {loss}")
    if metric in ("auc", "mse") or (metric == "auto" and not integer):
        values.append(f"data.metric {metric}")
    if values:
        what = " and ".join(values)
        if classes is not None and per_label == out[:-1] and not integer:
            raise UserError(f"{source}: labels {key!r} are {str(labels.dtype).removeprefix('torch.')} values but the "
                            f"model outputs {classes} classes; store class indices as integers (int64)")
        if int(torch.tensor(per_label).prod()) != int(torch.tensor(out).prod()):
            raise UserError(f"{source}: {what} compares each output with a label, but the model outputs {list(out)} "
                            f"per sample and labels {key!r} hold {list(per_label)}; for class labels use "
                            "loss: cross_entropy and metric: accuracy")
        if "bce" in what and bool(((labels < 0) | (labels > 1)).any()):
            raise UserError(f"{source}: finetune.loss bce needs labels {key!r} between 0 and 1")
    return labels


@dataclass
class Compressed:
    """Compression done in memory: the compressed model (CPU, eval mode) and what the report needs."""

    model: nn.Module
    original: nn.Module
    methods: list[Method]
    seed: int
    device: torch.device
    metric_before: dict | None
    reference: torch.Tensor | None  # the original's outputs on the eval data
    original_macs: int
    finetune: dict | None = None
    post_finetune: dict | None = None
    allocation: budgeting.Allocation | None = None  # the budget's choice per layer (recipes with `budget:`)

    @property
    def decisions(self) -> list[dict]:
        """Per-layer decisions as finally applied (finalize may have changed ranks or groups)."""
        return [d.as_dict() for m in self.methods for d in m.decisions]


def evaluate(model: nn.Module, ctx: Context, device, reference: torch.Tensor | None):
    """(metric dict, outputs) on the eval data, or (None, None) without eval data."""
    data = ctx.data["eval"]
    if data is None:
        return None, None
    outputs = predict(model, data, ctx.input_names, ctx.recipe.recipe.data.batch_size * 4, device)
    target = data.tensors.get(ctx.target)
    name = choose_metric(ctx.recipe.recipe.data.metric, target)
    # without a reference (the original model itself) agreement is measured against its own outputs
    reference = outputs if reference is None else reference
    return {"name": name, "value": round(score(name, outputs, target, reference), 6)}, outputs


def real_batch(ctx: Context, size: int) -> tuple[torch.Tensor, ...]:
    """`size` real samples from the eval data (cycled if fewer), or the synthetic sample repeated."""
    data = ctx.data["eval"]
    if data is None:
        return tuple(t.expand(size, *t.shape[1:]).contiguous() for t in ctx.sample)
    batch = data.head(size)
    return split_batch(batch, ctx.input_names, ctx.target)[0]


def export_axes(r, input_names: list[str], sample: tuple[torch.Tensor, ...], dynamic_batch: bool = True) -> dict:
    """The ONNX dynamic axes of the recipe's inputs (as declared in `inputs:`, else inferred)."""
    return exporting.dynamic_axes_for(input_names, sample, {s.name: s.dynamic_axes for s in r.inputs or []},
                                      dynamic_batch)


def _at_longest(r, input_names: list[str], sample: tuple[torch.Tensor, ...], per_sample: int) -> int:
    """Bytes per sample at the longest of bench.seq_lens (inputs that are not tokenized text refused
    now, before anything is compressed): attention grows with the square of the length, so the
    sample's bytes are scaled by the square of how much longer it is."""
    if not r.bench.seq_lens:
        return per_sample
    longest = max(r.bench.seq_lens)
    axes = export_axes(r, input_names, sample)
    exporting.at_length(sample, input_names, axes, longest)
    traced = sample[input_names.index("attention_mask")].shape[1]
    return int(per_sample * max(1.0, longest / traced) ** 2)


def timing_feeds(ctx: Context, batch_sizes: list[int], seq_lens: list[int] | None = None) -> dict[str, dict]:
    """ONNX feeds to time at, keyed by `bench.shape_key`: real eval samples at each batch size, and at
    each of `seq_lens` tokens when given (exporting.at_length)."""
    r = ctx.recipe.recipe
    axes = export_axes(r, ctx.input_names, ctx.sample)
    feeds = {}
    for size in batch_sizes:
        batch = real_batch(ctx, size)
        for length in seq_lens or [None]:
            shaped = batch if length is None else exporting.at_length(batch, ctx.input_names, axes, length)
            feeds[bench.shape_key(size, length)] = exporting.to_feed(ctx.input_names, shaped)
    return feeds


def rewrite_timing(ctx: Context, batch: int | None = None, seq_len: int | None = None) -> quantize.Timing:
    """Where `quantize.rewrites: auto` times its variants: real eval samples at `batch` (`seq_len`
    tokens), by default at each of the recipe's bench shapes, at the recipe's bench threads."""
    r = ctx.recipe.recipe
    if batch is None:
        return quantize.Timing(timing_feeds(ctx, r.bench.batch_sizes, r.bench.seq_lens), r.bench.threads)
    return quantize.Timing(timing_feeds(ctx, [batch], [seq_len] if seq_len else None), r.bench.threads)


def file_size(path) -> int | None:
    """The input checkpoint's size (None for a model given in memory)."""
    try:
        return Path(path).stat().st_size
    except (OSError, TypeError, ValueError):
        return None


def calibration_feeds(ctx: Context, cfg) -> list[dict] | None:
    """Static quantization's calibration batches (ONNX feeds) from data.calibration."""
    data = ctx.data["calibration"]
    if cfg is None or cfg.mode != "static" or data is None:
        return None
    return quantize.calibration_feeds(data, ctx.input_names, ctx.recipe.recipe.data.batch_size, cfg)
