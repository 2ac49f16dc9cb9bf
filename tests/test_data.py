"""Data sources and batching (compress/data.py)."""
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from compress.data import Dataset, load_source, split_batch, synthetic_sample
from compress.errors import UserError


def test_files_of_every_format_load_the_same(tmp_path):
    image = np.random.default_rng(0).random((6, 1, 8, 8))  # float64, as NumPy makes it
    target = np.arange(6)
    np.savez(tmp_path / "d.npz", image=image, target=target)
    torch.save({"image": torch.from_numpy(image), "target": torch.from_numpy(target)}, tmp_path / "d.pt")
    save_file({"image": torch.from_numpy(image), "target": torch.from_numpy(target)}, str(tmp_path / "d.safetensors"))
    sets = [load_source(str(tmp_path / f"d.{ext}")) for ext in ("npz", "pt", "safetensors")]
    for d in sets:
        assert len(d) == 6 and d.tensors["image"].dtype == torch.float32  # float64 becomes float32
        assert torch.equal(d.tensors["image"], sets[0].tensors["image"])
    with pytest.raises(UserError, match="unknown data format '.csv'"):
        (tmp_path / "d.csv").write_text("1,2\n")
        load_source(str(tmp_path / "d.csv"))


def test_batches_heads_and_splits():
    d = Dataset({"x": torch.arange(10).float().unsqueeze(1), "target": torch.arange(10)}, "toy")
    assert [len(b["x"]) for b in d.batches(4)] == [4, 4, 2]
    assert [len(b["x"]) for b in d.batches(4, drop_last=True)] == [4, 4]
    shuffled = torch.cat([b["target"] for b in d.batches(4, shuffle=True, generator=torch.Generator().manual_seed(0))])
    assert sorted(shuffled.tolist()) == list(range(10)) and shuffled.tolist() != list(range(10))
    assert d.head(13)["target"].tolist() == list(range(10)) + [0, 1, 2]  # cycled
    inputs, target = split_batch(d.head(2), ["x"], "target")
    assert inputs[0].shape == (2, 1) and target.tolist() == [0, 1]


def test_bad_sets_are_named():
    with pytest.raises(UserError, match="share their first"):
        Dataset({"a": torch.zeros(3), "b": torch.zeros(4)}, "toy")
    with pytest.raises(UserError, match="zero samples"):
        Dataset({"a": torch.zeros(0)}, "toy")
    with pytest.raises(UserError, match="'a' holds 1 non-finite values"):
        Dataset({"a": torch.tensor([1.0, float("nan"), 2.0])}, "toy")


def test_synthetic_sample_follows_the_specs():
    a, b = synthetic_sample([{"name": "x", "shape": [3, 4]}, {"name": "ids", "shape": [7], "dtype": "int64"}])
    assert a.shape == (1, 3, 4) and a.dtype == torch.float32 and b.dtype == torch.int64 and not b.any()


def test_split_cuts_disjoint_sets_the_same_way_every_time():
    from compress.data import Dataset

    data = Dataset({"x": torch.arange(100).float().reshape(100, 1), "target": torch.arange(100)}, "d.pt")
    parts = data.split(20, 10, seed=3)
    ids = {role: set(part.tensors["target"].tolist()) for role, part in parts.items()}
    assert [len(ids[r]) for r in ("calibration", "eval", "train")] == [20, 10, 70]
    assert not (ids["calibration"] & ids["eval"]) and not (ids["train"] & (ids["calibration"] | ids["eval"]))
    again = data.split(20, 10, seed=3)
    assert torch.equal(again["eval"].tensors["x"], parts["eval"].tensors["x"])
    assert not torch.equal(data.split(20, 10, seed=4)["eval"].tensors["x"], parts["eval"].tensors["x"])
    assert parts["eval"].source == "d.pt (split: eval)"
    with pytest.raises(UserError, match="too few for data.split"):
        data.split(60, 40, seed=0)


def test_split_is_used_by_a_recipe_and_refused_beside_other_sources(tmp_path, digits_model):
    from compress.api import as_recipe
    from compress.errors import RecipeError
    from compress.examples import bundled_data
    from compress.pipeline import Options, load_context

    torch.save(bundled_data("digits/train"), tmp_path / "all.pt")
    document = {"data": {"train": str(tmp_path / "all.pt"), "split": {"calibration": 100, "eval": 200, "seed": 1}},
                "stages": [{"method": "svd", "ratio": 0.5}]}
    ctx = load_context(as_recipe(document), digits_model, Options())
    sizes = {role: len(d) for role, d in ctx.data.items()}
    assert sizes == {"calibration": 100, "eval": 200, "train": len(bundled_data("digits/train")["image"]) - 300}
    assert ctx.data["eval"].source.endswith("(split: eval)")
    document["data"]["eval"] = str(tmp_path / "all.pt")
    with pytest.raises(RecipeError, match="leave data.calibration and data.eval unset"):
        as_recipe(document)


def test_tokenized_text_batches_are_cut_to_their_longest_example():
    from compress.data import Dataset

    ids = torch.tensor([[5, 6, 0, 0, 0], [5, 6, 7, 0, 0], [5, 6, 7, 8, 9], [5, 0, 0, 0, 0]])
    labels = torch.tensor([1, 0, 1, 0])
    text = Dataset({"input_ids": ids, "attention_mask": (ids != 0).long(), "label": labels}, "t").padded("right")
    first, second = text.batches(2, trim=True)
    assert first["input_ids"].tolist() == [[5, 6, 0], [5, 6, 7]] and first["attention_mask"].shape == (2, 3)
    assert second["input_ids"].shape == (2, 5) and first["label"].tolist() == [1, 0]  # per sample: untouched
    assert all(b["input_ids"].shape == (2, 5) for b in text.batches(2))  # evaluation keeps the set's padding
    part = text.subset(torch.tensor([0, 3]), "part")
    assert next(part.batches(2, trim=True))["input_ids"].tolist() == [[5, 6], [5, 0]]
    left = Dataset({"input_ids": ids.flip(1), "attention_mask": (ids != 0).long().flip(1)}, "l").padded("left")
    assert next(left.batches(2, trim=True))["input_ids"].tolist() == [[0, 6, 5], [7, 6, 5]]
    plain = Dataset({"x": torch.zeros(4, 5)}, "p")
    assert next(plain.batches(2, trim=True))["x"].shape == (2, 5)  # only text is cut
