"""The README's quickstarts run as written (the names they take as given are defined first); every `Trainer` in
the README and docs/*.md is bounded."""

from __future__ import annotations

import ast
import glob
import os
import re

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import gradwatch
from gradwatch.reference.blocks import resnet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme_blocks() -> list[str]:
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        return re.findall(r"```python\n(.*?)```", f.read(), re.S)


def _given() -> dict:
    """What the snippets assume the reader has: a model, its optimizer, data, a loss, a training loop."""
    torch.manual_seed(0)
    model = resnet(8, width=4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    data = TensorDataset(torch.randn(12, 3, 8, 8), torch.randint(0, 10, (12,)))
    loader = DataLoader(data, batch_size=4)

    def train(*args, **kwargs):
        for x, y in loader:
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
            optimizer.zero_grad()

    # gradwatch itself: the later snippets continue the first one, which imports it
    return {"model": model, "optimizer": optimizer, "loader": loader, "train_loader": loader,
            "loss_fn": F.cross_entropy, "train": train, "gradwatch": gradwatch}


def _lit_module(model):
    pl = pytest.importorskip("lightning.pytorch")

    class Lit(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = model

        def training_step(self, batch, i):
            x, y = batch
            return F.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    return Lit()


def test_the_readme_has_the_quickstarts():
    blocks = _readme_blocks()
    assert len(blocks) >= 3 and any("GradWatchCallback" in b for b in blocks)


@pytest.mark.parametrize("index", range(len(_readme_blocks())))
def test_each_readme_snippet_runs_as_written(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # they write runs/exp (and Lightning's logs) where they are run
    code = _readme_blocks()[index]
    ns = _given()
    if "lit_module" in code:
        ns["lit_module"] = _lit_module(ns["model"])
        code = code.replace("max_steps=100", "max_steps=3, enable_progress_bar=False")  # the one liberty: short
    exec(compile(code, f"README.md snippet {index}", "exec"), ns)
    if "Monitor(" in code:
        assert os.path.isdir(tmp_path / "runs" / "exp")
    if "history()" in code:
        assert list(ns["df"].columns) == ["step", "name", "metric", "value"] and len(ns["df"])


def _python_blocks(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return re.findall(r"```python\n(.*?)```", f.read(), re.S)


def _keywords(call: ast.Call) -> set[str]:
    return {k.arg for k in call.keywords if k.arg}


def _calls(tree: ast.AST, name: str) -> list[ast.Call]:
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call)
            and (getattr(n.func, "id", None) == name or getattr(n.func, "attr", None) == name)]


def test_every_trainer_in_the_docs_is_bounded():
    """A Lightning `Trainer()` without max_steps or max_epochs trains for 1,000 epochs: a reader pasting a
    snippet should get a run that ends. A Hugging Face `Trainer(args=...)` is bounded by its TrainingArguments."""
    unbounded, seen = [], 0
    for path in [os.path.join(ROOT, "README.md"), *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))]:
        for i, code in enumerate(_python_blocks(path)):
            tree = ast.parse(code)  # a snippet that does not parse is a broken snippet too
            for call in _calls(tree, "Trainer"):
                seen += 1
                if "args" in _keywords(call):  # transformers.Trainer
                    bounded = any({"max_steps", "num_train_epochs"} & _keywords(c)
                                  for c in _calls(tree, "TrainingArguments"))
                else:
                    bounded = bool({"max_steps", "max_epochs"} & _keywords(call))
                if not bounded:
                    unbounded.append(f"{os.path.relpath(path, ROOT)} block {i}: {ast.unparse(call)}")
    assert seen >= 4 and not unbounded, unbounded
