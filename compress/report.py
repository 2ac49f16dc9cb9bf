"""report.json and report.md, both from one result dict (report.json's keys are an interface)."""
from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any


def versions() -> dict[str, str]:
    import numpy
    import onnx
    import onnxruntime
    import torch

    from . import __version__

    return {"compress": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__, "numpy": numpy.__version__}


def ratio(before: float | None, after: float | None) -> float | None:
    if not before or not after:
        return None
    return round(before / after, 4)


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
    return "-" if not m else f"{m['name']} {_num(m['value'])}"


def layers_table(rows: list[dict]) -> list[str]:
    lines = ["| layer | type | action | rank | params before -> after | MACs before -> after | note |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        rank = f"{r['rank']}/{r['full_rank']}" if r.get("rank") else "-"
        note = r.get("reason") or r.get("note") or (f"{r['scheme']} scheme, energy {r['energy']:.3f}" if r.get("scheme") else
                                   (f"energy {r['energy']:.3f}" if r.get("energy") is not None else ""))
        lines.append(f"| {r['name']} | {r['layer_type']} | {r['action']} | {rank} | "
                     f"{_num(r['params_before'])} -> {_num(r['params_after'])} | "
                     f"{_num(r['macs_before'])} -> {_num(r['macs_after'])} | {note} |")
    return lines


def to_markdown(report: dict) -> str:
    o, c, r = report["original"], report["compressed"], report["ratios"]
    lines = [f"# Compression report: {report.get('recipe_name') or report['recipe']}", "",
             f"Model `{report['model']}`, recipe `{report['recipe']}` (sha256 `{report['recipe_sha256'][:12]}`), "
             f"seed {report['seed']}, device {report['device']}.", "",
             "| | original | compressed | ratio |", "|---|---|---|---|",
             f"| parameters | {_num(o['params'])} | {_num(c['params'])} | {_num(r['params'])}x |",
             f"| MACs per sample | {_num(o['macs'])} | {_num(c['macs'])} | {_num(r['macs'])}x |",
             f"| ONNX bytes | {_num(o['onnx_bytes'])} | {_num(c['onnx_bytes'])} | {_num(r['onnx_bytes'])}x |",
             f"| metric | {_metric(o['metric'])} | {_metric(c['metric'])} | |"]
    if c.get("onnx_metric"):
        lines.append(f"| metric of model.onnx | | {_metric(c['onnx_metric'])} | |")
    for bs, stats in o["latency_ms"].items():
        cs = c["latency_ms"][bs]
        lo, hi = r.get("speedup_ci", {}).get(bs, (None, None))
        interval = f" [{lo:.3f}, {hi:.3f}]" if lo is not None else ""
        lines.append(f"| latency batch {bs} p50 / p90 / p99 ms | {stats['p50']:.3f} / {stats['p90']:.3f} / {stats['p99']:.3f} "
                     f"| {cs['p50']:.3f} / {cs['p90']:.3f} / {cs['p99']:.3f} | {_num(r['speedup'].get(bs))}x{interval} |")
    p = report["parity"]
    lines += ["", f"ONNX parity ({'passed' if p['passed'] else 'FAILED'}): max abs diff {p['max_abs_diff']:.3g}, "
              f"max rel diff {p['max_rel_diff']:.3g} (atol {p['atol']}, rtol {p['rtol']}).", ""]
    bench = report["bench"]
    lines.append(f"Latency: ONNX Runtime {report['versions']['onnxruntime']}, CPU, {bench['threads']} thread(s), "
                 f"{bench['warmup']} warm-up and at least {bench['runs']} timed runs per batch size, models run in "
                 "alternating pairs; speedups with a bootstrap 95% interval in brackets.")
    for warning in report.get("warnings") or []:
        lines.append(f"**Warning:** {warning}.")
    ft = report.get("finetune") or {}
    if ft.get("steps"):
        lines.append(f"Fine-tuning: {ft['steps']} steps ({ft['epochs']:.2f} epochs) in {ft['seconds']:.1f} s, "
                     f"{ft['samples_per_s']:.0f} samples/s, final loss {ft['final_loss']:.4g}.")
    if report.get("gates", {}).get("checked"):
        lines += ["", "## Gates", ""]
        for g in report["gates"]["checked"]:
            lines.append(f"- {'pass' if g['passed'] else 'FAIL'}: {g['gate']} {g['limit']} (measured {_num(g['value'])})")
    lines += ["", "## Layers", ""] + layers_table(report["layers"])
    lines += ["", "## Time per stage (s)", ""] + [f"- {k}: {v:.2f}" for k, v in report["timings_s"].items()]
    lines += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()), ""]
    return "\n".join(lines)
