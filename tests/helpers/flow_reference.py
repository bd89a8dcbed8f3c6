"""Independent reference for block flow tests: per-path contributions to dL/d(fork) by detaching the other path.

Each reference block is re-expressed as ``after(branch(f) + skip(f))`` over its fork ``f`` using the block's own
layers; the contribution through one path is ``torch.autograd.grad`` of the loss with the other path fed a
detached copy of ``f``. No gradwatch code is involved.
"""

from __future__ import annotations

import torch
from torch import nn

from gradwatch import flow
from gradwatch.reference import blocks as B


def block_parts(block: nn.Module, x: torch.Tensor):
    """``(fork, skip, branch, after)`` for a reference block applied to ``x``."""
    relu = block.relu
    if isinstance(block, B.Bottleneck):
        branch = lambda t: block.bn3(block.conv3(relu(block.bn2(block.conv2(relu(block.bn1(block.conv1(t))))))))
        return x, (lambda t: block._skip(t, t)), branch, relu
    if isinstance(block, B.BasicBlock):
        branch = lambda t: block.bn2(block.conv2(relu(block.bn1(block.conv1(t)))))
        return x, (lambda t: block._skip(t, t)), branch, relu
    if isinstance(block, (B.PreActBasicBlock, B.PreActBottleneck)):
        pre = lambda t: relu(block.bn1(t))
        if isinstance(block, B.PreActBottleneck):
            body = lambda p: block.conv3(relu(block.bn3(block.conv2(relu(block.bn2(block.conv1(p)))))))
        else:
            body = lambda p: block.conv2(relu(block.bn2(block.conv1(p))))
        if block.projects:  # the projection reads relu(bn1(x)): the paths fork there
            return pre(x), (lambda p: block._skip(None, p)), body, (lambda y: y)
        return x, (lambda t: block._skip(t, None)), (lambda t: body(pre(t))), (lambda y: y)
    raise TypeError(type(block).__name__)


def contributions(parts_fn, x: torch.Tensor, downstream):
    """dL/df through the skip, through the branch, and in total, with ``downstream(out) -> loss``.

    ``parts_fn(x) -> (fork, skip, branch, after)``.
    """
    fork, skip, branch, after = parts_fn(x)
    f = fork.detach().requires_grad_(True)

    def loss(fs, fb):
        return downstream(after(branch(fb) + skip(fs)))

    total = torch.autograd.grad(loss(f, f), f)[0]
    through_skip = torch.autograd.grad(loss(f, f.detach()), f, allow_unused=True)[0]
    through_branch = torch.autograd.grad(loss(f.detach(), f), f)[0]
    if through_skip is None:  # a detached skip
        through_skip = torch.zeros_like(f)
    return through_skip, through_branch, total


def flow_values(mon, step: int = 0) -> dict[str, dict[str, float]]:
    """{block name: {metric: value}} of ``mon``'s block-flow metrics at ``step``, from its history."""
    hist = mon.history()
    rows = hist[(hist.step == step) & hist.metric.isin(flow.FLOW_METRICS)]
    out: dict[str, dict[str, float]] = {}
    for name, metric, value in zip(rows.name, rows.metric, rows.value):
        out.setdefault(name, {})[metric] = value
    return out
