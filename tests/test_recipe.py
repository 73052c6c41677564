"""Recipes: YAML and built-ins map onto config dataclasses; malformed ones fail in one line."""

import pytest

from llmpress.errors import LlmpressError
from llmpress.prune.magnitude import MagnitudeConfig
from llmpress.quant.rtn import RTNConfig
from llmpress.recipe import Recipe, load_recipe
from llmpress.registry import builtin_recipes

BUILTIN_RECIPES = builtin_recipes()


def test_builtins_all_load():
    for name in BUILTIN_RECIPES:
        recipe = load_recipe(name)
        assert recipe.name == name and recipe.stages
    r = load_recipe("rtn-w4-g64")
    assert r.stages[0].config == RTNConfig(bits=4, group_size=64, sym=True)
    assert load_recipe("magnitude-50").stages[0].config == MagnitudeConfig(sparsity=0.5)


def test_yaml_round_trip(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(
        "calibration: {data: 'text:/x.txt', samples: 4, seq_len: 32, seed: 3}\n"
        "stages:\n"
        "  - {method: magnitude, targets: ['*.mlp.*'], args: {sparsity: 0.25, scope: row}}\n"
        "  - {method: rtn, ignore: ['*.down_proj'], args: {bits: 3, group_size: -1, sym: false}}\n")
    r = load_recipe(path)
    assert r.name == "r"
    assert r.calibration.samples == 4 and r.calibration.seed == 3 and r.calibration.data == "text:/x.txt"
    assert r.stages[0].config == MagnitudeConfig(0.25, "row")
    assert r.stages[1].config == RTNConfig(3, -1, False)
    assert r.stages[0].applies_to("model.layers.0.mlp.up_proj")
    assert not r.stages[0].applies_to("model.layers.0.self_attn.q_proj")
    assert not r.stages[1].applies_to("model.layers.3.mlp.down_proj")
    assert r.stages[1].applies_to("model.layers.3.mlp.up_proj")
    assert Recipe.from_dict(r.to_dict()) == r


@pytest.mark.parametrize("text, needle", [
    ("stages: []", "needs a non-empty list 'stages'"),
    ("stage: [{method: rtn}]", "unknown key 'stage'; valid keys are calibration, name, stages"),
    ("stages: [{method: rnt}]", "unknown method 'rnt' (did you mean 'rtn'?)"),
    ("stages: [{args: {bits: 4}}]", "has no 'method'"),
    ("stages: [{method: rtn, args: {bitz: 4}}]", "unknown key 'bitz'; valid keys are bits, float_zero, group_size, "),
    ("stages: [{method: rtn, args: {bits: 12}}]", "bits=12 is out of range"),
    ("stages: [{method: magnitude, args: {sparsity: 1.5}}]", "sparsity=1.5 is out of range"),
    ("calibration: {samples: 0}\nstages: [{method: rtn}]", "calibration samples=0 is invalid"),
    ("stages: [{method: rtn, targets: 3}]", "targets must be a list of name patterns"),
    ("stages: [{method: rtn\n", "is not valid YAML"),
    ("- just a list", "must be a mapping"),
    ("stages: [{method: [rtn]}]", "has no 'method' name"),
    ("stages: [{method: rtn, args: {bits: 4, 1: 2}}]", "unknown key '1'"),
    ("calibration: {data: 5}\nstages: [{method: wanda}]", "calibration data=5 is invalid"),
    ("calibration: {seed: x}\nstages: [{method: wanda}]", "calibration seed='x' is invalid"),
    ("name: [1]\nstages: [{method: rtn}]", "name must be text"),
])
def test_malformed_recipes_name_the_problem(tmp_path, text, needle):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(LlmpressError) as info:
        load_recipe(path)
    assert needle in str(info.value)
    assert "\n" not in str(info.value)


def test_unknown_recipe_name_and_missing_file(tmp_path):
    with pytest.raises(LlmpressError, match="unknown recipe 'rtn-w5'"):
        load_recipe("rtn-w5")
    with pytest.raises(LlmpressError, match="does not exist"):
        load_recipe(tmp_path / "missing.yaml")


def test_composed_names_take_arguments():
    """NAME(args) in an 'A+B' name: the issue's own example, method names, layer patterns, numbers as text."""
    r = load_recipe("sparsegpt-24+distill(kl, steps=200)")
    assert [s.method for s in r.stages] == ["sparsegpt", "distill"]
    assert r.stages[0].config.pattern == "2:4"
    distill = r.stages[1].config
    assert (distill.loss, distill.steps, distill.lr) == ("forward_kl", 200, 1e-3)  # the built-in's lr is kept
    r = load_recipe("gptq-w4-g64(ignore=['*.down_proj'], mse=true, damp=0.02)+distill(reverse_kl, lr=5e-4)")
    assert r.calibration.dtype == "auto"  # gptq-w4-g64's calibration carries over
    gptq = r.stages[0]
    assert gptq.ignore == ("*.down_proj",) and gptq.config.mse is True and gptq.config.damp == 0.02
    assert gptq.config.act_order and gptq.config.true_sequential
    assert (r.stages[1].config.loss, r.stages[1].config.lr) == ("reverse_kl", 5e-4)
    r = load_recipe("sparsegpt(pattern=4:8, block_size=64)+rtn-w4-g64")
    assert r.stages[0].config.pattern == "4:8" and r.stages[0].config.block_size == 64
    assert [s.method for s in r.stages] == ["sparsegpt", "rtn"]
    assert load_recipe("awq+gptq-w4-g64+distill()").stages[-1].config == load_recipe("distill").stages[0].config


@pytest.mark.parametrize("text,needle", [
    ("awq-w4-g64(bits=3)", "has 2 stages"),
    ("nope(x=1)", "unknown method 'nope'"),
    ("distill(stepz=3)", "unknown key 'stepz'"),
    ("distill(kl", "unbalanced brackets"),
    ("sparsegpt-24+nope+distill(kl)", "unknown recipe 'sparsegpt-24+nope'"),
    ("distill(kl)x", "has text after ')'"),
    ("rtn(4)", "argument '4' of 'rtn(4)'"),
    ("distill(kl, reverse_kl)", "argument 'reverse_kl'"),
    ("distill(loss=[a)", "unbalanced brackets"),
])
def test_composed_names_with_bad_arguments_name_the_problem(text, needle):
    with pytest.raises(LlmpressError) as info:
        load_recipe(text)
    assert needle in str(info.value) and "\n" not in str(info.value)
