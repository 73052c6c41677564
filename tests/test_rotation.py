"""Rotations (QuaRot): Hadamard matrices are orthogonal, a rotated model computes the same logits, and a
rotated, quantized model saves and reloads exactly."""

import json

import pytest
import torch

from llmpress import compress, load_model
from llmpress.errors import LlmpressError
from llmpress.models.archs import arch_for, get_blocks
from llmpress.quant.rtn import RTNConfig, rtn
from llmpress.rotate import (
    RotateConfig,
    fold_norms,
    hadamard,
    has_hadamard,
    random_hadamard,
    random_orthogonal,
    rotate_model,
    rotate_residual,
)
from llmpress.rotate.fold import ROTATABLE, WHY_NOT, final_norm, norm_feeds
from tiny_models import EXTRA_TYPES, TINY_TYPES, random_ids, tiny_model

ALL_TYPES = TINY_TYPES + EXTRA_TYPES
ROTATED = [t for t in ALL_TYPES if t in ROTATABLE]
REFUSED = [t for t in ALL_TYPES if t not in ROTATABLE]


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits.double()


# sizes: Sylvester (powers of two), Paley I (12, 20, 72), Paley II (28 = 2·14, 36 = 2·18), Kronecker products
# (576 = 8·72: SmolLM2's hidden size, 1536 = 4·384: its MLP width, 640: Gemma 3 270M's hidden size)
@pytest.mark.parametrize("n", [1, 2, 4, 8, 12, 16, 20, 28, 36, 64, 72, 128, 576, 640, 1536])
def test_hadamard_is_orthogonal(n):
    H = hadamard(n)
    assert H.shape == (n, n) and H.dtype == torch.int64
    assert set(H.unique().tolist()) <= {-1, 1}
    assert torch.equal(H.double() @ H.double().T, n * torch.eye(n, dtype=torch.float64))


def test_hadamard_orders_that_do_not_exist_are_refused():
    for n in (3, 6, 10, 18, 188):  # not a multiple of 4 (none exists), or one no construction here reaches
        assert not has_hadamard(n)
        with pytest.raises(ValueError, match=f"order {n}"):
            hadamard(n)
    assert has_hadamard(576) and has_hadamard(1536)


@pytest.mark.parametrize("make", [random_hadamard, random_orthogonal])
def test_random_rotations_are_orthogonal_and_seeded(make):
    Q = make(72, 0)
    assert torch.allclose(Q @ Q.T, torch.eye(72, dtype=torch.float64), atol=1e-12)
    assert torch.equal(Q, make(72, 0)) and not torch.equal(Q, make(72, 1))
    if make is random_hadamard:  # every entry ±1/√n: the energy of any one channel is spread over all
        assert torch.allclose(Q.abs(), torch.full_like(Q, 72 ** -0.5))


def test_rotation_spreads_an_outlier_column_and_lowers_the_rounding_error():
    generator = torch.Generator().manual_seed(0)
    W = torch.randn(32, 64, generator=generator, dtype=torch.float64)
    W[:, 5] *= 40  # one outlier input channel, as in LLM activations folded into weights
    Q = random_hadamard(64, 0)

    def rtn_error(M):
        return (rtn(M.float(), RTNConfig(bits=3, group_size=64)).weight.double() - M).norm()

    # the rotated weight is rounded in the rotated basis; its error maps back unchanged (Q is orthogonal)
    assert rtn_error(W @ Q) < 0.5 * rtn_error(W)


@pytest.mark.parametrize("model_type", ROTATED)
@pytest.mark.parametrize("options", [{}, {"heads": False}, {"kind": "random", "seed": 3}])
def test_rotated_model_gives_the_original_logits(model_type, options):
    model = tiny_model(model_type, seed=1)
    ids = random_ids(2, 16, seed=2)
    before = _logits(model, ids)
    embedding = model.get_input_embeddings().weight.detach().clone()
    assert rotate_model(model, arch_for(model), None, RotateConfig(**options)) == {}
    after = _logits(model, ids)
    assert torch.allclose(after, before, atol=1e-5, rtol=1e-4), (after - before).abs().max()
    assert (model.get_input_embeddings().weight - embedding).abs().max() > 1e-2  # the weights did change
    arch = arch_for(model)
    for block in get_blocks(model, arch):
        for name, _ in norm_feeds(arch):
            assert torch.equal(block.get_submodule(name).weight, torch.ones_like(block.get_submodule(name).weight))


def test_tied_head_is_untied_and_both_change():
    model = tiny_model("llama", seed=1, tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = random_ids(2, 16, seed=2)
    before = _logits(model, ids)
    rotate_model(model, arch_for(model), None, RotateConfig())
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    assert model.config.tie_word_embeddings is False
    assert torch.allclose(_logits(model, ids), before, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("model_type", REFUSED)
def test_unsupported_architectures_are_refused_with_the_reason(model_type):
    model = tiny_model(model_type, seed=1)
    with pytest.raises(LlmpressError, match="rotate cannot rotate") as info:
        rotate_model(model, arch_for(model), None, RotateConfig())
    assert WHY_NOT[arch_for(model).name][:30] in str(info.value)


def test_gemma_sandwich_norms_really_break_a_rotation():
    """Why gemma3_text is refused: folding and rotating as for Llama changes its logits."""
    model = tiny_model("gemma3_text", seed=1)
    ids = random_ids(2, 16, seed=2)
    before = _logits(model, ids)
    arch = arch_for(model)
    assert final_norm(model, arch) is not None
    fold_norms(model, arch)
    after_fold = _logits(model, ids)
    assert torch.allclose(after_fold, before, atol=1e-5, rtol=1e-4)  # the folds alone are exact ((1 + w) norms too)
    rotate_residual(model, arch, random_hadamard(model.config.hidden_size, 0))
    assert not torch.allclose(_logits(model, ids), before, atol=1e-2, rtol=1e-2)


def test_bad_options_are_one_line_errors():
    with pytest.raises(LlmpressError, match="kind"):
        RotateConfig(kind="haar")
    model = tiny_model("llama", seed=1, hidden_size=72, head_dim=18, num_attention_heads=4)
    with pytest.raises(LlmpressError, match="order 18 .*kind=random"):  # head dim 18: no Hadamard matrix
        rotate_model(model, arch_for(model), None, RotateConfig())
    rotate_model(model, arch_for(model), None, RotateConfig(kind="random"))


@pytest.mark.parametrize("recipe", ["rotate+rtn-w4-g64", "rotate(seed=5)+gptq-w3-g64", "rotate"])
def test_rotated_quantized_model_saves_and_reloads(recipe, tmp_path, calib):
    tok, data = calib
    model = tiny_model("llama", seed=3, vocab_size=len(tok), tie_word_embeddings=True)
    ids = random_ids(2, 16, seed=4)
    out = tmp_path / "out"
    result = compress(model, recipe, tokenizer=tok, data=data, samples=4, seq_len=32, out=out)
    after = _logits(result.model, ids)
    reloaded = load_model(out)
    reloaded.model.set_attn_implementation("eager")
    assert torch.equal(_logits(reloaded.model, ids), after)
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    assert ("quantization_config" in config) == (recipe != "rotate")
    assert reloaded.meta["recipe"]["stages"][0]["method"] == "rotate"


# SpinQuant: the Cayley update against its plain formula, and the stage keeps the float model's function
def _cayley_reference(R, G, lr):
    """The Cayley retraction written out: W = G·Rᵀ − R·Gᵀ, Y = (I + lr/2·W)⁻¹·(I − lr/2·W)·R."""
    n = R.shape[0]
    W = G @ R.T - R @ G.T
    eye = torch.eye(n, dtype=R.dtype)
    return torch.inverse(eye + lr / 2 * W) @ (eye - lr / 2 * W) @ R


def test_cayley_step_stays_orthogonal_and_descends():
    from llmpress.rotate.spin import cayley_step

    gen = torch.Generator().manual_seed(0)
    R = random_orthogonal(24, 1)
    X = torch.randn(24, 64, dtype=torch.float64, generator=gen)
    S = torch.randn(24, 24, dtype=torch.float64, generator=gen)
    target = R @ torch.linalg.matrix_exp(S - S.T)  # a rotation Cayley steps from R can reach (same determinant)
    Y = target @ X  # the loss ½‖R·X − Y‖² is 0 at R = target

    def loss(R):
        return 0.5 * float(((R @ X - Y) ** 2).sum())

    G = (R @ X - Y) @ X.T  # its gradient at R
    for lr in (1e-3, 0.1, 2.0):
        step = cayley_step(R, G, lr / float(G.norm()))
        assert torch.allclose(step, _cayley_reference(R, G, lr / float(G.norm())), atol=1e-10)
        assert torch.allclose(step @ step.T, torch.eye(24, dtype=torch.float64), atol=1e-10)
    assert loss(cayley_step(R, G, 1e-3 / float(G.norm()))) < loss(R)
    start, lr = loss(R), 0.5 / float(torch.linalg.matrix_norm(X @ X.T, 2))
    for _ in range(300):  # repeated steps approach the minimum
        R = cayley_step(R, (R @ X - Y) @ X.T, lr)
    assert loss(R) < 1e-3 * start


def test_fake_quant_ste_is_w4a4s_grid_with_an_identity_gradient():
    from llmpress.quant.w4a4 import fake_quant_act_ste as fake_quant_ste
    from llmpress.quant.w4a4 import quantize_act_per_token

    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    y = fake_quant_ste(x, 4, 0.9)
    codes, scale = quantize_act_per_token(x.detach(), 4, 0.9)
    assert torch.allclose(y.detach(), codes.float() * scale, atol=1e-6) and not torch.equal(y.detach(), x.detach())
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))

