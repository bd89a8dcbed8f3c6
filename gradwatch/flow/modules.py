"""Which modules carry the probe's forward hooks, and the work a hooked forward does on the module's graph.

Until a module has been examined it carries a discovery hook pair (pre: its input nodes, post: its output
nodes); once it holds merges it carries one arming hook. :class:`ModuleTracker` places and removes these
hooks, examines a module's part of the graph (:meth:`~ModuleTracker.discover`) and, on logging steps,
resolves its merges on the new graph and hooks their autograd nodes (:meth:`~ModuleTracker.arm`). The hook
functions themselves belong to :class:`~gradwatch.flow.FlowProbe`, which decides whether a forward counts.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from .._compat import in_backward, is_compiled, is_compiling, is_optimized_module
from ..names import ROOT_NAME, clean_name
from ._hooks import hook_merge
from .discovery import Graph, Resolved, find_dead_merges, find_merges, resolve, resolve_lost
from .registry import BlockRegistry
from .session import _Session

log = logging.getLogger("gradwatch")

__all__ = ["ModuleTracker"]

_MAX_REDISCOVERIES = 10


def _is_scripted(m: nn.Module) -> bool:
    return isinstance(m, torch.jit.ScriptModule)


class ModuleTracker:
    """The forward hooks on ``model``'s modules, and discovery and arming in a hooked forward.

    Args:
        model, auto: the probe's model and whether every module is examined (else only watched ones).
        blocks: the registry where what is found goes.
        disc_pre, disc_post, arm_hook: the probe's hook functions (a discovery pair, the arming hook).
        warn_once: ``warn_once(key, message)`` logs ``message`` once per key.
        on_error: receives exceptions raised inside autograd hooks.
    """

    def __init__(self, model: nn.Module, auto: bool, blocks: BlockRegistry, *, disc_pre: Callable,
                 disc_post: Callable, arm_hook: Callable, warn_once: Callable[[str, str], None],
                 on_error: Callable[[BaseException], None]) -> None:
        self.model = model
        self.auto = auto
        self.blocks = blocks
        self._disc_pre, self._disc_post, self._arm_hook = disc_pre, disc_post, arm_hook
        self._warn_once = warn_once
        self._on_error = on_error
        self.disc_handles: dict[int, tuple[Any, Any]] = {}
        self.arm_handles: dict[int, Any] = {}
        # Arming waits for the end of the model's own forward when it runs inside one: done between two convs,
        # its Python runs on cold caches and cost twice as much (ResNet-56: 2.9 against 1.5 ms per step).
        self._local = threading.local()  # .depth: nesting of the model's forward, per thread
        self._deferred: list[tuple[Any, ...]] = []  # (module, outs, session, keep, inputs, call, tick)
        self._root_handles = [model.register_forward_pre_hook(self._enter), _post_hook(model, self._leave)]
        self._mismatches: dict[int, int] = {}
        self._scripted: list[str] = []  # TorchScript modules: forward hooks cannot be registered on them

    # ------------------------------------------------------------------ module hooks
    def refresh(self) -> None:
        """(Re)scan the module tree: name modules, hook new ones for discovery, forget removed ones."""
        named = list(self.model.named_modules(remove_duplicate=True))
        present = self.blocks.scan(named)
        for mid in [k for k in self.disc_handles if k not in present]:
            for h in self.disc_handles.pop(mid):
                h.remove()
        for mid in [k for k in self.arm_handles if k not in present]:
            self.arm_handles.pop(mid).remove()
        inside_compiled: set[int] = set()
        compiled_names = []
        for name, m in named:
            if id(m) in inside_compiled:
                continue
            if is_compiled(m):
                compiled_names.append(clean_name(name) or ROOT_NAME)
                # hooks inside compiled code would be traced (or ignored): hook only an OptimizedModule wrapper
                inside_compiled.update(id(c) for c in m.modules() if c is not m or not is_optimized_module(m))
        for cname in compiled_names:
            self.blocks.note_compiled(cname)
        scripted = [clean_name(name) or ROOT_NAME for name, m in named if _is_scripted(m)]
        reg = self.blocks
        watched = reg.modules if self.auto else {mid: reg.modules[mid] for mid in reg.explicit}
        for mid, m in watched.items():
            if mid in inside_compiled or mid in reg.exam or mid in reg.entries or _is_scripted(m):
                continue
            self.add_discovery(m)
        self._note_scripted(scripted)

    def _note_scripted(self, names: Sequence[str]) -> None:
        """Say once which TorchScript submodules are not watched (they accept no forward hooks)."""
        new = [n for n in names if n not in self._scripted and not any(n.startswith(s + ".") for s in names)]
        if new:
            self._scripted.extend(new)
            self._warn_once(
                "scripted-" + ",".join(new),
                "gradwatch: TorchScript modules accept no forward hooks, so block flow does not watch them as "
                f"blocks: {', '.join(new)} (a merge inside one may be found by the enclosing module and named after "
                "it). Other blocks and all parameter metrics are measured.",
            )

    def add_discovery(self, module: nn.Module) -> None:
        """Hook ``module`` for discovery (a forward pre/post pair), once; a TorchScript module takes no hooks and is
        only noted."""
        mid = id(module)
        if mid in self.disc_handles:
            return
        if _is_scripted(module):
            self._note_scripted([self.blocks.name(mid)])
            return
        pre = module.register_forward_pre_hook(self._disc_pre, with_kwargs=True)
        post = module.register_forward_hook(self._disc_post, with_kwargs=True)
        self.disc_handles[mid] = (pre, post)

    def _drop_discovery(self, mid: int) -> None:
        handles = self.disc_handles.pop(mid, None)
        if handles:
            for h in handles:
                h.remove()

    def add_arming(self, module: nn.Module) -> None:
        """Give ``module`` its arming hook, once."""
        if id(module) not in self.arm_handles:
            self.arm_handles[id(module)] = module.register_forward_hook(self._arm_hook, with_kwargs=True)

    def _drop_arming(self, mid: int) -> None:
        handle = self.arm_handles.pop(mid, None)
        if handle is not None:
            handle.remove()

    def _depth(self) -> int:
        return getattr(self._local, "depth", 0)

    def _enter(self, module: nn.Module, args: Any) -> None:
        if not is_compiling():
            if not self._depth():  # a new forward of the model: calls of shared modules count from 0 again
                self._local.forward = getattr(self._local, "forward", 0) + 1
            self._local.depth = self._depth() + 1

    def _leave(self, module: nn.Module, args: Any, output: Any) -> None:
        if is_compiling():
            return
        self._local.depth = depth = max(0, self._depth() - 1)
        if not depth:
            self.arm_pending()

    def reset(self) -> None:
        """The step is collected: nothing waits any more, and a forward that raised without running the post-hook
        (torch < 2.1 has no ``always_call``) no longer counts as running."""
        self._local.depth = 0
        self._deferred.clear()

    def close(self) -> None:
        """Remove every forward hook."""
        for h in self._root_handles:
            h.remove()
        self._root_handles.clear()
        self._deferred.clear()
        for pre, post in self.disc_handles.values():
            pre.remove()
            post.remove()
        self.disc_handles.clear()
        for h in self.arm_handles.values():
            h.remove()
        self.arm_handles.clear()

    def set_entries(self, module: nn.Module, *args: Any) -> None:
        """:meth:`BlockRegistry.set_entries`; a module that has merges gets its arming hook."""
        if self.blocks.set_entries(module, *args):
            self.add_arming(module)

    # ------------------------------------------------------------------ discovery and arming
    def discover(self, module: nn.Module, outs: list[Any], boundary: list[Any], sess: _Session) -> None:
        """Examine ``module``'s graph (``outs`` back to ``boundary``) for residual merges: record and arm those found,
        else try it as a sibling block whose skip is dead, else note it as plain."""
        reg = self.blocks
        mid = id(module)
        self._drop_discovery(mid)
        self.arm_pending()  # the blocks that ran inside this module claim their merges before it is examined
        g = Graph(outs, boundary)
        if g.truncated:
            log.info("gradwatch: %s: autograd graph too large to walk; flow not measured there", reg.names.get(mid))
        explicit = mid in reg.explicit
        found = find_merges(g, sess.claimed, sess.rejected, relaxed=explicit)
        if explicit and not found:
            found = find_dead_merges(g, sess.claimed, [])
        if g.compiled and not found:
            reg.note_compiled_graph(mid)
        if g.checkpointed and not found:
            reg.note_checkpointed_graph(mid)
        reg.exam[mid] = (sess.number, sess.order.get(mid, sess.tick))
        sess.examined.append(mid)
        ran_branch = any(g.is_leaf_param(n) for n in g.nodes)  # a sub-network ran (not `return x`)
        del g
        old_entries = reg.entries.get(mid, [])
        old = [e.key for e in old_entries]
        if old_entries and not found and not ran_branch:
            return  # the module passed its input through (stochastic depth, layer drop): nothing lost
        if old_entries and any(e.measured or e.block.lost is not None for e in old_entries):
            how = "watch" if explicit else "auto"
            if reg.rediscovered(module, [f[0] for f in found], [reg.exam[mid] + (f[1],) for f in found],
                                [how] * len(found), sess.step):
                self.add_arming(module)
            else:
                self._drop_arming(mid)
            return
        if found:
            how = "watch" if explicit else "auto"
            keys = old if len(old) == len(found) else [reg.exam[mid] + (f[1],) for f in found]
            self.set_entries(module, [f[0] for f in found], keys, [how] * len(found))
            return
        if old:  # rediscovered: no merge any more
            self.set_entries(module, [], [], [])
            self._drop_arming(mid)
        if self._adopt_sibling(module, outs, sess):
            return
        if explicit:
            self._warn_once(
                f"nomerge-{mid}",
                f"gradwatch: watched module {reg.names.get(mid)} has no residual merge in its forward "
                "(an add of two tensors computed from one input); nothing is measured for it",
            )
        reg.plain[mid] = module

    def _adopt_sibling(self, module: nn.Module, outs: list[Any], sess: _Session) -> bool:
        """:meth:`BlockRegistry.adopt_sibling`, keyed like a module examined in ``sess``; arms an adopted one."""
        key = self.blocks.exam.get(id(module), (sess.number, sess.tick)) + (0,)
        if not self.blocks.adopt_sibling(module, outs, key):
            return False
        self.add_arming(module)
        return True

    def arm(self, module: nn.Module, outs: list[Any], sess: _Session, keep: bool,
            inputs: Callable[[], list[Any]] | None = None) -> None:
        """Resolve ``module``'s merges on this forward's graph and hook them (``keep``: keep the vectors); at the
        end of the model's forward when called inside it (an activation-checkpoint recompute: at once).
        ``inputs`` gives the module's input nodes (for a graph that changed, and for lost blocks)."""
        sess.tick += 1
        call = self._call(module, sess)
        if self._depth() and not in_backward():
            self._deferred.append((module, outs, sess, keep, inputs, call, sess.tick))
            return
        self._arm(module, outs, sess, keep, inputs, call, sess.tick)

    def _call(self, module: nn.Module, sess: _Session) -> int:
        """Which training call of ``module`` this is within the model's current forward (0 for the first, and for
        any call outside a forward of the model, in eval mode or in backward: those replace the first)."""
        if not self._depth() or in_backward() or not module.training or not torch.is_grad_enabled():
            return 0
        forward = getattr(self._local, "forward", 0)
        last = sess.calls.get(id(module))
        n = last[1] + 1 if last is not None and last[0] == forward else 0
        sess.calls[id(module)] = (forward, n)
        return n

    def arm_pending(self) -> None:
        """Arm what waited for the end of the model's forward (sessions collected or dropped meanwhile are
        skipped). A forward that raises arms what it ran, as it did before arming waited (``always_call``)."""
        deferred, self._deferred = self._deferred, []
        for module, outs, sess, keep, inputs, call, tick in deferred:
            if sess.open:
                try:
                    self._arm(module, outs, sess, keep, inputs, call, tick)
                except Exception as err:  # never raise into the user's forward
                    self._on_error(err)

    def _arm(self, module: nn.Module, outs: list[Any], sess: _Session, keep: bool,
             inputs: Callable[[], list[Any]] | None = None, call: int = 0, tick: int = 0,
             retry: bool = True) -> None:
        mid = id(module)
        entries = self.blocks.entries.get(mid)
        if entries is None:
            if mid in self.blocks.plain and not sess.discovery_only:
                if not self._adopt_sibling(module, outs, sess):
                    self.blocks.plain.pop(mid, None)  # not a dead block: stop trying
                    self._drop_arming(mid)
                    return
                entries = self.blocks.entries[mid]
            else:
                return
        if call:
            self._arm_call(module, outs, sess, keep, call, tick)
            return
        prev = sess.armed.get(mid)
        if prev is not None:
            if in_backward():
                return  # activation-checkpoint recompute: the original forward's graph is measured
            if prev and not module.training:
                return  # an eval-mode forward does not replace a training one
        measured = [e for e in entries if e.block.lost is None]
        results = [resolve(e.pattern, outs) for e in measured]
        results = [None if e.block.found == "sibling" and isinstance(r, Resolved) and not r.dead else r
                   for e, r in zip(measured, results)]  # a skip that came back is rediscovered as what it is
        back = any(isinstance(resolve(e.pattern, outs), Resolved) for e in entries if e.block.lost is not None)
        if back or any(r is None for r in results):  # a lost merge is back where it was, or the graph changed
            if (retry and inputs is not None and not sess.discovery_only
                    and self._mismatches.get(mid, 0) < _MAX_REDISCOVERIES):
                # the graph changed: examine it now, so that a merge that disappeared is reported at this step
                self._mismatches[mid] = self._mismatches.get(mid, 0) + 1
                self.discover(module, outs, inputs(), sess)
                if mid in self.blocks.entries:
                    self._arm(module, outs, sess, keep, inputs, 0, tick, retry=False)
                return
            self._mismatch(module)
        live = [(e, r) for e, r in zip(measured, results) if isinstance(r, Resolved)]
        lost = [e for e in entries if e.block.lost is not None]
        if lost and inputs is not None:
            r = resolve_lost(lost[0].pattern, outs, inputs())
            if r is not None:
                live.extend((e, r) for e in lost)
        for _, r in live:
            sess.claimed.add(id(r.merge))
        if not live or sess.discovery_only:
            return
        sess.disarm(mid)
        sess.armed[mid] = module.training
        handles: list[Any] = []
        pairs = []
        for entry, r in live:
            entry.measured = True
            slot = hook_merge(r, sess.merges, handles, self._on_error, keep)
            pairs.append((entry, slot))
        sess.slots[mid] = pairs
        sess.handles[mid] = handles

    def _arm_call(self, module: nn.Module, outs: list[Any], sess: _Session, keep: bool, call: int,
                  tick: int) -> None:
        """Call ``call`` (1, 2, ...) of a module run several times in one forward (a weight-shared layer): its
        merges are blocks of their own, named ``<block>@<call>`` and placed in depth order where the call ran."""
        mid = id(module)
        if sess.discovery_only or mid not in sess.slots:
            return
        entries = self.blocks.call_entries(module, call, sess.number, tick)
        results = [resolve(e.pattern, outs) for e in entries]
        live = [(e, r) for e, r in zip(entries, results) if isinstance(r, Resolved)]
        handles = sess.handles.setdefault(mid, [])
        for entry, r in live:
            sess.claimed.add(id(r.merge))
            entry.measured = True
            sess.slots[mid].append((entry, hook_merge(r, sess.merges, handles, self._on_error, keep)))

    def _mismatch(self, module: nn.Module) -> None:
        mid = id(module)
        count = self._mismatches.get(mid, 0) + 1
        self._mismatches[mid] = count
        name = self.blocks.names.get(mid)
        if count > _MAX_REDISCOVERIES:
            self._warn_once(f"unstable-{mid}", f"gradwatch: {name}: the autograd graph keeps changing shape; "
                            "its residual merges are no longer rediscovered")
            return
        log.debug("gradwatch: %s: graph changed; rediscovering its merges on the next logging step", name)
        self.blocks.exam.pop(mid, None)
        self.add_discovery(module)


def _post_hook(model: nn.Module, hook: Callable) -> Any:
    """A forward hook that runs even when the forward raises (``always_call``, torch >= 2.1; before that a
    forward that raised is forgotten at the step's collection, :meth:`ModuleTracker.reset`)."""
    try:
        return model.register_forward_hook(hook, always_call=True)
    except TypeError:  # pragma: no cover - older torch
        return model.register_forward_hook(hook)
