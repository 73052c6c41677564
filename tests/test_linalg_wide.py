"""The wide-matrix paths of GPTQ's second-order math: the reversed Cholesky factorisation in place, the blocked
triangular inverse, the upper-triangle Gram accumulation, and the settled records kept on disk.

Each is checked against a plain reference written here (float64 three-step factorisation, ``torch.linalg.inv``,
``X.T @ X``, the in-memory records)."""

from __future__ import annotations

import pytest
import torch

from llmpress import linalg
from llmpress.calib import SpillList, tensor_spec
from llmpress.linalg import REVERSED_MIN, inverse_cholesky_upper, tril_inverse_
from llmpress.stats import UPPER_GRAM_MIN, HessianStats


def _hessian(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n + 64, n, generator=g) * torch.rand(n, generator=g)  # uneven channel scales
    H = X.T @ X / n
    H.diagonal().add_(0.01 * H.diagonal().mean())
    return H


def _reference(H: torch.Tensor) -> torch.Tensor:
    """GPTQ's reference route in float64: cholesky, cholesky_inverse, upper cholesky."""
    L = torch.linalg.cholesky(H.double())
    return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)


@pytest.mark.parametrize("n", [REVERSED_MIN, REVERSED_MIN + 37])
@pytest.mark.parametrize("in_place", [False, True])
def test_reversed_factor_equals_the_reference(n, in_place):
    H = _hessian(n)
    ref = _reference(H)
    given = H.clone()
    U = inverse_cholesky_upper(given, (lambda: H.clone()) if in_place else None)
    assert U.dtype == torch.float32 and U.is_contiguous()
    assert torch.equal(U, U.triu())
    assert (U.double() - ref).abs().max() <= 1e-5 * ref.abs().max()
    if in_place:
        assert U.data_ptr() == given.data_ptr()  # no second matrix
    else:
        assert torch.equal(given, H)  # left as it was


@pytest.mark.parametrize("n", [64, REVERSED_MIN])
@pytest.mark.parametrize("in_place", [False, True])
def test_retry_with_more_damping_on_both_routes(n, in_place, caplog):
    H = _hessian(n, seed=1)
    lowest = torch.linalg.eigvalsh(H.double()).min().item()
    bad = H.clone()
    bad.diagonal().sub_(lowest + 0.002 * bad.diagonal().mean())  # indefinite; 0.01·mean more damping fixes it
    fixed = bad.clone()
    fixed.diagonal().add_(0.01 * bad.diagonal().mean())
    ref = _reference(fixed)
    U = inverse_cholesky_upper(bad.clone(), (lambda: bad.clone()) if in_place else None)
    assert (U.double() - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert "extra damping" in caplog.text


@pytest.mark.parametrize("n,base", [(1, 4), (7, 4), (37, 8), (64, 16)])
def test_tril_inverse_equals_the_inverse(n, base):
    g = torch.Generator().manual_seed(n)
    L = (torch.randn(n, n, generator=g, dtype=torch.float64) / n).tril()  # well conditioned, as damped factors are
    L.diagonal().copy_(torch.rand(n, generator=g, dtype=torch.float64) + 1)
    expected = torch.linalg.inv(L)
    got = tril_inverse_(L.clone(), base)
    assert torch.allclose(got, expected, rtol=0, atol=1e-10)
    view = L.clone().mT.contiguous().mT  # column-major storage, as the factorisation hands it over
    assert torch.allclose(tril_inverse_(view, base), expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("n", [1, 2, 5, 33])
def test_rotate_and_transpose_in_place(n):
    M = torch.arange(n * n, dtype=torch.float32).reshape(n, n)
    assert torch.equal(linalg._rotate_(M.clone(), chunk=3), torch.flip(M, (0, 1)))
    assert torch.equal(linalg._transpose_(M.clone(), block=4), M.T)


@pytest.mark.parametrize("d", [UPPER_GRAM_MIN, UPPER_GRAM_MIN + 5])
def test_wide_hessian_accumulates_the_full_gram(d):
    g = torch.Generator().manual_seed(d)
    batches = [torch.randn(2, 30, d, generator=g).bfloat16() for _ in range(3)]
    acc = HessianStats()
    for x in batches:
        acc.add_batch(x)
    X = torch.cat([x.reshape(-1, d).double() for x in batches])
    H = acc.result()
    assert torch.equal(H, H.T)
    assert (H.double() - 2 / X.shape[0] * X.T @ X).abs().max() < 1e-4
    assert acc.result() is H  # scaled once
    with pytest.raises(RuntimeError):
        acc.add_batch(batches[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("d", [3, 70])
def test_syrk_adds_the_upper_triangle_in_place(dtype, d):
    """BLAS ?syrk through scipy: out's upper triangle gains XᵀX's, in place; the strict lower triangle is untouched."""
    from llmpress.stats import add_syrk_

    g = torch.Generator().manual_seed(d)
    X = (torch.randn(50, d, generator=g) * torch.rand(d, generator=g) * 4).bfloat16().to(dtype)
    before = torch.randn(d, d, generator=g, dtype=dtype)
    out = before.clone()
    pointer = out.data_ptr()
    add_syrk_(out, X)
    assert out.data_ptr() == pointer
    assert torch.equal(out.tril(-1), before.tril(-1))
    want = before.double().triu() + (X.double().T @ X.double()).triu()
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert ((out.double().triu() - want).abs().max() / want.abs().max()) < tol
    assert torch.equal(add_syrk_(out.clone(), X[:0]), out)  # no tokens: nothing added
    with pytest.raises(ValueError, match="contiguous"):
        add_syrk_(out.T, X)


@pytest.mark.parametrize("d,blocks", [(1, 8), (7, 8), (37, 8), (64, 4)])
def test_mirror_copies_the_upper_triangle_down(d, blocks):
    from llmpress.stats import mirror_upper_

    M = torch.randn(d, d, generator=torch.Generator().manual_seed(d))
    want = M.triu() + M.triu(1).T
    assert torch.equal(mirror_upper_(M.clone(), blocks), want)


def test_spill_list_keeps_tensors_on_disk(tmp_path):
    t = torch.randn(3, 4).bfloat16()
    kept = SpillList(tmp_path / "a", [None, t])
    kept.append((None,))
    assert len(kept) == 3 and kept[0] is None and kept[2] == (None,)
    assert torch.equal(kept[1], t) and kept[1] is not t
    assert len(list((tmp_path / "a").iterdir())) == 1
    kept[0] = t * 2
    assert torch.equal(kept[0], t * 2)
    assert kept.spec(0) == ((3, 4), torch.bfloat16) and tensor_spec([t.float()], 0) == ((3, 4), torch.float32)
    head = kept[:2]  # a slice reads its items back, as a list
    assert isinstance(head, list) and torch.equal(head[0], t * 2) and torch.equal(head[1], t)
    kept.clear()
    assert len(kept) == 0 and len(list((tmp_path / "a").iterdir())) == 2  # kept, to be written over
    node = (tmp_path / "a" / "0.bin").stat().st_ino
    again = SpillList(tmp_path / "a", [t[:1] * 3])  # the next block's list on the same folder
    assert (tmp_path / "a" / "0.bin").stat().st_ino == node  # the same file, written in place
    assert (tmp_path / "a" / "0.bin").stat().st_size == 4 * 2  # and cut to the new item's bytes
    assert torch.equal(again[0], t[:1] * 3)
    again.discard()
    assert len(again) == 0 and not list((tmp_path / "a").iterdir())


def test_resume_activations_from_disk_are_read_once_and_saved_as_from_memory(tmp_path, monkeypatch):
    """The activations a streamed run keeps for resuming: from a SpillList, the same file as from a list, each
    tensor read back once (the header comes from the shapes alone)."""
    from safetensors.torch import load_file

    from llmpress.stream import _save_streamed

    tensors = [torch.randn(2, 5, 8).bfloat16(), torch.randn(1, 5, 8).bfloat16()]
    _save_streamed(tensors, tmp_path / "a.safetensors")
    kept = SpillList(tmp_path / "spill", tensors)
    reads = []
    real = SpillList.__getitem__
    monkeypatch.setattr(SpillList, "__getitem__", lambda self, k: (reads.append(k), real(self, k))[1])
    _save_streamed(kept, tmp_path / "b.safetensors")
    assert reads == [0, 1]
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    assert torch.equal(load_file(tmp_path / "b.safetensors")["h1"], tensors[1])


def test_true_sequential_gptq_with_records_on_disk_writes_the_same_weights(tmp_path):
    """The engine with a spill folder (a streamed run) keeps settled records on disk: same weights, same hits."""
    from llmpress.engine import compress_blocks
    from llmpress.models.archs import arch_for
    from llmpress.recipe import load_recipe
    from tiny_models import tiny_model

    stage = load_recipe({"stages": [{"method": "gptq", "args": {"bits": 3, "group_size": 16,
                                                                "true_sequential": True}}]}).stages[0]
    ids = torch.randint(0, 100, (8, 16), generator=torch.Generator().manual_seed(0))
    weights, handed = [], []
    for spill in (None, tmp_path / "spill"):
        model = tiny_model("llama", seed=3)
        compress_blocks(model, arch_for(model), [stage], ids, batch_size=4, spill=spill,
                        after_block=lambda i, block, hidden, spill=spill: handed.append(
                            (spill, type(hidden), hidden and hidden[0])))
        weights.append({k: v.clone() for k, v in model.state_dict().items()})
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    # the activations between passes: in memory without a spill folder, on disk with one, the same values
    kinds = [(s is not None, t) for s, t, _ in handed if t is not type(None)]  # the last block hands None
    assert kinds and set(kinds) == {(False, list), (True, SpillList)}
    assert (tmp_path / "spill" / "hidden" / "0.bin").is_file()
    ours = [h for s, _, h in handed if s is None]
    assert all(torch.equal(a, b) for a, b in zip(ours, [h for s, _, h in handed if s]) if a is not None)


@pytest.mark.parametrize("method", ["sparsegpt", "gptq-lut", "gptvq"])
def test_wide_route_of_every_hessian_method_equals_the_reference_route(method, monkeypatch):
    """SparseGPT, GPTQ-LUT (act-order) and GPTVQ start from ``linalg.damped_hessian`` and factorise a wide Hessian
    in its own memory (LAPACK on the CPU); in float64, the result equals the narrow reference route's."""
    from llmpress.prune.sparsegpt import SparseGPTConfig, sparsegpt
    from llmpress.quant.squeezellm import GPTQLUTConfig, gptq_lut
    from llmpress.quant.vq import VQConfig, vq_gptq

    fn, cfg = {"sparsegpt": (sparsegpt, SparseGPTConfig(sparsity=0.5)),
               "gptq-lut": (gptq_lut, GPTQLUTConfig(bits=3, act_order=True, iterations=3)),
               "gptvq": (vq_gptq, VQConfig(bits=2, iterations=3))}[method]
    d = REVERSED_MIN
    g = torch.Generator().manual_seed(7)
    X = torch.randn(d + 64, d, generator=g, dtype=torch.float64) * torch.rand(d, generator=g, dtype=torch.float64)
    X[:, 5] = 0  # a dead input channel
    H = 2 / X.shape[0] * X.T @ X
    W = torch.randn(8, d, generator=g, dtype=torch.float64)
    wide = fn(W, H, cfg)
    monkeypatch.setattr(linalg, "REVERSED_MIN", d + 1)  # the reference steps
    narrow = fn(W, H, cfg)
    assert torch.allclose(wide.weight.double(), narrow.weight.double(), rtol=0, atol=1e-9)
    assert wide.loss == pytest.approx(narrow.loss, rel=1e-9)
