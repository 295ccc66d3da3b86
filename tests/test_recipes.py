"""Every bundled recipe loads, names known training settings and options, and builds its learner."""

from __future__ import annotations

import pytest

from kshot.learners import build_learner
from kshot.recipe import load_recipe, recipe_names


@pytest.mark.parametrize("name", recipe_names())
def test_bundled_recipe_builds_its_learner(name):
    recipe = load_recipe(name)
    assert recipe.description and recipe.evaluate, f"{name} says what it is and how it is evaluated"
    size = recipe.dataset.get("image_size") or {"cifar-fs": 32, "fc100": 32}.get(recipe.dataset["name"], 84)
    channels = 1 if recipe.dataset["name"] == "omniglot" else 3
    image_shape = (channels, size, size)
    learner = build_learner(recipe.learner, image_shape, recipe.backbone, recipe.options)
    assert sum(p.numel() for p in learner.parameters()) > 0
    for setting in recipe.evaluate:
        assert setting.episodes >= 1000, "reported figures use at least 1,000 test episodes"
