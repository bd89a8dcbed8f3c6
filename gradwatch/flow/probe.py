"""The probe: its public surface, one session per logging step, and the forward hooks that open them.

:class:`FlowProbe` owns a :class:`~gradwatch.flow.registry.BlockRegistry` (the blocks found so far) and a
:class:`~gradwatch.flow.modules.ModuleTracker` (which modules carry its forward hooks, and the discovery and
arming done in them). Its hooks decide whether a forward counts (not while compiling, only on logging
steps) and to which :class:`~gradwatch.flow.session._Session` it belongs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from .._checks import check_modules
from .._compat import is_compiled, is_compiling, tree_tensors
from .._once import Once
from ..names import ROOT_NAME
from .discovery import boundary_node
from .registry import BlockRegistry, Blocks, FlowStatus
from .session import FlowBatch, _Session, stack_norms
from .modules import ModuleTracker

log = logging.getLogger("gradwatch")

__all__ = ["FlowProbe", "check_blocks"]

_TREE_CHECK_EVERY = 8


def _check_member(model: nn.Module, module: Any, arg: str) -> None:
    if not isinstance(module, nn.Module):
        raise TypeError(f"{arg} must hold nn.Module instances, got {type(module).__name__}")
    if not any(m is module for m in model.modules()):
        raise ValueError(f"{arg}: {type(module).__name__} is not a submodule of the monitored model")


def check_blocks(model: nn.Module, blocks: Any) -> list[nn.Module] | None:
    """Validate a ``blocks=`` argument: None for ``"auto"``, else the list of modules (all in ``model``)."""
    mods = check_modules(blocks, "blocks")
    if mods is None:
        raise TypeError("blocks must be 'auto' or a list of modules here (None turns block flow off)")
    if isinstance(mods, str):  # "auto", the only string check_modules lets through
        return None
    for m in mods:
        _check_member(model, m, "blocks")
    return list(mods)


def _out_nodes(output: Any) -> list[Any]:
    return [t.grad_fn for t in tree_tensors(output)]


class FlowProbe:
    """Finds the residual merges of ``model`` and measures their gradient split on logging steps.

    Normally created by :class:`~gradwatch.Monitor` (``blocks=``); usable alone::

        probe = FlowProbe(model, is_logging=lambda: True, step=lambda: step)
        loss.backward(); batch = probe.collect()   # norms on device, or None
        host = batch.values.cpu().numpy(); flow_metrics(host)

    Args:
        model: the network.
        blocks: ``"auto"`` (find merges in every module), or modules of ``model`` to watch (each may hold
            several merges; discovery rules are relaxed for them: no parameter needed on the branch, and a
            skip without gradient is reported as such).
        is_logging: returns whether the step in progress logs (checked at every block forward).
        step: returns the current step number (tells one logging step's forwards from the next's).
        on_error: receives exceptions raised inside the probe's hooks (default: re-raise).
    """

    def __init__(
        self,
        model: nn.Module,
        blocks: str | Iterable[nn.Module] = "auto",
        *,
        is_logging: Callable[[], bool],
        step: Callable[[], int],
        on_error: Callable[[BaseException], None] | None = None,
    ) -> None:
        self._once = Once()
        self.model = model
        self._is_logging = is_logging
        self._step = step
        self._on_error = on_error
        self._blocks = BlockRegistry()
        mods = check_blocks(model, blocks)
        self.auto = mods is None
        for m in mods or ():
            self._blocks.explicit[id(m)] = None
        #: Debugging aid (tests): keep the gradient vectors of the last measured step in :attr:`vectors`.
        #: Holds activation-sized tensors; leave off in training.
        self.keep_vectors = False
        self.vectors: dict[str, dict[str, torch.Tensor]] = {}
        self._tracker = ModuleTracker(
            model, self.auto, self._blocks, disc_pre=self._disc_pre, disc_post=self._disc_post,
            arm_hook=self._arm_hook, warn_once=self._warn_once, on_error=self._error,
        )
        self._root_compiled = is_compiled(model)
        self._session: _Session | None = None
        self._sessions = 0
        self._discovered_once = False
        self._silent_steps = 0
        self._seen = False  # a hook of ours ran (eagerly) since the last collect
        self._announced = False
        self._closed = False
        self._constants: dict[tuple, torch.Tensor] = {}
        if self._root_compiled:
            self._warn_once(
                "root-compiled",
                "gradwatch: block flow is unavailable: the model is compiled with torch.compile, so its backward "
                "is one CompiledFunctionBackward node per graph and no residual merge can be seen or split. "
                "Parameter metrics are unaffected. To measure block flow, monitor the uncompiled model (e.g. a "
                "short diagnostic run) or compile only modules you do not need to watch.",
            )
            return
        self._tracker.refresh()

    # ------------------------------------------------------------------ public
    def describe(self) -> Blocks:
        """The blocks found so far, in depth order."""
        blocks = self._blocks.blocks()
        blocks.status = self.status
        return blocks

    @property
    def status(self) -> FlowStatus:
        """Whether block flow is being measured and, if not, why."""
        if self._closed and not self._blocks:
            return FlowStatus("off", "the monitor is closed")
        if self._root_compiled:
            return FlowStatus(
                "unavailable",
                "the model is compiled with torch.compile: its autograd graph cannot be walked "
                "(CompiledFunctionBackward); parameter metrics continue",
                0,
                (ROOT_NAME,),
            )
        if self._silent_steps >= 3:
            return FlowStatus(
                "unavailable",
                f"no forward of the model ran gradwatch's hooks on the last {self._silent_steps} logging steps "
                "(compiled with torch.compile after the Monitor was attached?)",
            )
        if not self._discovered_once:
            return FlowStatus("waiting", "no training forward pass on a logging step yet")
        return self._blocks.status()

    @property
    def armed(self) -> bool:
        """Debugging aid (tests): True while a logging step's session is open (hooks armed, not yet collected)."""
        return self._session is not None

    @property
    def sessions(self) -> int:
        """Debugging aid (tests): how many sessions have been opened (logging steps and :meth:`discover` calls)."""
        return self._sessions

    def watch(self, module: nn.Module, name: str | None = None) -> None:
        """Measure ``module``'s residual merges under ``name`` (default: its qualified name).

        Discovery rules are relaxed for it (see :class:`FlowProbe`). Found on the next logging step.
        """
        _check_member(self.model, module, "module")
        if name is not None and (not isinstance(name, str) or not name):
            raise TypeError("name must be a non-empty str")
        mid = id(module)
        self._blocks.explicit[mid] = name
        self._blocks.forget_lost(mid)  # watching anew is a deliberate change: what was lost there is not missed
        if self._root_compiled:
            return
        entries = self._blocks.entries.get(mid)
        for e in entries or ():
            e.measured = False  # declared anew: if its merges change from here on, that is the user's doing
        if entries is not None and not name:
            return
        if entries is not None:
            self._tracker.set_entries(module, [e.pattern for e in entries], [e.key for e in entries],
                                      [e.block.found for e in entries])
            return
        self._blocks.plain.pop(mid, None)
        self._blocks.exam.pop(mid, None)
        self._tracker.add_discovery(module)

    def collect(self) -> FlowBatch | None:
        """End the logging step: remove its hooks and return the norms measured (None if nothing armed)."""
        sess, self._session = self._session, None
        if self._closed or self._root_compiled:
            if sess is not None:
                sess.close()
            return None
        seen, self._seen = self._seen, False
        if sess is None:
            if seen:  # forwards ran, none on a logging step (e.g. an integration's trigger said no)
                self._silent_steps = 0
                return None
            if self._discovered_once and not self._blocks and not self._blocks.compiled:
                return None  # discovery ran and found no residual merge (a plain net): nothing to hear from
            self._silent_steps += 1
            if self._silent_steps == 3:
                self._warn_once("silent", "gradwatch: block flow is unavailable: " + self.status.reason)
            return None
        self._silent_steps = 0
        self._tracker.reset()
        try:
            self._end_of_session(sess)
            return self._gather(sess)
        finally:
            sess.end()

    @torch.no_grad()
    def _restore(self, saved: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        for buf, value in saved:
            buf.copy_(value)

    def discover(self, *args: Any, **kwargs: Any) -> Blocks:
        """Find the blocks now with one training-mode forward on example inputs.

        Buffers (BatchNorm statistics), train/eval flags and the RNG state are left as they were; no
        gradient is computed.
        """
        if self._root_compiled:
            return self.describe()
        saved = [(b, b.detach().clone()) for b in self.model.buffers()]
        modes = [(m, m.training) for m in self.model.modules()]
        prev, self._session = self._session, None
        self._sessions += 1
        self._session = _Session(None, self._sessions, discovery_only=True)
        self._forced = True
        try:
            self.model.train()  # the graph of training (dropout, batch statistics) is the one to match later
            with torch.random.fork_rng(), torch.enable_grad():
                self.model(*args, **kwargs)
            self._end_of_session(self._session)
        finally:
            self._forced = False
            self._session.close()
            self._session = prev
            self._restore(saved)
            for m, mode in modes:
                m.training = mode
        return self.describe()

    def close(self) -> None:
        """Remove every hook."""
        self._closed = True
        if self._session is not None:
            self._session.close()
            self._session = None
        self._tracker.close()

    # ------------------------------------------------------------------ sessions
    _forced = False

    def _open(self) -> _Session | None:
        """The session of the step in progress (opened at the first hooked forward of a logging step)."""
        sess = self._session
        if self._forced:
            return sess
        step = self._step()
        if sess is not None and sess.step == step:
            return sess
        if sess is not None:
            sess.close()  # a logging step whose measurement never came: drop it
        self._sessions += 1
        sess = self._session = _Session(step, self._sessions)
        # Walking the module tree costs ~0.2-0.4 ms on ResNet-56 (200 modules) in the middle of a forward: a
        # module added or replaced mid-run is looked for on every 8th logging step, not on each.
        if self.auto and self._sessions % _TREE_CHECK_EVERY == 1 and \
                tuple(id(m) for m in self.model.modules()) != self._blocks.signature:
            self._tracker.refresh()
        return sess

    def _end_of_session(self, sess: _Session) -> None:
        """After a session's forwards: announce what discovery found, queue sibling candidates."""
        if not sess.examined:
            return
        self._discovered_once = True
        reg = self._blocks
        classes = {type(reg.modules[mid]) for mid in reg.entries if mid in reg.modules}
        for mid, m in list(reg.plain.items()):
            if type(m) in classes:
                self._tracker.add_arming(m)  # try a sibling's pattern on its next logging forward
        if reg.compiled:
            self._warn_once(
                "compiled",
                "gradwatch: block flow is unavailable inside modules compiled with torch.compile "
                f"({', '.join(reg.compiled)}): their backward is a CompiledFunctionBackward node that cannot be "
                "walked. Other blocks and all parameter metrics are measured.",
            )
        if reg.hidden_by_checkpoints():
            self._warn_once("checkpointed", f"gradwatch: block flow is unavailable: {self.status.reason}. Other "
                            "blocks and all parameter metrics are measured.")
        if not self._announced:
            self._announced = True
            status = self.status
            log.info("gradwatch: block flow: %s", status)

    def _gather(self, sess: _Session) -> FlowBatch | None:
        rows = sess.rows()
        if not rows:
            return None
        values = stack_norms([slot for _, _, slot, _ in rows], self._constants)
        if self.keep_vectors:
            self.vectors = {name: dict(slot.vectors or {}) for _, name, slot, _ in rows}
        fired = any(isinstance(v, torch.Tensor) for _, _, slot, _ in rows for v in slot.norms)
        return FlowBatch([name for _, name, _, _ in rows], values, sess.step, backward=fired,
                         lost=tuple(name for _, name, _, lost in rows if lost))

    # ------------------------------------------------------------------ hooks (run inside the user's forward)
    def _live(self) -> bool:
        return not self._closed and (self._forced or self._is_logging())

    def _error(self, err: BaseException) -> None:
        if self._on_error is None:
            raise err
        self._on_error(err)

    def _warn_once(self, key: str, message: str) -> None:
        self._once.log(key, message)

    def _disc_pre(self, module: nn.Module, args: Any, kwargs: Any) -> None:
        if is_compiling():
            return
        self._seen = True
        if not self._live():
            return
        try:
            sess = self._open()
            if sess is None:
                return
            stack = sess.inputs.setdefault(id(module), [])
            if not torch.is_grad_enabled():
                stack.append(None)
                return
            nodes = [boundary_node(t) for t in tree_tensors((args, kwargs))]
            stack.append([n for n in nodes if n is not None])
        except Exception as err:
            self._error(err)

    def _disc_post(self, module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        if is_compiling() or not self._live():
            return
        try:
            sess = self._session
            if sess is None:
                return
            sess.tick += 1
            sess.order.setdefault(id(module), sess.tick)  # also under no_grad (reentrant checkpoint)
            stack = sess.inputs.get(id(module))
            if not stack:
                return
            boundary = stack.pop()
            if boundary is None or not torch.is_grad_enabled():
                return
            outs = _out_nodes(output)
            if not any(o is not None for o in outs):
                return
            mid = id(module)
            if mid in self._tracker.disc_handles:
                self._tracker.discover(module, outs, boundary, sess)
            if mid in self._blocks.entries:
                self._tracker.arm(module, outs, sess, self.keep_vectors, lambda: boundary)
        except Exception as err:
            self._error(err)

    def _arm_hook(self, module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        if is_compiling():
            return
        self._seen = True
        if not self._live():
            return
        try:
            if not torch.is_grad_enabled() or id(module) in self._tracker.disc_handles:
                return  # a module waiting for (re)discovery is handled by its discovery hook
            sess = self._open()
            if sess is not None:
                def inputs() -> list[Any]:  # read only when the graph changed or the block is lost
                    return [n for n in (boundary_node(t) for t in tree_tensors((args, kwargs))) if n is not None]
                self._tracker.arm(module, _out_nodes(output), sess, self.keep_vectors, inputs)
        except Exception as err:
            self._error(err)
