"""Text sources to token samples: calibration windows and evaluation windows.

A text is named by a spec string (see ``SPEC_HELP``): ``austen:calib`` /
``austen:eval`` / ``austen:eval2`` or a single novel, ``text:PATH``,
``jsonl:PATH:FIELD`` or ``hf:NAME[:CONFIG[:SPLIT]]``.
"""

from llmpress.data.sources import SPEC_HELP, describe_spec, load_text
from llmpress.data.windows import calibration_samples, eval_windows, token_ids, tokenize_text

__all__ = [
    "SPEC_HELP",
    "calibration_samples",
    "describe_spec",
    "eval_windows",
    "load_text",
    "token_ids",
    "tokenize_text",
]
