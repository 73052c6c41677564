"""llmpress: make large language models smaller and faster, and prove what it cost.

Public API::

    import llmpress
    result = llmpress.compress("smollm2-135m", "rtn-w4-g64", out="smollm2-w4")
    report = llmpress.evaluate("smollm2-w4", "austen:eval")

Names are imported on first use, so ``import llmpress.primitives`` stays light.
"""

from importlib import import_module

__version__ = "0.1.0"
_EXPORTS = {
    "compress": "api", "evaluate": "api", "CompressResult": "api",
    "LlmpressError": "errors", "load_model": "models.loader",
    "Recipe": "recipe", "load_recipe": "recipe",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'llmpress' has no attribute {name!r}")
