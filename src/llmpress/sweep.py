"""Many recipes compressed and evaluated as independent trials: in a local process pool, or on a Ray cluster.

A sweep is the outer loop of automatic compression (issue 17; the surveys' "search over configurations"):
each trial compresses the model with one recipe and evaluates it on the same windows, and the rows go into
one comparison report (size against perplexity, with the Pareto front). A trial is a plain function of a
picklable :class:`Trial`, so the same code runs in a ``concurrent.futures`` process pool (spawned
workers, the CPU's threads divided among them) or as a Ray task (``ray`` is an optional extra). A trial
that fails becomes a row with an ``error`` and the sweep goes on.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .errors import LlmpressError, first_line


@dataclass(frozen=True)
class Trial:
    """One job: compress ``model`` with ``recipe`` and evaluate it with ``evaluate_kwargs``."""

    model: str
    recipe: str
    evaluate_kwargs: dict = field(default_factory=dict)
    threads: int | None = None  # torch threads in the worker (None: torch's default)
    quiet: bool = True  # no progress bars or library log lines from the worker


def _failed(trial: Trial, error: str) -> dict:
    return {"name": trial.recipe, "recipe": trial.recipe, "error": error}


def run_trial(trial: Trial) -> dict:
    """The trial's row (``llmpress.evaluate``'s, plus ``compress_time_s`` and ``recipe``), or
    ``{"name", "recipe", "error"}`` when compression or evaluation failed."""
    import torch

    from .api import compress, evaluate
    from .progress import silenced

    if trial.threads:
        torch.set_num_threads(trial.threads)
    try:
        with silenced(trial.quiet):  # a spawned worker does not inherit the parent's silencing
            result = compress(trial.model, trial.recipe, progress=False)
            row = evaluate(result, name=trial.recipe, progress=False, **trial.evaluate_kwargs)
    except LlmpressError as e:
        return _failed(trial, str(e))
    except Exception as e:  # a trial's failure is reported in its row, not fatal to the sweep
        return _failed(trial, f"{type(e).__name__}: {first_line(e)}")
    row["compress_time_s"] = result.seconds
    row["recipe"] = trial.recipe
    return row


def _local(trials: Sequence[Trial], workers: int, done: Callable[[dict], None]) -> list[dict]:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    if workers <= 1:
        rows = []
        for trial in trials:
            rows.append(run_trial(trial))
            done(rows[-1])
        return rows
    # spawn, not fork: a forked torch (its thread pools already started) can deadlock in the child
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(run_trial, t) for t in trials]
        rows = []
        for trial, future in zip(trials, futures):
            try:
                rows.append(future.result())
            except Exception as e:  # the worker process itself died (out of memory, a signal)
                rows.append(_failed(trial, f"worker failed: {type(e).__name__}: {first_line(e)}"))
            done(rows[-1])
        return rows


def _on_ray(trials: Sequence[Trial], address: str, done: Callable[[dict], None], quiet: bool) -> list[dict]:
    try:
        import ray
    except ImportError:
        raise LlmpressError("--ray needs the ray package: pip install 'llmpress[ray]'") from None
    if not ray.is_initialized():
        try:
            ray.init(address=None if address == "local" else address, include_dashboard=False,
                     log_to_driver=False, logging_level=logging.ERROR if quiet else logging.INFO)
        except (ConnectionError, ValueError, RuntimeError) as e:
            raise LlmpressError(f"cannot reach a Ray cluster at {address} ({first_line(e)}): start one with "
                                "'ray start --head' or pass --ray local") from None
    remote = ray.remote(run_trial)
    refs = [remote.remote(t) for t in trials]
    rows = []
    for trial, ref in zip(trials, refs):
        try:
            rows.append(ray.get(ref))
        except Exception as e:  # the task or its worker died
            rows.append(_failed(trial, f"Ray task failed: {type(e).__name__}: {first_line(e)}"))
        done(rows[-1])
    return rows


def check_workers(workers: int) -> None:
    if workers < 1:
        raise LlmpressError(f"--workers {workers} must be at least 1")


def sweep(model: str, recipes: Sequence[str], *, evaluate_kwargs: dict | None = None, workers: int = 2,
          ray: str | None = None, progress: bool = False) -> list[dict]:
    """One row per recipe, in the order given: each compressed from ``model`` and evaluated with
    ``evaluate_kwargs`` (``llmpress.evaluate``'s keywords: data, windows, tasks ...).

    Locally ``workers`` spawned processes share the cores (each gets ``cores // workers`` torch threads);
    with ``ray`` (an address, or ``"local"`` to start a local instance) every trial is a Ray task. Each
    trial loads its own copy of the model, so memory grows with the trials running at once.
    """
    check_workers(workers)
    threads = max(1, (os.cpu_count() or 1) // workers) if ray is None else None
    trials = [Trial(model, r, dict(evaluate_kwargs or {}), threads, quiet=not progress) for r in recipes]
    from .progress import bar

    with bar(total=len(trials), desc="trials", unit="trial", enabled=progress) as pbar:
        def done(_row: dict) -> None:
            pbar.update(1)

        return _on_ray(trials, ray, done, not progress) if ray is not None else _local(trials, workers, done)
