"""Pipeline parallel: each stage's ranks measure their part of the model; every rank's record holds them all.

Under ``torch.distributed.pipelining`` each rank builds its monitor on its own stage module, so ranks measure
different layers and blocks. Stages are found once, on the first logging step, from what each rank measures:
ranks with the same selected layers are one stage (its data- or tensor-parallel peers), ranks with other
names are other stages. Finding them costs one ``all_gather`` of a 64-bit fingerprint of the selected layers' names, and, only
when they differ, one process group per stage (every rank creates every group, in the same order, as torch
requires) and, at the first merge, each stage's names broadcast by its first rank.

Then on each logging step :meth:`Stages.merge` joins the stages' records with ONE ``all_reduce`` of a vector
laid out stage after stage, each segment filled by its stage's first rank and zeros elsewhere: the layers and
blocks of every stage, in stage order, and the whole-model figures from each stage's squared sums. Stage
order is rank order (the usual mesh puts the pipeline dimension outermost, stage ``s`` on lower ranks than
stage ``s + 1``). When a rank's names change (blocks found again), its segment is sent empty with a flag,
and all ranks exchange names again before merging: nothing is merged under stale names.

Within a stage, the flow norms are summed over the stage's own group (:attr:`Stages.group`), never over the
world: other stages measure other blocks.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ..names import FLOW_METRICS
from ..record import StepRecord

log = logging.getLogger("gradwatch")

__all__ = ["Stages"]

_Names = tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...], tuple[str, ...]]  # layers, metrics, blocks, kinds


class Stages:
    """The pipeline stages of a run (one stage when there is no pipeline: then nothing is merged)."""

    def __init__(self) -> None:
        self.found = False
        self.pipeline = False
        self.group: Any = None  # this stage's process group (None: the world)
        self.size = 0  # ranks in this stage
        self._names: _Names | None = None  # what this rank sent at the last exchange
        self._stages: list[_Names] = []  # every stage's names, in stage order
        self._mine = 0
        self._first = True
        self._firsts: list[int] = []  # the first rank of each stage: it sends the stage's names and values
        self._prefix: list[str] = []

    def find(self, layers: tuple[str, ...], device: torch.device) -> None:
        """Whether ranks measure different parts of the model (collective: every rank calls it once).

        ``layers``: every layer the monitor selected, whether or not it has a gradient yet. Only these: they
        follow from the module each rank was given, the same on every data- or tensor-parallel rank, while the
        blocks are found as each rank's forward runs and a rank may not have them yet (two DDP ranks read as two
        pipeline stages when the blocks were in the fingerprint)."""
        self.found = True
        world, rank = dist.get_world_size(), dist.get_rank()
        prints = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world)]
        dist.all_gather(prints, torch.tensor([_fingerprint(layers)], dtype=torch.int64, device=device))
        keys = [int(p.item()) for p in prints]
        self.size = keys.count(keys[rank])
        if len(set(keys)) == 1:
            return
        self.pipeline = True
        distinct = list(dict.fromkeys(keys))
        members = [[r for r in range(world) if keys[r] == k] for k in distinct]
        self._mine = distinct.index(keys[rank])
        self._first = members[self._mine][0] == rank
        self._firsts = [m[0] for m in members]
        groups = [dist.new_group(m) for m in members]  # collective: every rank, every group, same order
        self.group = groups[self._mine]
        log.info("gradwatch: %d pipeline stages found (ranks %s); every record holds all of them",
                 len(members), "; ".join(",".join(map(str, m)) for m in members))

    def merge(self, record: StepRecord, kinds: dict[str, str]) -> StepRecord:
        """``record`` (this stage's) joined with every other stage's: one collective per logging step."""
        if not self.pipeline:
            return record
        names = (record.layers, record.layer_metrics, record.blocks,
                 tuple(kinds.get(n, "other") for n in record.layers))
        if not self._stages:  # the first merge of the run, on every rank: no names known yet
            self._exchange(names)
        values = self._reduce(record, names)
        if values[-1] > 0:  # a rank's names changed since: exchange names, merge again
            self._exchange(names)
            values = self._reduce(record, names)
        return self._record(record, values)

    def _reduce(self, record: StepRecord, names: _Names) -> np.ndarray:
        """The vector of every stage's values, laid out by the names of the last exchange (the same on every
        rank, so the vectors match), this stage's segment from its first rank; the last entry counts the ranks
        whose names changed since."""
        changed = names != self._names
        parts = []
        for s, (layers, metrics, blocks, _) in enumerate(self._stages):
            if s == self._mine and self._first and not changed:
                parts.append(np.concatenate([record.layer_values.ravel(), _squares(record),
                                             record.block_values.ravel()]))
            else:
                parts.append(np.zeros(len(layers) * len(metrics) + _N_SQUARES + len(blocks) * len(FLOW_METRICS)))
        parts.append(np.asarray([float(changed)]))
        flat = torch.from_numpy(np.concatenate(parts)).to(device=self._device(record), dtype=torch.float64)
        dist.all_reduce(flat)
        return flat.cpu().numpy()

    def _exchange(self, names: _Names) -> None:
        """Every stage's names, broadcast by its first rank (collective): one broadcast per stage, not an
        all_gather_object, which would pad every rank's share to the largest and hand each rank the world
        times that (5.9 MB per rank for an 80-layer model on 1,024 GPUs)."""
        stages = []
        for first in self._firsts:
            box: list[Any] = [names if dist.get_rank() == first else None]
            dist.broadcast_object_list(box, src=first)
            stages.append(box[0])
        self._stages = stages
        self._names = names
        layers = [name for stage in self._stages for name in stage[0]]
        clash = len(set(layers)) != len(layers)  # stage modules built apart: "0", "1" on every stage
        self._prefix = [f"stage{s}." if clash else "" for s in range(len(self._stages))]

    def _record(self, record: StepRecord, values: np.ndarray) -> StepRecord:
        metrics = self._stages[0][1]  # one configuration: every stage measures the same metrics
        layers: list[str] = []
        blocks: list[str] = []
        kinds: list[str] = []
        tables, btables = [], []
        squares = np.zeros(_N_SQUARES)
        at = 0
        for s, (names, stage_metrics, stage_blocks, stage_kinds) in enumerate(self._stages):
            n = len(names) * len(stage_metrics)
            table = values[at:at + n].reshape(len(names), len(stage_metrics))
            squares += values[at + n:at + n + _N_SQUARES]
            at += n + _N_SQUARES
            nb = len(stage_blocks) * len(FLOW_METRICS)
            btables.append(values[at:at + nb].reshape(len(stage_blocks), len(FLOW_METRICS)))
            at += nb
            tables.append(np.column_stack([table[:, stage_metrics.index(m)] if m in stage_metrics
                                           else np.full(len(names), np.nan) for m in metrics]))
            layers += [self._prefix[s] + name for name in names]
            blocks += [self._prefix[s] + b for b in stage_blocks]
            kinds += list(stage_kinds)
        grad, weight, update = np.sqrt(squares)
        whole = {"grad_norm": grad, "weight_norm": weight, "grad_to_weight": _ratio(grad, weight),
                 "update_to_weight": _ratio(update, weight)}
        table, btable = np.vstack(tables), np.vstack(btables)
        merged = StepRecord.build(record.step, layers, {m: table[:, i] for i, m in enumerate(metrics)}, whole,
                                  blocks, {m: btable[:, i] for i, m in enumerate(FLOW_METRICS)} if blocks else None)
        # this stage's lost blocks, under the names the merged record gives them (other stages' are not sent)
        mine = self._prefix[self._mine] if self._mine is not None and self._mine < len(self._prefix) else ""
        lost = tuple(mine + b for b in record.lost if mine + b in blocks)
        return dataclasses.replace(merged, kinds=tuple(kinds), verified=record.verified, lost=lost)

    @staticmethod
    def _device(record: StepRecord) -> torch.device:
        # NCCL reduces device tensors only; gloo takes CPU ones
        backend = dist.get_backend()
        return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


_N_SQUARES = 3  # the whole model's gradient, weight and update norms, squared: summed over stages


def _squares(record: StepRecord) -> np.ndarray:
    """The stage's whole-model gradient, weight and update norms squared (update: 0 when not measured)."""
    weight = record.global_value("weight_norm")
    update = record.global_value("update_to_weight") * weight if "update_to_weight" in record.layer_metrics else 0.0
    return np.asarray([record.global_value("grad_norm") ** 2, weight ** 2, update ** 2])


def _ratio(num: float, den: float) -> float:
    return float(num / den) if den > 0 else float("nan")


def _fingerprint(layers: tuple[str, ...]) -> int:
    """A 63-bit digest of the names (Python's ``hash`` differs between processes)."""
    digest = hashlib.blake2b("\n".join(layers).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1
