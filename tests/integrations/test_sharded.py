"""The framework adapters on sharded models, 2 real gloo processes on CPU, against the unsharded model in float64.

- Lightning ``ModelParallelStrategy`` with tensor parallel (``parallelize_module`` Colwise/Rowwise in
  ``configure_model``; the LayerNorm and the head stay plain tensors) and :class:`GradWatchCallback`.
- Accelerate with FSDP2 (``FullyShardedDataParallelPlugin(fsdp_version=2)``) and
  :func:`gradwatch.integrations.accelerate.watch`; then ``watch`` on an FSDP1 root wrapper (``use_orig_params=True``). Accelerate 1.16 uses FSDP only on accelerators: with
  ``cpu=True`` it drops the plugin without a word and wraps the model in DDP (``AcceleratorState`` picks
  ``DistributedType.FSDP`` for GPU-like distributed types only; the HF Trainer's ``fsdp=`` with ``use_cpu=True``
  does the same). So the test sets the accelerator's state to FSDP after construction, which runs accelerate's own
  FSDP2 ``prepare`` (``fully_shard``, the optimizer's parameters swapped for DTensors), and checks that it did.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers.webhook_server import free_port
from helpers.processes import spawn
from torch import nn

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RTOL = 1e-5


def _relative_error(got, want) -> float:
    got = got.set_index(["step", "name", "metric"]).value.dropna()
    want = want.set_index(["step", "name", "metric"]).value.dropna()
    assert set(got.index) == set(want.index), sorted(set(got.index) ^ set(want.index))[:5]
    return float(((got - want.reindex(got.index)).abs() / want.reindex(got.index).abs().clip(lower=1e-12)).max())


# ---------------------------------------------------------------------------------------------- Lightning TP
TP_SCRIPT = textwrap.dedent(
    '''
    """Run by the test as a script: Lightning's launcher re-runs this file for rank 1."""
    import os
    import sys

    import lightning.pytorch as pl
    import torch
    import torch.nn.functional as F
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from gradwatch.integrations.lightning import GradWatchCallback


    class Net(pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(10, 34), nn.ReLU(), nn.Linear(34, 16), nn.LayerNorm(16), nn.Linear(16, 1))

        def configure_model(self):
            mesh = getattr(self, "_device_mesh", None)  # set by ModelParallelStrategy only
            if mesh is None:
                return
            from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

            parallelize_module(self.net, mesh["tensor_parallel"], {"0": ColwiseParallel(), "2": RowwiseParallel()})

        def training_step(self, b, i):
            x, y = b
            return F.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

        def train_dataloader(self):
            g = torch.Generator().manual_seed(0)
            data = TensorDataset(torch.randn(24, 10, generator=g), torch.randn(24, 1, generator=g))
            return DataLoader(data, batch_size=8)  # no sampler: both tensor-parallel ranks see the same batch


    def fit(root, devices, precision="32-true"):
        strategy = "auto"
        if devices > 1:
            from lightning.pytorch.strategies import ModelParallelStrategy

            strategy = ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=devices)
        callback, net = GradWatchCallback(every=1, rules=False), Net()
        pl.Trainer(
            accelerator="cpu", devices=devices, strategy=strategy, precision=precision, max_steps=3,
            log_every_n_steps=1, callbacks=[callback], logger=False, default_root_dir=root, enable_progress_bar=False,
            enable_model_summary=False, enable_checkpointing=False, use_distributed_sampler=False,
        ).fit(net)
        return callback, net


    if __name__ == "__main__":
        out = sys.argv[1]
        callback, net = fit(os.path.join(out, "rank" + os.environ.get("LOCAL_RANK", "0")), 2)
        kinds = {n: type(p).__name__ for n, p in net.named_parameters()}
        # really tensor parallel: the Colwise/Rowwise weights are DTensors, the LayerNorm and the head are not
        assert kinds["net.0.weight"] == kinds["net.2.weight"] == "DTensor" and kinds["net.3.weight"] == "Parameter"
        if net.global_rank == 0:
            callback.history().to_csv(os.path.join(out, "tp.csv"), index=False)
    '''
)


def test_lightning_tensor_parallel_equals_the_unsharded_model(tmp_path):
    """Per-layer values under ``ModelParallelStrategy(tensor_parallel_size=2)`` equal a 1-process float64 run's:
    the Colwise layer's squares summed over TP, the Rowwise weight's too but not its replicated bias, nothing
    summed for the LayerNorm and the head."""
    pytest.importorskip("lightning.pytorch")
    pytest.importorskip("torch.distributed.tensor.parallel")
    import pandas as pd

    script = tmp_path / "tp_run.py"
    script.write_text(TP_SCRIPT)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1",
               MASTER_PORT=str(free_port()))
    env.pop("LOCAL_RANK", None)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], env=env, cwd=str(tmp_path),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]

    spec = importlib.util.spec_from_file_location("tp_run", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    reference, _ = mod.fit(str(tmp_path / "single"), 1, precision="64-true")  # unsharded, float64
    got = pd.read_csv(tmp_path / "tp.csv", dtype={"name": str})
    want = reference.history()
    assert set(got.name) == {"net.0", "net.2", "net.3", "net.4", "_global"} and set(got.step) == {0, 1, 2}
    assert _relative_error(got, want) < RTOL


# ---------------------------------------------------------------------------------------------- Accelerate FSDP2
def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 33), nn.ReLU(), nn.Linear(33, 16), nn.LayerNorm(16), nn.Linear(16, 1))


def _watched_error(accelerator: object, model: nn.Module, opt: torch.optim.Optimizer, rank: int) -> float:
    """Train ``model`` (as ``accelerator.prepare`` or FSDP1 left it) 3 steps beside the float64 unsharded model
    on the global batch, both watched; the largest relative difference of their values."""
    import gradwatch
    from gradwatch.integrations.accelerate import watch

    ref = _mlp().double()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    mon = watch(accelerator, model, opt, every=1, blocks=None, rules=False, strict=True)
    ref_mon = gradwatch.Monitor(ref, optimizer=ref_opt, every=1, blocks=None, rules=False, strict=True)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        x, y = torch.randn(8, 10, generator=g), torch.randn(8, 1, generator=g)
        mine = slice(4 * rank, 4 * rank + 4)  # FSDP averages gradients over ranks: the global batch's mean
        accelerator.backward(nn.functional.mse_loss(model(x[mine]), y[mine]))
        opt.step()
        opt.zero_grad()
        nn.functional.mse_loss(ref(x.double()), y.double()).backward()
        ref_opt.step()
        ref_opt.zero_grad()
    mon.close()
    assert mon.layer_names == ["0", "2", "3", "4"] and set(mon.history().step) == {0, 1, 2}
    return _relative_error(mon.history(), ref_mon.history())


def _accelerate_worker(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2")
    from accelerate import Accelerator, FullyShardedDataParallelPlugin
    from accelerate.utils import DistributedType
    from torch.distributed.fsdp import FullyShardedDataParallel

    plugin = FullyShardedDataParallelPlugin(fsdp_version=2)
    accelerator = Accelerator(cpu=True, fsdp_plugin=plugin)
    state = accelerator.state  # FSDP on CPU: see the module docstring
    state.distributed_type, state.fsdp_plugin = DistributedType.FSDP, plugin
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model, opt = accelerator.prepare(model, opt)
    assert all(type(p).__name__ == "DTensor" for p in model.parameters()), "accelerate did not shard with FSDP2"
    err = _watched_error(accelerator, model, opt, rank)
    assert err < RTOL, f"FSDP2, rank {rank}: off by {err:.2e}"

    # FSDP1 as accelerate wraps it on GPUs (use_orig_params=True, the root wrapped; its FSDP1 prepare fails on CPU:
    # "Inconsistent compute device and `device_id` on rank 0: cpu vs cpu:0"): watch keeps the root, which owns
    # the parameters of the layers no inner unit holds, instead of unwrapping it away
    model = FullyShardedDataParallel(_mlp(), use_orig_params=True, device_id=torch.device("cpu"))
    err = _watched_error(accelerator, model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), rank)
    assert err < RTOL, f"FSDP1, rank {rank}: off by {err:.2e}"
    accelerator.end_training()


def test_accelerate_fsdp2_and_fsdp1_equal_the_unsharded_model():
    pytest.importorskip("accelerate")

    spawn(_accelerate_worker, args=(free_port(),), nprocs=2)
