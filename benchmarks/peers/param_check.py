"""Which parameters a compression run changed, so that a side by side compares the same job.

Plain torch, no llmpress: imported by the llm-compressor peer script (in its own venv) and by
``benchmarks/_common.py``. A run "touched" a parameter when its values differ from the base, or
when the module holding it carries a quantization scale (llm-compressor's RTN keeps the float weight
and quantizes it in the forward; llmpress's packed layers no longer hold a float weight at all, so
the caller names those). Tied parameters appear once, under their first name
(``model.embed_tokens.weight`` for a tied head), so pruning a tied ``lm_head`` shows up as a
change of the embeddings.
"""

from __future__ import annotations

import torch


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every parameter, by name, taken before the run."""
    return {name: p.detach().clone() for name, p in model.named_parameters()}


@torch.no_grad()
def changes(before: dict[str, torch.Tensor], model: torch.nn.Module, also: tuple[str, ...] = ()) -> dict:
    """{"touched": sorted parameter names, "zeros_added": {name: zeros gained}} of ``model`` against ``before``.

    ``also``: parameter names the caller knows were replaced (e.g. packed into integer codes).
    """
    touched, zeros = set(also), {}
    now = dict(model.named_parameters())
    for name, old in before.items():
        new = now.get(name)
        if new is None:
            continue
        if new.shape != old.shape:
            touched.add(name)
            continue
        if not torch.equal(new, old):
            touched.add(name)
        gained = int((new == 0).sum()) - int((old == 0).sum())
        if gained > 0:
            zeros[name] = gained
    for module_name, module in model.named_modules():
        if hasattr(module, "weight_scale") and f"{module_name}.weight" in before:
            touched.add(f"{module_name}.weight")
    return {"touched": sorted(touched), "zeros_added": zeros}


def difference(ours: dict, peer: dict) -> str | None:
    """None when both runs touched (and zeroed) the same parameters, else a one-line description."""
    for key, what in (("touched", "changed"), ("zeros_added", "gained zeros in")):
        a, b = set(ours[key]), set(peer[key])
        if a != b:
            only_peer, only_ours = sorted(b - a), sorted(a - b)
            return (f"the toolkits {what} different parameters: only the peer {_few(only_peer)}; "
                    f"only llmpress {_few(only_ours)}")
    return None


def _few(names: list[str], shown: int = 3) -> str:
    if not names:
        return "none"
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more
