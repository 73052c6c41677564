"""Put tests/ on sys.path so tests can `from tiny_models import tiny_model, TINY_TYPES`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
