"""Recipes: YAML and built-ins map onto config dataclasses; malformed ones fail in one line."""

import pytest

from llmpress.errors import LlmpressError
from llmpress.prune.magnitude import MagnitudeConfig
from llmpress.quant.rtn import RTNConfig
from llmpress.recipe import BUILTIN_RECIPES, Recipe, load_recipe


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
    ("stages: [{method: rtn, args: {bitz: 4}}]", "unknown key 'bitz'; valid keys are bits, group_size, "),
    ("stages: [{method: rtn, args: {bits: 12}}]", "bits=12 is out of range"),
    ("stages: [{method: magnitude, args: {sparsity: 1.5}}]", "sparsity=1.5 is out of range"),
    ("calibration: {samples: 0}\nstages: [{method: rtn}]", "calibration samples=0 is invalid"),
    ("stages: [{method: rtn, targets: 3}]", "targets must be a list of name patterns"),
    ("stages: [{method: rtn\n", "is not valid YAML"),
    ("- just a list", "must be a mapping"),
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
