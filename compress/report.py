"""The report of `compress apply`: one typed object (`Report`), written as report.json (whose keys
are an interface) and report.md, and the table helper the verbs print with."""
from __future__ import annotations

import json
import platform
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .bench import describe_key, largest_key
from .exporting import Parity
from .quantize import Quantized


def versions() -> dict[str, str]:
    import numpy
    import onnx
    import onnxruntime
    import torch

    from ._version import __version__

    return {"compress": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__, "numpy": numpy.__version__}


def ratio(before: float | None, after: float | None) -> float | None:
    if not before or not after:
        return None
    return round(before / after, 4)


def doc(text: str, **kwargs):
    """A report field with its meaning: the README's report.json table is generated from these."""
    return field(metadata={"doc": text}, **kwargs)


@dataclass
class Side:
    """One model's figures (all counts per sample, i.e. batch size 1; latency in milliseconds)."""

    params: int = doc("parameters")
    macs: int = doc("multiply-accumulates per sample (torch `FlopCounterMode` FLOPs / 2)")
    onnx_bytes: int = doc("size of the exported ONNX file")
    metric: dict | None = doc('`{"name": "accuracy", "value": 0.9917}` on the eval data (accuracies as fractions); '
                              "null without eval data")
    latency_ms: dict = doc('batch size (a string; `"8x128"`, batch and tokens, with `bench.seq_lens`) -> '
                           '`{"p50", "p90", "p99", "mean", "runs"}`')
    checkpoint_bytes: int = doc("size of the input checkpoint (original) or of `model.pt` (compressed)")
    onnx_metric: dict | None = doc("compressed only: the metric scored by running `model.onnx` in ONNX Runtime "
                                   "on the eval data", default=None)


@dataclass
class Ratios:
    params: float | None = doc("original / compressed")
    macs: float | None = doc("original / compressed")
    onnx_bytes: float | None = doc("original / compressed ONNX file size")
    speedup: dict = doc("batch size -> p50 latency ratio original / compressed")
    speedup_ci: dict = doc("batch size -> `[low, high]`, the speedup's bootstrap 95% interval (never narrower "
                           "than +-5%)")


@dataclass
class Baseline:
    """An alternative measured in the same run (int8 of the original): its figures, or why it could
    not be made (`error`, the rest null)."""

    mode: str | None = None
    onnx_bytes: int | None = None
    metric: dict | None = None
    latency_ms: dict | None = None
    speedup: dict | None = None  # batch -> its speedup over the original
    speedup_ci: dict | None = None
    compressed_speedup: dict | None = None  # batch -> {"speedup", "ci"}: the shipped model over it
    quantized_ops: int | None = None  # operators ONNX Runtime quantized (0: it is the float model in effect)
    tried: list | None = None  # every int8 option measured (this one the fastest at the largest shape)
    error: str | None = None


@dataclass
class BudgetOutcome:
    """What a budget planned and, once the model is built and measured, whether it met its target."""

    target: dict  # {"speedup": 2.0, "batch": 8}: the target and, for latency, its batch size (and seq_len, over)
    predicted: float  # ratio, or ms for latency_ms
    rounds: int
    allocated_layers: int
    dense_layers: int
    history: list | None = None  # per verification round: predicted and measured (ms or bytes)
    measured: float | None = None  # on the shipped model; null while only planned
    met: bool | None = None  # null while only planned
    ops_measured: int | None = None  # latency targets: op latencies not found in the cache
    probe_passes: int = 0  # sensitivity: output: whole-model calibration passes run to scale the errors ...
    probe_samples: int = 0  # ... each on this many samples (0: none needed, or another sensitivity)
    over_original: float | None = None  # `over: int8_original`: the speedup over the original the target meant
    solver_gap: float = 0.0  # the knapsack's bound on how much more summed error it chose than the optimum (0: exact)
    objective: str | None = None  # whose choice was kept: sum, sum of squares, sum of 4th powers or largest error
    # (", every layer int8" added where precision per layer kept the choice made with every layer int8)
    recovery: float = 0.0  # budget.recovery as used: the price of the share of a layer removed (0: least damage)
    evaluations: int = 0  # whole-model passes that checked the objectives' choices on the probe samples
    search_passes: int = 0  # whole-model passes the swap search ran on the probe samples ...
    swaps: int = 0  # ... and the swaps it kept (each lowered the measured output error)
    min_agreement: float | None = None  # the floor on agreement with the original on the probe samples ...
    agreement: float | None = None  # ... the kept choice's there ...
    floor_bound: float | None = None  # ... and the target the floor allowed, where it is below the one asked
    float_layers: list | None = None  # budget.precision per_layer: the allocated layers kept float (others int8)
    # `over: int8_original` with the baseline measured: the shipped model over it in the same interleaved run
    # (speedup and 95 % interval), which decides `met` (two runs' timings of one model differ more than that)
    measured_over_int8: dict | None = None


@dataclass
class GateCheck:
    """One gate: its limit, the value measured, and whether it passed."""

    gate: str
    limit: float
    value: float | None
    passed: bool
    measured_on: str | None = None  # max_metric_drop: "torch" or "model.onnx", whichever dropped more
    estimate: float | None = None  # min_speedup: the point estimate beside the interval's lower end held to the limit


@dataclass
class Gates:
    checked: list[GateCheck]
    passed: bool

    def failed(self) -> list[GateCheck]:
        return [g for g in self.checked if not g.passed]


@dataclass(kw_only=True)
class Report:
    """What `compress apply` measured: report.json is `to_json()`, report.md is `to_markdown()`.
    The field order is report.json's key order; the keys are an interface for CI jobs."""

    recipe: str = doc("the recipe file")
    recipe_name: str | None = doc("the recipe's `name`")
    recipe_sha256: str = doc("sha256 of the recipe file's bytes")
    model: str = doc("the input model")
    seed: int = doc("the seed used")
    device: str = doc("where fine-tuning ran")
    inputs: list = doc("the model's input names, in call order")
    output: dict = doc("what the model returns, for the losses: `kind` (logits, probabilities, log_probabilities, "
                       "embeddings) "
                       "and the `reason` (the recipe's finetune.output, or what auto saw)",
                       default_factory=lambda: {"kind": "logits", "reason": "default"})
    original: Side = doc("the original model's figures (below)")
    compressed: Side = doc("the shipped model's figures (below): `model.onnx`, int8 when the recipe quantizes "
                           "(then `metric` is that of the int8 ONNX model)")
    compressed_float: Side | None = doc("with `quantize:`, the same figures for the float compressed model "
                                        "(`model.float.onnx`); null otherwise", default=None)
    quantization: Quantized | None = doc("with `quantize:`: `mode`, `weight_type`, `per_channel`, `reduce_range` (as used), `op_types`, `excluded` "
                                    "(ONNX nodes kept in float), `quantized_ops` (operator counts), `fidelity` "
                                    "(`agreement_kind` top1 or cosine, `agreement`, `max_abs_deviation`, "
                                    "`metric_drop` from the float model, the limits, `passed`), `tables` (with "
                                    "quantize.tables: `bits`, `block_size`, `symmetric`, `quantized` tables), `fused` "
                                    "(with quantize.fuse: operator -> nodes fused), `rewrites` (quantize.rewrites: "
                                    "`applied`, `nodes` each would change, the `shapes` timed at, each variant's "
                                    "`speedup` per shape over the model without them, `refused` and why); null otherwise",
                                    default=None)
    baselines: dict[str, Baseline] = doc("`int8_original`: ONNX Runtime's quantization of the original, measured in the same run: "
                          "the fastest (at the largest batch size) of the options the data allows: the recipe's quantize "
                          "settings (dynamic without them), the same unfused when they fuse, and static QDQ when there "
                          "is calibration data; `mode` (`dynamic`, `dynamic+fused`, `static`), "
                          "`onnx_bytes`, `quantized_ops`, `metric`, `latency_ms`, `speedup`/`speedup_ci` over the original, "
                          "`compressed_speedup` (batch size -> `speedup`, `ci` of the shipped model over this "
                          "baseline), `tried` (each option: mode, bytes, quantized ops, metric, p50); `error` when "
                          "none could be made (null otherwise)", default_factory=dict)
    ratios: Ratios = doc("original / compressed figures (below)")
    warnings: list = doc("one line each when a measurement was too noisy to trust (also printed on stderr)")
    parity: Parity = doc("`samples` (the whole eval set, else one batch), `max_abs_diff`, `max_rel_diff` (relative "
                       "to max(\\|torch\\|, 1e-6)), `atol`, `rtol`, `passed`: the float ONNX model against the torch "
                       "model; `sequence_lengths`: for tokenized text, the lengths checked (the batch as padded and its shortest "
                       "example), else null")
    layers: list = doc("one decision per targeted layer: `name`, `method`, `layer_type`, `action` (`factorize`, "
                       "`project`, `prune`, `refine` (a later stage trains an earlier stage's factors; `chain` names "
                       "both, e.g. `stages[0] afm -> stages[1] pela`) or `keep`), `weight_shape`, `rank`, `full_rank`, `scheme`, `energy` (share "
                       "of squared singular values kept), `factor_shapes`, `params_before/after`, "
                       "`macs_before/after`, `reason` when kept, and method-specific keys (e.g. `kept_channels`)")
    finetune: dict | None = doc("`steps`, `epochs`, `seconds`, `samples_per_s`, `final_loss`, `loss_terms` (the "
                                "last step's loss by term); `{steps: 0, skipped: why}` when the plan changed no "
                                "layer (nothing to recover); null without fine-tuning")
    post_finetune: dict | None = doc("the same for the epochs a method asks for after its structural change "
                                     "(trp, group_envelope); null when none ran")
    budget: BudgetOutcome | None = doc("with `budget:`: `target` (e.g. `{\"speedup\": 2, \"batch\": 32}`), `predicted` "
                              "(ratio, or ms for latency_ms), `measured` on the shipped model, `met` (latency "
                              "within 5 %, ONNX bytes within 1 %), `rounds` (allocations made; latency and "
                              "onnx_bytes targets are measured on the built model, int8 when the recipe quantizes, "
                              "before fine-tuning and corrected), `allocated_layers`, `dense_layers`, `float_layers` "
                              "(precision: per_layer: the allocated layers kept float, the others int8), `history` "
                              "(predicted and measured ms, or bytes, per round; latency with the 95 % "
                              "`measured_interval`), `ops_measured` (latencies not found in the cache), "
                              "`measured_over_int8` (`over: int8_original`: the shipped model over the baseline "
                              "in the same run, `speedup` and `ci`, which decides `met`), `recovery` (the price "
                              "of the share of a layer removed, with fine-tuning to follow; 0: least damage); null "
                              "otherwise", default=None)
    bench: dict = doc("the latency settings used (`batch_sizes`, `threads`, `warmup`, `runs`)")
    versions: dict = doc("compress, python, torch, onnx, onnxruntime, numpy")
    timings_s: dict = doc("seconds per stage (load, calibrate, plan, prepare, finetune, export, parity, bench, ...)")
    gates: Gates = doc("`checked` (each `gate`, `limit`, `value`, `passed`; `max_metric_drop` is held to the worse "
                      "of the torch and ONNX metrics, `measured_on` says which; `min_speedup` to the lower end of "
                      "the speedup's interval, with the point `estimate` beside it) and `passed`",
                      default_factory=lambda: Gates([], True))
    files: list = doc("the files in the output folder", default_factory=list)

    def to_json(self) -> dict:
        out = asdict(self)
        out["original"].pop("onnx_metric")  # a compressed-model figure
        return out

    def write(self, folder: Path) -> None:
        """report.json and report.md into `folder`, both from one `to_json()`."""
        data = self.to_json()
        write_json(data, folder / "report.json")
        (folder / "report.md").write_text(to_markdown(data))

    def summary(self) -> list[str]:
        """The lines `compress apply` prints at the end."""
        o, c, r = self.original, self.compressed, self.ratios
        fmt = lambda m: "-" if not m else f"{m['name']} {m['value']:.4f}"  # noqa: E731
        ci = r.speedup_ci
        return [
            f"params {o.params:,} -> {c.params:,} ({r.params}x)  MACs {o.macs:,} -> {c.macs:,} ({r.macs}x)",
            f"metric {fmt(o.metric)} -> {fmt(c.metric)} (model.onnx: {fmt(c.onnx_metric)})",
            "speedup (p50, 95% interval) " + ", ".join(
                f"batch {b}: {s}x [{ci[b][0]}, {ci[b][1]}]" if b in ci else f"batch {b}: {s}x"
                for b, s in r.speedup.items()) + f"  parity max abs diff {self.parity.max_abs_diff:.2e}",
        ] + [line for line in [baseline_verdict(self.to_json())] if line]


def keys_table() -> str:
    """The README's report.json table, from the fields' docs (so it cannot go stale)."""
    rows = ["| key | meaning |", "|---|---|"]
    for f in fields(Report):
        rows.append(f"| `{f.name}` | {f.metadata['doc']} |")
        if f.name == "original":
            continue  # its keys are listed once, with the compressed model's
        nested = {"compressed": (Side, ("original", "compressed")), "ratios": (Ratios, ("ratios",))}.get(f.name)
        if nested:
            kind, parents = nested
            for sub in fields(kind):
                names = ", ".join(f"`{p}.{sub.name}`" for p in parents if not (p == "original" and sub.name == "onnx_metric"))
                rows.append(f"| {names} | {sub.metadata['doc']} |")
    return "\n".join(rows)


def write_json(report: dict, path: Path) -> None:
    path.write_text(json.dumps(report, indent=2, default=_jsonable) + "\n")


def _jsonable(value: Any):
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def _num(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e4 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _metric(m: dict | None) -> str:
    return "-" if not m else f"{m['name']} {m['value']:.4f}"  # one format for every metric value


def table(headers: list[str], rows: list[list[Any]]) -> list[str]:
    """A Markdown table (what plan, inspect, bench and report.md print): cells as given, `|` escaped."""
    cell = lambda v: str(v).replace("|", "\\|")  # noqa: E731
    return (["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
            + ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows])


def layers_table(rows: list[dict]) -> list[str]:
    def note(r):
        if r.get("reason") or r.get("note") or r.get("chain"):
            return r.get("reason") or r.get("note") or r.get("chain")
        energy = f"energy {r['energy']:.3f}" if r.get("energy") is not None else ""
        precision = r["precision"] if r.get("precision") else ""  # budget.precision per_layer
        return ", ".join(p for p in (f"{r['scheme']} scheme" if r.get("scheme") else "", energy, precision) if p)

    return table(["layer", "type", "action", "rank", "params before -> after", "MACs before -> after", "note"],
                 [[r["name"], r["layer_type"], r["action"], f"{r['rank']}/{r['full_rank']}" if r.get("rank") else "-",
                   f"{_num(r['params_before'])} -> {_num(r['params_after'])}",
                   f"{_num(r['macs_before'])} -> {_num(r['macs_after'])}", note(r)] for r in rows])


SAME_SIZE = 0.001  # files within 0.1 % of each other's bytes are about the same size (a graph rewrite's nodes)


def baseline_verdict(report: dict) -> str | None:
    """One plain sentence: does the shipped model beat int8 quantization of the original on size,
    latency (at the largest batch, by the interval of the paired runs) and metric?"""
    base = (report.get("baselines") or {}).get("int8_original")
    if not base:
        return None
    if base.get("error"):
        return f"Int8 quantization of the original could not be measured: {base['error']}."
    if base.get("quantized_ops") == 0:
        return (f"Int8 quantization of the original ({base['mode']}) quantized no operator, so there is no int8 "
                "baseline to beat: compare with the original.")
    c = report["compressed"]
    outcomes, parts = [], []  # one of "win", "tie", "loss" per criterion
    gap = c["onnx_bytes"] - base["onnx_bytes"]  # within SAME_SIZE of the baseline's bytes: no difference
    size = 0 if abs(gap) <= SAME_SIZE * base["onnx_bytes"] else (gap > 0) - (gap < 0)
    outcomes.append(("win", "tie", "loss")[size + 1])
    same = "the same size" if gap == 0 else f"about the same size ({gap / base['onnx_bytes']:+.2%})"
    parts.append(f"{('smaller', same, 'larger')[size + 1]} ({_num(c['onnx_bytes'])} vs "
                 f"{_num(base['onnx_bytes'])} bytes)")
    batch = largest_key(base["compressed_speedup"])
    pair = base["compressed_speedup"][batch]
    lo, hi = pair["ci"]
    # an interval that holds 1.0 is a tie: the measurement cannot tell the two apart
    speed = "faster" if lo > 1 else "slower" if hi < 1 else "no faster or slower (the interval holds 1.00)"
    outcomes.append("win" if lo > 1 else "loss" if hi < 1 else "tie")
    parts.append(f"{speed} at {describe_key(batch)} ({pair['speedup']:.2f}x [{lo:.2f}, {hi:.2f}])")
    if c.get("metric") and base.get("metric"):
        from .metrics import drop

        # at the precision the sentence shows: a difference it would print as 0.7877 vs 0.7877 is none
        worse = drop(c["metric"]["name"], round(base["metric"]["value"], 4), round(c["metric"]["value"], 4))
        outcomes.append("win" if worse < 0 else "tie" if worse == 0 else "loss")
        parts.append(f"{'better' if worse < 0 else 'as good' if worse == 0 else 'worse'} on {c['metric']['name']} "
                     f"({c['metric']['value']:.4f} vs {base['metric']['value']:.4f})")
    wins, losses, total = outcomes.count("win"), outcomes.count("loss"), len(outcomes)
    if wins == losses == 0:
        verdict = ("is the same model as far as can be measured: nothing is gained over the one-line alternative"
                   if gap == 0 else "ties it")
    elif losses == 0:
        verdict = "beats it" if wins == total else f"beats it on {wins} of {total} and ties the rest"
    elif wins == 0:
        verdict = "does not beat it" + (f" (it loses on {losses} of {total})" if losses < total else "")
    else:
        verdict = f"beats it on {wins} of {total} and loses on {losses}"
    tried = base.get("tried") or []
    which = (f"{base['mode']}, the fastest of the one-line alternatives tried: {', '.join(t['mode'] for t in tried)}"
             if len(tried) > 1 else f"{base['mode']}, the one-line alternative")
    return (f"Against int8 quantization of the original ({which}), the shipped "
            f"model is {', '.join(parts)}: it {verdict}.")


def planning_line(timings: dict[str, float], allocation=None) -> str:
    """How long planning took and on what: loading, calibration, the budget's allocation (its probe
    passes and the op latencies it timed) and the decisions."""
    steps = [f"{name} {timings[name]:.1f} s" for name in ("load", "calibrate", "budget", "plan") if name in timings]
    line = f"Planned in {sum(timings.get(n, 0.0) for n in ('load', 'calibrate', 'budget', 'plan')):.1f} s ({', '.join(steps)})"
    if allocation is not None:
        work = []
        if allocation.probe_passes:
            work.append(f"{allocation.probe_passes} probe passes on {allocation.probe_samples} samples")
        if allocation.evaluations:
            work.append(f"{allocation.evaluations} passes checking the objectives' choices"
                        + (" and the agreement floor" if allocation.min_agreement is not None else "")
                        + f" (kept: {allocation.kept_objective})")
        if allocation.searched:
            work.append(f"{allocation.searched} passes of swap search ({allocation.swaps} swap(s) kept)")
        if allocation.newly_measured is not None:
            work.append(f"{allocation.newly_measured} op latencies timed (others from the cache)")
        line += f"; the budget ran {' and '.join(work)}" if work else "; the budget needed no probing"
        if allocation.recovery:
            line += (f"; fine-tuning follows, so each layer's removed share was priced (budget.recovery "
                     f"{allocation.recovery:g}) and no swap search ran unless asked")
    return line + "."


def budget_line(budget: dict | BudgetOutcome) -> str:
    """One sentence on a budget (report.json's `budget`, or the plan's): target, prediction,
    measurement, met or not."""
    if isinstance(budget, BudgetOutcome):
        budget = asdict(budget)
    target, = (k for k in budget["target"] if k not in ("batch", "seq_len", "over"))
    unit = " ms" if target == "latency_ms" else "x"
    where = f" at batch {budget['target']['batch']}" if "batch" in budget["target"] else ""
    where += f", {budget['target']['seq_len']} tokens" if "seq_len" in budget["target"] else ""
    if budget.get("met") is not None:
        measured = budget.get("measured")
        said = (f", measured {_num(measured)}{unit}" if measured is not None else ", not measured") \
            + (": met" if budget["met"] else ": MISSED")
    else:
        said = " (planned: nothing built or measured yet)"
    if budget["target"].get("over", "original") != "original":  # prediction and measurement are over the original
        where = (f" over int8 of the original ({_num(budget['over_original'])}x over the original){where}; "
                 "figures over the original")
        pair = budget.get("measured_over_int8")
        if pair and budget.get("met") is not None:
            said += (f"; measured {_num(pair['speedup'])}x [{_num(pair['ci'][0])}, {_num(pair['ci'][1])}] over int8 "
                     "of the original in the same run, which decides")
    if budget.get("min_agreement") is not None:
        where += (f", keeping agreement >= {budget['min_agreement']:g} on the probe samples (kept "
                  f"{_num(budget['agreement'])}" + (f"; that bound the target at {_num(budget['floor_bound'])}{unit}"
                                                     if budget.get("floor_bound") is not None else "") + ")")
    return (f"Budget: {target} {budget['target'][target]}{unit}{where}; predicted {_num(budget['predicted'])}{unit}"
            f"{said} ({budget['allocated_layers']} layers allocated, {budget['dense_layers']} left dense, "
            + (f"{len(budget['float_layers'])} kept float, " if budget.get("float_layers") is not None else "")
            + f"{budget['rounds']} round(s)).")


def to_markdown(report: dict) -> str:
    """report.md: the figures side by side, the verdicts, then the details."""
    r = report["ratios"]
    lines = [f"# Compression report: {report.get('recipe_name') or report['recipe']}", "",
             f"Model `{report['model']}`, recipe `{report['recipe']}` (sha256 `{report['recipe_sha256'][:12]}`), "
             f"seed {report['seed']}, device {report['device']}.", ""]
    lines += _figures(report)
    lines += ["", f"Compressed: {_num(r['params'])}x fewer parameters, {_num(r['macs'])}x fewer MACs, "
              f"{_num(r['onnx_bytes'])}x smaller ONNX file than the original."]
    verdict = baseline_verdict(report)
    if verdict:
        lines += ["", verdict]
    if report.get("budget"):
        lines += ["", budget_line(report["budget"])]
    if report.get("quantization"):
        lines += ["", _quantization_line(report["quantization"])]
    lines += _measurement_notes(report)
    if report.get("gates", {}).get("checked"):
        lines += ["", "## Gates", ""]
        for g in report["gates"]["checked"]:
            lines.append(f"- {'pass' if g['passed'] else 'FAIL'}: {g['gate']} {g['limit']} (measured {_num(g['value'])})")
    lines += ["", "## Layers", ""] + layers_table(report["layers"])
    lines += ["", "## Time per stage (s)", ""] + [f"- {k}: {v:.2f}" for k, v in report["timings_s"].items()]
    lines += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()), ""]
    return "\n".join(lines)


def _figures(report: dict) -> list[str]:
    """The table of every model's figures: the original, int8 of it, and the compressed model(s)."""
    o, c, r = report["original"], report["compressed"], report["ratios"]
    base = (report.get("baselines") or {}).get("int8_original")
    columns = [("original", o)]
    if base and not base.get("error"):
        columns.append(("int8 of the original", {"params": o["params"], "macs": o["macs"], **base}))
    if report.get("compressed_float"):
        columns.append(("compressed, float", report["compressed_float"]))
    columns.append(("compressed (model.onnx)" + (", int8" if report.get("quantization") else ""), c))
    rows = [["parameters"] + [_num(side["params"]) for _, side in columns],
            ["MACs per sample"] + [_num(side["macs"]) for _, side in columns],
            ["ONNX bytes"] + [_num(side["onnx_bytes"]) for _, side in columns],
            ["metric"] + [_metric(side.get("metric")) for _, side in columns],
            ["metric of the ONNX model"] + [_metric(side.get("onnx_metric")) for _, side in columns]]
    for bs, stats in o["latency_ms"].items():
        row = [f"latency {describe_key(bs)}: p50 ms (speedup over the original, 95% interval)"]
        for _, side in columns:
            p50 = side["latency_ms"][bs]["p50"]
            if side is c:
                lo, hi = r.get("speedup_ci", {}).get(bs, (None, None))
                row.append(f"{p50:.3f} ({_num(r['speedup'].get(bs))}x" + (f" [{lo:.2f}, {hi:.2f}])" if lo else ")"))
            elif "speedup" in side:  # the int8 baseline
                lo, hi = side["speedup_ci"][bs]
                row.append(f"{p50:.3f} ({_num(side['speedup'][bs])}x [{lo:.2f}, {hi:.2f}])")
            else:
                row.append(f"{p50:.3f}")
        rows.append(row)
    return table([""] + [name for name, _ in columns], rows)


def _quantization_line(q: dict) -> str:
    f = q["fidelity"]
    return (f"Quantization: {q['mode']}, {q['weight_type']} weights"
            f"{', per channel' if q['per_channel'] else ''}, {', '.join(q['op_types'])}; operators "
            + ", ".join(f"{k} x{v}" for k, v in q["quantized_ops"].items())
            + (f"; kept in float: {', '.join(q['excluded'])}" if q["excluded"] else "")
            + f". Fidelity to the float model: {f['agreement_kind']} agreement {f['agreement']:.4f} "
            f"(at least {f['min_agreement']}), max abs deviation {f['max_abs_deviation']:.3g}"
            + (f", metric drop {f['metric_drop']:.4f} (at most {f['max_metric_drop']})"
               if f.get("metric_drop") is not None else "") + "." + _rewrites_text(q.get("rewrites")))


def _rewrites_text(rewrites: dict | None) -> str:
    """The quantization line's sentence on compress's graph rewrites (quantize.rewrites)."""
    if not rewrites or not rewrites["nodes"]:
        return ""
    applied = rewrites["applied"]
    timed = rewrites["speedup"].get("+".join(applied)) if applied else None
    listed = ", ".join(f"{name} ({rewrites['nodes'][name]} nodes)" for name in applied)
    said = ""
    if applied:
        speeds = [f"{s['speedup']:.2f}x [{s['ci'][0]:.2f}, {s['ci'][1]:.2f}] at {describe_key(shape)}"
                  for shape, s in (timed or {}).items()]
        said = f" Graph rewrites: {listed}" + (f", over the same model without them: {'; '.join(speeds)}"
                                               if speeds else "") + "."
    return said + "".join(f" Not rewritten: {name}, {why}." for name, why in rewrites["refused"].items())


def _measurement_notes(report: dict) -> list[str]:
    """How parity, latency and fine-tuning were measured, and the warnings."""
    lines = []
    p = report["parity"]
    lines += ["", f"ONNX parity of the float model ({'passed' if p['passed'] else 'FAILED'}): max abs diff {p['max_abs_diff']:.3g}, "
              f"max rel diff {p['max_rel_diff']:.3g} (atol {p['atol']}, rtol {p['rtol']}).", ""]
    bench = report["bench"]
    lines.append(f"Latency: ONNX Runtime {report['versions']['onnxruntime']}, CPU, {bench['threads']} thread(s), "
                 f"{bench['warmup']} warm-up and at least {bench['runs']} timed runs per batch size, models run in "
                 "turns (never one twice in a row); speedups with a bootstrap 95% interval in brackets.")
    for warning in report.get("warnings") or []:
        lines.append(f"**Warning:** {warning}.")
    ft = report.get("finetune") or {}
    if ft.get("skipped"):
        lines.append(f"Fine-tuning: skipped, {ft['skipped']}.")
    if ft.get("steps"):
        lines.append(f"Fine-tuning: {ft['steps']} steps ({ft['epochs']:.2f} epochs) in {ft['seconds']:.1f} s, "
                     f"{ft['samples_per_s']:.0f} samples/s, final loss {ft['final_loss']:.4g}.")
    return lines
