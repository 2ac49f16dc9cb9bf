"""compress apply with `quantize:`: a verified int8 model.onnx for every method, the float model
beside it, and int8 of the original measured in the same run."""
import dataclasses
import json

import onnx
import pytest

from compress import quantize

QUANTIZED = {"MatMulInteger", "ConvInteger", "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"}


def ops(path):
    return {n.op_type for n in onnx.load(str(path)).graph.node}


# the CNN's weights are in its convolutions, which only static quantization makes int8 and faster
# (dynamic ConvInteger is slower than float on ONNX Runtime's CPU provider)
@pytest.mark.parametrize("recipe,example,mode", [("svd.yaml", "digits", "static"), ("trp.yaml", "digits", "static"),
                                                 ("group_envelope.yaml", "digits", "static"),
                                                 ("afm.yaml", "ctr", "dynamic"), ("pela.yaml", "transformer", "dynamic")])
def test_every_method_ships_a_verified_int8_model(recipe, example, mode, shipped, run_cli, tmp_path, digits_model,
                                                  ctr_model, transformer_model, monkeypatch):
    model = {"digits": digits_model, "ctr": ctr_model, "transformer": transformer_model}[example]
    cwd = tmp_path / "cwd"  # ORT's pre-processing once left <uuid>.data files in the working directory
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    path = shipped(recipe)
    path.write_text(path.read_text() + f"quantize: {{mode: {mode}}}\n")
    out = tmp_path / "out"
    result = run_cli("apply", "-r", path, model, "--out", out, "-q", "--max-metric-drop", "1")
    assert result.exit_code == 0, result.stderr
    assert ops(out / "model.onnx") & QUANTIZED and not ops(out / "model.float.onnx") & QUANTIZED
    report = json.loads((out / "report.json").read_text())
    q = report["quantization"]
    assert q["mode"] == mode and q["quantized_ops"] and q["fidelity"]["passed"]
    assert report["compressed"]["onnx_bytes"] == (out / "model.onnx").stat().st_size
    assert report["compressed_float"]["onnx_bytes"] == (out / "model.float.onnx").stat().st_size
    assert report["compressed"]["onnx_bytes"] < report["compressed_float"]["onnx_bytes"]
    assert report["compressed"]["metric"] == report["compressed"]["onnx_metric"]  # the int8 model's own metric
    base = report["baselines"]["int8_original"]
    # measured in the same interleaved run: every batch size has the same number of runs for all models
    for bs, stats in report["compressed"]["latency_ms"].items():
        assert base["latency_ms"][bs]["runs"] == stats["runs"] == report["original"]["latency_ms"][bs]["runs"]
        assert set(base["compressed_speedup"][bs]) == {"speedup", "ci"}
    assert "Against int8 quantization of the original" in (out / "report.md").read_text()
    assert json.loads((out / "compression.json").read_text())["metadata"]["quantization"]["mode"] == mode
    assert list(cwd.iterdir()) == []  # nothing written outside --out


def test_static_quantization_and_the_baseline_without_quantize(write_recipe, run_cli, digits_model, tmp_path):
    out = tmp_path / "static"
    result = run_cli("apply", "-r", write_recipe(extra="quantize: {mode: static, exclude: [fc]}"), digits_model,
                     "--out", out, "-q")
    assert result.exit_code == 0, result.stderr
    report = json.loads((out / "report.json").read_text())
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops(out / "model.onnx")
    assert report["quantization"]["calibration_batches"] > 0 and report["quantization"]["excluded"] == ["/model/fc/Gemm"]
    assert report["baselines"]["int8_original"]["mode"] == "static"  # the recipe's settings for the baseline too
    plain = tmp_path / "plain"
    assert run_cli("apply", "-r", write_recipe(name="plain.yaml"), digits_model, "--out", plain, "-q").exit_code == 0
    report = json.loads((plain / "report.json").read_text())
    assert report["quantization"] is None and report["compressed_float"] is None
    assert not (plain / "model.float.onnx").exists()
    # with calibration data static QDQ is an option too: the baseline is the faster of the two, both listed
    base = report["baselines"]["int8_original"]
    assert sorted(t["mode"] for t in base["tried"]) == ["dynamic", "static"]
    p50 = {t["mode"]: next(v for k, v in t.items() if k.startswith("p50_ms@")) for t in base["tried"]}
    assert base["mode"] == min(p50, key=p50.get) and base["quantized_ops"] > 0
    assert sorted(p.name for p in plain.iterdir() if "int8" in p.name) == []  # measured, not shipped
    off = tmp_path / "off"
    recipe = write_recipe(name="off.yaml")
    recipe.write_text(recipe.read_text().replace("runs: 3}", "runs: 3, baselines: []}"))
    assert run_cli("apply", "-r", recipe, digits_model, "--out", off, "-q").exit_code == 0
    assert json.loads((off / "report.json").read_text())["baselines"] == {}


def test_a_quantized_model_that_strays_exits_4_and_keeps_nothing(write_recipe, run_cli, digits_model, tmp_path,
                                                                 monkeypatch):
    real = quantize.fidelity
    monkeypatch.setattr(quantize, "fidelity", lambda a, b, classes: dataclasses.replace(real(a, b, classes),
                                                                                         agreement=0.5))
    result = run_cli("apply", "-r", write_recipe(extra="quantize: {mode: dynamic, min_agreement: 0.9}"), digits_model,
                     "--out", tmp_path / "out", "-q")
    assert result.exit_code == 4, result.stderr
    assert "agreement with the float model 0.5000 < quantize.min_agreement 0.9" in result.stderr
    assert result.stderr.count("\n") == 1 and sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml"]


@pytest.mark.parametrize("extra,words", [
    ("quantize: {mode: static}\n", "quantize.mode static needs calibration data"),
    ("quantize: {exclude: [nothing.here]}\n", "quantize.exclude[0]: pattern 'nothing.here' matches no module"),
    ("quantize: {op_types: [Softmax]}\n", "quantize.op_types[0]"),
    ("quantize: {mode: fp4}\n", "quantize.mode: Input should be 'dynamic' or 'static'"),
])
def test_bad_quantize_sections_exit_2_before_any_work(extra, words, write_recipe, run_cli, digits_model, tmp_path):
    recipe = write_recipe("data: {eval: bundled:digits/test}\nstages: [{method: svd, ratio: 0.5}]\n" + extra)
    result = run_cli("apply", "-r", recipe, digits_model, "--out", tmp_path / "out", "-q")
    assert result.exit_code == 2 and words in result.stderr and result.stderr.count("\n") == 1, result.stderr
    assert not (tmp_path / "out").exists()


def test_export_and_bench_quantize_for_quick_use(run_cli, digits_model, tmp_path):
    path = tmp_path / "int8.onnx"
    result = run_cli("export", digits_model, "--out", path, "--quantize", "dynamic")
    assert result.exit_code == 0 and "quantized (dynamic" in result.output and ops(path) & QUANTIZED
    result = run_cli("bench", path, "--quantize", "static", "--batch-sizes", "4", "--runs", "3", "--json", "-q")
    assert result.exit_code == 0, result.stderr
    assert f"{path} (int8 static)" in json.loads(result.stdout)["latency_ms"]
