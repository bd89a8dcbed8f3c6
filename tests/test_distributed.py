"""gradwatch under torch.distributed on CPU (gloo, 2 processes).

- Lightning DDP (``Trainer(strategy="ddp", accelerator="cpu", devices=2)``) and Lightning FSDP2
  (``ModelParallelStrategy`` + ``fully_shard``): the callback's values equal a 1-process run over the same
  global batch; rank 1 writes nothing and opens no files.
- FSDP2 (``fully_shard``, DTensor parameters) with raw torch.distributed: the raw :class:`gradwatch.Monitor`
  gives the values of the unsharded model, with ONE ``all_reduce`` per logging step; rank 1 writes nothing.
"""

from __future__ import annotations

import copy
import glob
import importlib.util
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers.collectives import all_reduces as _all_reduces
from helpers.processes import spawn
from torch import nn

import gradwatch

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RTOL = 1e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------- Lightning DDP
DDP_SCRIPT = textwrap.dedent(
    '''
    """Run by the test as a script: Lightning's DDP launcher re-runs this file for rank 1."""
    import os
    import sys

    import lightning.pytorch as pl
    import torch
    import torch.nn.functional as F
    from lightning.pytorch.loggers import TensorBoardLogger
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from gradwatch.integrations.lightning import GradWatchCallback


    class Net(pl.LightningModule):
        """No BatchNorm: per-rank batch statistics would make DDP differ from one process by design."""

        def __init__(self, batch):
            super().__init__()
            torch.manual_seed(0)
            self.batch = batch
            self.net = nn.Sequential(
                nn.Conv2d(3, 7, 3, padding=1), nn.ReLU(), nn.Conv2d(7, 8, 3, padding=1, stride=2), nn.ReLU(),
                nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10),
            )

        def configure_model(self):
            mesh = getattr(self, "_device_mesh", None)  # set by ModelParallelStrategy only
            if mesh is None:
                return
            from torch.distributed.fsdp import fully_shard

            for layer in self.net:
                if isinstance(layer, (nn.Conv2d, nn.Linear)):
                    fully_shard(layer, mesh=mesh["data_parallel"])
            fully_shard(self.net, mesh=mesh["data_parallel"])

        def training_step(self, b, i):
            x, y = b
            loss = F.cross_entropy(self.net(x), y)
            self.log("loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

        def train_dataloader(self):
            g = torch.Generator().manual_seed(0)
            data = TensorDataset(torch.randn(48, 3, 8, 8, generator=g), torch.randint(0, 10, (48,), generator=g))
            # Lightning's automatic DistributedSampler always shuffles training data; an unshuffled one makes
            # the ranks' batches at step k together exactly the 1-process batch k.
            sampler = None
            if self.trainer.world_size > 1:
                sampler = torch.utils.data.DistributedSampler(
                    data, self.trainer.world_size, self.trainer.global_rank, shuffle=False
                )
            return DataLoader(data, batch_size=self.batch, sampler=sampler)


    def trainer(root, devices, logger, strategy="auto"):
        if strategy == "fsdp2":
            from lightning.pytorch.strategies import ModelParallelStrategy

            strategy = ModelParallelStrategy(data_parallel_size=devices, tensor_parallel_size=1)
        return pl.Trainer(
            accelerator="cpu", devices=devices, strategy=strategy, max_steps=3,
            log_every_n_steps=1, callbacks=[GradWatchCallback(every=1)], logger=logger, default_root_dir=root,
            enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False, use_distributed_sampler=False,
        )


    if __name__ == "__main__":
        out, strategy = sys.argv[1], sys.argv[2]
        # Each rank gets its own folder, so "rank 1 opens no files" is checked by that folder not existing.
        root = os.path.join(out, "rank" + os.environ.get("LOCAL_RANK", "0"))
        net = Net(batch=4)
        trainer(root, 2, TensorBoardLogger(root, name="tb", version=0), strategy).fit(net)
        if strategy == "fsdp2":  # really sharded: every parameter is a DTensor
            assert all(type(p).__name__ == "DTensor" for p in net.parameters())
        # no logger: the callback's own writer, on rank 0 only
        trainer(root, 2, False, strategy).fit(Net(batch=4))
    '''
)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_lightning_multiprocess_equals_one_process_over_the_global_batch(strategy, tmp_path, events):
    """``ddp``: DistributedDataParallel. ``fsdp2``: ``ModelParallelStrategy`` with ``fully_shard`` in
    ``configure_model`` (DTensor parameters; runs on CPU with gloo, unlike Lightning's FSDP1 ``FSDPStrategy``)."""
    pytest.importorskip("lightning.pytorch")
    script = tmp_path / "ddp_run.py"
    script.write_text(DDP_SCRIPT)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("LOCAL_RANK", None)
    env["MASTER_PORT"] = str(_free_port())
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "multi"), strategy], env=env, cwd=str(tmp_path),
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]

    # The 1-process reference over the same global batch (2 x 4), in this process.
    spec = importlib.util.spec_from_file_location("ddp_run", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    from lightning.pytorch.loggers import TensorBoardLogger

    single = str(tmp_path / "single")
    mod.trainer(single, 1, TensorBoardLogger(single, name="tb", version=0)).fit(mod.Net(batch=8))

    written = events(str(tmp_path / "multi" / "rank0" / "tb" / "version_0"))
    multi = written["series"]
    ref = events(os.path.join(single, "tb", "version_0"))["series"]
    tags = [t for t in ref if t.split("/")[0] == "zz_gradwatch.layers" and t.split("/")[1] in gradwatch.names.METRICS]
    assert len(tags) == 4 * 4  # 3 layers + _global
    for tag in tags:
        assert set(multi[tag]) == set(ref[tag]) == {0, 1, 2}
        for step, value in ref[tag].items():
            assert multi[tag][step] == pytest.approx(value, rel=RTOL, abs=1e-9), (tag, step)
    assert set(written["scalars"]["loss"]) == {0, 1, 2}  # the user's own scalar, beside gradwatch's

    # Rank 0 wrote one event file per run; rank 1 created nothing at all.
    assert len(glob.glob(str(tmp_path / "multi" / "rank0" / "tb" / "version_0" / "events.*"))) == 1
    assert set(events(str(tmp_path / "multi" / "rank0" / "gradwatch"))["scalars"]["zz_gradwatch.layers/grad_norm/_global"]) == {0, 1, 2}
    assert not (tmp_path / "multi" / "rank1").exists()


# ---------------------------------------------------------------------------------------------- FSDP2, raw torch
def _mlp() -> nn.Module:
    torch.manual_seed(0)
    # 33 rows shard unevenly (17 + 16); the last layer's single row leaves rank 1 an empty shard.
    return nn.Sequential(nn.Linear(10, 33), nn.ReLU(), nn.Linear(33, 16), nn.ReLU(), nn.Linear(16, 1))


def _fsdp_worker(rank: int, init: str, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    import gradwatch

    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2)
    try:
        ref = _mlp()
        model = copy.deepcopy(ref)
        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer)
        fully_shard(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
        log_dir = os.path.join(out, f"rank{rank}")
        mon = gradwatch.Monitor(model, optimizer=opt, every=1, log_dir=log_dir)
        ref_mon = gradwatch.Monitor(ref, optimizer=ref_opt, every=1)
        plain = gradwatch.Monitor(model, every=1)  # the step() path, no optimizer, no update_to_weight

        g = torch.Generator().manual_seed(1)
        for step in range(3):
            x, y = torch.randn(8, 10, generator=g), torch.randn(8, 1, generator=g)
            local = slice(4 * rank, 4 * rank + 4)
            nn.functional.mse_loss(model(x[local]), y[local]).backward()
            nn.functional.mse_loss(ref(x), y).backward()  # FSDP2 averages grads over ranks: the global batch
            # + 1 on step 0: each monitor's self-check agrees on its verdict (torch's own norms go through
            # DTensor's functional collectives, which this does not count)
            with _all_reduces() as calls:
                plain.step()
                assert len(calls) == 1 + (step == 0), f"step() made {len(calls)} all_reduce calls"
                opt.step()
                assert len(calls) == 2 + 2 * (step == 0), f"optimizer.step() measurement made {len(calls)} in all"
            ref_opt.step()
            opt.zero_grad()
            ref_opt.zero_grad()
        mon.close()
        assert not mon.errors and not plain.errors, (mon.errors, plain.errors)
        assert [r.verified for r in mon.records + plain.records] == [True] * 6  # the self-check passed

        want = ref_mon.history().set_index(["step", "name", "metric"]).value
        got = mon.history().set_index(["step", "name", "metric"]).value
        assert set(got.index) == set(want.index) and len(want) == 3 * (4 * 4 + len(gradwatch.health.HEALTH))
        diff = ((got - want.reindex(got.index)).abs() / want.reindex(got.index).abs().clip(lower=1e-12)).max()
        assert diff < RTOL, f"FSDP2 values differ from unsharded ones by {diff:.2e}"
        got_plain = plain.history().set_index(["step", "name", "metric"]).value
        common = want.reindex(got_plain.index)
        assert len(got_plain) == 3 * (4 * 3 + len(gradwatch.health.HEALTH)) and ((got_plain - common).abs() / common.abs()).max() < RTOL
        assert mon.layer_names == ["0", "2", "4"]
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_fsdp2_monitor_equals_unsharded_with_one_all_reduce(tmp_path, events):
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch built without distributed")
    pytest.importorskip("torch.distributed.fsdp")
    from torch.distributed import fsdp

    if not hasattr(fsdp, "fully_shard"):
        pytest.skip("this torch has no FSDP2 fully_shard")
    spawn(_fsdp_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    assert set(events(str(tmp_path / "rank0"))["scalars"]["zz_gradwatch.layers/grad_norm/_global"]) == {0, 1, 2}
    assert not (tmp_path / "rank1").exists()  # the raw Monitor logs on rank 0 only


# ---------------------------------------------------------------------------------------------- 2-D meshes
def _mlp_ln(hidden: int) -> nn.Module:
    torch.manual_seed(0)
    # the LayerNorm and the head stay replicated over TP
    return nn.Sequential(nn.Linear(10, hidden), nn.ReLU(), nn.Linear(hidden, 16), nn.LayerNorm(16), nn.Linear(16, 1))


def _spawn4(worker, layouts: list[str], out: str) -> None:
    """Runs ``worker(rank, layout, out)`` for each layout in turn on 4 gloo processes started once (starting
    them costs more than a layout's run)."""
    spawn(_in_group, args=(os.path.join(out, "init"), worker, layouts, out), nprocs=4)


def _in_group(rank: int, init: str, worker, layouts: list[str], out: str) -> None:
    import torch.distributed as dist

    # a file store, not a TCP port picked beforehand that another process may take meanwhile
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=4)
    try:
        for layout in layouts:
            worker(rank, layout, os.path.join(out, layout))
            dist.barrier()
    finally:
        dist.destroy_process_group()


def _mesh_worker(rank: int, layout: str, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import gradwatch

    # 33 hidden units shard unevenly over HSDP's 2 shards (17 + 16 rows); 34 split evenly over TP (tensor
    # parallel needs it) and then unevenly over FSDP's dp shards (9 + 8 rows)
    hidden = {"hsdp": 33, "fsdp_tp": 34, "tp": 36}[layout]
    ref = _mlp_ln(hidden).double()  # the unsharded model in float64, on the global batch
    model = _mlp_ln(hidden)
    if layout == "hsdp":  # replicate x shard: all four ranks are data parallel
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
        for layer in (model[0], model[2], model[4]):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        dp_rank, dp_size = rank, 4
    elif layout == "tp":  # tensor parallel alone over 4 ranks; the LayerNorm and the head stay plain tensors
        from torch.distributed.tensor.parallel import (
            ColwiseParallel,
            RowwiseParallel,
            parallelize_module,
        )

        mesh = init_device_mesh("cpu", (4,), mesh_dim_names=("tp",))
        parallelize_module(model, mesh, {"0": ColwiseParallel(), "2": RowwiseParallel()})
        dp_rank, dp_size = 0, 1
    else:  # FSDP over "dp" x tensor parallel over "tp": ranks of one dp coordinate see the same batch
        from torch.distributed.tensor.parallel import (
            ColwiseParallel,
            RowwiseParallel,
            parallelize_module,
        )

        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
        parallelize_module(model, mesh["tp"], {"0": ColwiseParallel(), "2": RowwiseParallel()})
        for layer in (model[0], model[2], model[4]):
            fully_shard(layer, mesh=mesh["dp"])
        fully_shard(model, mesh=mesh["dp"])
        dp_rank, dp_size = mesh.get_local_rank("dp"), 2
    mon = gradwatch.Monitor(model, every=2, blocks=None, strict=True, log_dir=os.path.join(out, f"rank{rank}"))
    ref_mon = gradwatch.Monitor(ref, every=2, blocks=None, strict=True)
    g = torch.Generator().manual_seed(1)
    for step in range(4):
        x, y = torch.randn(8, 10, generator=g), torch.randn(8, 1, generator=g)
        part = slice(8 // dp_size * dp_rank, 8 // dp_size * (dp_rank + 1))
        nn.functional.mse_loss(model(x[part]), y[part]).backward()
        nn.functional.mse_loss(ref(x.double()), y.double()).backward()
        with _all_reduces() as calls:
            mon.step()
        # one per mesh dimension split along; on step 0 one more: the self-check's verdict
        expected = 0 if step % 2 else (2 if layout == "fsdp_tp" else 1) + (step == 0)
        assert len(calls) == expected, f"{layout}: step {step} made {len(calls)} all_reduce calls"
        ref_mon.step()
        for m in (model, ref):
            with torch.no_grad():
                for p in m.parameters():
                    p -= 0.1 * p.grad
            m.zero_grad()
    mon.close()
    assert [r.verified for r in mon.records] == [True, True], layout  # the self-check ran and passed
    want = ref_mon.history().set_index(["step", "name", "metric"]).value
    got = mon.history().set_index(["step", "name", "metric"]).value
    assert set(got.index) == set(want.index), (layout, sorted(set(got.index) ^ set(want.index))[:5])
    err = ((got - want.reindex(got.index)).abs() / want.reindex(got.index).abs().clip(lower=1e-12))
    assert err.max() < RTOL, f"{layout}: off by {err.max():.2e} at {err.idxmax()}"


@pytest.mark.slow
def test_two_dimensional_meshes_give_the_unsharded_values_with_one_all_reduce_per_split_dimension(tmp_path):
    """HSDP (replicate x shard) and FSDP x tensor parallel on a 2 x 2 mesh of 4 gloo processes, and tensor
    parallel alone over 4 (its LayerNorm and head plain tensors beside DTensors): every layer's norms equal the
    float64 unsharded model's on the global batch. Squares are summed over exactly the mesh
    dimensions a tensor is split along (not over HSDP's replicas, not over TP for a LayerNorm or a head
    replicated there): one all_reduce per such dimension on a logging step, none on the others."""
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch built without distributed")
    pytest.importorskip("torch.distributed.tensor.parallel")
    from torch.distributed import fsdp

    if not hasattr(fsdp, "fully_shard"):
        pytest.skip("this torch has no FSDP2 fully_shard")
    _spawn4(_mesh_worker, ["hsdp", "fsdp_tp", "tp"], str(tmp_path))


# ---------------------------------------------------------------------------------------------- transformer
class _Attention(nn.Module):
    """Causal self-attention that reads its head count from the local width (tensor parallel splits heads)."""

    def __init__(self, dim: int, head_dim: int) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(dim, dim, bias=False) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t = x.shape[:2]
        q, k, v = (w(x).view(b, t, -1, self.head_dim).transpose(1, 2) for w in (self.wq, self.wk, self.wv))
        y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.wo(y.transpose(1, 2).reshape(b, t, -1))


class _Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = _Attention(dim, head_dim=4)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class _GPT(nn.Module):
    """A small pre-LN decoder: embedding, 2 blocks (2 residual merges each), final norm, head."""

    def __init__(self, vocab: int = 32, dim: int = 16, depth: int = 2) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(_Block(dim) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.emb(idx)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def _tensor_parallel(model: _GPT, mesh, sequence: bool) -> None:
    """torchtitan's plan: Colwise q/k/v and MLP in, Rowwise out; with ``sequence`` the residual stream and the
    norms are split along the sequence (SequenceParallel), else replicated over the TP ranks."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    stream = Shard(1) if sequence else Replicate()
    top = {"emb": RowwiseParallel(input_layouts=Replicate(), output_layouts=stream),
           "head": ColwiseParallel(input_layouts=stream, output_layouts=Replicate())}
    if sequence:
        top["norm"] = SequenceParallel()
    parallelize_module(model, mesh, top)
    for block in model.blocks:
        plan = {
            "attn": PrepareModuleInput(input_layouts=(stream,), desired_input_layouts=(Replicate(),)),
            "attn.wq": ColwiseParallel(), "attn.wk": ColwiseParallel(), "attn.wv": ColwiseParallel(),
            "attn.wo": RowwiseParallel(output_layouts=stream),
            "mlp": PrepareModuleInput(input_layouts=(stream,), desired_input_layouts=(Replicate(),)),
            "mlp.0": ColwiseParallel(), "mlp.2": RowwiseParallel(output_layouts=stream),
        }
        if sequence:
            plan.update({"ln1": SequenceParallel(), "ln2": SequenceParallel()})
        parallelize_module(block, mesh, plan)


def _transformer_worker(rank: int, layout: str, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import gradwatch

    ref, model = _GPT().double(), _GPT()
    if layout == "tp_sp":  # tensor + sequence parallel over all 4 ranks: LayerNorm gradients are Partial
        mesh = init_device_mesh("cpu", (4,), mesh_dim_names=("tp",))
        _tensor_parallel(model, mesh, sequence=True)
        dp_rank, dp_size = 0, 1
    elif layout == "hsdp":
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        dp_rank, dp_size = rank, 4
    else:  # FSDP over "dp" x tensor parallel over "tp", with or without sequence parallel
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
        _tensor_parallel(model, mesh["tp"], sequence=layout == "fsdp_tp_sp")
        for block in model.blocks:
            fully_shard(block, mesh=mesh["dp"])
        fully_shard(model, mesh=mesh["dp"])
        dp_rank, dp_size = mesh.get_local_rank("dp"), 2
    opt, ref_opt = torch.optim.SGD(model.parameters(), lr=0.1), torch.optim.SGD(ref.parameters(), lr=0.1)
    mon = gradwatch.Monitor(model, optimizer=opt, every=2, strict=True, log_dir=os.path.join(out, f"rank{rank}"))
    ref_mon = gradwatch.Monitor(ref, optimizer=ref_opt, every=2, strict=True)
    g = torch.Generator().manual_seed(1)
    for step in range(4):
        idx, target = torch.randint(0, 32, (8, 8), generator=g), torch.randint(0, 32, (8, 8), generator=g)
        part = slice(8 // dp_size * dp_rank, 8 // dp_size * (dp_rank + 1))
        nn.functional.cross_entropy(model(idx[part]).flatten(0, 1), target[part].flatten()).backward()
        nn.functional.cross_entropy(ref(idx).flatten(0, 1), target.flatten()).backward()
        with _all_reduces() as calls:
            opt.step()
        # one per mesh dimension split along (the flow norms ride along when those reach every rank, else
        # one more over the world), one for Partial gradients; on the first logging step one per
        # model-parallel dimension reads whether the residual stream is replicated or split there
        per_step = 2  # hsdp: shard dim + the flow over the world; the others: dp + tp dims (flow rides) or tp + Partial
        first = (0 if layout == "hsdp" else 1) + 1  # + the self-check's verdict
        expected = 0 if step % 2 else per_step + (first if step == 0 else 0)
        assert len(calls) == expected, f"{layout}: step {step} made {len(calls)} all_reduce calls"
        ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
    mon.close()
    assert not mon.errors, mon.errors
    assert [r.verified for r in mon.records] == [True, True], layout  # the self-check ran and passed
    blocks = set(mon.history().query("metric == 'skip_share'").name)
    assert len(blocks) == 4, blocks  # 2 merges per transformer block
    want = ref_mon.history().set_index(["step", "name", "metric"]).value
    got = mon.history().set_index(["step", "name", "metric"]).value
    assert set(got.index) == set(want.index), (layout, sorted(set(got.index) ^ set(want.index))[:5])
    assert set(got.index.get_level_values("metric")) >= {"skip_grad", "branch_grad", "update_to_weight"}
    err = ((got - want.reindex(got.index)).abs() / want.reindex(got.index).abs().clip(lower=1e-12))
    # an update is a difference of float32 weights near 1 (LayerNorm): it carries ~1e-7 / lr*grad of
    # rounding, as the unsharded float32 model's would
    update = err.index.get_level_values("metric") == "update_to_weight"
    assert err[~update].max() < RTOL, f"{layout}: off by {err[~update].max():.2e} at {err[~update].idxmax()}"
    assert err[update].max() < 1e-4, f"{layout}: update off by {err[update].max():.2e} at {err[update].idxmax()}"


@pytest.mark.slow
def test_transformer_block_flow_and_layers_equal_the_unsharded_model(tmp_path):
    """A pre-LN transformer on 4 gloo processes: FSDP x tensor parallel with sequence parallel (the residual
    stream split along the sequence over TP: summed there) and without (replicated over TP: counted once),
    HSDP (every rank its own micro-batch), and tensor + sequence parallel alone (LayerNorm gradients Partial).
    Every layer's norms and ratios and every merge's flow norms equal the float64 unsharded model's on the
    global batch; the all_reduce calls per logging step are counted."""
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch built without distributed")
    pytest.importorskip("torch.distributed.tensor.parallel")
    from torch.distributed import fsdp

    if not hasattr(fsdp, "fully_shard"):
        pytest.skip("this torch has no FSDP2 fully_shard")
    _spawn4(_transformer_worker, ["fsdp_tp_sp", "fsdp_tp", "hsdp", "tp_sp"], str(tmp_path))


# ---------------------------------------------------------------------------------------------- the self-check
def _unsynced_worker(rank: int, init: str, out: str) -> None:
    import logging

    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    import gradwatch
    from gradwatch.measure.layers import select_parameters
    from gradwatch.measure.selfcheck import SelfCheck

    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2)
    errors: list[str] = []
    handler = logging.Handler(logging.ERROR)
    handler.emit = lambda r: errors.append(r.getMessage())
    logging.getLogger("gradwatch").addHandler(handler)
    try:
        torch.manual_seed(0)
        # Only the first layer is sharded; the head stays a plain tensor that nothing synchronises (no DDP, no
        # fully_shard over the root), so each rank's head gradient is its own batch's: the record holds rank 0's
        # value, which is not rank 1's. A real mistake (a module left out of the wrapping), and a real mismatch.
        model = nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 1))
        fully_shard(model[0])
        mon = gradwatch.Monitor(model, every=1, blocks=None, log_dir=os.path.join(out, f"rank{rank}"))
        g = torch.Generator().manual_seed(rank)  # each rank its own batch
        for step in range(3):
            nn.functional.mse_loss(model(torch.randn(4, 10, generator=g)), torch.randn(4, 1, generator=g)).backward()
            with _all_reduces() as calls:
                mon.step()
            # step 0: the values' one all_reduce, the verdict's, and the per-layer errors' (on a mismatch only)
            assert len(calls) == (3 if step == 0 else 1), f"step {step} made {len(calls)} all_reduce calls"
            model.zero_grad()
        mon.close()
        assert not mon.errors, mon.errors
        assert [r.verified for r in mon.records] == [False] * 3  # every record of the run, on every rank
        if rank == 0:  # one error, from rank 0, naming the layout and the one layer that disagrees
            assert len(errors) == 1, errors
            msg = errors[0]
            assert "self-check FAILED at step 0" in msg and "mesh (2,): (Shard(dim=0)) x2; 2 plain tensors" in msg
            assert "Layers that disagree: 2 (off by" in msg and "0 (off by" not in msg, msg
            assert "differ between ranks" in msg, msg
        else:
            assert errors == []

        # The check's own entry point, given a record whose sharded layer reads sqrt(2) too high (what HSDP's
        # replicas did before gradwatch reduced over the right mesh dimension): the same batch on both ranks
        # now, so only that layer disagrees, and on rank 0 too; the gradients carry a loss scale of 1024, which
        # the check divides out (else the other layer would be 1023x off as well).
        def raise_it(where, err):
            raise err

        x = torch.randn(4, 10, generator=torch.Generator().manual_seed(7))
        model(x).square().mean().backward()
        full = [p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad for p in model.parameters()]
        truth = [float(torch.cat([g.double().flatten() for g in pair]).norm()) for pair in (full[:2], full[2:])]
        wrong = gradwatch.StepRecord.build(9, ["0", "2"], {"grad_norm": [truth[0] * 2 ** 0.5, truth[1]]},
                                           {"grad_norm": 0.0})
        check, selection, errors[:] = SelfCheck(raise_it), select_parameters(model), []
        with torch.no_grad():  # gradients still carrying an AMP loss scale: divided out, as the monitor does
            for p in model.parameters():
                p.grad.mul_(1024.0)
        check.begin(selection, 9, range(len(selection.params)), grad_scale=torch.tensor(1024.0))
        assert check.finish(wrong).verified is False and check.finish(wrong).verified is False  # and it stays
        if rank == 0:
            assert len(errors) == 1 and "0 (off by 0.414" in errors[0] and "2 (off by" not in errors[0], errors
            assert "does not fit this layout" in errors[0]
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_the_self_check_names_the_layer_whose_gradients_differ_between_ranks_and_marks_the_run(tmp_path, events):
    """A plain layer's gradient left unsynchronised beside an FSDP2 layer: the record holds rank 0's value and
    torch's norm on rank 1 disagrees. One error on rank 0 names the layout and that layer (not the sharded one,
    which agrees), every record on every rank says ``verified=False``, and TensorBoard's health section carries
    ``unverified`` on every step. Then the check alone, on a record whose sharded layer is sqrt(2) too high:
    that layer is named, as gradwatch's fault. (The 4-process mesh tests and the FSDP2 test assert it passes.)"""
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch built without distributed")
    from torch.distributed import fsdp

    if not hasattr(fsdp, "fully_shard"):
        pytest.skip("this torch has no FSDP2 fully_shard")
    spawn(_unsynced_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    scalars = events(str(tmp_path / "rank0"))["scalars"]
    assert scalars["_gradwatch/0_unverified"] == {0: 1.0, 1: 1.0, 2: 1.0}
    assert set(scalars["zz_gradwatch.health/4_grad_norm_log10"]) == {0, 1, 2}  # the values are still written, marked


# ---------------------------------------------------------------------------------------------- pipeline parallel
class _Residual(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm, self.fc = nn.LayerNorm(dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc(torch.relu(self.norm(x)))


def _piped() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 16), *(_Residual(16) for _ in range(4)), nn.Linear(16, 1))


def _pipeline_worker(rank: int, init: str, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.pipelining import PipelineStage, ScheduleGPipe

    import gradwatch

    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2)
    try:
        ref = _piped().double()
        stage_module = _piped()  # stage 0: the input layer and 2 blocks; stage 1: 2 blocks and the head
        for name in [n for n in stage_module._modules if (int(n) < 3) != (rank == 0)]:
            del stage_module._modules[name]  # the names stay the full model's (torchtitan's split does the same)
        schedule = ScheduleGPipe(PipelineStage(stage_module, rank, 2, torch.device("cpu")), n_microbatches=2,
                                 loss_fn=nn.functional.mse_loss)
        opt = torch.optim.SGD(stage_module.parameters(), lr=0.1)
        ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
        # plain stage modules carry no sign that every rank runs a monitor (no DDP, no DTensor): say so
        mon = gradwatch.Monitor(stage_module, optimizer=opt, every=1, strict=True, sync_ranks=True,
                                log_dir=os.path.join(out, f"rank{rank}"))
        ref_mon = gradwatch.Monitor(ref, optimizer=ref_opt, every=1, strict=True)
        g = torch.Generator().manual_seed(1)
        for _ in range(3):
            x, y = torch.randn(8, 10, generator=g), torch.randn(8, 1, generator=g)
            if rank == 0:
                schedule.step(x)
            else:
                schedule.step(target=y)
            # the reference as GPipe runs it: both micro-batches forward, then both backward, then the
            # gradients divided by the number of micro-batches (the schedule's scale_grads; block flow, like
            # gradient accumulation, reads the last micro-batch's activation gradients, unscaled)
            outs = [ref(half.double()) for half in x.chunk(2)]
            for o, t in zip(outs, y.chunk(2)):
                nn.functional.mse_loss(o, t.double()).backward()
            for p in ref.parameters():
                p.grad /= 2
            with _all_reduces() as calls:
                opt.step()
            # the flow norms need no sum (one rank per stage); the stages' records: one all_reduce (the first
            # step also broadcasts each stage's names once)
            assert len(calls) == 1, f"step {_}: {len(calls)} all_reduce calls"
            ref_opt.step()
            opt.zero_grad()
            ref_opt.zero_grad()
        mon.close()
        assert not mon.errors, mon.errors
        want = ref_mon.history().set_index(["step", "name", "metric"]).value
        got = mon.history().set_index(["step", "name", "metric"]).value
        # every rank's record holds both stages, in model order
        assert list(mon.records[-1].layers) == list(ref_mon.records[-1].layers)
        assert list(mon.records[-1].blocks) == list(ref_mon.records[-1].blocks) == ["1", "2", "3", "4"]
        assert set(got.index) == set(want.index), (rank, sorted(set(got.index) ^ set(want.index))[:5])
        err = ((got - want.reindex(got.index)).abs() / want.reindex(got.index).abs().clip(lower=1e-12))
        update = err.index.get_level_values("metric") == "update_to_weight"
        assert err[~update].max() < RTOL, f"rank {rank}: off by {err[~update].max():.2e} at {err[~update].idxmax()}"
        assert err[update].max() < 1e-4, f"rank {rank}: update off by {err[update].max():.2e} at {err[update].idxmax()}"
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_pipeline_stages_join_into_one_record_of_the_whole_model(tmp_path, events):
    """``torch.distributed.pipelining`` with 2 stages on 2 gloo processes (``ScheduleGPipe``, 2 micro-batches):
    each rank's monitor measures its stage; every rank's record holds both stages' layers and blocks in model
    order, equal to the float64 unsharded model's, with one all_reduce per logging step; rank 0 writes it."""
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch built without distributed")
    pytest.importorskip("torch.distributed.pipelining")
    spawn(_pipeline_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    series = events(str(tmp_path / "rank0"))["series"]
    assert {"zz_gradwatch.layers/grad_norm/0", "zz_gradwatch.layers/grad_norm/5"} <= set(series)  # both stages
    assert not (tmp_path / "rank1").exists()
