"""The OFB search loop: losses, PMIM, budget, resume and DDP."""

import math
import os
import socket

import pytest
import timm
import torch
import torch.multiprocessing as mp

import ofbdeploy.models.zoo  # noqa: F401  (spawned DDP workers need the registry too)
from ofbdeploy.arch import ArchSpec
from ofbdeploy.errors import OfbError
from ofbdeploy.materialize import materialize
from ofbdeploy.recipe import SearchCfg
from ofbdeploy.search.budget import enforce_budget
from ofbdeploy.search.engine import run_search
from ofbdeploy.search.groups import VectorGroup
from ofbdeploy.search.losses import flops_loss, onehot_loss
from ofbdeploy.search.pmim import random_token_mask, reconstruction_loss
from ofbdeploy.search.searchable import SearchableViT
from ofbdeploy.train.data import DataSpec, build_datasets, build_loader
from ofbdeploy.train.distributed import Dist, init_distributed


def _model(seed: int = 0) -> SearchableViT:
    torch.manual_seed(seed)
    vit = timm.create_model("ofb_vit_pico_patch4_32", img_size=16, num_classes=10)
    return SearchableViT(vit, model_name="ofb_vit_pico_patch4_32")


def _loader(distributed: bool = False):
    train, _, _ = build_datasets(DataSpec(kind="synthetic", img_size=16, limit_train=256, limit_val=32))
    return build_loader(train, batch_size=32, train=True, seed=0, distributed=distributed)


def _cfg(**kwargs) -> SearchCfg:
    settings = {"target_flops_ratio": 0.5, "epochs": 4, "warmup_epochs": 1, "lr": 1e-3, "arch_lr": 0.5,
                "loss_weights": {"flops": 50.0}}
    settings.update(kwargs)
    return SearchCfg(**settings)


def test_onehot_loss_prefers_decided_distributions():
    group = VectorGroup("mlp", 16, (4, 8, 12, 16), l1=0.0)
    with torch.no_grad():
        group.alpha.fill_(0.0)
    uniform = float(onehot_loss(group).detach())
    with torch.no_grad():
        group.alpha.copy_(torch.tensor([6.0, 0.0, 0.0, 0.0]))
    sharp = float(onehot_loss(group).detach())
    assert uniform > 100 and sharp < uniform
    probs = torch.softmax(group.alpha.detach(), 0)
    v = float(((probs - 0.25) ** 2).sum() / 0.75)
    entropy = float(-(probs * probs.log()).sum())
    assert sharp == pytest.approx(entropy + math.tan(math.pi / 2 - math.pi * v) / 4, rel=1e-4)
    group.alive[1:] = False
    group.mark_decided()
    assert float(onehot_loss(group)) == 0.0


def test_flops_loss_is_zero_at_target_and_grows_quadratically():
    dense = 100.0
    assert float(flops_loss(torch.tensor(50.0), 50.0, dense)) == 0.0
    assert float(flops_loss(torch.tensor(70.0), 50.0, dense)) == pytest.approx(4 * float(flops_loss(torch.tensor(60.0),
                                                                                                    50.0, dense)))


def test_token_mask_hides_the_scheduled_share():
    mask = random_token_mask(8, 16, keep_ratio=0.75, device=torch.device("cpu"))
    assert mask.shape == (8, 16) and mask.sum(dim=1).tolist() == [4] * 8
    assert not random_token_mask(2, 16, 1.0, torch.device("cpu")).any()


def test_reconstruction_loss_counts_hidden_patches_only():
    images = torch.randn(2, 3, 8, 8)
    patches = torch.nn.functional.unfold(images, 4, stride=4).transpose(1, 2)
    normalised = (patches - patches.mean(-1, keepdim=True)) / (patches.var(-1, keepdim=True) + 1e-6).sqrt()
    perfect = torch.nn.functional.fold(normalised.transpose(1, 2), (8, 8), 4, stride=4)
    mask = torch.tensor([[True, False, False, True], [False, True, False, False]])
    assert float(reconstruction_loss(images, perfect, mask, 4)) == pytest.approx(0.0, abs=1e-5)
    wrong_visible = perfect.clone()
    wrong_visible[:, :, 0:4, 4:8] += 5.0  # patch 1 is visible in image 0, hidden in image 1
    assert float(reconstruction_loss(images, wrong_visible, mask, 4)) == pytest.approx(5.0 / 3, rel=1e-4)


def test_search_decides_and_meets_the_budget():
    model = _model()
    result = run_search(model, _loader(), _cfg(), Dist(), progress=False)
    assert model.all_decided
    assert result.achieved_macs <= result.target_macs
    assert result.achieved_macs == model.arch_spec().macs()
    assert result.target_macs == pytest.approx(0.5 * ArchSpec.dense(model.shape).macs())
    materialize(model)  # decided -> materialisable


def test_impossible_budget_is_refused_before_training():
    with pytest.raises(OfbError, match="cannot be met: the smallest architecture"):
        run_search(_model(), _loader(), _cfg(target_flops_ratio=0.01), Dist(), progress=False)


def test_enforce_budget_narrows_until_under_target():
    model = _model()
    model.decide_widest()
    dense = ArchSpec.dense(model.shape).macs()
    steps = enforce_budget(model, 0.6 * dense)
    assert steps and model.arch_spec().macs() <= 0.6 * dense
    assert all(group.is_decided for _, group in model.groups())


class _KilledLoader:
    """A loader that dies part-way through a given epoch, like a process killed mid-run."""

    def __init__(self, loader, die_in_epoch: int, after_batches: int) -> None:
        self.loader, self.die_in_epoch, self.after = loader, die_in_epoch, after_batches
        self.epoch = -1

    def __getattr__(self, name):
        return getattr(self.loader, name)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        self.epoch += 1
        for i, batch in enumerate(self.loader):
            if self.epoch == self.die_in_epoch and i == self.after:
                raise KeyboardInterrupt("killed")
            yield batch


def test_resume_reaches_the_same_result_as_an_uninterrupted_run(tmp_path):
    cfg = _cfg(epochs=5, arch_lr=0.1)  # slower decisions: the stop falls mid-search
    straight = _model()
    run_search(straight, _loader(), cfg, Dist(), seed=3, checkpoint_path=tmp_path / "a.ckpt", progress=False)

    stopped = _model()
    with pytest.raises(KeyboardInterrupt):
        run_search(stopped, _KilledLoader(_loader(), die_in_epoch=2, after_batches=3), cfg, Dist(), seed=3,
                   checkpoint_path=tmp_path / "b.ckpt", progress=False)
    resumed = _model()
    result = run_search(resumed, _loader(), cfg, Dist(), seed=3, checkpoint_path=tmp_path / "b.ckpt", resume=True,
                        progress=False)
    assert result.resumed_from == 2
    assert resumed.arch_spec() == straight.arch_spec()
    a, b = straight.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    ctx = init_distributed("cpu")
    model = _model()
    run_search(model, _loader(distributed=True), _cfg(epochs=3), ctx, progress=False)
    torch.save({"arch": model.arch_spec().to_dict(), "state": model.state_dict()}, f"{out}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_ddp_search_on_two_cpu_processes_stays_in_lockstep(tmp_path):
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert r0["arch"] == r1["arch"]
    assert all(torch.equal(r0["state"][k], r1["state"][k]) for k in r0["state"])
    assert ArchSpec.from_dict(r0["arch"]).macs() < ArchSpec.dense(ArchSpec.from_dict(r0["arch"]).base).macs()
