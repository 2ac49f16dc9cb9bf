import pytest
import torch
from torch import nn

from compress import linalg
from compress.bench import profile_layers
from compress.methods.afm import Afm, AfmStage, collect_moments, mimic, output_features


def correlated(n, dim, rank, seed):
    """Inputs whose layer outputs concentrate near a low-dimensional subspace, plus noise."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, rank, generator=gen, dtype=torch.float64) @ torch.randn(rank, dim, generator=gen, dtype=torch.float64) \
        + 0.05 * torch.randn(n, dim, generator=gen, dtype=torch.float64)


LAYERS = {
    "linear 3-D": (lambda: nn.Linear(12, 10), lambda: correlated(60, 12, 3, 0).reshape(20, 3, 12)),
    "conv": (lambda: nn.Conv2d(4, 9, 3, stride=2, padding=2), lambda: torch.randn(6, 4, 7, 9, dtype=torch.float64)),
    "embedding": (lambda: nn.Embedding(30, 8), lambda: torch.randint(0, 30, (40, 5), generator=torch.Generator().manual_seed(1))),
}


def moments_of(layer, x):
    m = linalg.OutputMoments(layer.weight.shape[1] if isinstance(layer, nn.Embedding) else layer.weight.shape[0])
    with torch.no_grad():
        m.update(output_features(layer, layer(x)))
    return m


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_full_rank_reproduces_the_layer_exactly(kind):
    torch.manual_seed(0)
    make, data = LAYERS[kind]
    layer, x = make().double(), data()
    moments = moments_of(layer, x)
    full = moments.total.numel()
    replacement = mimic(layer, moments, full)
    other = data() if kind != "embedding" else torch.arange(30)[None]  # also off the calibration data
    with torch.no_grad():
        assert torch.allclose(replacement(x), layer(x), atol=1e-9)
        assert torch.allclose(replacement(other), layer(other), atol=1e-9)


@pytest.mark.parametrize("kind", sorted(LAYERS))
@pytest.mark.parametrize("rank", [1, 3, 5])
def test_error_at_rank_k_is_the_sum_of_dropped_eigenvalues(kind, rank):
    torch.manual_seed(0)
    make, data = LAYERS[kind]
    layer, x = make().double(), data()
    moments = moments_of(layer, x)
    eigenvalues, _ = linalg.principal_subspace(moments.covariance())
    replacement = mimic(layer, moments, rank)
    with torch.no_grad():
        y, y_hat = output_features(layer, layer(x)), output_features(layer, replacement(x))
    per_sample = ((y - y_hat) ** 2).sum(-1).mean()
    assert float(per_sample) == pytest.approx(float(eigenvalues[rank:].sum()), rel=1e-7, abs=1e-10)


def test_afm_beats_weight_svd_at_equal_rank_on_correlated_inputs():
    from compress.layers import factorize

    torch.manual_seed(0)
    layer = nn.Linear(12, 10).double()
    x = correlated(500, 12, 3, 2)
    afm = mimic(layer, moments_of(layer, x), 3)
    svd = factorize(layer, 3)
    with torch.no_grad():
        err_afm = ((afm(x) - layer(x)) ** 2).mean()
        err_svd = ((svd(x) - layer(x)) ** 2).mean()
    assert err_afm < 0.1 * err_svd


class Stack(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.a, self.b, self.c = nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 4)

    def forward(self, ids):
        h = self.embed(ids).mean(1)
        return self.c(torch.relu(self.b(torch.relu(self.a(h)))))


def _plan(stage, model, ids):
    method = Afm(AfmStage.model_validate({"method": "afm", **stage}), 0)
    method.calibrate(model, lambda: ((ids[i:i + 64],) for i in range(0, len(ids), 64)))
    method.plan(model, profile_layers(model, (ids[:1],)))
    return method


def test_plan_prepare_edits_and_reasons():
    torch.manual_seed(0)
    model, ids = Stack().eval(), torch.randint(0, 50, (256, 6))
    method = _plan({"rank": 4, "targets": {"exclude": ["c"]}}, model, ids)
    actions = {d.name: d.action for d in method.decisions}
    assert actions == {"embed": "factorize", "a": "factorize", "b": "factorize"}
    method.prepare(model)
    assert type(model.embed).__name__ == "LowRankEmbedding" and model.embed.first.weight.shape == (50, 4)
    assert all(e["bias"] for e in method.edits())
    from compress.checkpoint import apply_edits

    rebuilt = Stack().eval()  # the edits alone rebuild the structure: the weights then load strictly
    apply_edits(rebuilt, method.edits())
    rebuilt.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(rebuilt(ids), model(ids))
    wide = _plan({"rank": 30, "targets": {"include": ["b"]}}, Stack().eval(), ids)
    assert wide.decisions[0].action == "keep" and "would not reduce MACs" in wide.decisions[0].reason


def test_sequential_calibration_reduces_the_error_of_a_stack():
    torch.manual_seed(0)
    reference = Stack().eval()
    ids = torch.randint(0, 50, (512, 6))
    errors = {}
    for sequential in (False, True):
        model = Stack().eval()
        model.load_state_dict(reference.state_dict())
        method = _plan({"rank": 3, "sequential": sequential, "targets": {"types": ["Linear"], "exclude": ["c"]}}, model, ids)
        method.prepare(model)
        with torch.no_grad():
            errors[sequential] = float(((model(ids) - reference(ids)) ** 2).mean())
    assert errors[True] <= errors[False]


def test_streaming_collection_does_not_depend_on_batch_size():
    # a float64 model: in float32 the layer outputs themselves differ by ~1e-7 across batch sizes
    # (matmul blocking), which is not what this test is about
    torch.manual_seed(0)
    model, ids = Stack().double().eval(), torch.randint(0, 50, (300, 6))
    stats = [collect_moments(model, ["embed", "a"], lambda b=b: ((ids[i:i + b],) for i in range(0, 300, b)))
             for b in (1, 37, 300)]
    for name in ("embed", "a"):
        assert all(torch.allclose(s[name].covariance(), stats[0][name].covariance(), atol=1e-10) for s in stats)


def test_afm_recipe_end_to_end_on_the_ctr_example(apply_shipped, ctr_model):
    out, report = apply_shipped("afm.yaml", ctr_model)
    assert report["compressed"]["metric"]["name"] == "auc"
    assert report["compressed"]["onnx_metric"]["value"] == pytest.approx(report["compressed"]["metric"]["value"], abs=1e-6)
    assert report["parity"]["passed"] and report["ratios"]["params"] > 2
    kinds = {row["layer_type"] for row in report["layers"] if row["action"] == "factorize"}
    assert kinds == {"Embedding", "Linear"}
    import compress

    from compress.checkpoint import load_model
    from compress.data import load_source

    rebuilt = compress.load(out)  # LowRankEmbedding and biased factors rebuild from compression.json
    assert any(type(m).__name__ == "LowRankEmbedding" for m in rebuilt.modules())
    fields = load_source("bundled:ctr/test").head(64)["fields"]
    import onnxruntime as ort

    onnx_out = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"fields": fields.numpy()})[0]
    with torch.no_grad():
        assert torch.equal(rebuilt(fields), load_model(out / "model.pt").model(fields))  # same weights, same model
        assert torch.allclose(rebuilt(fields), torch.from_numpy(onnx_out).reshape(-1), atol=1e-5)


def test_afm_on_a_pickled_transformer_with_two_inputs(tmp_path, write_recipe, run_cli):
    import json

    from ..tiny_models import digits_as_tokens, token_classifier

    torch.manual_seed(0)
    torch.save(token_classifier(), tmp_path / "encoder.pt")
    torch.save({k: v for k, v in digits_as_tokens("calibration").items() if k != "target"}, tmp_path / "calib.pt")
    recipe = write_recipe("""\
        data: {calibration: calib.pt}
        stages:
          - method: afm
            targets: {include: ["embed", "block.*"]}
            rank: 8
        bench: {batch_sizes: [1], warmup: 1, runs: 2}
        """)
    result = run_cli("apply", "-r", recipe, tmp_path / "encoder.pt", "--out", tmp_path / "out", "-q", "--trust-checkpoint")
    assert result.exit_code == 0, result.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    factorized = {row["name"] for row in report["layers"] if row["action"] == "factorize"}
    assert {"embed", "block.query", "block.up", "block.down"} <= factorized
    assert report["compressed"]["metric"]["name"] == "cosine" and report["parity"]["passed"]


class SharedInput(nn.Module):
    """Three projections of one tensor (query, key, value) and a narrowing layer after them."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(12, 24), nn.Linear(12, 24), nn.Linear(12, 24)
        self.down = nn.Linear(72, 6)

    def forward(self, x):
        return self.down(torch.cat([self.q(x), self.k(x), self.v(x)], -1))


def test_statistics_from_inputs_equal_statistics_from_outputs():
    torch.manual_seed(0)
    model = SharedInput().double().eval()
    x = torch.randn(400, 5, 12, dtype=torch.float64) @ torch.randn(12, 12, dtype=torch.float64)  # correlated inputs
    batches = lambda: ((x[i:i + 50],) for i in range(0, 400, 50))  # noqa: E731
    derived = collect_moments(model, ["q", "k", "v", "down"], batches)
    assert all(isinstance(derived[n], linalg.LinearOutputMoments) for n in "qkv")
    assert derived["q"].inputs is derived["k"].inputs is derived["v"].inputs  # one accumulator for one tensor
    assert isinstance(derived["down"], linalg.OutputMoments)  # narrower output: its own outputs are cheaper
    for name in "qkv":
        direct = moments_of(getattr(model, name), x)
        assert torch.allclose(derived[name].covariance(), direct.covariance(), atol=1e-9, rtol=1e-9)
        assert torch.allclose(derived[name].mean(), direct.mean(), atol=1e-12)


def test_float32_batch_products_are_accurate_to_float32():
    torch.manual_seed(0)
    x = torch.randn(64, 256, 48) * 3 + 1  # 16,384 rows per batch
    fast, exact = linalg.OutputMoments(48), linalg.OutputMoments(48)
    for batch in x.split(16):
        fast.update(batch)
        exact.update(batch, exact=True)
    relative = float((fast.covariance() - exact.covariance()).norm() / exact.covariance().norm())
    assert relative < 1e-6, relative  # float32 products, float64 accumulation
    assert fast.count == exact.count == 64 * 256


def _calibrate_in_process(rank, processes, port, folder):
    """One of two gloo processes: calibrate its share of the batches, count what it ran."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=processes)
    try:
        torch.manual_seed(0)
        model = SharedInput().double().eval()
        x = torch.randn(400, 5, 12, dtype=torch.float64)
        ran = []
        model.down.register_forward_pre_hook(lambda m, a: ran.append(1))

        def batches():
            return ((x[i:i + 50],) for i in range(0, 400, 50))

        batches.total = 8
        moments = collect_moments(model, ["q", "k", "v", "down"], batches)
        torch.save({"ran": len(ran), **{n: moments[n].covariance() for n in ("q", "down")},
                    "count": moments["down"].count}, f"{folder}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_calibration_split_across_two_processes_equals_one(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_calibrate_in_process, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    torch.manual_seed(0)
    model = SharedInput().double().eval()
    x = torch.randn(400, 5, 12, dtype=torch.float64)
    single = collect_moments(model, ["q", "k", "v", "down"], lambda: ((x[i:i + 50],) for i in range(0, 400, 50)))
    for rank in (0, 1):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert result["ran"] == 4  # each process ran half of the 8 batches ...
        assert result["count"] == single["down"].count == 2000  # ... and ends with the statistics of all
        for name in ("q", "down"):
            assert torch.allclose(result[name], single[name].covariance(), atol=1e-9, rtol=1e-9)


def _transformer_batches():
    from compress.examples.digits_transformer import digits_transformer, tokens_split

    data = tokens_split("calibration")
    batches = lambda: ((data["tokens"][i:i + 50], data["mask"][i:i + 50]) for i in range(0, 200, 50))  # noqa: E731
    torch.manual_seed(0)
    return digits_transformer(dim=32, hidden=64).eval(), batches


def test_sequential_groups_follow_execution_order_by_layer_or_by_block():
    from compress.methods.lowrank import sequential_groups

    model, batches = _transformer_batches()
    names = ["head", "blocks.1.down", "blocks.0.up", "blocks.0.query", "blocks.0.key", "embed"]
    batch = next(iter(batches()))
    assert sequential_groups(model, names, batch, "layers") == [
        ["embed"], ["blocks.0.query"], ["blocks.0.key"], ["blocks.0.up"], ["blocks.1.down"], ["head"]]
    assert sequential_groups(model, names, batch, "blocks") == [
        ["embed"], ["blocks.0.query", "blocks.0.key", "blocks.0.up"], ["blocks.1.down"], ["head"]]


def test_a_pass_stopped_after_the_last_layer_gives_the_same_statistics():
    model, batches = _transformer_batches()
    names = ["blocks.0.query", "blocks.0.output", "blocks.0.down"]
    full = collect_moments(model, names, batches)
    stopped = collect_moments(model, names, batches, stop_after="blocks.0.down")
    for name in names:
        assert torch.equal(full[name].covariance(), stopped[name].covariance())
    # the pass really stops: a layer after the stop is never reached
    assert "blocks.1.up" not in collect_moments(model, ["blocks.1.up", "blocks.0.down"], batches,
                                                stop_after="blocks.0.down")


@pytest.mark.parametrize("mode", ["blocks", "layers"])
def test_sequential_afm_compresses_each_group_on_the_compressed_groups_before_it(mode):
    from compress.methods.base import replace_module

    model, batches = _transformer_batches()
    targets = {"include": ["blocks.*"], "types": ["Linear"]}
    stage = AfmStage(method="afm", rank=8, targets=targets, sequential=mode)
    method = Afm(stage, 0)
    sample = tuple(t[:1] for t in next(iter(batches())))
    compressed = __import__("copy").deepcopy(model)
    method.calibrate(compressed, batches)
    method.plan(compressed, profile_layers(compressed, sample))
    method.prepare(compressed)
    # the reference, by hand: block 0 on the original's statistics (within a block: as the original;
    # one layer at a time: each on the layers compressed before it), block 1 after all of block 0
    reference = __import__("copy").deepcopy(model)
    order = ["query", "key", "value", "output", "up", "down"]
    for block in ("blocks.0", "blocks.1"):
        names = [f"{block}.{n}" for n in order]
        groups = [names] if mode == "blocks" else [[n] for n in names]
        for group in groups:
            stats = collect_moments(reference, group, batches)
            for name in group:
                replace_module(reference, name, mimic(reference.get_submodule(name), stats[name], 8))
    inputs = tuple(t[:64] for t in next(iter(batches())))
    with torch.no_grad():
        assert torch.allclose(compressed(*inputs), reference(*inputs), atol=1e-5)


def test_a_layer_called_twice_per_forward_does_not_share_its_accumulator():
    from compress.methods.lowrank import collect_moments

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(6, 8), nn.Linear(6, 8), nn.Linear(6, 8)

        def forward(self, x):
            y = x * 2 + 1
            return self.a(x) + self.a(y) + self.b(x) + self.c(x)  # a sees x and y; b and c see x only

    torch.manual_seed(0)
    model = Twice()
    data = [(torch.randn(50, 6),), (torch.randn(50, 6),)]
    derived = collect_moments(model, ["a", "b", "c"], lambda: iter(data))
    direct = collect_moments(model, ["a", "b", "c"], lambda: iter(data), derive=False, exact=True)
    for name, count in (("a", 200), ("b", 100), ("c", 100)):  # b's count was 200: it shared a's inputs
        assert direct[name].count == count
        assert torch.allclose(derived[name].covariance(), direct[name].covariance(), rtol=1e-5, atol=1e-6), name
        assert torch.allclose(derived[name].mean(), direct[name].mean(), atol=1e-6), name
