"""The global batch: processes x accumulation x micro-batch, and the learning rates that follow from it."""

from pathlib import Path

import pytest

from ofbdeploy.errors import OfbError
from ofbdeploy.recipe import load_recipe
from ofbdeploy.train.batching import plan_batch
from ofbdeploy.train.schedule import scaled_lr

RECIPES = Path(__file__).parents[2] / "recipes"


@pytest.mark.parametrize(("world", "accum", "micro"), [(1, 4, 256), (2, 2, 256), (8, 1, 128)])
def test_deit_s_50_gives_the_papers_batch_and_learning_rates_on_1_2_or_8_gpus(world, accum, micro):
    recipe = load_recipe(RECIPES / "deit_s_50.yaml")
    plan = plan_batch(recipe.data.batch_size, world, recipe.data.max_batch_per_process)
    assert (plan.global_batch, plan.accum, plan.micro) == (1024, accum, micro)
    assert scaled_lr(recipe.search.lr, plan.global_batch) == pytest.approx(1e-3)  # the paper's search lr
    assert recipe.data.repeated_aug == 3 and recipe.search.drop_path == 0.1
    assert plan.describe() == f"global batch 1024 = {world} process(es) x {accum} accumulation step(s) x {micro} " \
                              "images per forward"


def test_uneven_splits_keep_equal_micro_batches_and_say_so():
    plan = plan_batch(64, 3)
    assert (plan.global_batch, plan.micro) == (63, 21) and "does not split evenly" in plan.describe()
    assert (plan_batch(100, 2, 30).accum, plan_batch(100, 2, 30).micro) == (2, 25)
    assert plan_batch(96, 1, 40).accum == 3  # the fewest steps under the cap that split 96 evenly
    with pytest.raises(OfbError, match=r"data\.batch_size: 2 images per step cannot be shared by 4 processes"):
        plan_batch(2, 4)
