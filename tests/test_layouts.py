"""Sharded layouts whose gradients ``p.grad`` does not hold (``gradwatch.measure.layouts``).

- DeepSpeed ZeRO is refused with a message that says what to use instead, at construction, or at the first
  logging step when ZeRO took the model over after the monitor was made; nothing is recorded.
- FSDP1 (``FullyShardedDataParallel``) on 2 and 4 gloo processes: ``use_orig_params=False`` is refused;
  ``use_orig_params=True`` gives the float64 unsharded model's values under FULL_SHARD, SHARD_GRAD_OP, NO_SHARD and
  HYBRID_SHARD, with one ``all_reduce`` per logging step (none under NO_SHARD) and none on the other steps.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import tempfile

import pytest
import torch
from helpers.collectives import all_reduces as _all_reduces
from helpers.processes import spawn
from torch import nn

import gradwatch
from gradwatch.measure.layouts import UnsupportedLayout

RTOL = 1e-5


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 33), nn.ReLU(), nn.Linear(33, 16), nn.LayerNorm(16), nn.Linear(16, 1))


# ---------------------------------------------------------------------------------------------- DeepSpeed ZeRO
# DeepSpeed cannot run here (not installed, and it needs an accelerator), so these models IMITATE what it leaves on
# the parameters, attribute for attribute as its source sets them:
# - ZeRO-3, deepspeed/runtime/zero/partition_parameters.py: Init._convert_to_deepspeed_param sets ds_id, ds_shape,
#   ds_numel, ds_tensor, ds_status, ds_persist, ds_process_group...; free_param then replaces p.data with an empty
#   tensor (the rank's partition lives in ds_tensor) and backward leaves p.grad None.
# - ZeRO-1/2 (and its bf16 optimizer), deepspeed/utils/mixed_precision_linkage.py: _init_lp_to_hp_mapping sets
#   _hp_mapping (None off this rank's partition), _dp_group and get_full_hp_grad on every parameter it holds.
def _as_zero3(model: nn.Module, rank: int = 0, world: int = 2) -> nn.Module:
    for i, p in enumerate(model.parameters()):
        n = p.numel()
        part = math.ceil(n / world)
        p.ds_id, p.ds_shape, p.ds_numel = i, p.shape, n
        p.ds_tensor = p.data.flatten()[rank * part: (rank + 1) * part].clone()
        p.ds_status, p.ds_persist, p.ds_process_group = "NOT_AVAILABLE", False, None
        p.data = torch.empty(0, dtype=p.dtype)
    return model


def _as_zero12(model: nn.Module) -> nn.Module:
    for p in model.parameters():
        p._hp_mapping, p._dp_group = None, None
        p.get_full_hp_grad = lambda: None
    return model


@pytest.mark.parametrize("stage", ["zero3", "zero12"])
def test_deepspeed_zero_is_refused_at_construction_with_what_to_do(stage):
    model = _as_zero3(_mlp()) if stage == "zero3" else _as_zero12(_mlp())
    with pytest.raises(UnsupportedLayout) as err:
        gradwatch.Monitor(model, every=1)
    text = str(err.value)
    assert ("ZeRO-3" if stage == "zero3" else "ZeRO (stage 1 or 2)") in text
    assert "safe_get_full_grad" in text and "fully_shard" in text  # what to do instead
    assert "0.weight" in text  # names the parameters
    assert isinstance(err.value, ValueError)


def test_zero_after_the_monitor_was_made_says_so_once_and_records_nothing(caplog):
    """``deepspeed.initialize`` after ``Monitor(model)``: found on the first logging step; an error (logged,
    kept in ``errors``) instead of wrong numbers or the generic 'N parameter(s) have no gradient' line."""
    model = _mlp()
    mon = gradwatch.Monitor(model, every=1)  # block flow on (the default): its hooks are removed, too
    _as_zero3(model)  # ZeRO-3 takes the parameters over: .data emptied, .grad None after backward
    with caplog.at_level(logging.INFO, logger="gradwatch"):
        for _ in range(3):
            mon.step()
    assert len(mon.errors) == 1 and mon.errors[0].startswith("UnsupportedLayout: ") and "ZeRO-3" in mon.errors[0]
    assert "Nothing is recorded" in mon.errors[0]
    assert mon.history().empty and mon.latest is None and mon.measured_steps == 0
    assert mon.flow_status.state == "off" and "unsupported" in mon.flow_status.reason
    assert not any("have no gradient" in r.getMessage() or "before backward" in r.getMessage() for r in caplog.records)
    mon.close()

    strict = gradwatch.Monitor(_mlp(), every=1, blocks=None, strict=True)
    _as_zero12(strict.model)
    with pytest.raises(UnsupportedLayout, match="ZeRO"):
        strict.step()
    strict.close()


def test_the_lightning_callback_lets_the_refusal_out_of_fit(tmp_path):
    """Under Lightning's DeepSpeedStrategy the parameters carry ZeRO's attributes by ``on_fit_start`` (the
    strategy sets the engine up first): ``fit`` stops there with the message, before any step."""
    pl = pytest.importorskip("lightning.pytorch")
    from gradwatch.integrations.lightning import GradWatchCallback

    class Net(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = _as_zero12(_mlp())

        def training_step(self, batch, i):
            return self.net(batch[0]).square().mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 10)), batch_size=4)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=2, callbacks=[GradWatchCallback(every=1)],
                         logger=False, default_root_dir=str(tmp_path), enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False)
    with pytest.raises(UnsupportedLayout, match="DeepSpeed ZeRO"):
        trainer.fit(Net(), data)
    assert trainer.global_step == 0


# ---------------------------------------------------------------------------------------------- FSDP1
def _fsdp1_worker(rank: int, init: str, world: int, strategies: list[str]) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import ShardingStrategy

    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    cpu = torch.device("cpu")
    try:
        if world == 2:  # flat parameters: nothing per layer can be read, refused with what to do
            flat = FSDP(_mlp(), use_orig_params=False, device_id=cpu)
            with pytest.raises(UnsupportedLayout, match="use_orig_params=False.*fully_shard.*use_orig_params=True"):
                gradwatch.Monitor(flat)
            # the original parameters, given without the FSDP1 unit that shards them: which ranks hold their
            # pieces is unknown, refused
            inner = FSDP(_mlp(), use_orig_params=True, device_id=cpu).module
            with pytest.raises(UnsupportedLayout, match="not inside the model"):
                gradwatch.Monitor(inner)

        for name in strategies:
            ref = _mlp().double()  # the unsharded model in float64, on the global batch
            kwargs = {}
            if name == "HYBRID_SHARD":  # 2 replicas x 2 shards: squares summed over the shard group only
                from torch.distributed.device_mesh import init_device_mesh

                kwargs["device_mesh"] = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
            # each Linear its own unit, the LayerNorm in the root's: 33 rows shard unevenly, and the last
            # layer's 17 values leave one rank's piece of some tensors empty (.grad None there)
            model = copy.deepcopy(ref).float()
            for i in (0, 2, 4):
                model[i] = FSDP(model[i], use_orig_params=True, device_id=cpu,
                                sharding_strategy=ShardingStrategy[name], **kwargs)
            model = FSDP(model, use_orig_params=True, device_id=cpu, sharding_strategy=ShardingStrategy[name],
                         **kwargs)
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
            ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
            mon = gradwatch.Monitor(model, optimizer=opt, every=2, blocks=None, strict=True)
            ref_mon = gradwatch.Monitor(ref, optimizer=ref_opt, every=2, blocks=None, strict=True)
            g = torch.Generator().manual_seed(1)
            for step in range(4):
                x, y = torch.randn(8, 10, generator=g), torch.randn(8, 1, generator=g)
                part = slice(8 // world * rank, 8 // world * (rank + 1))
                nn.functional.mse_loss(model(x[part]), y[part]).backward()
                nn.functional.mse_loss(ref(x.double()), y.double()).backward()
                with _all_reduces() as calls:
                    opt.step()
                expected = 0 if step % 2 or name == "NO_SHARD" else 1
                assert len(calls) == expected, f"{name}: step {step} made {len(calls)} all_reduce calls"
                ref_opt.step()
                opt.zero_grad()
                ref_opt.zero_grad()
            mon.close()
            assert mon.layer_names == ["0", "2", "3", "4"]
            want = ref_mon.history().set_index(["step", "name", "metric"]).value
            got = mon.history().set_index(["step", "name", "metric"]).value
            assert set(got.index) == set(want.index), (name, sorted(set(got.index) ^ set(want.index))[:5])
            err = (got - want.reindex(got.index)).abs() / want.reindex(got.index).abs().clip(lower=1e-12)
            assert err.max() < RTOL, f"{name}: off by {err.max():.2e} at {err.idxmax()}"
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _spawn(world: int, strategies: list[str]) -> None:
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch built without distributed")
    # a file store, not a TCP port picked beforehand that another process may take meanwhile
    init = os.path.join(tempfile.mkdtemp(prefix="gradwatch-fsdp1-"), "init")
    spawn(_fsdp1_worker, args=(init, world, strategies), nprocs=world)


@pytest.mark.slow
def test_fsdp1_flat_parameters_refused_original_parameters_exact():
    """2 processes: ``use_orig_params=False`` refused; ``use_orig_params=True`` exact under FULL_SHARD,
    SHARD_GRAD_OP (one all_reduce per logging step over the shard group) and NO_SHARD (none)."""
    _spawn(2, ["FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD"])


@pytest.mark.slow
def test_fsdp1_hybrid_shard_sums_over_the_shard_group_only():
    """4 processes, HYBRID_SHARD on a 2 x 2 mesh: summed over the world, every norm would be sqrt(2) too large."""
    _spawn(4, ["HYBRID_SHARD"])
