"""Hugging Face model folders: a folder holding `config.json`, safetensors weights and tokenizer
files is a model compress can take, as transformers' Auto classes build it, from local files only.

What a stranger's folder can and cannot do: its config is read as bounded JSON and checked
(no `auto_map`: compress never runs a folder's own code, `trust_remote_code` is never passed; a
`model_type` transformers ships; a size that fits in memory, measured on the meta device before
anything is allocated); its weights are read from safetensors only (a folder with only pickled
`pytorch_model.bin` weights is refused: convert it with transformers' `save_pretrained`); its
tokenizer is loaded the same way, with local files only.

The model compress sees is `TextModel`: token ids, the attention mask (and token types where the
tokenizer makes them) in, one tensor out: the mean of the last hidden states over the attention
mask (`mean_pool`, what sentence-transformers ships for encoders such as all-MiniLM-L6-v2), the
first token's (`cls`), the pooler's output (`pooler`), or a classifier's `logits`. A compressed
model reloads from `compression.json` through the factory `compress.hf:from_config`, which
builds the same architecture from the config stored there (no folder is read to reload it).
"""
from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import UserError, first_line
from .files import FileRefused, loads_json, read_regular

FACTORY = "compress.hf:from_config"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
SHARDED_INDEX = "model.safetensors.index.json"
PICKLED_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")
MAX_CONFIG_BYTES = 1 << 20
MAX_LAYERS = 1024  # num_hidden_layers and the like: more is not a model, it is a way to hang the tool
TASKS = {"feature-extraction": "AutoModel", "sequence-classification": "AutoModelForSequenceClassification",
         "token-classification": "AutoModelForTokenClassification"}
OUTPUTS = ("mean_pool", "cls", "pooler", "logits")
# what a tokenizer may be saved as; copied beside model.onnx so that the output can be served alone
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json",
                   "merges.txt", "added_tokens.json", "spiece.model", "sentencepiece.bpe.model")
MAX_TOKENIZER_FILE = 256 << 20
EXTRA = "pip install 'compress[hf]'"


def is_model_folder(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / CONFIG_NAME).is_file()


def transformers():
    """The transformers module, or a one-line error saying which extra to install."""
    try:
        import transformers as module
    except ImportError:
        raise UserError(f"a Hugging Face model folder needs the transformers package: {EXTRA}") from None
    return module


def default_output(task: str | None) -> str:
    return "mean_pool" if (task or "feature-extraction") == "feature-extraction" else "logits"


def check_task(task: str | None, output: str | None, source: str) -> tuple[str, str]:
    task = task or "feature-extraction"
    output = output or default_output(task)
    if task not in TASKS:
        raise UserError(f"{source}: model.task {task!r}: expected one of {', '.join(TASKS)}")
    if output not in OUTPUTS:
        raise UserError(f"{source}: model.output {output!r}: expected one of {', '.join(OUTPUTS)}")
    if (output == "logits") != (task != "feature-extraction"):
        wanted = "logits" if task != "feature-extraction" else "mean_pool, cls or pooler"
        raise UserError(f"{source}: model.output {output} does not go with model.task {task} (it gives {wanted})")
    return task, output


def read_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG_NAME
    try:
        config = loads_json(read_regular(path, MAX_CONFIG_BYTES))
    except FileRefused as exc:
        raise UserError(f"{path}: not a config to read: {exc}") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise UserError(f"{path}: not a readable config.json ({first_line(exc)})") from None
    return check_config(config, str(path))


def check_config(config: Any, source: str) -> dict[str, Any]:
    """A transformers config that names only code transformers ships, of a bounded depth."""
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise UserError(f"{source}: not a transformers config (no \"model_type\")")
    if config.get("auto_map"):
        raise UserError(f"{source}: names code of its own (auto_map); compress never runs a model folder's code "
                        "(trust_remote_code), so it builds only the architectures transformers ships")
    tf = transformers()
    if config["model_type"] not in tf.CONFIG_MAPPING:
        raise UserError(f"{source}: model_type {config['model_type'][:60]!r} is not one transformers "
                        f"{tf.__version__} ships")
    for key in ("num_hidden_layers", "num_layers", "n_layer", "num_attention_heads", "n_head"):
        value = config.get(key)
        if isinstance(value, int) and not 0 < value <= MAX_LAYERS:
            raise UserError(f"{source}: {key} {value} is out of range (1 to {MAX_LAYERS})")
    return config


def _auto_config(tf, config: dict[str, Any], source: str):
    settings = {k: v for k, v in config.items() if k != "model_type"}
    try:
        return tf.AutoConfig.for_model(config["model_type"], **settings)
    except Exception as exc:  # noqa: BLE001 - a config transformers rejects, in its own words
        raise UserError(f"{source}: transformers rejects the config ({first_line(exc, 150)})") from None


@contextlib.contextmanager
def _quiet(tf):
    """transformers' own warnings (weights it initialised, ...) and progress bars off the terminal
    while it builds: compress reports its own progress."""
    logging = tf.utils.logging
    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


def _check_size(auto, cfg, source: str) -> None:
    """Refuse a model whose weights would take more than half the memory, counted on the meta
    device (no memory is allocated for the count)."""
    from .system import available_memory

    try:
        with torch.device("meta"):
            probe = auto.from_config(cfg)
    except Exception as exc:  # noqa: BLE001 - a config the architecture cannot be built from
        raise UserError(f"{source}: transformers cannot build this architecture ({first_line(exc, 150)})") from None
    need = sum(p.numel() for p in probe.parameters()) * 4
    budget = available_memory() // 2
    if need > budget:
        raise UserError(f"{source}: its weights take {need / 2**30:.1f} GiB in float32, more than half the "
                        f"{budget * 2 / 2**30:.1f} GiB available")


@contextlib.contextmanager
def eager_attention(model: nn.Module):
    """The transformers models inside `model` run their attention eagerly (as plain ops, transformers'
    `set_attn_implementation`) inside the block, as they did after it."""
    previous = []
    for module in model.modules():
        config = getattr(module, "config", None)
        if hasattr(module, "set_attn_implementation") and hasattr(config, "_attn_implementation"):
            previous.append((module, config._attn_implementation))
    try:
        for module, _ in previous:
            module.set_attn_implementation("eager")
        yield model
    finally:
        for module, implementation in reversed(previous):
            if isinstance(implementation, str):
                module.set_attn_implementation(implementation)
            else:  # none was chosen before: leave it unchosen again
                module.config._attn_implementation = implementation


class TextModel(nn.Module):
    """A transformers model as compress sees it: token ids and mask (and token types) in, one tensor
    out (see the module's notes for the outputs)."""

    def __init__(self, model: nn.Module, output: str = "mean_pool"):
        super().__init__()
        self.model = model
        self.output = output

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, **extra)
        if self.output == "logits":
            return out.logits
        if self.output == "pooler":
            return out.pooler_output
        hidden = out.last_hidden_state
        if self.output == "cls":
            return hidden[:, 0]
        weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1e-9)


def from_config(config: dict, task: str = "feature-extraction", output: str = "mean_pool") -> TextModel:
    """The architecture `config` describes, with fresh weights (the factory compression.json names:
    the weights come from the file beside it)."""
    return _build(check_config(config, "model config"), task, output, "model config",
                  lambda auto, cfg: auto.from_config(cfg))


def _build(config: dict[str, Any], task: str | None, output: str | None, source: str, make) -> TextModel:
    """The TextModel of a checked config: `make(auto_class, config)` builds the transformers model
    once its size is known to fit, quietly; the unused pooler dropped, the output checked."""
    task, output = check_task(task, output, source)
    tf = transformers()
    cfg = _auto_config(tf, config, source)
    auto = getattr(tf, TASKS[task])
    _check_size(auto, cfg, source)
    with _quiet(tf):
        model = make(auto, cfg)
    return _output_checked(TextModel(_without_unused_pooler(model.float().eval(), output), output), source)


def _without_unused_pooler(model: nn.Module, output: str) -> nn.Module:
    """An encoder whose pooler's output is not the one measured, without its pooler (its weights
    would be counted, compressed and shipped for nothing), where the model runs without one."""
    pooler = getattr(model, "pooler", None)
    if output == "pooler" or not isinstance(pooler, nn.Module):
        return model
    model.pooler = None
    try:
        with torch.no_grad():
            model(input_ids=torch.ones(1, 2, dtype=torch.long), attention_mask=torch.ones(1, 2, dtype=torch.long))
    except Exception:  # noqa: BLE001 - this architecture needs its pooler: keep it
        model.pooler = pooler
    return model


def _output_checked(model: TextModel, source: str) -> TextModel:
    if model.output == "pooler" and getattr(model.model, "pooler", None) is None:
        raise UserError(f"{source}: model.output pooler, but this model has no pooler; use mean_pool or cls")
    return model


def weights_file(folder: Path) -> Path:
    """The folder's safetensors weights (one file, or the index of its shards); pickles refused."""
    for name in (WEIGHTS_NAME, SHARDED_INDEX):
        if (folder / name).is_file():
            return folder / name
    pickled = [name for name in PICKLED_WEIGHTS if (folder / name).is_file()]
    if pickled:
        raise UserError(f"{folder}: holds its weights only as pickles ({pickled[0]}); unpickling runs code, so compress "
                        "reads model folders' weights from safetensors only: save the model with transformers' "
                        "save_pretrained (safetensors by default) and pass that folder")
    raise UserError(f"{folder}: has a config.json but no {WEIGHTS_NAME}")


def sha256(path: Path, limit: int = 1 << 40) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
            limit -= len(block)
            if limit < 0:
                raise UserError(f"{path}: larger than any model compress reads")
    return digest.hexdigest()


def load_folder(folder: Path, task: str | None, output: str | None) -> tuple[TextModel, dict, dict]:
    """(model, factory kwargs, metadata) of a model folder: built by transformers from the folder's
    safetensors weights, local files only, no code of the folder's own."""
    source = str(folder)
    task, output = check_task(task, output, source)
    config = read_config(folder)
    weights = weights_file(folder)

    def make(auto, cfg):
        try:
            return auto.from_pretrained(str(folder), config=cfg, local_files_only=True, trust_remote_code=False,
                                        use_safetensors=True, dtype=torch.float32)
        except (OSError, ValueError, RuntimeError, KeyError, TypeError) as exc:
            raise UserError(f"{source}: transformers cannot load it ({first_line(exc, 200)})") from None

    wrapped = _build(config, task, output, source, make)
    metadata = {"base": {"folder": str(folder.resolve()), "weights": weights.name, "weights_sha256": sha256(weights),
                         "model_type": config["model_type"], "task": task, "output": output}}
    return wrapped, {"config": config, "task": task, "output": output}, metadata


def input_specs(tokenizer_names: list[str] | None, length: int = 16) -> list[dict]:
    """The forward arguments, in call order, that the tokenizer produces (ids and mask at least)."""
    names = ["input_ids", "attention_mask"] + (["token_type_ids"] if "token_type_ids" in (tokenizer_names or []) else [])
    return [{"name": n, "shape": [length], "dtype": "int64", "dynamic_axes": {1: "sequence"}} for n in names]


def has_tokenizer(folder: str | Path | None) -> bool:
    return folder is not None and any((Path(folder) / name).is_file() for name in TOKENIZER_FILES)


def load_tokenizer(folder: str | Path):
    """The tokenizer saved in `folder`, local files only, no code of the folder's own."""
    tf = transformers()
    folder = Path(folder)
    if not has_tokenizer(folder):
        raise UserError(f"{folder}: holds no tokenizer files ({', '.join(TOKENIZER_FILES[:4])}, ...)")
    try:
        with _quiet(tf):
            return tf.AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError, AttributeError) as exc:
        raise UserError(f"{folder}: transformers cannot load its tokenizer ({first_line(exc, 200)})") from None


def tokenizer_input_names(folder: str | Path | None) -> list[str] | None:
    """What the folder's tokenizer feeds the model, or None without one."""
    if not has_tokenizer(folder):
        return None
    return list(load_tokenizer(folder).model_input_names)


def copy_tokenizer(folder: str | Path, into: Path) -> list[str]:
    """The tokenizer's files copied into `into` (regular files only, bounded), so the output folder
    serves alone; the names copied."""
    copied = []
    for name in TOKENIZER_FILES:
        source = Path(folder) / name
        if source.is_file() and not source.is_symlink():
            try:
                data = read_regular(source, MAX_TOKENIZER_FILE)
            except FileRefused as exc:
                raise UserError(f"{source}: not a tokenizer file to copy: {exc}") from None
            (into / name).write_bytes(data)
            copied.append(name)
    return copied


__all__ = ["FACTORY", "TextModel", "copy_tokenizer", "from_config", "has_tokenizer", "input_specs", "is_model_folder",
           "load_folder", "load_tokenizer"]
