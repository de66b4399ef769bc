import random

import timm
from click.testing import CliRunner

from ofbdeploy.cli import main
from ofbdeploy.families.vit.searchable import SearchableViT
from ofbdeploy.models.materialize import materialize
from ofbdeploy.models.pruned import save_pruned
from ofbdeploy.verify.exactness import decide_randomly


def test_help_lists_the_verbs():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for verb in ("info", "selfcheck"):
        assert verb in result.output


def test_info_prints_the_architecture(tmp_path):
    searchable = SearchableViT(timm.create_model("ofb_vit_pico_patch4_32"), model_name="ofb_vit_pico_patch4_32")
    decide_randomly(searchable, random.Random(0))
    model, spec = materialize(searchable)
    save_pruned(model, spec, tmp_path / "m")
    result = CliRunner().invoke(main, ["info", str(tmp_path / "m")])
    assert result.exit_code == 0, result.output
    assert "heads x width" in result.output and "of dense" in result.output
    for i, blk in enumerate(spec.blocks):
        assert f"{i}  {blk.heads} x {blk.head_dim}" in result.output
    assert f"{spec.params() / 1e6:.2f} M" in result.output


def test_info_on_missing_path_is_one_line_and_exit_2(tmp_path):
    result = CliRunner().invoke(main, ["info", str(tmp_path / "none")])
    assert result.exit_code == 2
    assert result.output.strip().count("\n") == 0 and "not found" in result.output


def test_selfcheck_passes(tmp_path):
    result = CliRunner().invoke(main, ["selfcheck", "--trials", "1", "--save", str(tmp_path / "m")])
    assert result.exit_code == 0, result.output
    assert "FAIL" not in result.output and result.output.count(" ok") == 3
    assert (tmp_path / "m" / "arch.json").is_file()
