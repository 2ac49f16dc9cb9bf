"""compress/ortgraph.py: graph rewrites for ONNX Runtime's CPU kernels keep the model's outputs, are
not undone when ONNX Runtime loads the model, leave what they cannot rewrite alone, and are kept by
`choose` only when measured faster (the timing itself is replaced here: tests never assert speed)."""
from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from compress import bench, ortgraph, quantize

H = 16
RNG = np.random.default_rng(0)


def _model(nodes, inputs, outputs, inits, opset=17):
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset),
                                                   helper.make_opsetid("com.microsoft", 1)])


def _value(name, shape, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


def _norm_model(opset=17, scale_dtype=np.float32):
    """x + skip -> SkipLayerNormalization (with its bias and its sum used) -> Relu -> LayerNormalization
    (fed by the Relu: left as it is) -> + the sum -> LayerNormalization (fed by an Add: rewritten)."""
    inits = [numpy_helper.from_array(RNG.random(H).astype(scale_dtype) + 0.5, "g1"),
             numpy_helper.from_array(RNG.standard_normal(H).astype(np.float32), "b1"),
             numpy_helper.from_array(RNG.standard_normal(H).astype(np.float32), "bias"),
             numpy_helper.from_array(RNG.random(H).astype(np.float32) + 0.5, "g2"),
             numpy_helper.from_array(RNG.standard_normal(H).astype(np.float32), "b2")]
    nodes = [helper.make_node("SkipLayerNormalization", ["x", "skip", "g1", "b1", "bias"], ["n1", "", "", "sum"],
                              domain="com.microsoft", epsilon=1e-5),
             helper.make_node("Relu", ["n1"], ["r"]),
             helper.make_node("LayerNormalization", ["r", "g2", "b2"], ["n2"], axis=-1, epsilon=1e-6),
             helper.make_node("Add", ["n2", "sum"], ["a"]),
             helper.make_node("LayerNormalization", ["a", "g2", "b2"], ["y"], axis=-1, epsilon=1e-6)]
    return _model(nodes, [_value("x", [2, 5, H]), _value("skip", [2, 5, H])], [_value("y", [2, 5, H])], inits, opset)


def _run(model, feed, optimized: Path | None = None):
    options = ort.SessionOptions()
    if optimized is not None:
        options.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, feed)


@pytest.mark.parametrize("opset", [17, 18])
def test_layer_norms_become_elementwise_and_keep_their_outputs(opset, tmp_path):
    model = _norm_model(opset)
    feed = {"x": RNG.standard_normal((2, 5, H)).astype(np.float32) * 3,
            "skip": RNG.standard_normal((2, 5, H)).astype(np.float32)}
    before = _run(model, feed)[0]
    assert ortgraph.decompose_layer_norms(model) == 2
    onnx.checker.check_model(model)
    ops = collections.Counter(n.op_type for n in model.graph.node)
    assert ops["LayerNormalization"] == 1 and not ops["SkipLayerNormalization"] and ops["ReduceMean"] == 4
    assert next(n for n in model.graph.node if n.op_type == "LayerNormalization").input[0] == "r"  # the Relu's
    after = _run(model, feed, tmp_path / "loaded.onnx")[0]
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5)
    loaded = collections.Counter(n.op_type for n in onnx.load(str(tmp_path / "loaded.onnx")).graph.node)
    assert loaded["LayerNormalization"] == 1 and not loaded["SkipLayerNormalization"]  # not fused back at load


def test_a_norm_whose_statistics_are_used_or_whose_scale_is_not_float_is_left_alone():
    model = _norm_model(scale_dtype=np.float16)  # the skip norm's scale: not a float initializer
    assert ortgraph.decompose_layer_norms(model) == 1
    assert [n.op_type for n in model.graph.node].count("SkipLayerNormalization") == 1
    stats = _norm_model()
    stats.graph.node[4].output.extend(["mean"])  # the last LayerNormalization's mean, used below
    stats.graph.node.append(helper.make_node("Identity", ["mean"], ["m"]))
    assert ortgraph.decompose_layer_norms(stats) == 1
    assert [n.op_type for n in stats.graph.node].count("LayerNormalization") == 2


def _attention_model(mask: bool = True):
    heads, seq = 2, 6
    inits = [numpy_helper.from_array(RNG.standard_normal((H, 3 * H)).astype(np.float32) * 0.5, "w"),
             numpy_helper.from_array(RNG.standard_normal(3 * H).astype(np.float32) * 0.1, "b")]
    node = helper.make_node("Attention", ["x", "w", "b"] + (["mask"] if mask else []), ["y"],
                            domain="com.microsoft", num_heads=heads)
    inputs = [_value("x", [2, seq, H])] + ([_value("mask", [2, seq], TensorProto.INT32)] if mask else [])
    return _model([node], inputs, [_value("y", [2, seq, H])], inits)


def test_softened_attention_masks_leave_the_outputs_as_they_were():
    model = _attention_model()
    feed = {"x": RNG.standard_normal((2, 6, H)).astype(np.float32),
            "mask": np.array([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]], np.int32)}
    before = _run(model, feed)[0]
    assert ortgraph.soften_attention_masks(model) == 1
    attrs = {a.name: helper.get_attribute_value(a) for a in model.graph.node[0].attribute}
    assert attrs["mask_filter_value"] == ortgraph.MASK_FILTER
    np.testing.assert_allclose(_run(model, feed)[0], before, rtol=1e-6, atol=1e-6)
    assert ortgraph.soften_attention_masks(model) == 1  # again: the value is replaced, not added twice
    assert [a.name for a in model.graph.node[0].attribute].count("mask_filter_value") == 1
    assert ortgraph.soften_attention_masks(_attention_model(mask=False)) == 0


def _unfused_attention(padding: float, shared: bool = False, via_mul: bool = False):
    """scores + mask -> Softmax, the mask a Where (or, via_mul, (1 - mask) * padding) of a padding constant."""
    scores = _value("scores", [2, 2, 6, 6])
    nodes = [helper.make_node("Constant", [], ["pad"], value=numpy_helper.from_array(np.array(padding, np.float32)))]
    if via_mul:
        nodes += [helper.make_node("Constant", [], ["one"], value=numpy_helper.from_array(np.array(1, np.float32))),
                  helper.make_node("Cast", ["keep"], ["keep_f"], to=TensorProto.FLOAT),
                  helper.make_node("Sub", ["one", "keep_f"], ["dropped"]),
                  helper.make_node("Mul", ["dropped", "pad"], ["mask"])]
    else:
        nodes += [helper.make_node("Constant", [], ["zero"], value=numpy_helper.from_array(np.array(0, np.float32))),
                  helper.make_node("Where", ["keep", "zero", "pad"], ["mask"])]
    nodes += [helper.make_node("Add", ["scores", "mask"], ["masked"]),
              helper.make_node("Softmax", ["masked"], ["y"], axis=-1)]
    outputs = [_value("y", [2, 2, 6, 6])]
    if shared:  # the padding constant feeds something else too, which must keep it
        nodes.append(helper.make_node("Identity", ["pad"], ["pad_out"]))
        outputs.append(_value("pad_out", []))
    return _model(nodes, [scores, _value("keep", [2, 1, 1, 6], TensorProto.BOOL)], outputs, [])


@pytest.mark.parametrize("padding, via_mul", [(-np.inf, False), (float(np.finfo(np.float32).min), True)])
def test_an_unfused_attentions_mask_gets_the_softened_value(padding, via_mul):
    model = _unfused_attention(padding, shared=True, via_mul=via_mul)
    keep = np.ones((2, 1, 1, 6), bool)
    keep[0, ..., 3:] = keep[1, ..., 5:] = False
    feed = {"scores": RNG.standard_normal((2, 2, 6, 6)).astype(np.float32) * 3, "keep": keep}
    before = _run(model, feed)
    assert ortgraph.soften_attention_masks(model) == 1
    after = _run(model, feed)
    np.testing.assert_allclose(after[0], before[0], rtol=1e-6, atol=1e-12)
    assert after[1] == before[1] == np.float32(padding)  # the other consumer still sees the old constant


def test_a_mask_that_is_no_padding_value_is_left_alone():
    assert ortgraph.soften_attention_masks(_unfused_attention(-5.0)) == 0


class _Timed:
    """bench.measure's stand-in: every variant's speedup over the unrewritten model, as given (one
    {speedup, ci} for every shape, or shape -> {speedup, ci})."""

    def __init__(self, speedups):
        self.speedups, self.asked = speedups, []

    def __call__(self, paths, feeds, threads, **kwargs):
        self.asked.append(list(paths))
        speedups = self.speedups

        class Measured:
            def pair(self, a, b):
                given = speedups[b]
                return {shape: given.get(shape, given) if "ci" not in given else given for shape in feeds}

        return Measured()


def _save_both(tmp_path) -> tuple[Path, dict]:
    """A model with a layer norm and a masked attention, and a feed for it."""
    norm = _norm_model()
    attention = _attention_model()
    nodes = list(attention.graph.node) + [
        helper.make_node("Add", ["y", "x"], ["residual"]),
        helper.make_node("LayerNormalization", ["residual", "g2", "b2"], ["z"], axis=-1)]
    inits = list(attention.graph.initializer) + [i for i in norm.graph.initializer if i.name in ("g2", "b2")]
    model = _model(nodes, list(attention.graph.input), [_value("z", [2, 6, H])], inits)
    path = tmp_path / "model.onnx"
    onnx.save(model, str(path))
    feed = {"x": RNG.standard_normal((2, 6, H)).astype(np.float32),
            "mask": np.array([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]], np.int32)}
    return path, feed


def test_choose_keeps_the_fastest_variant_that_is_surely_faster(tmp_path, monkeypatch):
    path, feed = _save_both(tmp_path)
    before = _run(onnx.load(str(path)), feed)[0]
    timed = _Timed({"layer_norms": {"speedup": 1.2, "ci": [1.1, 1.3]},
                    "attention_masks": {"speedup": 1.1, "ci": [1.05, 1.15]},
                    "layer_norms+attention_masks": {"speedup": 1.4, "ci": [1.3, 1.5]}})
    monkeypatch.setattr(bench, "measure", timed)
    done = ortgraph.choose(path, {"2x6": feed}, 1)
    assert timed.asked == [["as quantized", "layer_norms", "attention_masks", "layer_norms+attention_masks"]]
    assert done.applied == ["layer_norms", "attention_masks"] and done.nodes == {"layer_norms": 1, "attention_masks": 1}
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert "LayerNormalization" not in ops and ops.count("Attention") == 1
    np.testing.assert_allclose(_run(onnx.load(str(path)), feed)[0], before, rtol=1e-5, atol=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]  # nothing else left behind


def test_choose_keeps_nothing_whose_interval_holds_one(tmp_path, monkeypatch):
    path, feed = _save_both(tmp_path)
    data = path.read_bytes()
    monkeypatch.setattr(bench, "measure", _Timed({
        "layer_norms": {"speedup": 1.05, "ci": [0.98, 1.12]}, "attention_masks": {"speedup": 0.9, "ci": [0.85, 0.95]},
        "layer_norms+attention_masks": {"speedup": 1.01, "ci": [0.95, 1.07]}}))
    done = ortgraph.choose(path, {"2x6": feed}, 1)
    assert done.applied == [] and path.read_bytes() == data
    assert done.refused["layer_norms"] == "not surely faster (1.05x [0.98, 1.12] at batch 2, 6 tokens)"


def test_choose_keeps_nothing_that_is_surely_slower_at_a_smaller_shape(tmp_path, monkeypatch):
    """Faster at the largest bench shape is not enough: a variant surely slower at another shape
    (the unfused layer norms at batch 1 with 2 threads, measured) is not kept; one that may tie there is."""
    path, feed = _save_both(tmp_path)
    faster = {"speedup": 1.3, "ci": [1.2, 1.4]}
    monkeypatch.setattr(bench, "measure", _Timed({
        "layer_norms": {"1x6": {"speedup": 0.8, "ci": [0.75, 0.85]}, "2x6": faster},
        "attention_masks": {"1x6": {"speedup": 1.0, "ci": [0.9, 1.1]}, "2x6": {"speedup": 1.1, "ci": [1.05, 1.15]}},
        "layer_norms+attention_masks": {"1x6": {"speedup": 0.9, "ci": [0.85, 0.95]}, "2x6": faster}}))
    done = ortgraph.choose(path, {"1x6": {k: v[:1] for k, v in feed.items()}, "2x6": feed}, 1)
    assert done.applied == ["attention_masks"] and done.shapes == ["1x6", "2x6"]
    assert done.refused["layer_norms"] == "slower at a smaller shape (0.80x [0.75, 0.85] at batch 1, 6 tokens)"


def test_choose_refuses_a_mask_value_that_changes_the_outputs(tmp_path, monkeypatch):
    path, feed = _save_both(tmp_path)
    monkeypatch.setattr(ortgraph, "MASK_FILTER", 0.0)  # padded positions would then count
    monkeypatch.setattr(bench, "measure", _Timed({"layer_norms": {"speedup": 1.2, "ci": [1.1, 1.3]}}))
    done = ortgraph.choose(path, {"2x6": feed}, 1)
    assert done.applied == ["layer_norms"] and "changed the outputs" in done.refused["attention_masks"]


def test_nothing_to_rewrite_is_not_timed(tmp_path, monkeypatch):
    model = _model([helper.make_node("Relu", ["x"], ["y"])], [_value("x", [2, H])], [_value("y", [2, H])], [])
    path = tmp_path / "relu.onnx"
    onnx.save(model, str(path))
    monkeypatch.setattr(bench, "measure", lambda *a, **k: pytest.fail("timed a model with nothing to rewrite"))
    done = ortgraph.choose(path, {"2": {"x": np.ones((2, H), np.float32)}}, 1)
    assert done.applied == [] and done.nodes == {}


def test_a_recipes_list_applies_untimed_and_an_empty_one_nothing(tmp_path, monkeypatch):
    path, feed = _save_both(tmp_path)
    monkeypatch.setattr(bench, "measure", lambda *a, **k: pytest.fail("an explicit list is not timed"))
    cfg = quantize.QuantizeSection(rewrites=["layer_norms"])
    assert quantize._rewrite(path, cfg, None)["applied"] == ["layer_norms"]
    assert quantize._rewrite(path, quantize.QuantizeSection(rewrites=[]), None) is None
    assert quantize._rewrite(path, quantize.QuantizeSection(), None) is None  # auto without a place to time
    with pytest.raises(Exception, match="rewrites"):
        quantize.QuantizeSection(rewrites=["softmax"])


def test_outputs_that_are_nan_in_one_model_only_do_not_agree(monkeypatch):
    """A mask whose every key is padded gives -inf rows NaN (PyTorch's export then zeroes them):
    a variant that answers with numbers there is not the same model."""
    class Session:
        def __init__(self, outputs):
            self.outputs = outputs

        def run(self, names, feed):
            return self.outputs

    outputs = iter([[np.array([1.0, np.nan])], [np.array([1.0, 0.0])],
                    [np.array([1.0, np.nan])], [np.array([1.00001, np.nan])]])
    monkeypatch.setattr(bench, "make_session", lambda path, threads: Session(next(outputs)))
    assert ortgraph._disagreement("a", "b", {}, 1) == float("inf")
    assert ortgraph._disagreement("a", "b", {}, 1) == pytest.approx(1e-5)
