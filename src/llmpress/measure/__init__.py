"""Measure what compression cost and saved: perplexity, size, FLOPs, speed, memory.

Every function takes a plain ``transformers`` model (or its config) and
returns a JSON-able dict; :func:`build_report` gathers one dict per model
into a comparison table.
"""

from llmpress.measure.flops import flops_per_token
from llmpress.measure.memory import PeakMemory
from llmpress.measure.perplexity import perplexity
from llmpress.measure.report import build_report, report_markdown, write_report
from llmpress.measure.size import count_params, size_report
from llmpress.measure.speed import speed

__all__ = [
    "PeakMemory",
    "build_report",
    "count_params",
    "flops_per_token",
    "perplexity",
    "report_markdown",
    "size_report",
    "speed",
    "write_report",
]
