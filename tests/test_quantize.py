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
