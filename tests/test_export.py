"""ONNX export helpers (compress/export.py): dynamic axes, parity, verification."""
import pytest
import torch
from torch import nn

from compress import exporting as export
from compress.errors import ParityError


def test_dynamic_axes_batch_and_token_sequences():
    sample = (torch.zeros(1, 3, 8, 8), torch.zeros(1, 16, dtype=torch.long))
    axes = export.dynamic_axes_for(["image", "tokens"], sample, {}, True)
    assert axes == {"image": {0: "batch"}, "tokens": {0: "batch", 1: "sequence"}, "output": {0: "batch"}}
    declared = export.dynamic_axes_for(["image", "tokens"], sample, {"tokens": {}}, False)
    assert declared == {}  # a declared input gets exactly what it declares


def test_parity_is_atol_plus_rtol_elementwise():
    ref = torch.tensor([0.0, 1.0, 100.0])
    assert export.parity(ref, ref + torch.tensor([1e-5, 1e-5, 0.05]), atol=1e-4, rtol=1e-3).passed
    result = export.parity(ref, ref + torch.tensor([2e-4, 0, 0]), atol=1e-4, rtol=1e-3)
    assert not result.passed and result.max_abs_diff == pytest.approx(2e-4)


def test_verify_exports_that_agree_and_refuses_those_that_do_not(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3)).eval()
    batch = (torch.randn(5, 4),)
    path = tmp_path / "m.onnx"
    export.export_onnx(model, batch, ["x"], path, 17, export.dynamic_axes_for(["x"], batch, {}, True))
    assert export.verify(model, path, ["x"], batch, 1e-5, 1e-4).passed
    with torch.no_grad():
        model[0].bias += 1.0  # the torch model moved on: the file no longer matches it
    with pytest.raises(ParityError, match="disagrees with the torch model"):
        export.verify(model, path, ["x"], batch, 1e-5, 1e-4)


def test_text_is_cut_or_repeated_to_a_sequence_length():
    from compress.errors import UserError
    from compress.exporting import at_length

    ids = torch.tensor([[101, 7, 8, 102, 0], [101, 9, 102, 0, 0]])
    mask = (ids != 0).long()
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"}}
    short = at_length((ids, mask), ["input_ids", "attention_mask"], axes, 3)
    assert short[0].tolist() == [[101, 7, 8], [101, 9, 102]] and short[1].tolist() == [[1, 1, 1], [1, 1, 1]]
    long = at_length((ids, mask), ["input_ids", "attention_mask"], axes, 12)
    assert long[0].shape == (2, 12) and long[0][0, 5:10].tolist() == ids[0].tolist()
    assert long[1][1].tolist() == [1, 1, 1, 0, 0] * 2 + [1, 1]  # the mask goes with its tokens
    with pytest.raises(UserError, match="apply to tokenized text"):
        at_length((ids,), ["input_ids"], {"input_ids": {0: "batch", 1: "sequence"}}, 8)
