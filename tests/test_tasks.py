"""Downstream tasks: the local task builders (pure functions of a text), lm-eval's results read back, and
lm-eval run on a tiny model checked against a direct computation of what its metrics mean."""

import json
import math
import statistics
from pathlib import Path

import pytest
import torch
import yaml

from llmpress.cli import main
from llmpress.data.tasks import (
    LASTWORD,
    NEXTSENT,
    lastword_docs,
    local_task_folder,
    nextsent_docs,
    paragraphs,
    sentences,
    write_tasks,
)
from llmpress.measure.tasks import paired_difference, summarize

lm_eval = pytest.importorskip("lm_eval")

NAMES = ["Anne", "Elliot", "Wentworth", "Louisa", "Henrietta", "Charles", "Mary", "Russell"]


def _story(paras: int = 60, seed: int = 0) -> str:
    """A text of short paragraphs whose sentences end in names that recur (so last-word targets exist)."""
    import random

    rng = random.Random(seed)
    out = []
    for _ in range(paras):
        sents = []
        for _ in range(rng.randint(4, 8)):
            words = [rng.choice(["she", "walked", "with", "the", "captain", "and", "saw", "quietly", "again"])
                     for _ in range(rng.randint(5, 12))]
            sents.append(" ".join(words).capitalize() + " " + rng.choice(NAMES) + rng.choice([".", "!", "?"]))
        # wrap lines as a book would, to check that paragraphs are re-joined
        text = " ".join(sents)
        out.append("\n".join(text[i:i + 70] for i in range(0, len(text), 70)))
    return "\n\n".join(out)


def test_sentences_keep_abbreviations_and_initials():
    assert sentences('He met Mr. Darcy. Then J. Smith came! "Why?" said she. No.') == [
        "He met Mr. Darcy.", "Then J. Smith came!", '"Why?"', "said she.", "No."]


def test_paragraphs_rejoin_wrapped_lines():
    assert paragraphs("a b\nc\n\n\n d  e \n") == ["a b c", "d e"]


def test_lastword_docs_are_passages_of_the_text_ending_before_a_word_seen_in_them():
    text = _story()
    flat = " ".join(text.split())
    docs = lastword_docs(text, n=50, context_words=40, seed=1)
    assert len(docs) == 50
    positions = []
    for d in docs:
        assert d["target"] in NAMES  # the only content words that end sentences here
        assert d["target"].lower() in d["context"].lower()  # LAMBADA's criterion: seen in the passage
        passage = f"{d['context']} {d['target']}"
        assert passage in flat  # a real passage, ending right before the word
        assert flat[flat.index(passage) + len(passage)] in ".!?"
        assert len(d["context"].split()) == 40  # exactly the passage's words, the sentence's head included
        positions.append(flat.index(passage))
    assert positions == sorted(positions)  # in text order
    assert lastword_docs(text, n=50, context_words=40, seed=1) == docs  # seeded
    assert lastword_docs(text, n=50, context_words=40, seed=2) != docs


def test_nextsent_docs_hold_the_true_next_sentence_and_distractors_of_similar_length():
    text = _story()
    paras = [sentences(p) for p in paragraphs(text)]
    docs = nextsent_docs(text, n=40, context_sentences=2, choices=4, seed=0, max_context_words=20, max_words=10)
    assert len(docs) == 40
    labels = set()
    for d in docs:
        assert len(d["choices"]) == 4 and len(set(d["choices"])) == 4
        true = d["choices"][d["label"]]
        labels.add(d["label"])
        # the context is consecutive sentences of one paragraph and the true choice comes right after them
        assert any(" ".join(s[j - 2:j]) == d["context"] and s[j] == true for s in paras for j in range(2, len(s)))
        assert len(d["context"].split()) <= 20 and all(6 <= len(c.split()) <= 10 for c in d["choices"])
        for k, other in enumerate(d["choices"]):
            if k != d["label"]:
                assert any(other in s for s in paras)  # a sentence of the same text
                assert len(other.split()) * 1.5 >= len(true.split()) and len(other.split()) <= 1.5 * len(true.split())
    assert len(labels) > 1  # the answer's place is drawn, not fixed


def test_write_tasks_writes_lm_eval_configs_over_the_documents(tmp_path):
    sizes = write_tasks(tmp_path, _story(), n=30)
    assert sizes == {LASTWORD: 30, NEXTSENT: 30}
    for task in (LASTWORD, NEXTSENT):
        config = yaml.safe_load((tmp_path / f"{task}.yaml").read_text())
        assert config["task"] == task
        data = Path(config["dataset_kwargs"]["data_files"]["test"])
        assert data.parent == tmp_path and len(data.read_text().splitlines()) == 30


def test_local_task_folder_is_built_once_and_keyed_by_the_text(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMPRESS_CACHE", str(tmp_path))
    a = local_task_folder("text:x", _story(seed=0), n=10)
    assert local_task_folder("text:x", _story(seed=0), n=10) == a
    b = local_task_folder("text:x", _story(seed=1), n=10)
    assert a != b and a.is_dir() and b.is_dir()
    config = yaml.safe_load((a / f"{LASTWORD}.yaml").read_text())
    assert Path(config["dataset_kwargs"]["data_files"]["test"]).parent == a  # points at the final folder
    assert not list(tmp_path.glob("tasks/.building-*"))


def test_summarize_reads_lm_eval_results():
    results = {
        "results": {"t": {"alias": "t", "acc,none": 0.5, "acc_stderr,none": 0.25, "acc_norm,none": 0.75,
                          "acc_norm_stderr,none": 0.2, "perplexity,none": 3.0, "perplexity_stderr,none": "N/A"}},
        "n-samples": {"t": {"original": 10, "effective": 4}},
    }
    samples = {"t": [{"doc_id": i, "acc": float(i % 2), "acc_norm": 1.0} for i in (3, 0, 2, 1)]}
    out = summarize(results, samples)["t"]
    assert (out["metric"], out["value"], out["stderr"], out["n"]) == ("acc", 0.5, 0.25, 4)
    assert out["metrics"]["acc_norm"] == {"value": 0.75, "stderr": 0.2}
    assert out["metrics"]["perplexity"] == {"value": 3.0, "stderr": None}
    assert out["per_doc"] == [0.0, 1.0, 0.0, 1.0]  # in document order


def test_paired_difference_matches_a_direct_computation():
    a, b = [1, 1, 0, 1, 0, 1, 1, 0], [1, 0, 0, 1, 0, 0, 1, 0]
    diffs = [x - y for x, y in zip(a, b)]
    mean, se = paired_difference(a, b)
    assert mean == pytest.approx(statistics.mean(diffs))
    assert se == pytest.approx(statistics.stdev(diffs) / math.sqrt(len(diffs)))
    with pytest.raises(ValueError):
        paired_difference([1], [1, 0])


# --- lm-eval on a tiny model, against what its metrics mean -------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tiny_models import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer()
    model = tiny_model("llama", vocab_size=len(tok))
    folder = tmp_path_factory.mktemp("tasks") / "m"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    text = tmp_path_factory.mktemp("text") / "story.txt"
    text.write_text(_story())
    return model, tok, folder, text


def _logprobs(model, tok, context: str, continuation: str) -> tuple[float, bool]:
    """Sum log p(continuation | context) and whether it is the greedy continuation, as lm-eval defines them:
    the pair is encoded whole and split where the context's own encoding ends."""
    whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    cont = whole[len(ctx):]
    ids = torch.tensor([(ctx + cont)[:-1]])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].float(), -1)[len(ctx) - 1:]
    target = torch.tensor(cont)
    return float(logp[range(len(cont)), target].sum()), bool((logp.argmax(-1) == target).all())


def test_local_tasks_through_lm_eval_score_what_the_model_predicts(tiny, tmp_path, capsys):
    from llmpress.measure.tasks import run_tasks

    model, tok, _, text = tiny
    write_tasks(tmp_path, text.read_text(), n=6)
    got = run_tasks(model, tok, [LASTWORD, NEXTSENT], include_path=tmp_path, limit=6, batch_size=2)
    assert "bootstrapping" not in capsys.readouterr().out  # lm-eval's notice kept off our stdout (tables, JSON)
    lw = [json.loads(line) for line in (tmp_path / f"{LASTWORD}.jsonl").read_text().splitlines()]
    ns = [json.loads(line) for line in (tmp_path / f"{NEXTSENT}.jsonl").read_text().splitlines()]
    greedy = [float(_logprobs(model, tok, d["context"], " " + d["target"])[1]) for d in lw]
    picked = [float(max(range(4), key=lambda k: _logprobs(model, tok, d["context"], " " + d["choices"][k])[0])
                    == d["label"]) for d in ns]
    assert got[LASTWORD]["per_doc"] == greedy
    assert got[LASTWORD]["value"] == pytest.approx(sum(greedy) / 6)
    assert got[NEXTSENT]["per_doc"] == picked
    assert got[NEXTSENT]["n"] == 6 and got[NEXTSENT]["stderr"] is not None


@pytest.mark.parametrize("recipe, fmt, kind", [("gptq-w4-g64", "auto", "pack-quantized"),
                                               ("sparsegpt-50", "compressed-tensors", "sparse-bitmask"),
                                               ("svd-llm-90", "auto", "low-rank")])
def test_tasks_run_on_packed_sparse_and_low_rank_folders(calib, tmp_path, recipe, fmt, kind):
    """The folders lm-eval's hf backend cannot all load (transformers refuses sparse and low-rank ones,
    tests/test_plain_transformers.py): llmpress loads them and lm-eval scores the reloaded model exactly
    as it scores the compressed model in memory."""
    import llmpress
    from llmpress.export.formats import folder_format
    from llmpress.measure.tasks import run_tasks
    from llmpress.models.loader import load_model
    from tiny_models import tiny_model

    tok, spec = calib
    out = tmp_path / "out"
    result = llmpress.compress(tiny_model("llama", seed=3, vocab_size=len(tok)), recipe, tokenizer=tok, out=out,
                               format=fmt, data=spec, samples=8, seq_len=32, progress=False)
    assert folder_format(json.loads((out / "config.json").read_text())) == kind
    write_tasks(tmp_path / "tasks", _story(), n=4)
    loaded = load_model(out)
    got = run_tasks(loaded.model, loaded.tokenizer, [LASTWORD, NEXTSENT], include_path=tmp_path / "tasks", limit=4,
                    batch_size=2)
    want = run_tasks(result.model, tok, [LASTWORD, NEXTSENT], include_path=tmp_path / "tasks", limit=4, batch_size=2)
    for task in (LASTWORD, NEXTSENT):
        assert got[task]["n"] == 4 and got[task]["per_doc"] == want[task]["per_doc"]
        for metric, value in want[task]["metrics"].items():
            # equal per-document scores; the bootstrap's float sums of a random model's 1e16 perplexities
            # may differ from the 6th digit of the stderr (seen 7.6e-6 with lm-eval on a clean install)
            assert got[task]["metrics"][metric]["value"] == pytest.approx(value["value"], rel=1e-6)
            stderr = got[task]["metrics"][metric]["stderr"]
            assert stderr == value["stderr"] if value["stderr"] is None else stderr == pytest.approx(value["stderr"],
                                                                                                     rel=1e-4)


def test_a_standard_task_runs_from_a_local_file_in_its_schema(tiny, tmp_path):
    """HellaSwag's own lm-eval config (its prompt, its process_docs), pointed at a local file."""
    from llmpress.measure.tasks import run_tasks

    model, tok, _, _ = tiny
    base = Path(lm_eval.__file__).parent / "tasks" / "hellaswag" / "hellaswag.yaml"
    rows = [{"ind": i, "activity_label": "Walking", "ctx_a": "Anne walked with the captain.", "ctx_b": "she",
             "ctx": "", "endings": ["saw Elliot.", "saw Mary.", "walked again.", "and the captain."],
             "source_id": "x", "split": "val", "split_type": "indomain", "label": str(i % 4)} for i in range(4)]
    (tmp_path / "hs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "hs.yaml").write_text(yaml.safe_dump({
        "include": str(base), "task": "hellaswag_local", "dataset_path": "json", "dataset_name": None,
        "dataset_kwargs": {"data_files": {"validation": str(tmp_path / "hs.jsonl")}},
        "training_split": None, "validation_split": "validation"}))
    got = run_tasks(model, tok, ["hellaswag_local"], include_path=tmp_path, batch_size=4)["hellaswag_local"]
    assert got["n"] == 4 and set(got["metrics"]) == {"acc", "acc_norm"}
    assert 0.0 <= got["value"] <= 1.0


def test_cli_eval_with_local_tasks_writes_them_to_the_report(tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LLMPRESS_CACHE", str(tmp_path / "cache"))
    _, _, folder, text = tiny
    out = tmp_path / "r.json"
    code = main(["eval", str(folder), "--data", f"text:{text}", "--seq-len", "32", "--max-windows", "2",
                 "--no-speed", "--quiet", "--tasks", f"{LASTWORD},{NEXTSENT}", "--limit", "3",
                 "--task-data", f"text:{text}", "--json", str(out)])
    assert code == 0, capsys.readouterr().err
    row = json.loads(out.read_text())
    assert set(row["tasks"]) == {LASTWORD, NEXTSENT}
    assert row["tasks"][LASTWORD]["n"] == 3 and row["task_data"] == f"text:{text}" and row["task_seconds"] > 0


@pytest.mark.parametrize("args, message", [
    (["--tasks", "no_such_task_xyz"], "unknown lm-eval task(s): no_such_task_xyz"),
    (["--tasks", LASTWORD, "--include-path", "/nonexistent/dir"], "not a folder"),
    (["--tasks", LASTWORD, "--limit", "0"], "--limit 0 must be positive"),
    (["--tasks", LASTWORD, "--task-data", "bogus"], "bad text spec"),
])
def test_cli_task_errors_are_one_line(tiny, tmp_path, monkeypatch, capsys, args, message):
    from lm_eval.tasks import TaskManager

    from llmpress.measure import tasks as task_module

    monkeypatch.setenv("LLMPRESS_CACHE", str(tmp_path / "cache"))
    # An unknown name is looked up in lm-eval's whole registry, whose indexing (thousands of YAMLs) takes a
    # minute on this machine: stand in an empty registry, which knows no name either.
    monkeypatch.setitem(task_module._MANAGERS, ((), True), TaskManager(include_defaults=False))
    _, _, folder, text = tiny
    out = tmp_path / "r.json"
    code = main(["eval", str(folder), "--data", f"text:{text}", "--seq-len", "32", "--max-windows", "1",
                 "--no-speed", "--quiet", "--task-data", f"text:{text}", *args, "--json", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()
