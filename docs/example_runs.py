"""Make the runs whose first screens docs/dashboard.md shows (besides ``make demo``'s):

    python docs/example_runs.py runs/docs     # then: python docs/screenshots.py runs/docs/lightning ...

- ``lightning/``: a LightningModule that logs ``self.log("train_loss")`` and ``self.log("train_acc")``, with the
  default ``GradWatchCallback()`` and a ``TensorBoardLogger``: what a Lightning user's dashboard looks like.
- ``fault/resnet20_skip_lost_at_60/``: a ResNet-20 whose block 4 (``layer2.1``) loses its skip at step 60 of 120 (a ``.detach()`` planted
  mid-run): the incident card names the block and the step.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

import gradwatch
from gradwatch.reference.blocks import resnet, set_skip_fault
from gradwatch.reference.data import synthetic_images


def lightning_run(out: str, steps: int = 60) -> None:
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import TensorBoardLogger

    from gradwatch.integrations.lightning import GradWatchCallback

    x, y = synthetic_images(256, size=16, seed=0)

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = resnet(20, width=8)

        def training_step(self, batch, _):
            xb, yb = batch
            logits = self.net(xb)
            loss = F.cross_entropy(logits, yb)
            self.log("train_loss", loss)
            self.log("train_acc", (logits.argmax(1) == yb).float().mean())
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32, shuffle=True)
    trainer = pl.Trainer(max_steps=steps, logger=TensorBoardLogger(out, name="lightning", version=0),
                         callbacks=[GradWatchCallback()], log_every_n_steps=2, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(Module(), data)


def fault_run(out: str, steps: int = 120, at: int = 60) -> None:
    torch.manual_seed(0)
    x, y = synthetic_images(512, size=16, seed=0)
    model = resnet(20, width=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    with gradwatch.Monitor(model, optimizer=opt, every=2, log_dir=os.path.join(out, "fault", "resnet20_skip_lost_at_60")) as mon:
        for step in range(steps):
            if step == at:
                set_skip_fault(model, {4: "detached"})
            i = torch.randint(0, len(x), (32,))
            F.cross_entropy(model(x[i]), y[i]).backward()
            opt.step()
            opt.zero_grad()
    print("fault run: incidents", [(e.rule, e.name, e.step) for r in mon.records for e in r.events])


if __name__ == "__main__":
    torch.set_num_threads(1)
    root = sys.argv[1] if len(sys.argv) > 1 else "runs/docs"
    fault_run(root)
    lightning_run(root)
