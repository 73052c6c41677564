"""Downstream task accuracy through lm-evaluation-harness, on the model exactly as llmpress loaded it.

lm-eval's ``hf`` backend loads a folder with ``from_pretrained``, which cannot read every folder llmpress
writes (packed int3, low-rank factors, our sparse layout) and knows nothing of a quantized KV cache. Here
lm-eval's own ``HFLM`` wraps the model *object* llmpress built (dense, packed, sparse, W8A8, low-rank), so
its task registry, prompts, request batching and metrics are lm-eval's, unchanged: the same folder gives
the same numbers as ``lm_eval --model hf`` when that backend can load it. A KV-cache setting is honoured by
giving every scoring forward a fresh quantized cache, as the perplexity measurement does.

Results are one dict per task: the headline metric (``acc`` where the task has it) with lm-eval's standard
error, every metric lm-eval reported, the number of documents, and the per-document correctness of the
headline metric, so two models evaluated on the same documents can be compared *paired*
(:func:`paired_difference`), which separates models that unpaired error bars cannot.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from llmpress.errors import LlmpressError, first_line

log = logging.getLogger(__name__)

INSTALL_HINT = "task evaluation needs lm-eval: pip install 'llmpress[eval]'"


def _lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise LlmpressError(f"{INSTALL_HINT} ({first_line(e)})") from None
    return lm_eval, HFLM, TaskManager


def task_manager(include_path: str | Path | Sequence[str | Path] | None = None, tasks: Sequence[str] = ()):
    """lm-eval's TaskManager over the YAML folders in ``include_path`` and, unless those folders hold every
    one of ``tasks``, lm-eval's built-in tasks too (indexing those thousands of YAMLs takes seconds, so a
    run of local tasks only skips it). Made once per set of folders and checked for unknown task names."""
    _, _, TaskManager = _lm_eval()
    paths = [include_path] if isinstance(include_path, (str, Path)) else list(include_path or [])
    for p in paths:
        if not Path(p).is_dir():
            raise LlmpressError(f"--include-path {p}: not a folder; give a folder of lm-eval task YAML files")
    key = tuple(str(p) for p in paths)
    if key and (key, False) not in _MANAGERS:
        _MANAGERS[(key, False)] = TaskManager(include_path=list(key), include_defaults=False)
    local = _MANAGERS.get((key, False))
    if local is not None and tasks and all(t in set(local.all_tasks) for t in tasks):
        return local
    if (key, True) not in _MANAGERS:
        _MANAGERS[(key, True)] = TaskManager(include_path=list(key) or None)
    manager = _MANAGERS[(key, True)]
    check_tasks(tasks, manager)
    return manager


_MANAGERS: dict[tuple[tuple[str, ...], bool], object] = {}


def check_tasks(names: Sequence[str], manager) -> None:
    """Refuse task names lm-eval does not know, with one line naming them and where the names are listed."""
    known = set(manager.all_tasks)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise LlmpressError(f"unknown lm-eval task(s): {', '.join(unknown)}; list them with 'lm-eval ls tasks', "
                            "or give your own task YAMLs with --include-path DIR")


def _headline(metrics: dict[str, Any]) -> str | None:
    names = [k.split(",")[0] for k in metrics if "," in k and "_stderr" not in k]
    for preferred in ("acc", "acc_norm", "exact_match"):
        if preferred in names:
            return preferred
    return names[0] if names else None


def summarize(results: dict, samples: dict | None = None) -> dict[str, dict]:
    """lm-eval's ``results`` (and ``samples``) dict -> {task: {metric, value, stderr, n, metrics, per_doc}}."""
    out = {}
    n_samples = results.get("n-samples", {})
    for task, metrics in results["results"].items():
        head = _headline(metrics)
        if head is None:
            continue
        filt = next(k.split(",", 1)[1] for k in metrics if k.startswith(f"{head},"))
        table = {}
        for key, value in metrics.items():
            if "," not in key or "_stderr" in key or key.split(",", 1)[1] != filt:
                continue
            name = key.split(",")[0]
            stderr = metrics.get(f"{name}_stderr,{filt}")
            table[name] = {"value": _number(value), "stderr": _number(stderr)}
        entry = {"metric": head, "value": table[head]["value"], "stderr": table[head]["stderr"],
                 "n": (n_samples.get(task) or {}).get("effective"), "metrics": table}
        docs = (samples or {}).get(task)
        if docs:
            per = sorted(docs, key=lambda d: d["doc_id"])
            entry["per_doc"] = [float(d[head]) for d in per if head in d]
        out[task] = entry
    return out


def _number(value) -> float | None:
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def run_tasks(model, tokenizer, tasks: Sequence[str], *, include_path=None, limit: int | float | None = None,
              num_fewshot: int | None = None, batch_size: int = 8,
              cache_factory: Callable[[], Any] | None = None) -> dict[str, dict]:
    """Evaluate ``model`` (a loaded ``transformers`` causal LM on its device) on lm-eval ``tasks``.

    ``include_path``: folders of extra task YAMLs (the user's own, or llmpress's local tasks);
    ``limit``/``num_fewshot``/``batch_size`` as lm-eval's CLI takes them; ``cache_factory`` makes the
    KV cache every forward writes to (a quantized KV cache), or None for the model's own.
    lm-eval's own seeds and bootstrap settings are kept, so the figures are the ones its CLI prints.
    Returns :func:`summarize`'s dict.
    """
    lm_eval, HFLM, _ = _lm_eval()
    manager = task_manager(include_path, tasks)

    class _LLMpressLM(HFLM):
        def _model_call(self, inps, attn_mask=None, labels=None):
            if cache_factory is None:
                return super()._model_call(inps, attn_mask, labels)
            import torch

            with torch.no_grad():
                return self.model(inps, past_key_values=cache_factory(), use_cache=True).logits

    hf_log = logging.getLogger("lm_eval.models.huggingface")
    level = hf_log.level
    hf_log.setLevel(logging.ERROR)  # its warning that a model object, not a name, was passed: that is the point
    try:
        lm = _LLMpressLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    finally:
        hf_log.setLevel(level)
    try:
        # lm-eval prints its bootstrap notice to stdout, which is llmpress's tables and JSON: to stderr with it
        with contextlib.redirect_stdout(sys.stderr):
            results = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
                                              task_manager=manager, log_samples=True)
    except (FileNotFoundError, ConnectionError, OSError) as e:
        raise LlmpressError(f"a task's dataset could not be loaded ({first_line(e)}); it needs the hub or a cached "
                            "copy: run once with network access, or point a task YAML at local files and pass "
                            "--include-path DIR") from None
    return summarize(results, results.get("samples"))


def paired_difference(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """Mean of ``a - b`` over the same documents and its standard error (sample std / sqrt(n)).

    Two models scored on the same documents differ by much less noise than their separate standard errors
    suggest (most documents are right, or wrong, for both); this is the error bar of the difference.
    """
    if len(a) != len(b) or len(a) < 2:
        raise ValueError("paired_difference needs two equal-length lists of at least 2 scores")
    d = [x - y for x, y in zip(a, b)]
    mean = sum(d) / len(d)
    var = sum((x - mean) ** 2 for x in d) / (len(d) - 1)
    return mean, math.sqrt(var / len(d))
