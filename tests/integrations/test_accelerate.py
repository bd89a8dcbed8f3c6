"""gradwatch in a raw Accelerate loop, 2 real processes (gloo, CPU): measured once per optimizer step after
gradient accumulation and the cross-process sync, the unwrapped model's names, rank 0 alone writes."""

from __future__ import annotations

import json
import os

import pytest
import torch
from helpers.webhook_server import free_port
from helpers.processes import spawn

pytest.importorskip("accelerate")


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2")
    import torch.nn.functional as F
    from accelerate import Accelerator
    from torch import nn

    from gradwatch.integrations.accelerate import watch

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model, opt = accelerator.prepare(model, opt)
    log_dir = os.path.join(out, f"rank{rank}")
    mon = watch(accelerator, model, opt, log_dir=log_dir, every=1, rules=False)
    reference = []  # global grad norm where the torch optimizer steps (after accumulation and all-reduce)
    opt.optimizer.register_step_pre_hook(lambda o, a, k: reference.append(
        float(torch.sqrt(sum(p.grad.double().square().sum() for g in o.param_groups for p in g["params"])))))
    g = torch.Generator().manual_seed(rank)
    for _ in range(4):  # 4 micro-batches = 2 optimizer steps
        x, y = torch.randn(8, 8, generator=g), torch.randint(0, 3, (8,), generator=g)
        with accelerator.accumulate(model):
            accelerator.backward(F.cross_entropy(model(x), y))
            opt.step()
            opt.zero_grad()
    mon.close()
    hist = mon.history()
    glob = hist[(hist.name == "_global") & (hist.metric == "grad_norm")]
    with open(os.path.join(out, f"result{rank}.json"), "w") as f:
        json.dump({"steps": glob.step.tolist(), "values": glob.value.tolist(), "reference": reference,
                   "names": sorted(set(hist.name))}, f)
    accelerator.end_training()


@pytest.mark.slow
def test_two_processes_accumulate_sync_and_rank0_writes(tmp_path):

    spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=2)
    res = [json.loads((tmp_path / f"result{r}.json").read_text()) for r in (0, 1)]
    for r in res:
        assert r["steps"] == [0, 1] and len(r["reference"]) == 2  # once per optimizer step, not per micro-batch
        assert r["values"] == pytest.approx(r["reference"], rel=1e-5)
        assert r["names"] == ["0", "2", "_global"]  # the unwrapped model's names: no "module." prefix
    assert res[0]["values"] == pytest.approx(res[1]["values"], rel=1e-6)  # gradients synced across processes
    assert any((tmp_path / "rank0").glob("events.out.tfevents.*"))
    assert not (tmp_path / "rank1").exists()  # only the main process writes
