"""Int8 as a stage (compress/quantize.py): node mapping, fidelity, and early mistakes."""
import pytest
import torch

from compress.errors import UserError
from compress.quantize import QuantizeSection, check_section, fidelity, node_module


def test_exported_node_names_map_to_module_names():
    assert node_module("/model/layer1/layer1.0/conv1/Conv") == "layer1.0.conv1"
    assert node_module("/model/layer1/layer1.0/conv1/first/Conv") == "layer1.0.conv1.first"
    assert node_module("/model/stem/stem.0/Conv") == "stem.0"
    assert node_module("/model/fc/Gemm") == "fc"
    assert node_module("/model/Flatten") == ""


def test_fidelity_of_class_and_vector_outputs():
    logits = torch.tensor([[2.0, 1.0], [0.0, 1.0], [3.0, 0.0], [1.0, 2.0]])
    flipped = logits.clone()
    flipped[0] = torch.tensor([1.0, 2.0])
    fid = fidelity(logits, flipped, classes=True)
    assert fid.agreement_kind == "top1" and fid.agreement == 0.75 and fid.max_abs_deviation == 1.0
    assert fidelity(logits, flipped).agreement_kind == "cosine"  # without class labels
    vectors = torch.randn(5, 8)
    fid = fidelity(vectors, vectors * 2)  # same directions: cosine 1
    assert fid.agreement_kind == "cosine" and fid.agreement == pytest.approx(1.0)
    fid = fidelity(torch.tensor([[1.0], [2.0]]), torch.tensor([[1.0], [-2.0]]))  # one number per sample
    assert fid.agreement == pytest.approx(-0.6)


def test_mistakes_are_found_before_any_work():
    names = ["stem.0", "layer1.0.conv1", "fc"]
    with pytest.raises(UserError, match="static needs calibration data"):
        check_section(QuantizeSection(mode="static"), names, has_calibration=False)
    with pytest.raises(UserError, match=r"op_types\[0\]: ONNX Runtime's dynamic quantization does not handle 'Softmax'"):
        check_section(QuantizeSection(op_types=["Softmax"]), names, True)
    with pytest.raises(UserError, match=r"exclude\[1\]: pattern 'head' matches no module"):
        check_section(QuantizeSection(exclude=["fc", "head"]), names, True)
    check_section(QuantizeSection(mode="static", exclude=["layer1.*"]), names, True)


class _Bag(torch.nn.Module):
    """A text model in miniature: a word table, a second table (looked up by a computed index, as
    token types are), mean pooling, a projection."""

    def __init__(self):
        super().__init__()
        self.words = torch.nn.Embedding(2000, 64)
        self.kinds = torch.nn.Embedding(4, 64)
        self.proj = torch.nn.Linear(64, 32)

    def forward(self, ids):
        x = self.words(ids) + self.kinds(ids % 4)
        return self.proj(x.mean(1))


@pytest.mark.parametrize("exclude", [[], ["kinds"]])
def test_tables_in_4_bits_shrink_the_file_and_keep_the_outputs(tmp_path, exclude):
    """quantize.tables: the lookup tables become GatherBlockQuantized (4 bits, block-wise) after
    the int8 step: the file shrinks by most of the tables' bytes and the outputs stay close."""
    import onnx

    from compress import bench
    from compress.quantize import quantize

    torch.manual_seed(0)
    model = _Bag().eval()
    ids = torch.randint(0, 2000, (32, 16))
    path = tmp_path / "bag.onnx"
    torch.onnx.export(model, (ids,), str(path), input_names=["ids"], output_names=["out"], dynamo=False)
    plain, tables = tmp_path / "int8.onnx", tmp_path / "int4-tables.onnx"
    quantize(path, plain, QuantizeSection())
    info = quantize(path, tables, QuantizeSection(tables={"block_size": 32}, exclude=exclude))
    assert info.tables == {"bits": 4, "block_size": 32, "symmetric": False, "quantized": 2 - len(exclude)}
    assert info.quantized_ops["GatherBlockQuantized"] == 2 - len(exclude)
    ops = [n.op_type for n in onnx.load(str(tables)).graph.node]
    assert ops.count("Gather") >= len(exclude)
    # the word table: 2000 x 64 floats, 512,000 bytes -> 64,000 bytes of 4-bit values plus scales
    assert plain.stat().st_size - tables.stat().st_size > 400_000
    with torch.no_grad():
        expected = model(ids)
    got = torch.from_numpy(bench.make_session(str(tables), 1).run(None, {"ids": ids.numpy()})[0])
    assert fidelity(expected, got).agreement > 0.99
    assert not torch.allclose(expected, got, atol=1e-6)  # it did round


def test_tables_refuse_what_they_cannot_do(tmp_path):
    with pytest.raises(UserError, match="quantize.tables: Gather is also in quantize.op_types"):
        check_section(QuantizeSection(op_types=["MatMul", "Gather"], tables={}), [], True)
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="block_size"):
        QuantizeSection(tables={"block_size": 12})
    from compress.quantize import quantize

    path = tmp_path / "linear.onnx"
    torch.onnx.export(torch.nn.Linear(8, 4), (torch.randn(2, 8),), str(path), dynamo=False)
    with pytest.raises(UserError, match="quantize.tables: the model has no lookup table"):
        quantize(path, tmp_path / "q.onnx", QuantizeSection(tables={}))
    assert not (tmp_path / "q.onnx").exists()


def test_histogram_calibration_prints_nothing_on_stdout(tmp_path, capfd):
    """ORT's percentile and entropy calibrators print progress with print(): stdout is the CLI's
    (`--json`), so quantization keeps it clean."""
    from compress.quantize import quantize

    path = tmp_path / "linear.onnx"
    torch.onnx.export(torch.nn.Linear(8, 4), (torch.randn(2, 8),), str(path), input_names=["x"], dynamo=False)
    feeds = [{"x": torch.randn(2, 8).numpy()} for _ in range(3)]
    capfd.readouterr()
    quantize(path, tmp_path / "q.onnx", QuantizeSection(mode="static", calibrate_method="percentile"), feeds)
    assert capfd.readouterr().out == ""
