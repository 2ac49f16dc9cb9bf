"""Hugging Face model folders and text data, end to end: a tiny BERT built from a config inside the
test (no weights fetched), its tokenizer made from a word list, sentences as a .txt file; and the
refusals a stranger's folder or text file meets."""
import collections
import json
import random

import numpy as np
import onnx
import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the hf extra is not installed (pip install 'compress[hf]')")

WORDS = ("the a cat dog sat on mat runs fast slow red blue green house tree car sky sun moon big small "
         "good bad old new").split()


def make_folder(folder, classes=None):
    """A tiny BERT (2 layers, width 32) with its tokenizer, saved as transformers saves one."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    transformers.BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=5 + len(WORDS), hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=64, max_position_embeddings=64,
                                     **({"num_labels": classes} if classes else {}))
    model = (transformers.BertForSequenceClassification if classes else transformers.BertModel)(config)
    model.save_pretrained(folder)
    return folder


def sentences(count, seed=0):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 14))) for _ in range(count)]


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("hf") / "bert")


RECIPE = """\
data: {{train: {train}, batch_size: 16, max_length: 32}}
stages:
  - method: svd
    targets: {{types: [Linear]}}
    ratio: 0.5
finetune: {{steps: 3}}
bench: {{batch_sizes: [1, 4], warmup: 1, runs: 3}}
"""


def test_a_model_folder_and_a_text_file_go_through_apply_and_reload(bert, tmp_path, write_recipe, run_cli):
    (tmp_path / "sentences.txt").write_text("\n".join(sentences(120)) + "\n\n")
    recipe = write_recipe(RECIPE.format(train="sentences.txt"))
    out = tmp_path / "out"
    result = run_cli("apply", "-r", recipe, bert, "--out", out, "-q")
    assert result.exit_code == 0, result.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["inputs"] == ["input_ids", "attention_mask", "token_type_ids"]
    assert report["output"]["kind"] == "embeddings" and report["compressed"]["metric"]["name"] == "cosine"
    parity = report["parity"]
    assert parity["passed"] and len(parity["sequence_lengths"]) == 2  # the longest and the shortest eval example
    assert {"tokenizer.json", "vocab.txt", "tokenizer_config.json"} <= set(report["files"])
    # the pooler's output is not the one measured: it is neither compressed nor shipped
    assert not any(".pooler." in row["name"] for row in report["layers"])
    base = json.loads((out / "compression.json").read_text())["metadata"]["base"]
    assert base["model_type"] == "bert" and len(base["weights_sha256"]) == 64

    import compress
    import onnxruntime as ort

    reloaded = compress.load(out).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    for batch in (sentences(3, seed=1), [s + " the cat sat on the mat" * 2 for s in sentences(5, seed=2)]):
        feed = tokenizer(batch, padding="longest", return_tensors="np")
        onnx_out = session.run(None, {k: feed[k].astype(np.int64) for k in report["inputs"]})[0]
        with torch.no_grad():
            torch_out = reloaded(*(torch.from_numpy(feed[k]).long() for k in report["inputs"]))
        assert np.allclose(onnx_out, torch_out.numpy(), atol=1e-4), (feed["input_ids"].shape, batch)


def test_pairs_with_labels_train_a_classifier_folder(tmp_path, write_recipe, run_cli):
    folder = make_folder(tmp_path / "clf", classes=3)
    rows = [{"premise": a, "hypothesis": b, "label": i % 3}
            for i, (a, b) in enumerate(zip(sentences(90, 3), sentences(90, 4)))]
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with open(tmp_path / "pairs.csv", "w") as f:
        f.write("premise,hypothesis,label\n" + "".join(f"{r['premise']},{r['hypothesis']},{r['label']}\n" for r in rows))
    for source in ("pairs.jsonl", "pairs.csv"):
        recipe = write_recipe(RECIPE.format(train=source) + "model: {task: sequence-classification}\n"
                              + "", name=f"{source}.yaml")
        text = recipe.read_text().replace("max_length: 32}", "max_length: 32, text_keys: [premise, hypothesis]}")
        recipe.write_text(text)
        out = tmp_path / f"out-{source}"
        result = run_cli("apply", "-r", recipe, folder, "--out", out, "-q", "--max-metric-drop", "1")
        assert result.exit_code == 0, result.stderr
        report = json.loads((out / "report.json").read_text())
        assert report["compressed"]["metric"]["name"] == "accuracy" and report["output"]["kind"] == "logits"
        assert "task" in report["finetune"]["loss_terms"]  # the labels train it


@pytest.mark.parametrize("change, message", [
    (lambda f: f.joinpath("config.json").write_text(json.dumps({**json.loads(f.joinpath("config.json").read_text()),
                                                                "auto_map": {"AutoModel": "x.Y"}})),
     "compress never runs a model folder's code"),
    (lambda f: f.joinpath("config.json").write_text(json.dumps({**json.loads(f.joinpath("config.json").read_text()),
                                                                "model_type": "no-such-model"})),
     "is not one transformers"),
    (lambda f: f.joinpath("config.json").write_text(json.dumps({**json.loads(f.joinpath("config.json").read_text()),
                                                                "num_hidden_layers": 10**6})),
     "num_hidden_layers 1000000 is out of range"),
    (lambda f: f.joinpath("config.json").write_text(json.dumps({**json.loads(f.joinpath("config.json").read_text()),
                                                                "vocab_size": 10**12})),
     "more than half the"),
    (lambda f: f.joinpath("config.json").write_text("[" * 100_000),
     "not a config to read"),
    (lambda f: (f.joinpath("model.safetensors").rename(f / "pytorch_model.bin")),
     "reads model folders' weights from safetensors only"),
])
def test_a_strangers_folder_is_refused_in_one_line(bert, tmp_path, change, message, run_cli, write_recipe):
    import shutil

    folder = tmp_path / "stranger"
    shutil.copytree(bert, folder)
    change(folder)
    (tmp_path / "s.txt").write_text("\n".join(sentences(20)))
    recipe = write_recipe(RECIPE.format(train="s.txt"))
    result = run_cli("plan", "-r", recipe, folder)
    assert result.exit_code == 2 and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("name, content, extra, message", [
    ("long.txt", "a " * (1 << 20), "", "a line of more than"),
    ("bad.jsonl", '{"text": "a cat"}\n[1, 2]\n', "", "expected a JSON object"),
    ("nokey.jsonl", '{"sentence": "a cat"}\n', "", "no text under 'text'"),
    ("half.jsonl", '{"text": "a cat", "label": 1}\n{"text": "a dog"}\n', "", "1 of 2 examples have a 'label'"),
    ("word.jsonl", '{"text": "a cat", "label": "cat"}\n', "", "is not a number"),
    ("pairs.txt", "a cat\n", "text_keys: [a, b]", "pairs need .jsonl or .csv"),
    ("empty.txt", "\n\n", "", "holds no examples"),
])
def test_text_mistakes_are_one_line(bert, tmp_path, name, content, extra, message, run_cli, write_recipe):
    (tmp_path / name).write_text(content)
    recipe = write_recipe(RECIPE.format(train=name).replace("max_length: 32", f"max_length: 32, {extra}" if extra
                                                            else "max_length: 32"))
    result = run_cli("plan", "-r", recipe, bert)
    assert result.exit_code == 2 and message in result.stderr, result.stderr


def test_text_needs_a_tokenizer_and_hf_keys_need_a_folder(digits_model, bert, tmp_path, run_cli, write_recipe):
    (tmp_path / "s.txt").write_text("\n".join(sentences(20)))
    result = run_cli("plan", "-r", write_recipe(RECIPE.format(train="s.txt")), digits_model)
    assert result.exit_code == 2 and "text data needs a tokenizer" in result.stderr
    recipe = write_recipe(extra="model: {task: feature-extraction}")
    result = run_cli("plan", "-r", recipe, digits_model)
    assert result.exit_code == 2 and "are for a Hugging Face model folder" in result.stderr
    recipe = write_recipe(RECIPE.format(train="s.txt") + "model: {output: logits}\n", name="bad-output.yaml")
    result = run_cli("plan", "-r", recipe, bert)
    assert result.exit_code == 2 and "does not go with model.task feature-extraction" in result.stderr


def test_text_is_read_no_further_than_max_examples(bert, tmp_path, run_cli, write_recipe):
    (tmp_path / "s.txt").write_bytes(("\n".join(sentences(50)) + "\n").encode() + b"\xff\xfe not utf-8 after the limit")
    recipe = write_recipe(RECIPE.format(train="s.txt").replace("max_length: 32", "max_length: 32, max_examples: 50"))
    result = run_cli("plan", "-r", recipe, bert, "--json")
    assert result.exit_code == 0, result.stderr


def test_without_transformers_the_error_names_the_extra(monkeypatch):
    import sys

    from compress import hf
    from compress.errors import UserError

    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers raises ImportError
    with pytest.raises(UserError, match=r"pip install 'compress\[hf\]'"):
        hf.transformers()


def _apply_example(name: str, change, seed: int, bert, tmp_path, run_cli) -> tuple[dict, object]:
    """(report, output folder) of `compress apply` with examples/sentence-encoder/`name`, as `change`
    leaves it, on one file of 900 sentences; the run must succeed."""
    import yaml

    from ..conftest import REPO

    document = yaml.safe_load((REPO / "examples" / "sentence-encoder" / name).read_text())
    change(document)
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(document))
    (tmp_path / "sentences.txt").write_text("\n".join(sentences(900, seed=seed)) + "\n")
    out = tmp_path / "out"
    result = run_cli("apply", "-r", tmp_path / "recipe.yaml", bert, "--out", out, "-q")
    assert result.exit_code == 0, result.stderr
    return json.loads((out / "report.json").read_text()), out


def test_the_sentence_encoder_example_runs_on_one_file(bert, tmp_path, run_cli):
    """examples/sentence-encoder/recipe.yaml as shipped (fine-tuning cut short), on one text file
    that data.split divides: the encoder's feed-forward layers change, int8 ships, the gate holds."""
    def change(document):
        document["finetune"]["steps"] = 3
        document["bench"] = {"batch_sizes": [1, 4], "warmup": 1, "runs": 3}

    report, _ = _apply_example("recipe.yaml", change, 5, bert, tmp_path, run_cli)
    changed = {row["name"] for row in report["layers"] if row["action"] == "factorize"}
    assert changed == {f"model.encoder.layer.{i}.{part}.dense" for i in range(2) for part in ("intermediate", "output")}
    assert report["quantization"]["mode"] == "dynamic" and report["gates"]["passed"]
    assert report["compressed"]["metric"]["name"] == "cosine"


def test_the_faster_than_int8_example_ships_fused_int8_with_its_rewrites_timed(bert, tmp_path, run_cli):
    """examples/sentence-encoder/faster-than-int8.yaml on a tiny BERT (fine-tuning and timing cut
    short; `speedup: 0.8` over int8 of the original, which a tiny model reaches by staying dense): the
    attention ships fused and integer, both rewrites were timed at the budget's shape and at the
    bench's (whether they are kept depends on this machine), and the baseline has none."""
    def change(document):
        assert document["budget"] == {"speedup": 1.3, "over": "int8_original", "batch": 8, "seq_len": 64}
        document["budget"].update(speedup=0.8, batch=4, seq_len=16)  # reached dense, whatever the noise
        document["finetune"]["steps"] = 3
        document["bench"] = {"batch_sizes": [1, 4], "seq_lens": [16], "warmup": 1, "runs": 3, "threads": 1}

    report, out = _apply_example("faster-than-int8.yaml", change, 7, bert, tmp_path, run_cli)
    q = report["quantization"]
    assert q["quantized_ops"]["QAttention"] == 2
    rewrites = q["rewrites"]
    assert rewrites["nodes"] == {"layer_norms": 4, "attention_masks": 2} and rewrites["shapes"] == ["1x16", "4x16"]
    assert set(rewrites["speedup"]) == {"layer_norms", "attention_masks", "layer_norms+attention_masks"}
    assert set(rewrites["applied"]) | set(rewrites["refused"]) == {"layer_norms", "attention_masks"}
    onnx_ops = {n.op_type for n in onnx.load(str(out / "model.onnx")).graph.node}
    assert ("SkipLayerNormalization" in onnx_ops) == ("layer_norms" not in rewrites["applied"])
    assert "Graph rewrites" in (out / "report.md").read_text() or not rewrites["applied"]
    base = report["baselines"]["int8_original"]
    assert [t["mode"] for t in base["tried"]][:2] == ["dynamic+fused", "dynamic"]


def test_padding_that_would_not_fit_in_memory_is_refused(bert, tmp_path, monkeypatch, run_cli, write_recipe):
    """One long line among many short ones pads them all to its length: counted before padding."""
    import compress.system

    (tmp_path / "s.txt").write_text("\n".join(sentences(200)) + "\n" + " ".join(["cat"] * 30) + "\n")
    # half of it holds the tiny model's 80 KB but not 201 examples x 32 tokens x 8 bytes x 3 tensors (154 KB)
    monkeypatch.setattr(compress.system, "available_memory", lambda: 240_000)
    result = run_cli("plan", "-r", write_recipe(RECIPE.format(train="s.txt")), bert)
    assert result.exit_code == 2 and "lower data.max_length or data.max_examples" in result.stderr, result.stderr


def test_the_sentence_encoder_budget_example_plans(bert, tmp_path, run_cli):
    """examples/sentence-encoder/budget.yaml plans on a folder and one text file. Its speedup target
    depends on this machine's latencies (a tiny model cannot reach it), so the test swaps in a
    parameter target; the rest is as shipped."""
    from ..conftest import REPO

    text = (REPO / "examples" / "sentence-encoder" / "budget.yaml").read_text()
    assert "budget: {speedup: 1.4, batch: 8}" in text
    (tmp_path / "budget.yaml").write_text(text.replace("budget: {speedup: 1.4, batch: 8}", "budget: {params: 1.1}"))
    (tmp_path / "sentences.txt").write_text("\n".join(sentences(900, seed=6)) + "\n")
    result = run_cli("plan", "-r", tmp_path / "budget.yaml", bert)
    assert result.exit_code == 0, result.stderr
    assert "Budget: params 1.1x" in result.output and "12 targeted layers changed" in result.output
    assert "the budget ran" in result.output and "probe passes on" in result.output  # what planning cost


def test_latency_is_timed_at_each_sequence_length_and_a_budget_at_one(bert, tmp_path, run_cli, write_recipe):
    """bench.seq_lens times every batch size at every length (the report keys them '2x48'); a latency
    budget's seq_len is where its ops are priced and the built model is measured; the speedup gate
    reads the longest length."""
    (tmp_path / "s.txt").write_text("\n".join(sentences(120)) + "\n")
    recipe = write_recipe("""\
data: {train: s.txt, batch_size: 16, max_length: 32}
stages:
  - method: svd
    targets: {types: [Linear]}
bench: {batch_sizes: [1, 2], seq_lens: [8, 48], warmup: 1, runs: 3}
budget: {latency_ms: 10000, batch: 2}
gates: {min_speedup: 0.01}
""")
    out = tmp_path / "out"
    result = run_cli("apply", "-r", recipe, bert, "--out", out, "-q")
    assert result.exit_code == 0, result.stderr
    report = json.loads((out / "report.json").read_text())
    assert set(report["compressed"]["latency_ms"]) == {"1x8", "1x48", "2x8", "2x48"}
    assert report["budget"]["target"] == {"latency_ms": 10000, "batch": 2, "seq_len": 48}  # the longest by default
    assert report["budget"]["measured"] == report["compressed"]["latency_ms"]["2x48"]["p50"]
    assert [g["gate"] for g in report["gates"]["checked"]] == ["min_speedup@batch2x48"]
    assert "at batch 2, 48 tokens" in (out / "report.md").read_text()


def test_sequence_lengths_are_for_text(digits_model, bert, tmp_path, run_cli, write_recipe):
    recipe = write_recipe("""\
data: {eval: "bundled:digits"}
stages: [{method: svd, targets: {types: [Linear]}, ratio: 0.5}]
bench: {batch_sizes: [1], seq_lens: [16]}
""")
    result = run_cli("plan", "-r", recipe, digits_model)
    assert result.exit_code == 2 and "bench.seq_lens and budget.seq_len apply to tokenized text" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("budget, message", [
    ("{speedup: 1.5, batch: 1, seq_len: 32}", "budget.seq_len 32 is not among bench.seq_lens [16]"),
    ("{params: 1.5, seq_len: 16}", "budget.seq_len applies to latency targets"),
])
def test_a_budgets_sequence_length_is_benchmarked(budget, message, tmp_path, run_cli, write_recipe, bert):
    recipe = write_recipe(f"""\
data: {{train: s.txt}}
stages: [{{method: svd, targets: {{types: [Linear]}}}}]
bench: {{batch_sizes: [1], seq_lens: [16]}}
budget: {budget}
""")
    result = run_cli("recipe", "check", recipe)
    assert result.exit_code == 2 and message in result.stderr, result.stderr


def assert_reloaded_matches_the_onnx_file(out, input_names, reloaded):
    """The model compression.json rebuilt computes what the exported model.onnx does, on new sentences."""
    import onnxruntime as ort

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    feed = tokenizer(sentences(3, seed=3), padding="longest", return_tensors="pt")
    inputs = [feed[k].long() for k in input_names]
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    onnx_out = session.run(None, {k: t.numpy() for k, t in zip(input_names, inputs)})[0]
    with torch.no_grad():
        assert np.allclose(reloaded(*inputs).numpy(), onnx_out, atol=1e-4)


def test_group_envelope_removes_a_bert_encoders_heads_and_ffn_channels(bert, tmp_path, run_cli, write_recipe):
    """BertAttention's heads (query/key/value under .self, the output under .output.dense) are one
    group each; the pruned model exports, and compression.json rebuilds it with the same outputs."""
    (tmp_path / "s.txt").write_text("\n".join(sentences(120)) + "\n")
    recipe = write_recipe("""\
data: {train: s.txt, batch_size: 16, max_length: 32}
stages: [{method: group_envelope, targets: {types: [Linear]}, keep: 0.5}]
finetune: {steps: 4}
bench: {batch_sizes: [2], warmup: 1, runs: 3, baselines: []}
""")
    out = tmp_path / "out"
    result = run_cli("apply", "-r", recipe, bert, "--out", out, "-q")
    assert result.exit_code == 0, result.stderr
    report = json.loads((out / "report.json").read_text())
    pruned = {row["name"] for row in report["layers"] if row["action"] == "prune"}
    assert pruned == {f"model.encoder.layer.{i}.{part}" for i in range(2) for part in ("attention", "intermediate.dense")}

    import compress

    reloaded = compress.load(out).eval()
    attention = reloaded.model.encoder.layer[0].attention.self
    assert (attention.num_attention_heads, attention.all_head_size, attention.query.out_features) == (2, 16, 16)
    assert_reloaded_matches_the_onnx_file(out, report["inputs"], reloaded)


def test_depth_groups_remove_a_post_norm_bert_layer_and_reload(bert, tmp_path, run_cli, write_recipe):
    """BERT's layers are post-norm: a dead layer goes as its two LayerNorms (what it computes with
    everything else at zero), the model exports, and compression.json rebuilds it with the same outputs."""
    (tmp_path / "s.txt").write_text("\n".join(sentences(120)) + "\n")
    recipe = write_recipe("""\
data: {train: s.txt, batch_size: 16, max_length: 32}
stages: [{method: group_envelope, groups: depth, keep: 1, post_finetune: 1}]
finetune: {steps: 4}
bench: {batch_sizes: [2], warmup: 1, runs: 3, baselines: []}
""")
    out = tmp_path / "out"
    result = run_cli("apply", "-r", recipe, bert, "--out", out, "-q")
    assert result.exit_code == 0, result.stderr
    report = json.loads((out / "report.json").read_text())
    row, = [r for r in report["layers"] if r["action"] == "prune"]
    assert (row["name"], row["kept"]) == ("model.encoder.layer", 1)
    edit, = json.loads((out / "compression.json").read_text())["edits"]
    assert edit["op"] == "remove_blocks" and edit["post_norm"] is True and len(edit["indices"]) == 1

    import compress

    reloaded = compress.load(out).eval()
    layers = reloaded.model.encoder.layer
    assert [type(b).__name__ for b in layers].count("Norms") == 1
    norms = layers[edit["indices"][0]].norms
    assert [type(n).__name__ for n in norms] == ["LayerNorm", "LayerNorm"]
    assert_reloaded_matches_the_onnx_file(out, report["inputs"], reloaded)


def test_a_text_encoders_tables_ship_in_4_bits(bert, tmp_path, write_recipe, run_cli):
    """quantize.tables on a BERT folder: the word, position and token-type tables of the shipped
    model are GatherBlockQuantized, the report says so, and the fidelity check still holds."""
    import onnx

    (tmp_path / "sentences.txt").write_text("\n".join(sentences(120)) + "\n")
    recipe = write_recipe(RECIPE.format(train="sentences.txt")
                          + "quantize: {mode: dynamic, tables: {block_size: 16}, min_agreement: 0.9}\n")
    out = tmp_path / "out"
    result = run_cli("apply", "-r", recipe, bert, "--out", out, "-q")
    assert result.exit_code == 0, result.stderr
    report = json.loads((out / "report.json").read_text())
    q = report["quantization"]
    assert q["tables"]["quantized"] == q["quantized_ops"]["GatherBlockQuantized"] >= 1
    modules = {n.name.split("/")[-2] for n in onnx.load(str(out / "model.onnx")).graph.node
               if n.op_type == "GatherBlockQuantized"}
    assert "word_embeddings" in modules
    assert q["fidelity"]["passed"]  # (a width-32 model's tables are too small to shrink the file: tests/test_quantize.py)


FUSED = RECIPE.replace("types: [Linear]", "types: [Linear], include: ['*intermediate*']")


def test_a_text_encoders_attention_ships_fused_and_integer(bert, tmp_path, write_recipe, run_cli):
    """quantize.fuse on a BERT folder: ONNX Runtime's optimizer fuses both blocks' attention (the FFN's
    factorized Linears leave it alone), the one whose query stays float stays a float Attention, the
    other runs as QAttention; the output follows the reloaded model; the baseline tries int8 of the
    original fused and unfused; and `--force` replaces the output, tokenizer files and all."""
    import onnx
    import onnxruntime as ort

    import compress

    (tmp_path / "sentences.txt").write_text("\n".join(sentences(120)) + "\n")
    recipe = write_recipe(FUSED.format(train="sentences.txt") + "quantize: {fuse: true, exclude: "
                          "['model.encoder.layer.0.attention.self.query']}\n")
    out = tmp_path / "out"
    for args in ((), ("--force",)):
        result = run_cli("apply", "-r", recipe, bert, "--out", out, "-q", *args)
        assert result.exit_code == 0, result.stderr
    report = json.loads((out / "report.json").read_text())
    q = report["quantization"]
    assert q["fused"]["Attention"] == 2 and q["fused"]["EmbedLayerNormalization"] == 1
    assert q["quantized_ops"]["QAttention"] == 1 and "Attention" in q["op_types"]
    ops = collections.Counter(n.op_type for n in onnx.load(str(out / "model.onnx")).graph.node)
    assert ops["Attention"] == 1 and ops["QAttention"] == 1 and q["excluded"] == ["Attention_0"]
    assert q["fidelity"]["passed"] and not any("fused no attention" in w for w in report["warnings"])
    tried = [t["mode"] for t in report["baselines"]["int8_original"]["tried"]]
    assert tried[:2] == ["dynamic+fused", "dynamic"]
    reloaded = compress.load(out).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    feed = tokenizer(sentences(6, seed=4), padding="longest", return_tensors="np")
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    onnx_out = torch.from_numpy(session.run(None, {k: feed[k].astype(np.int64) for k in report["inputs"]})[0])
    with torch.no_grad():
        torch_out = reloaded(*(torch.from_numpy(feed[k]).long() for k in report["inputs"]))
    assert torch.nn.functional.cosine_similarity(onnx_out, torch_out).min() > 0.99


def test_fused_attention_leaves_the_tables_to_4_bits(bert, tmp_path, write_recipe, run_cli):
    """quantize.fuse with quantize.tables: the embedding fusion, which would take in the word table's
    Gather, is left out; the attention is still fused and integer, the tables in 4 bits."""
    (tmp_path / "sentences.txt").write_text("\n".join(sentences(120)) + "\n")
    recipe = write_recipe(FUSED.format(train="sentences.txt") + "quantize: {fuse: true, tables: {block_size: 16}}\n")
    result = run_cli("apply", "-r", recipe, bert, "--out", tmp_path / "out", "-q")
    assert result.exit_code == 0, result.stderr
    q = json.loads((tmp_path / "out" / "report.json").read_text())["quantization"]
    assert "EmbedLayerNormalization" not in q["fused"] and q["quantized_ops"]["QAttention"] == 2
    assert q["tables"]["quantized"] >= 1


def test_fusion_that_finds_no_attention_says_so(bert, tmp_path, write_recipe, run_cli):
    """Every Linear factorized (the attention projections too): the optimizer fuses the rest, the
    report warns that no attention was fused, and the model ships."""
    (tmp_path / "sentences.txt").write_text("\n".join(sentences(120)) + "\n")
    recipe = write_recipe(RECIPE.format(train="sentences.txt") + "quantize: {fuse: true}\n")
    result = run_cli("apply", "-r", recipe, bert, "--out", tmp_path / "out", "-q")
    assert result.exit_code == 0, result.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert "Attention" not in report["quantization"]["fused"] and report["quantization"]["fused"]
    assert any(w.startswith("quantize.fuse fused no attention") for w in report["warnings"])


@pytest.mark.parametrize("quantize, model, message", [
    ("{fuse: true, mode: static}", "bert", "quantize.fuse needs mode: dynamic"),
    ("{fuse: true}", "digits", "quantize.fuse: the model has no attention module that says its heads"),
])
def test_fusion_a_model_cannot_take_is_refused_before_any_work(bert, digits_model, tmp_path, write_recipe, run_cli,
                                                                quantize, model, message):
    if model == "bert":
        (tmp_path / "sentences.txt").write_text("\n".join(sentences(40)) + "\n")
        recipe = write_recipe(FUSED.format(train="sentences.txt") + f"quantize: {quantize}\n")
    else:
        recipe = write_recipe(extra=f"quantize: {quantize}\n")
    out = tmp_path / "out"
    result = run_cli("apply", "-r", recipe, bert if model == "bert" else digits_model, "--out", out)
    assert result.exit_code == 2 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_attention_heads_are_read_from_the_modules_and_eager_attention_is_undone():
    from compress.hf import eager_attention
    from compress.quantize import attention_heads

    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    model = transformers.BertModel(config)
    before = model.config._attn_implementation
    with eager_attention(model):
        assert model.config._attn_implementation == "eager"
    assert model.config._attn_implementation == before == "sdpa"
    assert attention_heads(model) == (4, 32)
    model.encoder.layer[1].attention.self.num_attention_heads = 2  # heads removed from one layer only
    assert attention_heads(model) == (0, 0)
    assert attention_heads(torch.nn.Linear(2, 2)) is None
