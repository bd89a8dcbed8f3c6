"""What block flow knows about the model: its residual blocks, their names and depth order, what each module's
examination concluded, and why flow is or is not measured (:class:`FlowStatus`).

Bookkeeping only: nothing here registers a hook or keeps a graph node (a merge is kept as its
:class:`~gradwatch.flow.discovery.MergePattern`). Modules are keyed by ``id(module)``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..names import ROOT_NAME, clean_name
from .discovery import MergePattern, Resolved, resolve

log = logging.getLogger("gradwatch")

#: What to do about reentrant checkpointing, said in the flow status and the one-time warning.
CHECKPOINT_FIX = ("use non-reentrant checkpointing: model.gradient_checkpointing_enable(gradient_checkpointing_kwargs="
                  "{'use_reentrant': False}) in transformers, torch.utils.checkpoint.checkpoint(..., use_reentrant=False)")

__all__ = ["Block", "Blocks", "FlowStatus", "BlockRegistry"]


@dataclass(frozen=True)
class Block:
    """One residual merge found in the model (what :meth:`Monitor.describe` lists).

    Attributes:
        name: its name in ``history()`` and TensorBoard (``<metric>/<name>``): the module's qualified name,
            with ``[i]`` appended (``h.0[0]``, ``h.0[1]``) when one module holds several merges.
        module: qualified name of the module whose forward creates the merge.
        kind: ``identity`` (the skip only moves values: identity, slicing, zero-padding), ``projection``
            (learnable: 1x1 conv, linear, BN), ``scaled`` (a multiply/divide on the skip: gated or scaled
            skips) or ``other``.
        index: depth order, 0 nearest the input.
        skip: the skip path's ops from fork to merge (``""`` for an identity skip), e.g.
            ``"Slice>Slice>ConstantPadNd"`` or ``"Convolution>NativeBatchNorm"``.
        found: ``"auto"`` (graph discovery), ``"watch"`` (explicitly watched module) or ``"sibling"``
            (matched against a block of the same class because its own skip carried no gradient).
        note: anything unusual, e.g. ``"skip carries no gradient"``.
        branches: the sum's operands besides the skip: 1 for ``x + F(x)``, n - 1 for an n-way merge
            ``x + attn(ln x) + mlp(ln x)`` (``skip_share`` sets the skip against all branches together).
        lost: the step at which the merge disappeared from the module's graph while the module still ran
            (``out = branch(x)`` instead of ``x + branch(x)``), None while it merges. A lost block keeps its
            name and depth index; it is measured as a block whose skip carries nothing (``skip_grad`` 0,
            ``branch_grad`` the gradient its forward sends to its input) and is listed in
            :attr:`gradwatch.StepRecord.lost` (the ``lost_skip`` rule).
        calls: for a module run several times in one forward (a weight-shared layer): which call this
            block is (0, 1, ...); None for a module run once.
    """

    name: str
    module: str
    kind: str
    index: int
    skip: str
    found: str
    note: str = ""
    branches: int = 1
    lost: int | None = None
    calls: int | None = None

    def __str__(self) -> str:
        skip = self.skip or "-"
        note = f"  ({self.note})" if self.note else ""
        return f"{self.index:>4}  {self.name:<28} {self.kind:<10} {skip}{note}"


class Blocks(list):
    """A list of :class:`Block` that prints as a table (followed by the flow status, when known).

    Where a user treats it as text it is its table: ``"blocks:\n" + mon.describe()``, ``text += blocks`` and
    ``f"{blocks:>40}"`` give strings; as a list (``len``, indexing, iteration, ``+`` another list) it is the
    blocks.
    """

    status: FlowStatus | None = None

    def __add__(self, other):
        if isinstance(other, str):
            return str(self) + other
        return super().__add__(other)

    def __radd__(self, other: object) -> str:
        if isinstance(other, str):
            return other + str(self)
        return NotImplemented

    def __iadd__(self, other):
        if isinstance(other, str):  # list's += would append the text's characters as items
            return str(self) + other
        return super().__iadd__(other)

    def __format__(self, spec: str) -> str:
        return format(str(self), spec)

    def __str__(self) -> str:
        lines = []
        if self:
            lines.append(f"{'idx':>4}  {'name':<28} {'kind':<10} skip path (fork > merge)")
            lines.extend(str(b) for b in self)
        if self.status is not None:
            lines.append(f"block flow: {self.status}")
        elif not self:
            lines.append("no residual blocks found")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.__str__()


@dataclass(frozen=True)
class FlowStatus:
    """Whether block flow is being measured, and if not, why.

    ``state`` is one of ``"off"`` (``blocks=None``), ``"waiting"`` (no training forward on a logging step
    yet), ``"ok"``, ``"partial"`` (some regions cannot be measured: ``unavailable`` lists them),
    ``"unavailable"`` (nothing can be measured) or ``"none"`` (no residual merge in the model).
    """

    state: str
    reason: str
    blocks: int = 0
    unavailable: tuple[str, ...] = ()

    @property
    def available(self) -> bool:
        """Whether block flow is measured, at least in part (``ok`` or ``partial``)."""
        return self.state in ("ok", "partial")

    def __str__(self) -> str:
        return f"{self.state}: {self.reason}"


@dataclass
class _Entry:
    """A merge the probe knows: where it is (pattern) and how it is presented (block)."""

    pattern: MergePattern
    block: Block
    key: tuple  # sort key for the depth index
    measured: bool = False  # armed on a logging step at least once (only a measured block can be lost)


class BlockRegistry:
    """The merges found so far, per module, their names and depth index, and what each examination concluded.

    :class:`~gradwatch.flow.FlowProbe` owns one; it decides when modules are examined and hooked, the registry
    remembers the outcome. Attributes (all keyed by module id):

    - ``explicit``: watched modules -> the name given to ``watch`` (None: their qualified name);
    - ``entries``: modules with merges -> their :class:`_Entry` list; ``index``: all entries in depth order;
    - ``exam``: examined modules -> ``(session number, completion order)``, the depth key of their merges;
    - ``plain``: examined modules without a merge (candidates for sibling matching);
    - ``names`` / ``modules``: the model's tree as of the last :meth:`scan`;
    - ``compiled``: names of compiled regions, in the order they were seen (flow cannot be measured there);
    - ``checkpointed``: names of the innermost modules whose graph holds a reentrant checkpoint and no merge.
    """

    def __init__(self) -> None:
        self.explicit: dict[int, str | None] = {}
        self.entries: dict[int, list[_Entry]] = {}
        self.modules: dict[int, nn.Module] = {}
        self.names: dict[int, str] = {}
        self.exam: dict[int, tuple[int, int]] = {}  # examined module id -> (session, completion order)
        self.plain: dict[int, nn.Module] = {}  # examined, no merge: candidates for sibling matching
        self.compiled: list[str] = []
        self._compiled_seen: set[str] = set()
        self.checkpointed: list[str] = []
        self.signature: tuple[int, ...] = ()  # module ids at the last scan: tells when the tree changed
        self.index: list[_Entry] = []
        #: modules run several times in one forward -> the entries of their calls 1, 2, ... (call 0: ``entries``)
        self.calls: dict[int, list[list[_Entry]]] = {}

    def __len__(self) -> int:
        return len(self.index)

    def name(self, mid: int) -> str:
        """Module ``mid``'s name as of the last :meth:`scan` (the root's name when unknown)."""
        return self.names.get(mid, ROOT_NAME)

    def blocks(self) -> Blocks:
        """The blocks found so far, in depth order (without status)."""
        return Blocks(e.block for e in self.index)

    def status(self) -> FlowStatus:
        """The status once discovery has run: what it found, and which compiled regions it could not walk."""
        n = len(self.index)
        compiled = tuple(self.compiled)
        if compiled:
            why = "compiled with torch.compile (CompiledFunctionBackward cannot be walked): " + ", ".join(compiled)
            if n:
                return FlowStatus("partial", f"{n} blocks measured; not measurable: {why}", n, compiled)
            return FlowStatus("unavailable", why, 0, compiled)
        hidden = self.hidden_by_checkpoints()
        if hidden:
            why = (f"reentrant activation checkpointing hides the blocks inside {', '.join(hidden)} "
                   f"(CheckpointFunctionBackward: the graph exists only while it is recomputed in backward); "
                   f"{CHECKPOINT_FIX}")
            if n:
                return FlowStatus("partial", f"{n} blocks measured; not measurable: {why}", n, hidden)
            return FlowStatus("unavailable", why, 0, hidden)
        if n:
            # most common first, ties in depth order (what pandas' value_counts gave)
            kinds = Counter(e.block.kind for e in self.index).most_common()
            text = ", ".join(f"{k}: {v}" for k, v in kinds)
            return FlowStatus("ok", f"{n} residual merges ({text})", n)
        return FlowStatus("none", "no residual merge found (an add whose operands both come from one tensor)")

    # ------------------------------------------------------------------ the model's tree
    def scan(self, named: Sequence[tuple[str, nn.Module]]) -> set[int]:
        """Name the modules of ``named`` (``model.named_modules()``), forget those no longer in it; returns
        the ids present."""
        self.signature = tuple(id(m) for _, m in named)
        present = {id(m) for _, m in named}
        self.names = {id(m): (clean_name(n) or ROOT_NAME) for n, m in named}
        self.modules = {id(m): m for _, m in named}
        for store in (self.entries, self.plain, self.exam, self.explicit, self.calls):
            for mid in [k for k in store if k not in present]:
                store.pop(mid)
        self._reindex()
        return present

    def note_compiled(self, name: str) -> None:
        """Note the compiled region ``name`` in :attr:`compiled`, once."""
        if name not in self._compiled_seen:
            self._compiled_seen.add(name)
            self.compiled.append(name)

    def note_compiled_graph(self, mid: int) -> None:
        """Module ``mid``'s graph reaches a compiled region and holds no merge: note the region under its name."""
        name = self.name(mid)
        inner = name == ROOT_NAME or any(c.startswith(name + ".") for c in self.compiled)
        if not (inner and self.compiled):
            self.note_compiled(name)  # only the innermost module around a compiled region

    def hidden_by_checkpoints(self) -> tuple[str, ...]:
        """The noted checkpointed modules with no block found inside: when a checkpoint recomputes through the
        modules' ``__call__`` (``torch.utils.checkpoint`` around a block), discovery sees the recompute and
        finds them; when it recomputes a bare ``forward`` (transformers' layers), nothing inside is seen."""
        def inside(region: str, module: str) -> bool:
            return region == ROOT_NAME or module == region or module.startswith(region + ".")
        return tuple(c for c in self.checkpointed if not any(inside(c, e.block.module) for e in self.index))

    def note_checkpointed_graph(self, mid: int) -> None:
        """Module ``mid``'s graph holds a reentrant checkpoint and no merge: note it, innermost modules only."""
        name = self.name(mid)
        if self.checkpointed and (name == ROOT_NAME or any(c == name or c.startswith(name + ".")
                                                           for c in self.checkpointed)):
            return  # an outer module of one noted already
        self.checkpointed.append(name)

    # ------------------------------------------------------------------ entries
    def set_entries(self, module: nn.Module, patterns: Sequence[MergePattern], keys: Sequence[tuple],
                    found: Sequence[str]) -> bool:
        """Replace ``module``'s merges; returns whether it has any (then its forward must arm them)."""
        mid = id(module)
        base = self.explicit.get(mid) or self.name(mid)
        many = len(patterns) > 1
        entries = []
        for i, (p, key, how) in enumerate(zip(patterns, keys, found)):
            note = "skip carries no gradient" if p.dead or how == "sibling" else ""
            block = Block(
                name=f"{base}[{i}]" if many else base,
                module=self.name(mid),
                kind=p.kind,
                index=-1,
                skip=p.skip_ops,
                found=how,
                note=note,
                branches=p.branches,
            )
            entries.append(_Entry(p, block, key))
        self._store(mid, entries)
        return bool(entries)

    def _store(self, mid: int, entries: list[_Entry]) -> None:
        """``mid``'s merges are now ``entries`` (its calls after the first are found again on their next run)."""
        self.calls.pop(mid, None)
        if entries:
            self.entries[mid] = entries
            self.plain.pop(mid, None)
        else:
            self.entries.pop(mid, None)
        self._harmonize()
        self._reindex()

    def call_entries(self, module: nn.Module, call: int, session: int, tick: int) -> list[_Entry]:
        """The entries of call ``call`` (>= 1) of ``module`` in one forward: its merges again, as blocks of their own
        named ``<name>@<call>`` (the first call's become ``<name>@0``), placed in depth order where that call
        completed (``tick`` of session ``session``; met on the first logging step, as usual, that is the session
        that examined every module, so the calls interleave with the other blocks as they ran)."""
        mid = id(module)
        first = self.entries[mid]
        calls = self.calls.setdefault(mid, [])
        if not calls:
            for e in first:
                if e.block.calls is None:
                    e.block = dataclasses.replace(e.block, name=f"{e.block.name}@0", calls=0)
        while len(calls) < call:
            c = len(calls) + 1
            key_base = (session, tick)  # where this call completed in this session's forward
            calls.append([_Entry(e.pattern, dataclasses.replace(e.block, name=f"{e.block.name.rsplit('@', 1)[0]}@{c}",
                                                                calls=c, lost=None, note=e.block.note),
                                 key_base + e.key[2:]) for e in first if e.block.lost is None])
            self._reindex()
        return calls[call - 1]

    def rediscovered(self, module: nn.Module, patterns: Sequence[MergePattern], keys: Sequence[tuple],
                     found: Sequence[str], step: int | None) -> bool:
        """``module`` was examined again (its graph no longer matched): keep what still merges under its old name
        and depth index, add what is new, and mark *lost* (at ``step``) each measured block whose merge is gone.
        Blocks never measured are dropped, as before. Returns whether the module has any entries."""
        mid = id(module)
        old = self.entries.get(mid, [])
        if not any(e.measured or e.block.lost is not None for e in old):
            return self.set_entries(module, patterns, keys, found)
        left = list(old)
        matched: list[_Entry | None] = []
        for p in patterns:
            # the same merge; else the same branch seen from its merge (the graph around it moved: a sibling
            # merge of the module was lost); else one of the same kind
            e = next((e for e in left if e.pattern == p), None) or next(
                (e for e in left if (e.pattern.consumers, e.pattern.skip_edge) == (p.consumers, p.skip_edge)),
                None) or next((e for e in left if (e.pattern.kind, e.pattern.skip_ops, e.pattern.branches)
                               == (p.kind, p.skip_ops, p.branches)), None)
            if e is not None:
                left.remove(e)
            matched.append(e)
        for i, e in enumerate(matched):  # a merge that changed form (a dead skip repaired): the same block
            if e is None and left:
                matched[i] = left.pop(0)
        base = self.explicit.get(mid) or self.name(mid)
        names = {e.block.name for e in old}
        entries = []
        for p, key, how, e in zip(patterns, keys, found, matched):
            if e is not None:
                if e.block.lost is not None:
                    log.info("gradwatch: %s: its residual merge is back", e.block.name)
                block = dataclasses.replace(e.block, kind=p.kind, skip=p.skip_ops, branches=p.branches, lost=None,
                                            found=how, note="skip carries no gradient" if p.dead else "")
                entries.append(_Entry(p, block, e.key, e.measured))
                continue
            name = base if base not in names else next(f"{base}[{i}]" for i in range(len(old) + len(patterns) + 1)
                                                       if f"{base}[{i}]" not in names)
            names.add(name)
            entries.append(_Entry(p, Block(name, self.name(mid), p.kind, -1, p.skip_ops, how, branches=p.branches),
                                  key))
        for e in left:
            if not (e.measured or e.block.lost is not None):
                continue
            if e.block.lost is None:
                log.warning("gradwatch: %s: its residual merge is gone from the graph at step %s while the module "
                            "still runs (out = branch(x)?); measured from now on as a block whose skip carries "
                            "nothing", e.block.name, step)
            at = e.block.lost if e.block.lost is not None else step
            block = dataclasses.replace(e.block, lost=-1 if at is None else at, note=f"merge lost at step {at}")
            entries.append(_Entry(e.pattern, block, e.key, e.measured))
        self._store(mid, entries)
        return bool(entries)

    def forget_lost(self, mid: int) -> None:
        """The user replaced ``mid``'s blocks on purpose (``watch``): its lost blocks are forgotten."""
        entries = [e for e in self.entries.get(mid, ()) if e.block.lost is None]
        if entries:
            self.entries[mid] = entries
        else:
            self.entries.pop(mid, None)
        self._reindex()

    def adopt_sibling(self, module: nn.Module, outs: list[Any], key: tuple) -> bool:
        """A module with no live merge, of the same class as a block: is it a block whose skip is dead?

        If a sibling's pattern resolves on ``outs`` to a merge with a dead skip, ``module`` gets that merge
        (depth key ``key``) and True is returned.
        """
        mid = id(module)
        seen = set()
        for other, entries in list(self.entries.items()):
            if other == mid or type(self.modules.get(other)) is not type(module):
                continue
            for e in entries:
                if e.pattern in seen:
                    continue
                seen.add(e.pattern)
                r = resolve(e.pattern, outs)
                if isinstance(r, Resolved) and r.dead:
                    # what the skip was before it was cut off is not in the graph: its kind is unknown
                    dead = dataclasses.replace(e.pattern, kind="other", skip_ops="")
                    self.set_entries(module, [dead], [key], ["sibling"])
                    log.info("gradwatch: %s: residual block whose skip carries no gradient (matched to %s)",
                             self.names.get(mid), e.block.name)
                    return True
        return False

    def _harmonize(self) -> None:
        """Name merges alike across modules of one class: a transformer layer whose attention residual has no
        gradient (its input needs none) still calls its MLP residual ``layers.0[1]``, like its siblings."""
        by_class: dict[type, list[int]] = {}
        for mid in self.entries:
            if mid in self.modules:
                by_class.setdefault(type(self.modules[mid]), []).append(mid)
        for mids in by_class.values():
            ref = max(mids, key=lambda m: len(self.entries[m]))
            where = [(e.pattern.out_index, e.pattern.to_merge) for e in self.entries[ref]]
            if len(where) < 2:
                continue
            for mid in mids:
                entries = self.entries[mid]
                if len(entries) == len(where) or self.explicit.get(mid):
                    continue
                spots = [(e.pattern.out_index, e.pattern.to_merge) for e in entries]
                if not all(s in where for s in spots) or len(set(spots)) != len(spots):
                    continue
                base = self.name(mid)
                for e, spot in zip(entries, spots):
                    e.block = dataclasses.replace(e.block, name=f"{base}[{where.index(spot)}]")

    def _reindex(self) -> None:
        calls = (e for per in self.calls.values() for es in per for e in es)
        entries = sorted([*(e for es in self.entries.values() for e in es), *calls], key=lambda e: e.key)
        for i, e in enumerate(entries):
            if e.block.index != i:
                e.block = dataclasses.replace(e.block, index=i)
        self.index = entries
