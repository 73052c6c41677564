"""Two zero-shot tasks built from any text llmpress can read, written as lm-eval task configs.

Perplexity on one text says little about what a compressed model still *does*; the standard suites
(HellaSwag, LAMBADA, ...) need their datasets from the hub. These two tasks need nothing but a text
(by default ``austen:eval2``, held out from calibration), so they run offline:

* ``llmpress_lastword`` -- LAMBADA-style (Paperno et al. 2016, arXiv:1606.06031): a passage of
  about ``context_words`` words ending just before the last word of a sentence; the model must predict
  that word (lm-eval ``loglikelihood``: ``acc`` = the word is the greedy continuation, and its
  perplexity). As in LAMBADA, only words that appear earlier in the passage are kept as targets, so the
  task rewards using the broad context rather than the local n-gram.
* ``llmpress_nextsent`` -- "which sentence comes next": the sentences before a position as context; the
  true next sentence against ``choices - 1`` sentences of similar length drawn from elsewhere in the same
  text (lm-eval ``multiple_choice``: ``acc`` and length-normalised ``acc_norm``).

The documents are a pure, seeded function of the text (:func:`lastword_docs`, :func:`nextsent_docs`);
:func:`write_tasks` writes them as JSON lines with one YAML config per task into a folder that lm-eval
reads with ``include_path`` -- lm-eval's own task machinery and metrics score them.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import yaml

LASTWORD = "llmpress_lastword"
NEXTSENT = "llmpress_nextsent"
LOCAL_TASKS = (LASTWORD, NEXTSENT)
DEFAULT_TASK_DATA = "austen:eval2"
BUILD_VERSION = 3  # bump when the construction below changes: cached task folders are keyed by it

# A sentence ends at . ! or ? (optionally followed by closing quotes or brackets) before whitespace.
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"'\u201d\u2019)\]]*\s+")
_WORD = re.compile(r"[A-Za-z]+")
# A period after these (or after a lone capital, an initial) does not end a sentence.
_ABBREVIATIONS = {"mr", "mrs", "messrs", "dr", "st", "col", "capt", "esq", "rev", "gen", "lt", "vol", "ch"}


# Function words are not targets: a LAMBADA target is a content word that the passage makes predictable.
_FUNCTION_WORDS = set("""
a an the and but or nor for so yet of to in on at by with from into upon about than then there here this that
these those it its i me my mine you your yours he him his she her hers we us our ours they them their theirs
who whom whose which what is am are was were be been being have has had do does did not no yes all any some
one ones own such very too more most much many can could will would shall should may might must
""".split())


def _abbreviation(part: str) -> bool:
    m = re.search(r"(?:^|\s)([A-Za-z]+)\.$", part)
    return m is not None and (m.group(1).lower() in _ABBREVIATIONS or len(m.group(1)) == 1)


def paragraphs(text: str) -> list[str]:
    """The text's paragraphs (blank-line separated), each on one line with single spaces."""
    return [" ".join(p.split()) for p in re.split(r"\n\s*\n", text) if p.strip()]


def sentences(paragraph: str) -> list[str]:
    """Split one paragraph into sentences at terminal punctuation followed by whitespace."""
    parts, start = [], 0
    for m in _SENTENCE_END.finditer(paragraph):
        if _abbreviation(paragraph[start:m.end()].strip()):
            continue
        parts.append(paragraph[start:m.end()].strip())
        start = m.end()
    tail = paragraph[start:].strip()
    if tail:
        parts.append(tail)
    return [p for p in parts if p]


def _last_word_split(sentence: str) -> tuple[str, str] | None:
    """(sentence up to the last word, the last word) when the sentence ends in a plain word + punctuation."""
    m = re.search(r"([A-Za-z]+)([.!?][\"'\u201d\u2019)\]]*)$", sentence)
    if m is None or m.start(1) == 0 or sentence[m.start(1) - 1] != " ":
        return None
    return sentence[:m.start(1) - 1], m.group(1)


def lastword_docs(text: str, n: int = 1000, context_words: int = 70, seed: int = 0) -> list[dict]:
    """Up to ``n`` LAMBADA-style documents ``{"context", "target"}`` from ``text``, in text order.

    Candidates are the sentence ends of the text whose last word has at least three letters, is not a
    function word (pronoun, auxiliary, article, preposition) and appears (case-insensitively) in the
    passage before it: the ``context_words`` words of running text that end right before it; ``n`` of
    them are drawn with ``seed`` and returned in text order. ``context`` is that passage, ``target`` the word.
    """
    words_so_far: list[str] = []  # the running text as words, across paragraphs
    candidates = []
    for para in paragraphs(text):
        for sent in sentences(para):
            split = _last_word_split(sent)
            if split is not None and len(words_so_far) + len(split[0].split()) >= context_words:
                head, target = split
                context = " ".join((words_so_far + head.split())[-context_words:])
                seen = {w.lower() for w in _WORD.findall(context)}
                if len(target) >= 3 and target.lower() in seen and target.lower() not in _FUNCTION_WORDS:
                    candidates.append({"context": context, "target": target})
            words_so_far.extend(sent.split())
        words_so_far = words_so_far[-4 * context_words:]
    rng = random.Random(seed)
    keep = sorted(rng.sample(range(len(candidates)), min(n, len(candidates))))
    return [candidates[i] for i in keep]


def nextsent_docs(text: str, n: int = 1000, context_sentences: int = 2, choices: int = 4,
                  seed: int = 0, max_context_words: int = 40, max_words: int = 30) -> list[dict]:
    """Up to ``n`` documents ``{"context", "choices", "label"}``: pick the sentence that follows the context.

    A position needs ``context_sentences`` sentences before it in the same paragraph, of at most
    ``max_context_words`` words together, and a true next sentence of 6 to ``max_words`` words (the
    bounds keep each document to about 60 tokens per choice, so that 200 documents score in a minute or
    two on a CPU). The distractors are ``choices - 1`` other sentences of the text whose
    length is within a factor 1.5 of the true one (so length alone does not give the answer away), drawn
    with ``seed``; the true sentence's place among the choices is drawn too.
    """
    paras = [sentences(p) for p in paragraphs(text)]
    pool = [s for sents in paras for s in sents if 6 <= len(s.split()) <= max_words]
    positions = [(i, j) for i, sents in enumerate(paras) for j in range(context_sentences, len(sents))
                 if 6 <= len(sents[j].split()) <= max_words
                 and len(" ".join(sents[j - context_sentences:j]).split()) <= max_context_words]
    rng = random.Random(seed)
    keep = sorted(rng.sample(range(len(positions)), min(n, len(positions))))
    by_len = sorted(pool, key=lambda s: len(s.split()))
    lengths = [len(s.split()) for s in by_len]
    docs = []
    for k in keep:
        i, j = positions[k]
        true = paras[i][j]
        size = len(true.split())
        lo = next((x for x, L in enumerate(lengths) if L * 1.5 >= size), 0)
        hi = next((x for x, L in enumerate(lengths) if L > size * 1.5), len(lengths))
        near = [s for s in by_len[lo:hi] if s != true and s not in paras[i]]
        if len(near) < choices - 1:
            continue
        options = rng.sample(near, choices - 1)
        label = rng.randrange(choices)
        options.insert(label, true)
        docs.append({"context": " ".join(paras[i][j - context_sentences:j]), "choices": options,
                     "label": label})
    return docs


def _config(task: str, data_file: Path) -> dict:
    common = {
        "task": task,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_file)}},
        "test_split": "test",
        "doc_to_text": "{{context}}",
        "metadata": {"version": 1.0},
    }
    if task == LASTWORD:
        return {**common, "output_type": "loglikelihood", "doc_to_target": "{{' ' + target}}",
                "metric_list": [{"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
                                {"metric": "acc", "aggregation": "mean", "higher_is_better": True}]}
    return {**common, "output_type": "multiple_choice", "doc_to_choice": "{{choices}}", "doc_to_target": "{{label}}",
            "target_delimiter": " ",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}]}


def write_tasks(folder: str | Path, text: str, n: int = 1000, seed: int = 0,
                named_folder: str | Path | None = None) -> dict[str, int]:
    """Write both tasks' documents (JSON lines) and lm-eval YAML configs into ``folder``; returns task -> size.

    The YAMLs name their data files by absolute path, in ``named_folder`` (default ``folder``): the folder
    the files will be read from, when ``folder`` is a temporary one renamed there afterwards.
    """
    folder = Path(folder)
    named = Path(named_folder) if named_folder is not None else folder
    folder.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for task, docs in ((LASTWORD, lastword_docs(text, n, seed=seed)), (NEXTSENT, nextsent_docs(text, n, seed=seed))):
        (folder / f"{task}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
        config = _config(task, named / f"{task}.jsonl")
        (folder / f"{task}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        sizes[task] = len(docs)
    return sizes


def local_task_folder(spec: str, text: str, n: int = 1000, seed: int = 0) -> Path:
    """The folder of both local tasks built from ``text`` (named ``spec``), made once in the cache.

    Keyed by the text's hash, the size, the seed and this module's version of the construction, so a
    changed text or builder makes a new folder; written to a temporary name and renamed, so a folder that
    exists is complete.
    """
    import hashlib
    import os
    import shutil
    import tempfile

    from llmpress.paths import cache_dir, make_public

    key = hashlib.sha256(f"{BUILD_VERSION}|{n}|{seed}|".encode() + text.encode()).hexdigest()[:16]
    root = cache_dir() / "tasks"
    folder = root / f"{spec.replace(':', '-').replace('/', '_')[:40]}-{key}"
    if folder.is_dir():
        return folder
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".building-"))
    try:
        write_tasks(tmp, text, n, seed, named_folder=folder)
        make_public(tmp)
        os.replace(tmp, folder)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not folder.is_dir():  # not just another process that built it first
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder
