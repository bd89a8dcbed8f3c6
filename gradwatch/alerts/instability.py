"""The early warning of a loss spike: :class:`Instability`, from the per-layer update and gradient growth that
comes before it (``docs/alerts.md``, ``docs/validation.md``: the instability suite)."""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np

from .._checks import check_int, check_number
from . import _inflation, _loss
from ._instability_text import finding
from ._stats import nanmedian, nanmedian_rows, quantiles
from .alert import Alert
from .measurements import Measurements
from .rule import Rule

__all__ = ["Instability"]


class Instability(Rule):
    """Training is about to go unstable: at steps large enough to run away, a weight layer's update and its
    gradient grow fast at once, a residual branch is knocked quiet, the whole model's gradient climbs and
    stays up, or the weights inflate, each step scaling them up.

    Two gates first, both measured. **Large steps**: a layer is judged only while its ``update_to_weight`` is at
    least ``min_update`` (2% of the weight per step; healthy training moves ~0.1%, AdamW at 3e-4 on 0.02-std
    transformers up to ~1.4%). **An adaptive update**: the rule stands down while the update follows the
    gradient, as SGD's does — every weight layer taking the same step per unit of gradient (``|update| /
    |gradient|`` within ``follows_gradient`` decades over the layers, median over the window): there "the update
    grew with the gradient" is one fact counted twice, and a runaway shows in the gradient (``exploding``).

    **A runaway, not a local swing** (round 2, raised in round 3): the two per-layer triggers below count only
    at logging steps where the whole model's gradient norm (the monitor's ``_global``; else the root sum of
    squares of the layers') is ``runaway`` (2x) its median over the previous ``window`` logging steps. Too large
    a step raises the loss, and with it the gradient of the whole model; one layer's update and gradient
    swinging together, or one branch going quiet, while the model's gradient stays where it was, is what
    near-edge runs that never spike did out of sample (docs/alerts.md).

    **The climb** (round 3): the rule also fires when the whole model's gradient norm has stayed above
    ``climb`` (1.75x) its median over the previous ``climb_window`` (50) logging steps for ``sustained`` (5)
    logging steps in a row, at large adaptive steps: the slow road to a spike that stock LMs take 10-40 steps
    ahead of it (one noisy batch or one layer's swing lasts a step or two). The incident names the layers whose
    gradient grew most against their medians. It keeps firing while the ratio stays above the square root of
    ``climb``.

    **The weights inflate** (round 4): the rule also fires when, for ``inflate_patience`` (3) logging steps in a
    row at large adaptive steps, ``inflate_share`` (a quarter) or more of the weight layers grew their weight's
    norm by ``inflate`` (90%) or more of their steps' length over the last ``inflate_window`` (10) logging steps:
    ``log(|w_now| / |w_then|)`` against the summed ``update_to_weight`` in between (each logged update standing
    for the steps to the next log). Steps across the weight (a random walk) grow its norm only by their square;
    steps that scale the weight up grow it by their whole length: the weights and the logits they make grow
    without bound, the road to the logit-growth instability (Wortsman et al. 2023). Healthy stock LMs, trained
    the usual way, read 0.12-0.61; stock LMs at peaks that spike read 0.9-1 tens of steps ahead
    (docs/alerts.md). The incident names the layers whose steps went most into their norm. It is judged from the
    ``inflate_from``-th (30) logging step: round 6 tried the 20th (it needs only its own window) and kept the
    30th, which the other triggers need (the 20th won 4 calibration runs and none out of sample, and warned on
    a healthy MobileNetV2 of the zoo).

    **The loss climbs** (round 7; ``risen``): the rule also fires when the training loss's level, the median of
    the last ``risen_window`` (20) losses given, has stood ``risen`` (half a nat) or more above the best level it
    reached for ``patience`` logging steps, at large adaptive steps: half of the scorecard's divergence (a nat),
    the road post-LN models (GPT-1, BERT as a decoder) take back to chance with no layer's signal growing first
    (their last LayerNorm's gain shrinks while every gradient falls). ``risen`` is in the loss's units (nats for
    a cross-entropy); the bar is at least a tenth of the best level, so a loss of another scale is not judged by
    a half-unit wobble, and 4 standard errors of the level, so a loss as noisy as small image batches give
    (0.4-20 nats a batch) is not judged by its median's wandering. Needs the loss (:meth:`Monitor.loss
    <gradwatch.Monitor.loss>`); ``risen=None`` turns it off.

    **While the loss falls** (round 4) no new warning opens: when the training loss is given
    (:meth:`Monitor.loss <gradwatch.Monitor.loss>`; the Lightning and HF adapters give it), the rule holds back
    while the median of the last ``falling_window`` (10) losses is ``falling`` (1%; 2% before round 7) or more
    below the median of the 10 before: a gradient that climbs as the model leaves a plateau is learning, not a
    runaway (a healthy Gemma 2 at the usual 1e-3 did). A warning already open stays. Without a loss the rule
    judges as before.

    Then, per ``"weight"`` layer, ``update_to_weight`` and ``grad_norm`` are compared with their medians over
    the previous ``window`` logging steps; the rule fires (warning) when, for ``patience`` consecutive logging
    steps, some layer's update has grown ``update_growth`` times *and* its gradient ``grad_growth`` times,
    both beyond ``spread`` times the layer's own scatter (the median absolute deviation of the log values in
    the window), judged once ``window`` logging steps are seen; needs an optimizer watched
    (``Monitor(optimizer=...)``). Either alone is common in healthy runs: a learning-rate warm-up grows every
    update while the gradients stay put, and one noisy batch grows the gradient for one step; together, held,
    they are the runaway feedback of too large a step (Wortsman et al. 2023; the update-norm spikes before
    Marin's loss spikes). It also fires when a residual branch's gradient amplitude against its skip
    (``branch_grad / skip_grad``) falls ``branch_drop`` times below its median over the window for
    ``patience`` logging steps: units knocked dead by too large steps (the last MLP of the suite's
    transformers: 18-37 steps before the spike in four of the six runs at peak learning rate 0.5). It keeps
    firing until the growth is back within the square root of its threshold, and while a residual branch that
    grew ``branch_growth`` times against its skip since the warning opened has not come back.

    The incident names the layers and blocks whose signal moved first, in order, and says what to do: lower
    the peak learning rate or lengthen the warm-up; qk-layernorm when attention layers move first; z-loss when
    the output layer does; check the data at the step it started when most layers moved in the same step.
    Blocks whose branch grew that way are passed on in ``Measurements.context["unstable_blocks"]``:
    :class:`~gradwatch.alerts.rules.SkipCollapse` leaves them to this rule (a skip that "collapses" because
    its branch exploded is this instability, not an architectural fault).

    On by default. Defaults chosen (round 1) on the instability suite (``gradwatch validate --only instability``,
    logging every step), three healthy reference ResNets, a 10-layer SGD MLP and five stock models trained as
    the zoo trains them, all logged every step; the whole-model condition (round 2) on those runs, the suite's
    held-out runs and stock LM families (``benchmarks/instability_stock.py``); the climb and ``runaway``
    (round 3) offline on all of those and six more families, tested once on six families never seen
    (``--set test6``); the inflation (round 4) offline on the same calibration runs and 51 healthy ones
    (``--usual``), tested once on six more families never seen (``--set round4``), and again on ``--set round5``
    and ``--set round6``. The figures, in-sample and
    out, and the limits are in ``docs/alerts.md``. Windows and patience count logging steps: with ``every=50``
    the rule judges after 2,500 steps.
    """

    name = "instability"

    def __init__(self, window: int = 30, update_growth: float = 1.5, grad_growth: float = 1.5,
                 patience: int = 2, branch_growth: float = 2.0, spread: float = 3.0,
                 clear_margin: float = 2.0, min_update: float = 2e-2, branch_drop: float = 10.0,
                 follows_gradient: float = 0.3, runaway: float = 2.0, climb: float = 1.75,
                 climb_window: int = 50, sustained: int = 5, together: int = 3, inflate: float = 0.9,
                 inflate_window: int = 10, inflate_share: float = 0.25, inflate_patience: int = 3,
                 inflate_from: int = 30, falling: float = 0.01, falling_window: int = 10,
                 risen: float | None = 0.5, risen_window: int = 20) -> None:
        super().__init__(patience, clear_margin)
        self.spread = check_number(spread, "spread", owner=self.name)
        self.min_update = check_number(min_update, "min_update", owner=self.name)
        self.branch_drop = check_number(branch_drop, "branch_drop", owner=self.name)
        self.follows_gradient = check_number(follows_gradient, "follows_gradient", owner=self.name)
        if self.branch_drop <= 1:
            raise ValueError(f"{self.name}: branch_drop must be > 1, got {branch_drop!r}")
        self.window = check_int(window, "window", minimum=2, owner=self.name)
        self.sustained = check_int(sustained, "sustained", minimum=1, owner=self.name)
        self.together = check_int(together, "together", minimum=1, owner=self.name)
        self.climb_window = check_int(climb_window, "climb_window", minimum=2, owner=self.name)
        self.inflate_window = check_int(inflate_window, "inflate_window", minimum=1, owner=self.name)
        self.inflate_patience = check_int(inflate_patience, "inflate_patience", minimum=1, owner=self.name)
        self.inflate_from = check_int(inflate_from, "inflate_from", minimum=1, owner=self.name)
        self.inflate = check_number(inflate, "inflate", owner=self.name)
        self.inflate_share = check_number(inflate_share, "inflate_share", owner=self.name)
        self.falling = check_number(falling, "falling", owner=self.name)
        self.falling_window = check_int(falling_window, "falling_window", minimum=1, owner=self.name)
        self.risen = None if risen is None else check_number(risen, "risen", owner=self.name)
        self.risen_window = check_int(risen_window, "risen_window", minimum=2, owner=self.name)
        if not 0 < self.inflate <= 1:
            raise ValueError(f"{self.name}: inflate must be in (0, 1] (the share of a step's length that grows "
                             f"the weight's norm), got {inflate!r}")
        if not 0 < self.inflate_share <= 1:
            raise ValueError(f"{self.name}: inflate_share must be in (0, 1], got {inflate_share!r}")
        self.runaway = check_number(runaway, "runaway", owner=self.name)
        self.climb = check_number(climb, "climb", owner=self.name)
        self.update_growth = check_number(update_growth, "update_growth", owner=self.name)
        self.grad_growth = check_number(grad_growth, "grad_growth", owner=self.name)
        self.branch_growth = check_number(branch_growth, "branch_growth", owner=self.name)
        for key, v in (("update_growth", self.update_growth), ("grad_growth", self.grad_growth),
                       ("branch_growth", self.branch_growth), ("runaway", self.runaway),
                       ("climb", self.climb)):
            if v <= 1:
                raise ValueError(f"{self.name}: {key} must be > 1, got {v!r}")
        # per layer: the last `window` values (oldest first); when each layer's growth began; the branch/skip
        # ratios of the blocks before the warning opened, and the step it opened
        self.state.update({"update": {}, "grad": {}, "branch": {}, "since": {}, "opened": None,
                           "baseline": {}, "spread": [], "whole": [], "whole_ratio": None,
                           "climb_ratio": None, "norms": _inflation.empty(), "loss": _loss.empty(), "logged": 0})

    def check(self, m: Measurements) -> list[Alert]:
        """One finding while some layer's update and gradient have both outgrown their recent medians, or a
        residual branch went quiet, with the whole model's gradient grown too, or while that gradient has
        climbed and stayed up, at steps large enough to run away."""
        learning = self._learning(m.loss)
        idx = m.weight_layers()
        names = [m.layers[i] for i in idx]
        u, g = m.values("update_to_weight")[idx], m.values("grad_norm")[idx]
        ru, rg = self._ratios("update", names, u), self._ratios("grad", names, g)
        # growth beyond the layer's own step-to-step scatter: log ratio > spread x median absolute deviation
        with np.errstate(divide="ignore", invalid="ignore"):
            beyond = (np.log(ru) > self.spread * self._scatter("update", names)) & (
                np.log(rg) > self.spread * self._scatter("grad", names))
        # a step that moves the weight by 2% or more is what a runaway needs (healthy updates are ~1e-3 of the
        # weight); an update that follows the gradient (SGD) grows with every noisy batch: "the update grew with
        # the gradient" is one fact counted twice there, and the rule stands down
        large = np.nan_to_num(u, nan=0.0) >= self.min_update
        if self._follows_gradient(u * m.values("weight_norm")[idx], g):
            large[:] = False
        branch = self._branch_ratio(m)
        # a runaway raises the whole model's gradient (the loss climbs): one layer's or one branch's own swing,
        # with the model's gradient where it was, is not one (round 2, docs/alerts.md: most out-of-sample
        # false alarms were such local swings)
        whole, climb = self._whole_ratio(m)
        runaway, on = bool(whole > self.runaway), bool(large.any())
        dropped = self._dropped(branch) if on and runaway else {}
        # the slow road (round 3): the whole model's gradient held above `climb` x its median over the
        # previous `climb_window` logging steps for `sustained` logging steps in a row, at large adaptive steps:
        # stock LMs climb this way 10-40 steps before their spike, while one noisy batch or one layer's swing
        # lasts a step or two
        n = self._streak_since("whole", on and bool(climb > self.climb),
                               not (on and bool(climb > math.sqrt(self.climb))), int(m.step), self.sustained)
        climbing, calm = n >= self.sustained, not n
        # the weights inflate (round 4): the weight norms of a share of the layers grow by nearly the whole
        # length of their steps, each step scaling the weight up (the logit growth of Wortsman et al. 2023: a
        # softmax sharpened by growing its weights); judged from the `inflate_from`-th logging step (30, as the
        # other triggers: 20 won 4 calibration runs, none on round 6's test, and warned on the zoo's MobileNetV2)
        self.state["logged"] = logged = int(self.state["logged"]) + 1
        align = _inflation.alignment(self.state["norms"], names, m.values("weight_norm")[idx], u, int(m.step),
                                     self.inflate_window, judge=logged > self.inflate_from)
        share = _inflation.reached(align, self.inflate_share)
        n = self._streak_since("inflate", on and share > self.inflate,
                               not (on and share > self.inflate / 2), int(m.step), self.inflate_patience)
        inflating = n >= self.inflate_patience
        calm = calm and not n
        # the loss climbs (round 7): its level, the median over the last `risen_window` logging steps, stands
        # a bar (`risen` nats, or more for a loss of larger scale or noise: _loss.risen) above the best level it
        # reached, at large adaptive steps: a run on its way to diverging (post-LN models climb back to chance
        # this way, with no layer's signal growing first)
        rise = (_loss.risen(self.state["loss"], self.risen_window, self.risen) if self.risen is not None
                else None)
        n = self._streak_since("loss", on and rise is not None and rise.up,
                               not (on and rise is not None and rise.half), int(m.step))
        climbed = rise if n >= self.patience else None
        calm = calm and not n
        self._remember("update", names, u)
        self._remember("grad", names, g)
        growing, quiet = [], []
        grown = (ru > self.update_growth) & (rg > self.grad_growth) & beyond & large
        # a runaway spreads: `together` layers or more growing in one logging step need the whole model's gradient
        # at grad_growth only, one or two at `runaway` (near-edge runs swing one layer at a time, docs/alerts.md)
        runaway = runaway or (int(grown.sum()) >= self.together and bool(whole > self.grad_growth))
        for name, fire, a, b in zip(names, grown & runaway, ru, rg):
            clear = not (a > math.sqrt(self.update_growth) or b > math.sqrt(self.grad_growth))
            n = self._streak_since(name, bool(fire), clear, int(m.step))
            calm = calm and not n
            if n >= self.patience:
                growing.append(name)
        for block in branch:  # a branch knocked quiet: its gradient fell branch_drop x against its skip
            n = self._streak_since(f"branch:{block}", block in dropped, block not in dropped, int(m.step))
            calm = calm and not n
            if n >= self.patience:
                quiet.append(block)
        opened = self.state["opened"]
        # while the loss falls the model is learning: a gradient that climbs as it leaves a plateau is no runaway
        # (round 4, docs/alerts.md: the one healthy usual-recipe run warned); a warning already open stays
        held = learning and opened is None
        if (growing or quiet or climbing or inflating or climbed) and opened is None and not held:
            # the branches' level before: their window medians
            opened = self.state["opened"] = int(m.step)
            self.state["baseline"] = {k: nanmedian(h) for k, h in self.state["branch"].items() if h}
        exploded = self._exploded(branch) if opened is not None else []
        if opened is None or not exploded:  # the level before: kept while no warning is open
            self._remember("branch", list(branch), np.array(list(branch.values()), dtype=np.float64))
        if held or not (growing or exploded or quiet or climbing or inflating or climbed):
            if calm:
                self.state["opened"] = None
                self.state["baseline"] = {}
            return []
        if exploded:
            m.context["unstable_blocks"] = set(exploded)
        return [finding(self, m, names, u, ru, rg, growing, exploded, quiet, dropped, int(opened), climbing,
                        align if inflating else None, climbed)]

    def _streak_since(self, key: str, fire: bool, clear: bool, step: int, patience: int | None = None) -> int:
        """``key``'s streak (:meth:`Rule.hold`, ``patience`` its own), keeping the step it began in
        ``state["since"]`` (the incident names layers, blocks and the climb from when they moved) while it lasts."""
        n = self.hold(key, fire, clear, patience=patience)
        since: dict[str, int] = self.state["since"]
        if n:
            since.setdefault(key, step)
        else:
            since.pop(key, None)
        return n

    def _learning(self, loss: float | None) -> bool:
        """Keeps ``loss`` (:mod:`._loss`) and says whether it is falling: the median of the last
        ``falling_window`` losses given is ``falling`` (1%) or more below the median of the ``falling_window``
        before. False while fewer are known (no loss given: the rule judges as without this check)."""
        if loss is None:
            return False
        _loss.add(self.state["loss"], loss, 2 * max(self.falling_window, self.risen_window))
        return _loss.falling(self.state["loss"], self.falling_window, self.falling)

    def _ratios(self, key: str, names: list[str], values: np.ndarray) -> np.ndarray:
        """Each value over the median of its last ``window`` values (NaN until ``window`` are kept)."""
        hist: dict[str, list[float]] = self.state[key]
        out = np.full(len(names), np.nan)
        full = [i for i, n in enumerate(names) if len(hist.get(n, ())) >= self.window]
        if full:  # one median over a (layers x window) array: rules run on every logging step
            with warnings.catch_warnings():  # a window of NaN only (a layer never updated): NaN, is no growth
                warnings.simplefilter("ignore", RuntimeWarning)
                med = nanmedian_rows(np.array([hist[names[i]][-self.window:] for i in full], dtype=np.float64))
            v = np.asarray(values, dtype=np.float64)[full]
            with np.errstate(divide="ignore", invalid="ignore"):
                out[full] = np.where((med > 0) & np.isfinite(v), v / med, np.nan)
        return out

    def _whole_ratio(self, m: Measurements) -> tuple[float, float]:
        """The whole model's gradient norm over its median over the previous ``window`` and over the previous
        ``climb_window`` logging steps (each NaN until that many are kept); the norm is the monitor's ``_global``
        entry, else the root sum of squares of the layers' gradient norms. The value is then kept."""
        g = float(m.whole.get("grad_norm", math.nan))
        if not math.isfinite(g):
            layers = m.values("grad_norm")
            layers = layers[np.isfinite(layers)]
            g = float(np.sqrt(np.sum(layers ** 2))) if len(layers) else math.nan
        hist: list[float] = self.state["whole"]
        ratios = []
        for w in (self.window, self.climb_window):
            ratio = math.nan
            if len(hist) >= w:
                med = nanmedian(hist[-w:])
                if med > 0 and math.isfinite(g):
                    ratio = g / med
            ratios.append(ratio)
        hist.append(g if math.isfinite(g) else math.nan)
        del hist[: max(0, len(hist) - max(self.window, self.climb_window))]
        self.state["whole_ratio"] = ratios[0] if math.isfinite(ratios[0]) else None
        self.state["climb_ratio"] = ratios[1] if math.isfinite(ratios[1]) else None
        return ratios[0], ratios[1]

    def _scatter(self, key: str, names: list[str]) -> np.ndarray:
        """Each layer's median absolute deviation of log values over its window (NaN until it is full)."""
        hist: dict[str, list[float]] = self.state[key]
        out = np.full(len(names), np.nan)
        full = [i for i, n in enumerate(names) if len(hist.get(n, ())) >= self.window]
        if full:
            with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # as in _ratios
                x = np.log(np.array([hist[names[i]][-self.window:] for i in full], dtype=np.float64))
                out[full] = nanmedian_rows(np.abs(x - nanmedian_rows(x)[:, None]))
        return out

    def _remember(self, key: str, names: list[str], values: np.ndarray) -> None:
        hist: dict[str, list[float]] = self.state[key]
        for name, v in zip(names, values):
            h = hist.setdefault(name, [])
            h.append(float(v) if math.isfinite(v) else math.nan)
            del h[: max(0, len(h) - self.window)]

    @staticmethod
    def _branch_ratio(m: Measurements) -> dict[str, float]:
        """Each block's branch/skip gradient amplitude (what skip_share reads as a collapse when it is large)."""
        if not m.blocks:
            return {}
        br, sk = m.block_values("branch_grad"), m.block_values("skip_grad")
        with np.errstate(divide="ignore", invalid="ignore"):
            r = br / sk
        return {b: float(v) for b, v in zip(m.blocks, r) if math.isfinite(v) and v >= 0}

    def _exploded(self, branch: dict[str, float]) -> list[str]:
        base = self.state["baseline"]
        return [b for b, v in branch.items() if b in base and base[b] > 0 and v > self.branch_growth * base[b]]

    def _follows_gradient(self, step: np.ndarray, grad: np.ndarray) -> bool:
        """Whether the update follows the gradient, as SGD's does: every weight layer takes about the same step
        per unit of gradient, ``|update| / |gradient|`` (one learning rate times the momentum-averaged
        gradient): its 10-90% range over the layers, median over the window, is under ``follows_gradient``
        decades. An adaptive optimizer (Adam) divides each coordinate by its own gradient scale, so its layers'
        steps per unit gradient span what their gradients span (docs/alerts.md has the measured ranges).
        Unknown (fewer than 3 layers) reads as adaptive: the rule judges."""
        with np.errstate(divide="ignore", invalid="ignore"):
            r = np.log10(step / grad)
        r = r[np.isfinite(r)]
        hist: list[float] = self.state["spread"]
        if len(r) >= 3:
            high, low = quantiles(r, (0.9, 0.1))  # one sort for both
            hist.append(high - low)
            del hist[: max(0, len(hist) - self.window)]
        return bool(hist) and nanmedian(hist) < self.follows_gradient

    def _dropped(self, branch: dict[str, float]) -> dict[str, float]:
        """Blocks whose branch/skip amplitude is ``branch_drop`` times below its median over the window (the
        window full), with that factor."""
        hist: dict[str, list[float]] = self.state["branch"]
        out = {}
        for b, v in branch.items():
            h = hist.get(b, ())
            if len(h) >= self.window:
                med = nanmedian(h)
                if med > 0 and v * self.branch_drop < med:
                    out[b] = med / v if v > 0 else math.inf
        return out

    def load_state_dict(self, state: Any) -> None:
        """Restore the saved state (JSON turns the step keys and histories into plain types: kept as is)."""
        super().load_state_dict(state)
        for key, empty in (("update", {}), ("grad", {}), ("branch", {}), ("since", {}), ("opened", None),
                           ("baseline", {}), ("spread", []), ("whole", []), ("whole_ratio", None),
                           ("climb_ratio", None), ("norms", _inflation.empty()), ("loss", _loss.empty()),
                           ("logged", 0)):
            self.state.setdefault(key, empty)
