"""The report (compress/report.py): tables, ratios, markdown from one object."""
from compress.exporting import Parity
from compress.report import Ratios, Report, Side, layers_table, ratio, table, to_markdown


def test_table_escapes_pipes_and_ratio_handles_zero():
    lines = table(["a", "b"], [["x|y", 1]])
    assert lines == ["| a | b |", "|---|---|", "| x\\|y | 1 |"]
    assert ratio(10, 4) == 2.5 and ratio(0, 4) is None and ratio(4, None) is None


def test_markdown_and_summary_come_from_the_same_report():
    side = lambda p50: Side(params=100, macs=1000, onnx_bytes=400, metric={"name": "accuracy", "value": 0.99},  # noqa: E731
                            latency_ms={"8": {"p50": p50, "p90": p50, "p99": p50, "mean": p50, "runs": 50}},
                            checkpoint_bytes=500)
    report = Report(recipe="r.yaml", recipe_name="r", recipe_sha256="0" * 64, model="m.pt", seed=0, device="cpu",
                    inputs=["x"], original=side(2.0), compressed=side(1.0),
                    ratios=Ratios(params=1.0, macs=1.0, onnx_bytes=1.0, speedup={"8": 2.0}, speedup_ci={"8": [1.8, 2.2]}),
                    warnings=["batch 8: noisy"], parity=Parity(samples=8, max_abs_diff=1e-6, max_rel_diff=1e-6, atol=1e-4,
                                                          rtol=1e-3, passed=True),
                    layers=[{"name": "fc", "layer_type": "Linear", "action": "keep", "params_before": 1,
                             "params_after": 1, "macs_before": 1, "macs_after": 1, "reason": "a | b"}],
                    finetune=None, post_finetune=None, bench={"threads": 1, "warmup": 1, "runs": 50},
                    versions={"onnxruntime": "1"}, timings_s={"load": 0.1})
    data = report.to_json()
    assert "onnx_metric" not in data["original"] and data["compressed"]["onnx_metric"] is None
    text = to_markdown(data)
    assert "1.000 (2x [1.80, 2.20])" in text and "**Warning:** batch 8: noisy." in text and "a \\| b" in text
    assert any("batch 8: 2.0x [1.8, 2.2]" in line for line in report.summary())
    assert layers_table(data["layers"])[2].startswith("| fc | Linear | keep | - |")


def _verdict_report(bytes_, base_bytes, ci, metric, base_metric, tried=None):
    from compress.report import baseline_verdict

    return baseline_verdict({
        "compressed": {"onnx_bytes": bytes_, "metric": {"name": "accuracy", "value": metric}},
        "baselines": {"int8_original": {"mode": tried[-1]["mode"] if tried else "dynamic", "onnx_bytes": base_bytes,
                                        "tried": tried,
                                        "metric": {"name": "accuracy", "value": base_metric},
                                        "compressed_speedup": {"8": {"speedup": sum(ci) / 2, "ci": list(ci)}}}}})


def test_baseline_verdict_says_equal_is_equal_and_an_interval_holding_one_is_a_tie():
    # the case a real budget produced: int8 of the original shipped as itself
    same = _verdict_report(58_713_861, 58_713_861, (0.90, 1.00), 0.9, 0.9)
    assert "the same size" in same and "no faster or slower" in same and "as good" in same
    assert "is the same model as far as can be measured" in same and "larger" not in same and " slower at" not in same
    assert _verdict_report(100, 101, (0.95, 1.05), 0.9, 0.9).endswith("it beats it on 1 of 3 and ties the rest.")
    assert _verdict_report(90, 100, (1.1, 1.3), 0.91, 0.9).endswith("it beats it.")
    assert "beats it on 1 of 3 and ties the rest" in _verdict_report(90, 100, (0.9, 1.1), 0.9, 0.9)
    assert "does not beat it." in _verdict_report(110, 100, (0.7, 0.9), 0.8, 0.9)
    assert "does not beat it (it loses on 1 of 3)" in _verdict_report(110, 100, (0.9, 1.1), 0.9, 0.9)
    assert "beats it on 1 of 3 and loses on 2" in _verdict_report(90, 100, (0.7, 0.9), 0.8, 0.9)
    assert "slower at batch 8 (0.85x [0.80, 0.90])" in _verdict_report(90, 100, (0.8, 0.9), 0.8, 0.9)
    # a graph rewrite's few nodes: 8 KB of 58.6 MB is about the same size, not a loss
    rewritten = _verdict_report(58_574_653, 58_566_674, (1.27, 1.41), 0.9929, 0.9929)
    assert "about the same size (+0.01%)" in rewritten and rewritten.endswith("it beats it on 1 of 3 and ties the rest.")
    # a difference the sentence would print as equal is no difference (the CTR model: AUC 0.78771 vs 0.78774)
    assert "as good on accuracy (0.7877 vs 0.7877)" in _verdict_report(90, 100, (0.9, 1.1), 0.78771, 0.78774)


def test_a_baseline_that_could_not_be_made_is_said_and_left_out_of_the_table():
    from dataclasses import asdict

    from compress.report import Baseline, baseline_verdict

    failed = asdict(Baseline(error="nothing to quantize"))
    assert failed["mode"] is None and failed["error"] == "nothing to quantize"
    report = {"compressed": {"onnx_bytes": 1}, "baselines": {"int8_original": failed}}
    assert baseline_verdict(report) == "Int8 quantization of the original could not be measured: nothing to quantize."
    measured = asdict(Baseline(mode="dynamic", onnx_bytes=2, compressed_speedup={"8": {"speedup": 1.2, "ci": [1.1, 1.3]}}))
    assert "it beats it" in baseline_verdict({"compressed": {"onnx_bytes": 1}, "baselines": {"int8_original": measured}})


def test_a_baseline_that_quantized_nothing_is_not_beaten_on_size():
    """Dynamic int8 of a convolutional network quantizes no operator: the file is the float model (a
    little larger), and no sentence may call the compressed model smaller than int8."""
    from compress.report import baseline_verdict

    verdict = baseline_verdict({
        "compressed": {"onnx_bytes": 100, "metric": None},
        "baselines": {"int8_original": {"mode": "dynamic", "onnx_bytes": 400, "quantized_ops": 0,
                                        "compressed_speedup": {"32": {"speedup": 2.0, "ci": [1.9, 2.1]}}}}})
    assert verdict.startswith("Int8 quantization of the original (dynamic) quantized no operator")
    assert "smaller" not in verdict and "beat" in verdict


def test_the_verdict_names_the_int8_options_tried():
    tried = [{"mode": "dynamic"}, {"mode": "static"}]
    verdict = _verdict_report(90, 100, (1.1, 1.3), 0.91, 0.9, tried=tried)
    assert "(static, the fastest of the one-line alternatives tried: dynamic, static)" in verdict
