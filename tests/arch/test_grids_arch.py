import json

import pytest
import timm

from ofbdeploy.arch import ArchSpec, BlockSpec, arch_to_dict, save_arch
from ofbdeploy.arch.cost import count_params, measure_macs
from ofbdeploy.arch.grids import SearchSpace, embed_grid, head_grid, head_width_grid, mlp_grid, width_grid
from ofbdeploy.errors import ArchError, ModelError
from ofbdeploy.families import load_arch
from ofbdeploy.families.vit.support import read_vit_shape
from ofbdeploy.report.describe import unaligned_widths

DEIT = ["deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224"]


def test_paper_grids_for_deit_s():
    assert head_grid(6) == [2, 4, 6]
    assert head_width_grid(64) == [16, 24, 32, 40, 48, 56, 64]
    assert len(SearchSpace.for_model(384, 6, 64, 1536).attention) == 21
    assert mlp_grid(1536) == [384, 576, 768, 960, 1152, 1344, 1536]
    grid = embed_grid(384)
    assert grid[0] == 192 and grid[-1] == 384 and len(grid) == 17
    assert 204 in grid and 228 in grid  # the paper's misaligned widths


def test_odd_head_count_reaches_every_head():
    assert head_grid(3) == [1, 2, 3]
    assert head_grid(12) == [2, 4, 6, 8, 10, 12]


@pytest.mark.parametrize("align", [8, 16, 32, 64])
def test_aligned_grids_hold_multiples_only(align):
    for full, grid in [(384, embed_grid(384, align)), (1536, mlp_grid(1536, align)), (64, head_width_grid(64, align)),
                       (192, embed_grid(192, align))]:
        assert grid[-1] == full
        assert all(w % align == 0 for w in grid[:-1]), grid
        assert full % align or all(w % align == 0 for w in grid)


def test_width_grid_rejects_bad_alignment():
    with pytest.raises(ValueError, match="align"):
        width_grid(64, 16, 8, align=12)


@pytest.mark.slow
@pytest.mark.parametrize("name", DEIT)
def test_dense_cost_matches_torch_counter(name):
    model = timm.create_model(name)
    spec = ArchSpec.dense(read_vit_shape(model, name))
    counted = measure_macs(model, 224)
    assert abs(spec.macs() - counted) <= 0.01 * counted
    assert spec.params() == count_params(model)


def test_deit_s_headline_numbers():
    spec = ArchSpec.dense(read_vit_shape(timm.create_model("deit_small_patch16_224")))
    assert round(spec.macs() / 1e9, 1) == 4.6
    assert round(spec.params() / 1e6, 1) == 22.1


def test_unsupported_vit_is_refused_with_reason():
    with pytest.raises(ModelError, match="q/k norm"):
        read_vit_shape(timm.create_model("vit_small_patch16_224", qk_norm=True, num_classes=10, img_size=32))


def _small_spec() -> ArchSpec:
    base = read_vit_shape(timm.create_model("ofb_vit_pico_patch4_32"))
    blocks = tuple(BlockSpec(2, 12, 96, (0, 3), ((0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11), tuple(range(4, 16))),
                             tuple(range(96))) for _ in range(4))
    return ArchSpec(base, 40, blocks, tuple(range(40)))


def test_arch_json_round_trip(tmp_path):
    spec = _small_spec()
    save_arch(spec, tmp_path / "arch.json")
    again = load_arch(tmp_path / "arch.json")
    assert again == spec
    data = json.loads((tmp_path / "arch.json").read_text())
    assert data["macs"] == spec.macs() and data["params"] == spec.params()


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.update(format="other"), "format"),
        (lambda d: d.pop("embed_dims"), "missing field 'embed_dims'"),
        (lambda d: d["blocks"][1].update(heads=9), r"blocks\[1\].heads: expected 1..4"),
        (lambda d: d["blocks"][0].update(kept_heads=[0, 0]), "unique"),
        (lambda d: d["blocks"][2].update(kept_mlp=list(range(95))), r"blocks\[2\].kept_mlp: expected 96 indices"),
        (lambda d: d["base"].update(colour="red"), "unknown field"),
        (lambda d: d.update(blocks=d["blocks"][:3]), "expected 4 blocks"),
    ],
)
def test_arch_validation_names_the_field(tmp_path, edit, message):
    data = arch_to_dict(_small_spec())
    edit(data)
    path = tmp_path / "arch.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ArchError, match=message):
        load_arch(path)


def test_arch_load_errors_name_the_file(tmp_path):
    with pytest.raises(ArchError, match="not found"):
        load_arch(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(ArchError, match=r"bad\.json: not valid JSON"):
        load_arch(tmp_path / "bad.json")


def test_unaligned_widths_are_named():
    spec = _small_spec()
    assert unaligned_widths(spec) == [f"block {i} head width 12" for i in range(4)]


def test_narrowest_architecture_takes_the_smallest_cell_of_every_group():
    shape = read_vit_shape(timm.create_model("deit_small_patch16_224"))
    space = SearchSpace.for_model(384, 6, 64, 1536)
    spec = ArchSpec.narrowest(shape, space)
    assert spec.embed_dim == 192 and all((b.heads, b.head_dim, b.mlp_dim) == (2, 16, 384) for b in spec.blocks)
    assert spec.macs() == shape.macs_at([192], [32] * 12, [384] * 12)


def test_format_1_records_still_load_as_vit(tmp_path):
    """arch.json files written before model families (format 1: one embed_dim, no family) keep loading."""
    spec = _small_spec()
    data = arch_to_dict(spec)
    old = {"format": "ofbdeploy.arch/1", "base": data["base"], "embed_dim": data["embed_dims"][0],
           "kept_embed": data["kept_embeds"][0], "blocks": data["blocks"], "macs": data["macs"],
           "params": data["params"], "notes": {}}
    for key in ("reg_tokens", "distilled", "pre_norm", "act", "norm_eps", "block", "pool_heads"):  # newer fields
        old["base"].pop(key)
    (tmp_path / "arch.json").write_text(json.dumps(old))
    again = load_arch(tmp_path / "arch.json")
    assert again == spec and again.family == "vit" and again.kept_embed == spec.kept_embed
    assert arch_to_dict(again)["format"] == "ofbdeploy.arch/2" and arch_to_dict(again)["family"] == "vit"
