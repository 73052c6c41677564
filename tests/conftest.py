"""Put tests/ on sys.path so tests can `from tiny_models import tiny_model, TINY_TYPES`; shared fixtures."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pytest  # noqa: E402

from tiny_models import TOKENIZER_TEXT, tiny_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    """A tiny tokenizer and a ``text:`` calibration spec over its training text."""
    tok = tiny_tokenizer()
    text = tmp_path_factory.mktemp("calib") / "calib.txt"
    text.write_text(TOKENIZER_TEXT * 3)
    return tok, f"text:{text}"
