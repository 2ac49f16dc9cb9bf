"""The recipe: a typed YAML schema (pydantic v2), loading, and errors that name the key path.

A recipe says *what* to do to a model (stages of methods over targeted layers), how to fine-tune,
export and benchmark it, and which gates a CI job holds it to. `compress recipe schema` prints
its JSON Schema for editors.
"""
from __future__ import annotations

import difflib
import hashlib
import re
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from .errors import RecipeError
from .files import FileRefused, read_regular
from .methods import METHODS
from .schema import Strict
from .bench import MAX_SEQ_LEN
from .budget import BudgetSection
from .quantize import QuantizeSection


SEED_MAX = 2**32 - 1


class ModelSection(Strict):
    """How to build the model when the checkpoint does not say (e.g. a `.safetensors` state dict)."""

    factory: str | None = Field(None, description="'package.module:callable' that returns the nn.Module")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="keyword arguments for the factory")
    task: Literal["feature-extraction", "sequence-classification", "token-classification"] | None = Field(
        None, description="for a Hugging Face model folder: what transformers builds from it (default "
        "feature-extraction, the bare encoder)")
    output: Literal["mean_pool", "cls", "pooler", "logits"] | None = Field(
        None, description="for a Hugging Face model folder: the tensor compress measures; mean_pool (the mean of the "
        "last hidden states over the attention mask, the default for feature-extraction), cls (the first token's), "
        "pooler, or logits (the default for the classification tasks)")
    output_key: str | None = Field(None, description="which output to compress for and measure when the model returns "
                                   "a dict, a transformers ModelOutput, an object or a tuple: a key, an attribute, or "
                                   "an index (default: `logits` if present, else the first)")
    trust: list[str] = Field(default_factory=list, description="not allowed: a recipe may come from anyone, so it "
                             "cannot trust code; trust a factory's package with --trust-factory PREFIX (or "
                             "trust_factories= in Python)")

    @field_validator("trust")
    @classmethod
    def _recipes_trust_nothing(cls, value: list[str]) -> list[str]:
        if value:
            from .trust import never_trusted

            first = value[0] if isinstance(value[0], str) and len(value[0]) < 100 else "PREFIX"
            refusal = never_trusted(first)
            if refusal:
                raise ValueError(f"a recipe cannot trust code, and {first!r} can never be trusted: {refusal}")
            raise ValueError("a recipe cannot trust code (a recipe may come from anyone, e.g. a pull request); "
                             f"pass --trust-factory {first} on the command line (trust_factories= in Python) "
                             "if you trust it yourself")
        return value


class SplitSection(Strict):
    """Calibration and eval sets cut from data.train, for a user with one file: disjoint, and the
    same on every run with the same seed."""

    calibration: int = Field(ge=1, le=10_000_000, description="examples for calibration")
    eval: int = Field(ge=1, le=10_000_000, description="examples for the metric")
    seed: int = Field(0, ge=0, le=SEED_MAX, description="the shuffle's seed")


class DataSection(Strict):
    """Where the data comes from. A source is a file (.pt, .npz, .safetensors; relative paths are
    taken from the recipe's folder) whose keys are the model's input names plus an optional
    target, a bundled set `bundled:NAME/SPLIT` (e.g. `bundled:digits/train`), or text (.txt a line
    per example, .jsonl or .csv with `text_keys` and an optional `label_key`) that the model's
    tokenizer turns into its inputs."""

    train: str | None = Field(None, description="fine-tuning data")
    calibration: str | None = Field(None, description="data for statistics and decisions (default: train)")
    eval: str | None = Field(None, description="data the metric is measured on (default: calibration)")
    target: str = Field("target", description="key of the labels; absent labels mean distillation only")
    batch_size: int = Field(64, gt=0, le=1 << 20)
    metric: Literal["auto", "accuracy", "auc", "mse", "agreement", "cosine", "neighbors"] = Field(
        "auto", description="auto: accuracy for class labels, auc for 0/1 labels, mse for other real-valued "
        "targets; without labels cosine (mean cosine of the outputs to the original's), never top-1 agreement "
        "(meaningless for embeddings: ask for `agreement` for a classifier); neighbors: top-1 nearest-neighbour "
        "agreement within the eval set, as embedding retrieval sees it"
    )
    tokenizer: str = Field("auto", max_length=4096, description="text data: the folder of the tokenizer (relative to "
                           "the recipe's folder); auto: the model folder's own")
    max_length: int = Field(128, ge=1, le=8192, description="text data: tokens per example at most (longer ones are "
                            "truncated); a set is padded to its longest example")
    text_keys: list[Annotated[str, Field(min_length=1, max_length=200)]] = Field(
        default_factory=lambda: ["text"], min_length=1, max_length=2,
        description=".jsonl / .csv text data: the key of the text, or two keys for pairs")
    label_key: str = Field("label", min_length=1, max_length=200, description=".jsonl / .csv text data: the key of "
                           "the labels (stored under `target`): label every example or none (without labels, fine-tuning distills)")
    max_examples: int = Field(100_000, ge=1, le=10_000_000, description="text data: examples read from each file "
                              "at most (the file is read no further)")
    split: SplitSection | None = Field(None, description="cut calibration and eval sets from data.train (the rest "
                                       "trains); data.calibration and data.eval are then left unset")

    @model_validator(mode="after")
    def _split_needs_one_source(self):
        if self.split is not None:
            if self.train is None:
                raise ValueError("split: needs data.train, the file it divides")
            if self.calibration is not None or self.eval is not None:
                raise ValueError("split: divides data.train into calibration and eval; leave data.calibration and "
                                 "data.eval unset")
        return self


class InputSpec(Strict):
    """One forward argument of the model, in call order."""

    name: str
    shape: list[Annotated[int, Field(gt=0)]] = Field(description="shape of one sample, without the batch axis")
    dtype: Literal["float32", "float64", "float16", "int64", "int32", "bool"] = "float32"
    dynamic_axes: dict[int, str] = Field(
        default_factory=dict, description="axes besides the batch (axis 0) whose size may vary, e.g. {1: sequence}; "
        "when inputs are declared, only these (2-D integer inputs otherwise get a dynamic axis 1)"
    )

    @model_validator(mode="after")
    def _bounded(self):
        from .data import sample_size_error

        error = sample_size_error(self.name, self.shape)
        if error:
            raise ValueError(error)
        return self


class DistillSection(Strict):
    weight: float = Field(0.0, ge=0, description="weight of distillation from the frozen original (forced to 1 without labels if 0)")
    loss: Literal["kl", "mse", "cosine"] = Field("kl", description="kl: over the last axis (Bernoulli for one "
                                                 "output per sample); mse; cosine: 1 - cosine over the last axis "
                                                 "(embeddings)")
    temperature: float = Field(1.0, gt=0)


class FinetuneSection(Strict):
    """The single fine-tuning loop every method shares. Zero epochs and steps: no fine-tuning."""

    epochs: int = Field(0, ge=0, le=100_000)
    steps: int | None = Field(None, ge=0, le=10**9, description="total optimizer steps; overrides epochs when set")
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD only")
    schedule: Literal["cosine", "constant"] = "cosine"
    loss: Literal["auto", "cross_entropy", "mse", "bce"] = Field(
        "auto", description="task loss when labels exist; auto: cross_entropy for integer labels, bce for 0/1 "
        "labels, else mse"
    )
    output: Literal["auto", "logits", "probabilities", "log_probabilities", "embeddings"] = Field(
        "auto", description="what the model returns, for the losses; auto: embeddings for a Hugging Face encoder's "
        "pooled output (distilled by cosine), probabilities when it ends in a sigmoid or softmax or every sampled "
        "output is one, log_probabilities after a log-softmax, else logits")
    distill: DistillSection = Field(default_factory=DistillSection)
    clip_grad_norm: float | None = Field(None, gt=0)
    checkpoint_every: int | None = Field(None, gt=0, le=10**9, description="write the resumable state every N steps "
                                         "(`compress apply --resume` continues a killed run from it)")


class ParitySection(Strict):
    atol: float = Field(1e-4, ge=0, le=1.0)
    rtol: float = Field(1e-3, ge=0, le=1.0)


class ExportSection(Strict):
    opset: int = Field(17, ge=13, le=21)
    dynamic_batch: bool = True
    parity: ParitySection = Field(default_factory=ParitySection)


class BenchSection(Strict):
    """ONNX Runtime latency: same session options for both models, runs interleaved."""

    batch_sizes: list[Annotated[int, Field(gt=0)]] = Field(default_factory=lambda: [1, 32], min_length=1)
    seq_lens: list[Annotated[int, Field(gt=0, le=MAX_SEQ_LEN)]] | None = Field(
        None, min_length=1, max_length=16, description="tokenized text: the sequence lengths to time at (each eval "
        "example cut, or its tokens repeated, to that many; every length at every batch size, keyed '8x128' in the "
        "report); default: the eval data as it is padded")
    threads: int = Field(1, gt=0, le=1024, description="ONNX Runtime intra-op threads")
    warmup: int = Field(10, ge=0, le=10_000)
    runs: int = Field(50, gt=0, le=100_000, description="timed runs per model and batch size (more while the speedup's "
                      "interval is wide, up to 8x)")
    baselines: list[Literal["int8_original"]] = Field(
        default_factory=lambda: ["int8_original"], description="alternatives measured in the same run: "
        "int8_original is ONNX Runtime's quantization of the original model (the recipe's quantize settings, "
        "dynamic without them, and the other options the data allows); [] for none")


class GatesSection(Strict):
    """Limits that make `apply` exit 3 (after writing the report) when missed."""

    max_metric_drop: float | None = Field(None, ge=0, description="largest allowed drop of the metric (accuracy as a fraction)")
    min_speedup: float | None = Field(None, gt=0, description="p50 latency ratio original/compressed at speedup_batch")
    speedup_batch: int | None = Field(None, gt=0, le=1 << 20, description="batch size min_speedup applies to (default: the largest benchmarked)")
    min_size_ratio: float | None = Field(None, gt=0, description="ONNX file size ratio original/compressed")
    budget: bool = Field(False, description="exit 3 when the recipe's `budget:` target is missed (latency "
                         "targets by more than 5 %)")


StageUnion = Annotated[Union[tuple(cls.schema for cls in METHODS.values())], Field(discriminator="method")]


class Recipe(Strict):
    """A compression recipe."""

    name: str | None = None
    description: str | None = None
    seed: int = Field(0, ge=0, le=SEED_MAX, description="random seed for fine-tuning and data order")
    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection = Field(default_factory=DataSection)
    inputs: list[InputSpec] | None = Field(None, description="forward arguments; default: the data's keys, in file order")
    stages: list[StageUnion] = Field(min_length=1)
    finetune: FinetuneSection = Field(default_factory=FinetuneSection)
    export: ExportSection = Field(default_factory=ExportSection)
    quantize: QuantizeSection | None = Field(None, description="int8 model.onnx by ONNX Runtime's quantization "
                                             "(absent: the float model ships)")
    bench: BenchSection = Field(default_factory=BenchSection)
    budget: BudgetSection | None = Field(None, description="what the compressed model may cost; stages that leave their "
                                         "sizes open (a factorizing stage without a rank rule, keep: auto) get them "
                                         "allocated to meet it")
    gates: GatesSection = Field(default_factory=GatesSection)

    @model_validator(mode="after")
    def _speedup_batch_is_benchmarked(self):
        b = self.gates.speedup_batch
        if b is not None and b not in self.bench.batch_sizes:
            raise ValueError(f"gates.speedup_batch {b} is not among bench.batch_sizes {self.bench.batch_sizes}")
        if self.budget is not None and self.budget.in_latency:
            if self.budget.batch is None:
                self.budget.batch = max(self.bench.batch_sizes)
            elif self.budget.batch not in self.bench.batch_sizes:
                raise ValueError(f"budget.batch {self.budget.batch} is not among bench.batch_sizes "
                                 f"{self.bench.batch_sizes}")
            lengths = self.bench.seq_lens
            if self.budget.seq_len is None and lengths:
                self.budget.seq_len = max(lengths)
            elif self.budget.seq_len is not None and self.budget.seq_len not in (lengths or []):
                raise ValueError(f"budget.seq_len {self.budget.seq_len} is not among bench.seq_lens {lengths}")
        elif self.budget is not None and self.budget.seq_len is not None:
            raise ValueError("budget.seq_len applies to latency targets (speedup, latency_ms) only")
        if self.gates.budget and self.budget is None:
            raise ValueError("gates.budget is set but the recipe has no budget section")
        if self.budget is not None and self.budget.precision == "per_layer" and self.quantize is None:
            raise ValueError("budget.precision: per_layer chooses int8 or float per layer, and needs a quantize: "
                             "section (the int8 settings its int8 layers use)")
        for i, stage in enumerate(self.stages):
            if getattr(stage, "keep", None) == "auto" and self.budget is None:
                raise ValueError(f"stages[{i}].keep: auto needs a budget: section (params, macs or onnx_bytes) to "
                                 "allocate the kept channels")
        return self


class LoadedRecipe:
    """A validated recipe plus where it came from (for relative paths and the report)."""

    def __init__(self, recipe: Recipe, path: Path | None, sha256: str):
        self.recipe = recipe
        self.path = path
        self.sha256 = sha256

    def resolve(self, source: str) -> str:
        """A data source as given, with a relative file path taken from the recipe's folder."""
        if source.startswith("bundled:") or self.path is None or Path(source).is_absolute():
            return source
        return str(self.path.parent / source)


MAX_RECIPE_BYTES = 1 << 20  # a recipe is a page of YAML; a megabyte is already absurd
MAX_DEPTH = 32  # nesting levels of mappings and lists
MAX_NODES = 50_000  # YAML nodes after expanding aliases (a "billion laughs" document has 10^9)


def load_recipe(path: str | Path) -> LoadedRecipe:
    """Read and validate a recipe file; every mistake is a RecipeError naming the key path."""
    path = Path(path)
    try:
        raw = read_regular(path, MAX_RECIPE_BYTES)
    except FileRefused as exc:
        raise RecipeError(f"{path}: not a recipe to read: {exc}") from None
    except FileNotFoundError:
        raise RecipeError(f"{path}: recipe file not found") from None
    except OSError as exc:
        raise RecipeError(f"{path}: cannot read recipe: {exc.strerror}") from None
    return LoadedRecipe(parse_recipe(raw, str(path)), path, hashlib.sha256(raw).hexdigest())


class _RecipeLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses duplicate keys and nesting deeper than MAX_DEPTH, and counts
    the nodes a document expands to through its aliases (see read_yaml)."""

    def __init__(self, stream):
        super().__init__(stream)
        self.depth = 0

    def compose_node(self, parent, index):
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                raise yaml.composer.ComposerError(None, None, f"nested deeper than {MAX_DEPTH} levels",
                                                  self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                continue
            key = (key_node.tag, key_node.value)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {_excerpt(repr(key_node.value))}",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def read_yaml(text: str | bytes) -> Any:
    """One YAML document, safely: no tags that build objects, no duplicate keys, bounded depth, and at
    most MAX_NODES nodes once aliases are expanded (checked before anything is built)."""
    loader = _RecipeLoader(text)
    try:
        node = loader.get_single_node()
        if node is not None:
            sizes: dict[int, int] = {}

            def size(n) -> int:
                if id(n) not in sizes:
                    sizes[id(n)] = 0  # a node that contains itself counts once
                    children = (n.value if isinstance(n, yaml.SequenceNode) else
                                [c for pair in n.value for c in pair] if isinstance(n, yaml.MappingNode) else [])
                    sizes[id(n)] = min(MAX_NODES + 1, 1 + sum(size(c) for c in children))
                return sizes[id(n)]

            if size(node) > MAX_NODES:
                raise yaml.YAMLError(f"the document expands to more than {MAX_NODES:,} nodes through its aliases "
                                     "(a recipe is far smaller)")
        return loader.construct_document(node) if node is not None else None
    finally:
        loader.dispose()


def parse_recipe(text: str | bytes, origin: str = "recipe") -> Recipe:
    try:
        document = read_yaml(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        raise RecipeError(f"{origin}{where}: YAML syntax error: {_excerpt(exc.problem or exc.context, 160)}") from None
    except yaml.YAMLError as exc:
        raise RecipeError(f"{origin}: YAML error: {_excerpt(exc, 200)}") from None
    except UnicodeDecodeError:
        raise RecipeError(f"{origin}: not a text file") from None
    except ValueError as exc:  # an integer past Python's 4,300-digit conversion limit
        raise RecipeError(f"{origin}: holds a number too long to read ({_excerpt(str(exc).split(';')[0], 120)}); "
                          "no setting takes a number that large") from None
    if not isinstance(document, dict):
        kind = "empty" if document is None else f"a {type(document).__name__}"
        raise RecipeError(f"{origin}: a recipe is a YAML mapping with at least `stages:`, this is {kind}")
    try:
        return Recipe.model_validate(document)
    except ValidationError as exc:
        raise RecipeError(f"{origin}: " + format_errors(exc)) from None


def _excerpt(text, limit: int = 60) -> str:
    """A short one-line excerpt of user input for an error message (never the whole document)."""
    line = " ".join(str(text)[: limit * 4].split())
    return line if len(line) <= limit else line[:limit] + "..."


def format_errors(exc: ValidationError, limit: int = 3) -> str:
    """pydantic errors as `key.path: message` on one line (the first few)."""
    parts = [_format_one(err) for err in exc.errors()[:limit]]
    more = len(exc.errors()) - limit
    return " | ".join(parts) + (f" | (+{more} more)" if more > 0 else "")


def _format_one(err: dict) -> str:
    loc = list(err["loc"])
    path = _loc_path(loc)
    kind = err["type"]
    if kind == "extra_forbidden":
        allowed = _fields_at(loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else (f"; allowed: {', '.join(allowed)}" if allowed else "")
        return f"{path}: unknown key{hint}"
    if kind == "union_tag_invalid":
        return f"{path}.method: unknown method {_excerpt(repr(err['input'].get('method')))}; available: {', '.join(METHODS)}"
    if kind == "union_tag_not_found":
        return f"{path}: a stage needs `method:` (one of {', '.join(METHODS)})"
    message = err["msg"].removeprefix("Value error, ")
    if not path:
        return message
    if kind == "missing":
        return f"{path}: required key is missing"
    message = _excerpt(message, 200)
    if "input" in err and not isinstance(err["input"], dict):
        return f"{path}: {message} (got {_excerpt(repr(err['input']))})"
    return f"{path}: {message}"


def _loc_path(loc: list) -> str:
    """('stages', 0, 'svd', 'energy') -> 'stages[0].energy' (the union tag is not a key)."""
    out = ""
    for i, part in enumerate(loc):
        if isinstance(part, int):
            out += f"[{part}]"
        elif loc[0] == "stages" and i == 2 and part in METHODS:
            continue
        elif re.fullmatch(r"[A-Za-z0-9_.\-]+", str(part)):
            out += ("." if out else "") + str(part)
        else:  # keys with spaces, newlines or symbols are quoted so the message stays one line
            out += f"[{_excerpt(repr(str(part)), 40)}]"
    return out


def _fields_at(loc: list) -> list[str]:
    """The keys allowed at a location, for 'did you mean' hints."""
    model: Any = Recipe
    for i, part in enumerate(loc):
        if isinstance(part, int):
            continue
        if loc[0] == "stages" and i == 2 and part in METHODS:  # the union tag picks the stage schema
            model = METHODS[part].schema
            continue
        fields = getattr(model, "model_fields", None)
        if not fields or part not in fields:
            return []
        model = _unwrap(fields[part].annotation)
    return list(getattr(model, "model_fields", None) or [])


def _unwrap(annotation):
    """list[X] / X | None / Annotated[X, ...] -> X (leaves the stage union alone)."""
    while True:
        origin = typing.get_origin(annotation)
        if origin is Annotated:
            annotation = typing.get_args(annotation)[0]
        elif origin in (list, typing.List):
            annotation = typing.get_args(annotation)[0]
        elif origin is Union or str(origin) == "<class 'types.UnionType'>":
            args = [a for a in typing.get_args(annotation) if a is not type(None)]
            if len(args) == 1:
                annotation = args[0]
            else:
                return annotation
        else:
            return annotation


def json_schema() -> dict:
    return Recipe.model_json_schema()
