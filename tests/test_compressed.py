"""The typed result contract: Grid and Sparsity round-trip through a layer's JSON record, and only
llmpress.compressed reads the record's keys."""

import re
from pathlib import Path

import pytest
import torch

from llmpress.compressed import Compressed, Grid, Sparsity
from llmpress.quant.rtn import RTNConfig, rtn

SRC = Path(__file__).resolve().parents[1] / "src" / "llmpress"
KEYS = ("bits", "group_size", "sym", "zero_float", "act_bits", "codebook", "sparsity", "n:m")


@pytest.mark.parametrize("grid", [Grid(4, 64), Grid(3, -1, sym=False), Grid(4, 64, sym=False, float_zero=True),
                                  Grid(8, -1, act_bits=8), Grid(3, -1, sym=False, codebook=True)])
def test_grid_round_trips_through_its_record(grid):
    assert Grid.of(grid.to_record()) == grid
    assert grid.group == (None if grid.group_size == -1 else grid.group_size)


@pytest.mark.parametrize("sparsity", [Sparsity(0.5), Sparsity(0.5, (2, 4)), Sparsity(0.25, (1, 4))])
def test_sparsity_round_trips_through_its_record(sparsity):
    assert Sparsity.of(sparsity.to_record()) == sparsity


def test_absent_means_none_and_nm_alone_implies_its_fraction():
    assert Grid.of({"method": "wanda", "sparsity": 0.5}) is None and Grid.of(None) is None
    assert Sparsity.of({"method": "rtn", "bits": 4}) is None and Sparsity.of({"sparsity": 0.0}) is None
    assert Sparsity.of({"n:m": [2, 4]}) == Sparsity(0.5, (2, 4))
    assert Grid.of({"bits": 4, "group_size": None}).group_size == -1  # one spelling of per channel


def test_record_merges_meta_sparsity_and_grid():
    out = rtn(torch.randn(4, 64, generator=torch.Generator().manual_seed(0)), RTNConfig(bits=4, group_size=32))
    assert out.grid == Grid(4, 32, True) and out.record() == {"method": "rtn", "bits": 4, "group_size": 32, "sym": True}
    both = Compressed(weight=None, meta={"method": "sparsegpt"}, grid=Grid(4, 64), sparsity=Sparsity(0.5, (2, 4)))
    assert both.record() == {"method": "sparsegpt", "sparsity": 0.5, "n:m": [2, 4], "bits": 4, "group_size": 64,
                             "sym": True}


def test_only_the_contract_reads_record_keys():
    """Size accounting, FLOPs, exporters and QAT read Grid/Sparsity fields, never a record's keys by hand
    (measure/size.py's check of a malformed record from disk is the one exception)."""
    pattern = re.compile(r"""(?:\.get\(|\[)["'](?:""" + "|".join(re.escape(k) for k in KEYS) + r""")["']""")
    found = {}
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC).as_posix()
        if rel == "compressed.py":
            continue
        hits = [n for n, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)
                and "weights.get(" not in line]  # compressed-tensors' own config dict, not our record
        if hits:
            found[rel] = hits
    assert found == {"engine.py": found.get("engine.py"), "measure/size.py": found.get("measure/size.py")}
    assert len(found["engine.py"]) == 1 and len(found["measure/size.py"]) == 1
