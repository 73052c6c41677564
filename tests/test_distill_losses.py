"""Distillation losses against plain-math references written here (lists, math.exp/log)."""

import math
from types import SimpleNamespace

import pytest
import torch

from llmpress.distill import losses
from llmpress.distill.losses import (
    LossConfig,
    distill_loss,
    forward_kl,
    generalized_jsd,
    hidden_mse,
    needs_hidden,
    needs_teacher,
    next_token_ce,
    reverse_kl,
)
from llmpress.errors import LlmpressError


def softmax(row, temperature=1.0):
    exps = [math.exp(v / temperature) for v in row]
    total = sum(exps)
    return [e / total for e in exps]


def kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def mean_over(rows_s, rows_t, fn, keep=None):
    values = [fn(s, t) for s, t in zip(rows_s, rows_t)]
    keep = keep or [True] * len(values)
    chosen = [v for v, k in zip(values, keep) if k]
    return sum(chosen) / len(chosen)


S = [[1.0, 0.0, -1.0, 0.5], [0.2, 0.3, 2.0, -0.4], [-1.0, 1.5, 0.0, 0.0]]
T = [[0.0, 2.0, -0.5, 0.1], [1.0, 1.0, 1.0, 1.0], [0.3, -0.2, 0.8, -2.0]]


def as_logits(rows):
    return torch.tensor([rows], dtype=torch.float64)  # (1, 3, 4)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_forward_and_reverse_kl_match_hand_computation(temperature):
    t2 = temperature ** 2
    ref_f = t2 * mean_over(S, T, lambda s, t: kl(softmax(t, temperature), softmax(s, temperature)))
    ref_r = t2 * mean_over(S, T, lambda s, t: kl(softmax(s, temperature), softmax(t, temperature)))
    assert forward_kl(as_logits(S), as_logits(T), temperature).item() == pytest.approx(ref_f, rel=1e-6)
    assert reverse_kl(as_logits(S), as_logits(T), temperature).item() == pytest.approx(ref_r, rel=1e-6)


def test_mask_selects_positions():
    keep = [True, False, True]
    ref = mean_over(S, T, lambda s, t: kl(softmax(t), softmax(s)), keep)
    got = forward_kl(as_logits(S), as_logits(T), mask=torch.tensor([keep]))
    assert got.item() == pytest.approx(ref, rel=1e-6)


def test_jsd_matches_hand_computation_and_limits():
    beta = 0.3

    def jsd(s, t):
        p_s, p_t = softmax(s), softmax(t)
        m = [beta * a + (1 - beta) * b for a, b in zip(p_t, p_s)]
        return beta * kl(p_t, m) + (1 - beta) * kl(p_s, m)
    got = generalized_jsd(as_logits(S), as_logits(T), beta=beta)
    assert got.item() == pytest.approx(mean_over(S, T, jsd), rel=1e-6)
    # Endpoints: forward / reverse KL, and the scaled JSD tends to them (no NaN near the ends).
    fwd, rev = forward_kl(as_logits(S), as_logits(T)), reverse_kl(as_logits(S), as_logits(T))
    assert torch.equal(generalized_jsd(as_logits(S), as_logits(T), beta=0.0), fwd)
    assert torch.equal(generalized_jsd(as_logits(S), as_logits(T), beta=1.0), rev)
    small = 1e-5
    near0 = generalized_jsd(as_logits(S), as_logits(T), beta=small) / small
    near1 = generalized_jsd(as_logits(S), as_logits(T), beta=1 - small) / small
    assert near0.item() == pytest.approx(fwd.item(), rel=1e-3)
    assert near1.item() == pytest.approx(rev.item(), rel=1e-3)


def test_jsd_symmetric_and_bounded_by_log2():
    torch.manual_seed(0)
    a, b = torch.randn(2, 5, 50) * 4, torch.randn(2, 5, 50) * 4
    ab, ba = generalized_jsd(a, b, 0.5), generalized_jsd(b, a, 0.5)
    assert torch.allclose(ab, ba, rtol=1e-5)
    # Disjoint supports reach the bound; nothing exceeds it.
    peaked_a = torch.full((1, 1, 4), -60.0)
    peaked_a[..., 0] = 60.0
    peaked_b = torch.full((1, 1, 4), -60.0)
    peaked_b[..., 1] = 60.0
    assert generalized_jsd(peaked_a, peaked_b, 0.5).item() == pytest.approx(math.log(2), rel=1e-5)
    assert 0 < ab.item() < math.log(2)


def test_forward_kl_is_mode_covering_and_reverse_mode_seeking():
    # Teacher: two equal modes. Student A sits on one mode only; student B spreads over everything.
    teacher = torch.log(torch.tensor([[[0.49, 0.49, 0.01, 0.01]]]))
    one_mode = torch.log(torch.tensor([[[0.97, 0.01, 0.01, 0.01]]]))
    spread = torch.log(torch.tensor([[[0.25, 0.25, 0.25, 0.25]]]))
    # Forward KL punishes missing the teacher's second mode more than spreading mass out ...
    assert forward_kl(one_mode, teacher) > forward_kl(spread, teacher)
    # ... reverse KL punishes putting mass where the teacher has none more than dropping a mode.
    assert reverse_kl(one_mode, teacher) < reverse_kl(spread, teacher)


def test_next_token_ce_is_shifted_and_masked():
    ids = torch.tensor([[2, 0, 3]])
    logits = as_logits(S)

    def ce(row, target):
        return -math.log(softmax(row)[target])
    full = (ce(S[0], 0) + ce(S[1], 3)) / 2  # position t predicts token t+1; the last position scores nothing
    assert next_token_ce(logits, ids).item() == pytest.approx(full, rel=1e-6)
    # A padded last token: the prediction of it drops out.
    assert next_token_ce(logits, ids, torch.tensor([[1, 1, 0]])).item() == pytest.approx(ce(S[0], 0), rel=1e-6)


def test_hidden_mse_is_scale_free_mean_over_layers():
    torch.manual_seed(0)
    t1, t2 = torch.randn(2, 3, 8), 100 * torch.randn(2, 3, 8)
    s1, s2 = t1 + 0.1 * torch.randn(2, 3, 8), t2 * 1.1
    ref = ((s1 - t1).pow(2).mean() / t1.pow(2).mean() + torch.tensor(0.01)) / 2  # layer 2: (0.1 t)² / t² = 0.01
    assert torch.allclose(hidden_mse([s1, s2], [t1, t2]), ref, rtol=1e-5)
    keep = torch.tensor([[True, True, False], [False, True, True]])
    masked = hidden_mse([s1], [t1], keep)
    assert torch.allclose(masked, (s1[keep] - t1[keep]).pow(2).mean() / t1[keep].pow(2).mean())


def autograd_reference(kind, s, t, temperature, keep, beta=0.5):
    """The same losses written the obvious way with torch autograd (no chunks, no closed forms)."""
    log_s, log_t = torch.log_softmax(s / temperature, -1), torch.log_softmax(t / temperature, -1)
    p_s, p_t = log_s.exp(), log_t.exp()
    if kind == "forward_kl":
        per = (p_t * (log_t - log_s)).sum(-1)
    elif kind == "reverse_kl":
        per = (p_s * (log_s - log_t)).sum(-1)
    else:
        log_m = torch.log(beta * p_t + (1 - beta) * p_s)
        per = beta * (p_t * (log_t - log_m)).sum(-1) + (1 - beta) * (p_s * (log_s - log_m)).sum(-1)
    return temperature ** 2 * per[keep].mean()


@pytest.mark.parametrize("chunk", [256, 3])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_values_and_closed_form_gradients_match_autograd(monkeypatch, chunk, temperature):
    monkeypatch.setattr(losses, "CHUNK_TOKENS", chunk)
    torch.manual_seed(0)
    s = (3 * torch.randn(2, 7, 11, dtype=torch.float64)).requires_grad_(True)
    t = 3 * torch.randn(2, 7, 11, dtype=torch.float64)
    keep = torch.rand(2, 7) > 0.3
    cases = {"forward_kl": lambda: forward_kl(s, t, temperature, keep),
             "reverse_kl": lambda: reverse_kl(s, t, temperature, keep),
             "jsd": lambda: generalized_jsd(s, t, 0.3, temperature, keep)}
    for kind, ours in cases.items():
        s.grad = None
        value = ours()
        (2.0 * value).backward()
        mine = s.grad.clone()
        s.grad = None
        ref = autograd_reference(kind, s, t, temperature, keep, beta=0.3)
        (2.0 * ref).backward()
        assert torch.allclose(value, ref, rtol=1e-10), kind
        assert torch.allclose(mine, s.grad, rtol=1e-8, atol=1e-12), kind
    ids = torch.randint(0, 11, (2, 7))
    real = torch.rand(2, 7) > 0.2
    s.grad = None
    next_token_ce(s, ids, real).backward()
    mine = s.grad.clone()
    s.grad = None
    pairs = real[:, :-1] & real[:, 1:]
    ref = torch.nn.functional.cross_entropy(s[:, :-1][pairs], ids[:, 1:][pairs])
    ref.backward()
    assert torch.allclose(next_token_ce(s, ids, real), ref) and torch.allclose(mine, s.grad)


def test_nothing_to_score_gives_zero_and_no_gradient_to_the_teacher():
    s = torch.randn(1, 4, 5, requires_grad=True)
    t = torch.randn(1, 4, 5, requires_grad=True)
    value = forward_kl(s, t, mask=torch.zeros(1, 4, dtype=torch.bool))
    value.backward()
    assert value.item() == 0 and torch.equal(s.grad, torch.zeros_like(s)) and t.grad is None
    with torch.no_grad():
        assert forward_kl(s, t).item() > 0


def test_bf16_logits_are_upcast():
    torch.manual_seed(0)
    s, t = torch.randn(1, 4, 30), torch.randn(1, 4, 30)
    low = forward_kl(s.bfloat16(), t.bfloat16())
    assert low.dtype == torch.float32
    assert low.item() == pytest.approx(forward_kl(s.bfloat16().float(), t.bfloat16().float()).item(), rel=1e-6)


def test_distill_loss_combines_parts():
    torch.manual_seed(0)
    ids = torch.randint(0, 11, (2, 6))
    def hidden():
        return tuple(torch.randn(2, 6, 5) for _ in range(3))
    student = SimpleNamespace(logits=torch.randn(2, 6, 11), hidden_states=hidden())
    teacher = SimpleNamespace(logits=torch.randn(2, 6, 11), hidden_states=hidden())
    cfg = LossConfig(kind="jsd", beta=0.2, temperature=1.5, hidden_weight=0.5, ce_weight=0.25)
    total, parts = distill_loss(student, teacher, ids, cfg)
    jsd = generalized_jsd(student.logits[:, :-1], teacher.logits[:, :-1], 0.2, 1.5)
    ce = next_token_ce(student.logits, ids)
    hid = hidden_mse(student.hidden_states[1:], teacher.hidden_states[1:])
    assert parts["jsd"] == pytest.approx(jsd.item()) and parts["ce"] == pytest.approx(ce.item())
    assert parts["hidden"] == pytest.approx(hid.item())
    assert total.item() == pytest.approx(jsd.item() + 0.25 * ce.item() + 0.5 * hid.item(), rel=1e-6)
    assert parts["total"] == pytest.approx(total.item())
    # Plain CE needs no teacher.
    total, parts = distill_loss(student, None, ids, LossConfig(kind="ce"))
    assert set(parts) == {"ce", "total"} and total.item() == pytest.approx(ce.item())


def test_loss_config_validation_and_needs():
    assert needs_teacher(LossConfig()) and not needs_hidden(LossConfig())
    assert not needs_teacher(LossConfig(kind="ce")) and needs_teacher(LossConfig(kind="ce", hidden_weight=1.0))
    for bad in ({"kind": "kl"}, {"temperature": 0}, {"beta": 1.5}, {"hidden_weight": -1}, {"ce_weight": True},
                {"kind": "ce", "ce_weight": 1.0}, {"temperature": float("nan")}):
        with pytest.raises(LlmpressError):
            LossConfig(**bad)
