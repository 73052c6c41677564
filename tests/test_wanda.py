"""Masks (exact sparsity, valid N:M), Wanda against a brute-force reference, magnitude N:M, OWL's allocation."""

import pytest
import torch

import llmpress
from llmpress.errors import LlmpressError
from llmpress.prune.magnitude import MagnitudeConfig, magnitude
from llmpress.prune.masks import nm_mask, parse_pattern, unstructured_mask
from llmpress.prune.owl import OWLConfig, outlier_ratio, owl_sparsities
from llmpress.prune.wanda import WandaConfig, wanda
from tiny_models import TOKENIZER_TEXT, tiny_model, tiny_tokenizer


def reference_row_mask(scores, k):
    """Per row, drop the k lowest scores (earliest column first on ties), by plain Python sorting."""
    mask = torch.ones_like(scores, dtype=torch.bool)
    for r, row in enumerate(scores.tolist()):
        for c in sorted(range(len(row)), key=lambda c: (row[c], c))[:k]:
            mask[r, c] = False
    return mask


def reference_nm_mask(scores, n, m):
    mask = torch.ones_like(scores, dtype=torch.bool)
    for start in range(0, scores.shape[1], m):
        block = scores[:, start:start + m]
        mask[:, start:start + m] = reference_row_mask(block, max(block.shape[1] - n, 0))
    return mask


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.77])
def test_wanda_unstructured_is_exact_per_row_and_matches_reference(sparsity):
    g = torch.Generator().manual_seed(0)
    W, norms = torch.randn(12, 70, generator=g), torch.rand(70, generator=g) * 5
    r = wanda(W, norms, WandaConfig(sparsity=sparsity))
    k = int(70 * sparsity)
    assert ((~r.mask).sum(dim=1) == k).all()
    assert torch.equal(r.mask, reference_row_mask(W.abs() * norms, k))
    assert torch.equal(r.weight, W * r.mask)
    assert r.record() == {"method": "wanda", "sparsity": pytest.approx(k / 70)}


@pytest.mark.parametrize("pattern, cols", [("2:4", 64), ("4:8", 64), ("2:4", 70), ("1:3", 30)])
def test_nm_masks_keep_exactly_n_of_every_m(pattern, cols):
    n, m = parse_pattern(pattern)
    g = torch.Generator().manual_seed(1)
    W, norms = torch.randn(9, cols, generator=g), torch.rand(cols, generator=g) + 0.1
    r = wanda(W, norms, WandaConfig(pattern=pattern))
    full = cols - cols % m
    kept = r.mask[:, :full].reshape(9, -1, m).sum(-1)
    assert (kept == n).all()
    assert (r.mask[:, full:].sum(-1) <= n).all()
    assert torch.equal(r.mask, reference_nm_mask(W.abs() * norms, n, m))
    assert r.sparsity.nm == (n, m)
    mag = magnitude(W, MagnitudeConfig(pattern=pattern, sparsity=1 - n / m))
    assert torch.equal(mag.mask, reference_nm_mask(W.abs(), n, m))


def test_wanda_with_equal_norms_is_row_magnitude_and_layer_scope_counts_globally():
    W = torch.randn(8, 32, generator=torch.Generator().manual_seed(2))
    r = wanda(W, torch.full((32,), 3.0), WandaConfig(sparsity=0.5))
    assert torch.equal(r.mask, magnitude(W, MagnitudeConfig(sparsity=0.5, scope="row")).mask)
    layer = wanda(W, torch.rand(32), WandaConfig(sparsity=0.4, scope="layer"))
    assert int((~layer.mask).sum()) == int(8 * 32 * 0.4)


def test_activation_norms_change_the_choice():
    W = torch.ones(2, 4)
    r = wanda(W, torch.tensor([1.0, 9.0, 2.0, 8.0]), WandaConfig(sparsity=0.5))
    assert r.mask.tolist() == [[False, True, False, True]] * 2


def test_ties_break_by_position():
    assert unstructured_mask(torch.zeros(1, 4), 0.5).tolist() == [[False, False, True, True]]
    assert nm_mask(torch.zeros(1, 8), 2, 4).tolist() == [[False, False, True, True] * 2]


@pytest.mark.parametrize("cls, kwargs, needle", [
    (WandaConfig, {"sparsity": 1.0}, "sparsity=1.0 is out of range"),
    (WandaConfig, {"pattern": "4:2"}, "pattern='4:2' is invalid"),
    (WandaConfig, {"pattern": "2:4", "sparsity": 0.3}, "contradicts pattern"),
    (WandaConfig, {"scope": "block"}, "scope='block' is invalid"),
    (MagnitudeConfig, {"pattern": "2:4", "sparsity": 0.3}, "contradicts pattern"),
    (OWLConfig, {"pruner": "magnitude"}, "pruner='magnitude' is invalid"),
    (OWLConfig, {"sparsity": 0.1}, "max_deviation=0.08 could push"),
])
def test_configs_reject_bad_values(cls, kwargs, needle):
    with pytest.raises(LlmpressError, match=needle):
        cls(**kwargs)


def test_outlier_ratio_counts_against_the_pooled_mean():
    a, b = torch.tensor([1.0, 1.0, 1.0, 13.0]), torch.tensor([[0.0, 0.0], [0.0, 2.0]])
    # pooled mean = 18/8 = 2.25; above 2 x 2.25: only 13
    assert outlier_ratio([a, b], 2.0) == pytest.approx(1 / 8)


def test_owl_sparsities_keep_the_weighted_budget_and_favour_outliers():
    ratios = torch.tensor([0.01, 0.05, 0.02, 0.03])
    params = torch.tensor([100.0, 300.0, 200.0, 400.0])
    s = owl_sparsities(ratios, params, 0.5, 0.08)
    assert float((s * params).sum() / params.sum()) == pytest.approx(0.5, abs=1e-12)
    assert torch.equal(torch.argsort(s), torch.argsort(ratios, descending=True))
    assert float(s.max() - s.min()) == pytest.approx(0.16)
    assert owl_sparsities(torch.full((3,), 0.2), torch.ones(3), 0.6, 0.05).tolist() == [0.6] * 3


def test_owl_through_compress_hits_the_overall_budget(tmp_path):
    tok = tiny_tokenizer()
    model = tiny_model("llama", seed=3, vocab_size=len(tok))
    text = tmp_path / "calib.txt"
    text.write_text(TOKENIZER_TEXT * 3)
    recipe = {"stages": [{"method": "owl", "args": {"sparsity": 0.5, "pruner": "sparsegpt", "max_deviation": 0.1}}]}
    result = llmpress.compress(model, recipe, tokenizer=tok, data=f"text:{text}", samples=4, seq_len=32)
    sizes = {n: m["shape"][0] * m["shape"][1] for n, m in result.layers.items()}
    zeros = sum(m["sparsity"] * sizes[n] for n, m in result.layers.items())
    assert zeros / sum(sizes.values()) == pytest.approx(0.5, abs=0.005)
    per_block = sorted({m["owl_sparsity"] for m in result.layers.values()})
    assert len(per_block) == 2 and per_block[1] - per_block[0] == pytest.approx(0.2)  # two blocks: ends of 2λ
    assert all(m["method"] == "owl-sparsegpt" for m in result.layers.values())
