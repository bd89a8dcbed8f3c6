"""The built-in alert rules: turn one logging step's measurements into findings. Open this file to add a rule.

Every logging step the :class:`~gradwatch.Monitor` gathers what it recorded (per-layer metrics in forward
order, the whole-model ``_global`` entry and, when block flow is on, per-block metrics) into one
:class:`Measurements` and hands it to each :class:`Rule`. A rule returns the :class:`~gradwatch.Alert` s it
raises at that step; what happens next (cooldown, the JSONL record, sinks, the ``on_critical`` policy) is
:mod:`gradwatch.alerts`'s business. Rules keep their state (streak counters, running baselines) in plain
dicts so that it travels in the monitor's ``state_dict`` and survives checkpoint/resume.

Rules see the same numbers on every rank, so they reach the same verdict everywhere without communicating:
per-layer gradients are identical after DDP's all-reduce (FSDP/DTensor norms are all-reduced), and block-flow
metrics, measured on each rank's own activations, are summed across ranks into the global batch's values
(:mod:`gradwatch.measure.parallel`) when the monitor syncs ranks (``Monitor(sync_ranks=...)``: on by default for DDP-wrapped and DTensor
models, always in the Lightning callback). With ``sync_ranks=False`` the block rules may disagree across ranks.

Adding a rule::

    class TooQuiet(Rule):
        name = "too_quiet"
        def check(self, m):
            g = m.whole.get("grad_norm", float("nan"))
            if self.streak("all", g < 1e-9) >= self.patience:
                return [self.alert(m, "warning", None, g, 1e-9, "no gradient at all", "is the loss detached?")]
            return []

    gradwatch.Monitor(model, rules=[*gradwatch.alerts.default_rules(), TooQuiet()])

Defaults and the measurements behind them are in ``docs/alerts.md``
(reproduce with ``python benchmarks/calibrate_alerts.py``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from .._checks import check_fraction, check_int, check_number
from ..names import EARLY_FRACTION, short_list
from ._spike import SpikeReference
from .alert import Alert
from .highway import highway
from .instability import Instability
from .lost import LostSkip
from .measurements import Measurements, depth_slope, early_ratio
from .rule import FAR, Rule

__all__ = [
    "SkipCollapse", "AttenuatedIdentity", "Vanishing", "Exploding", "DepthTrend", "NonFinite", "DeadLayer", "RULES",
    "default_rules",
    "build_rules", "replay",
]


#: A skip whose gain ``skip_grad / grad_out`` is within this of 1 passes the gradient on as an identity does
#: (:func:`~gradwatch.alerts.highway.highway`'s default band): ``skip_collapse`` does not read it as broken.
IDENTITY_BAND = 0.1


class SkipCollapse(Rule):
    """A residual block's skip carries (almost) no gradient, or has lost it.

    Reads each block's ``skip_share`` = skip_grad² / (skip_grad² + branch_grad²). Fires (naming the block)
    when it is below ``threshold`` *and* has fallen more than ``drop`` times below the block's own early level
    (the median of its first ``baseline_steps`` logging steps), or is ``far`` times below ``threshold`` (a skip
    that passes nothing of note, whatever its history), for ``patience`` consecutive logging steps;
    ``critical`` when below ``critical``. Unlike the early-ratio rules, a far value still waits for
    ``patience``: the planted faults' incidents open where they always did (third logging step). Needs block
    flow (``Monitor(blocks="auto")``); without block metrics it stays silent.

    Why the early level: a skip that carries little gradient by design is not a collapse. A projection
    shortcut at a stage boundary, a 1x1 convolution whose gradient is small next to its branch's, sat at
    skip_share 5e-4 (2e-3 at 224 px) in a healthy hybrid conv/attention net for its whole run; a collapse is
    a change, or nothing at all. Defaults (``docs/alerts.md``): healthy stock nets stay above 0.0055 at every
    logging step; a detached skip gives 0 and a skip scaled by 1e-4 ~1e-8, both far below ``threshold / far``
    = 2e-4.

    A block whose skip passes the gradient on unchanged (gain ``skip_grad / grad_out`` within
    :data:`IDENTITY_BAND` of 1, when both are measured) is not a collapse: its share is low because its branch
    is large, not because the skip lost the gradient (a detached or scaled skip has a gain of 0 or 1e-4).
    A block the ``instability`` rule lists in ``m.context["unstable_blocks"]`` (its branch grew against its
    skip since an instability warning opened) is left to that rule: its streak restarts, so it is judged
    again only once the instability is over. A lost block (``m.lost``: its merge is gone from the graph) is
    ``lost_skip``'s, which names it at once.
    """

    name = "skip_collapse"

    def __init__(self, threshold: float = 1e-3, critical: float | None = None, patience: int = 3,
                 drop: float = 10.0, baseline_steps: int = 5, clear_margin: float = 2.0, far: float = FAR) -> None:
        super().__init__(patience, clear_margin, far)
        self.threshold = check_number(threshold, "threshold", owner=self.name)
        self.critical = check_number(critical, "critical", owner=self.name, allow_none=True)
        self.drop = check_number(drop, "drop", owner=self.name)
        self.baseline_steps = check_int(baseline_steps, "baseline_steps", minimum=1, owner=self.name)

    def check(self, m: Measurements) -> list[Alert]:
        """One finding per block whose ``skip_share`` has been far below ``threshold``, or below it and ``drop``
        times below its early level, for ``patience`` logging steps."""
        share = m.block_values("skip_share")
        # Left to the rule that says why: a branch that exploded (instability), a merge gone from the graph
        # (lost_skip, whose skip_share reads 0): one incident per cause, not two naming the same block.
        explained = set(m.context.get("unstable_blocks", ())) | set(m.lost)
        # A skip that passes the gradient on unchanged (gain skip_grad / grad_out within 10% of 1: an intact
        # identity) is not broken: its share fell because its branch grew (a pre-LN MLP branch 30x its skip in a
        # stable TinyGPT run), which is the business of `instability`, not of a detach or a gate on the skip.
        with np.errstate(divide="ignore", invalid="ignore"):
            gain = m.block_values("skip_grad") / m.block_values("grad_out")
        intact = np.isfinite(gain) & (gain > 1 - IDENTITY_BAND) & (gain < 1 / (1 - IDENTITY_BAND))
        out = []
        for name, s, whole in zip(m.blocks, share, intact):
            if name in explained or whole:
                self.streak(name, False)
                continue
            finite = bool(np.isfinite(s))
            base = self._early_level(name, float(s))
            fell = finite and s < self.threshold and s * self.drop < base  # base holds s itself at first: no fall
            far = finite and s < self.threshold / self.far
            n = self.hold(name, fell or far, finite and s >= self.threshold * self.clear_margin)
            if self.firing(name):
                severity = "critical" if self.critical is not None and s < self.critical else "warning"
                since = f" for {n} logging steps" if n > 1 else ""
                how = (f"far below {self.threshold:g}{since}" if s < self.threshold / self.far else
                       f"< {self.threshold:g}{since}, down from {base:.3g} in its first logging steps")
                out.append(self.alert(
                    m, severity, name, s, self.threshold,
                    f"block {name}: the skip carries {s:.3g} of the gradient reaching the block input "
                    f"(skip_share {how}); the block trains like a plain one",
                    "look for a .detach(), a multiply by ~0 or a gate closing on the skip path of this block's "
                    "forward; healthy ResNets keep skip_share above ~0.02",
                ))
        return out

    def _early_level(self, name: str, share: float) -> float:
        """The block's early level: the median of its first ``baseline_steps`` finite shares (until it has them,
        of those seen so far, ``share`` included). Kept in :attr:`state` (block -> list, then the median)."""
        early = self.state.setdefault("early", {})
        level = early.get(name, [])
        if not isinstance(level, list):
            return float(level)
        if math.isfinite(share):
            level = [*level, share]
        early[name] = float(np.median(level)) if len(level) >= self.baseline_steps else level
        return float(np.median(level)) if level else math.nan


class AttenuatedIdentity(Rule):
    """The identity path is gone: most of the chain's skips pass the gradient on scaled, gated or projected.

    Reads each block's skip gain ``skip_grad / grad_out`` (exactly 1 for an identity skip;
    :mod:`gradwatch.alerts.highway`). Fires (warning) when, for ``patience`` consecutive logging steps, more
    than ``share`` of at least ``min_blocks`` blocks have a gain outside ``[1 - band, 1 / (1 - band)]`` *and*
    their gains compound to a factor beyond ``10 ** departure`` along the chain, either way. Names the blocks
    and their gains. Needs block flow.

    Defaults, from ``docs/alerts.md``: healthy stock nets keep at most 0.375 of their blocks off identity (the
    projection shortcuts where a stage changes shape) with a compounded departure of at most 10^1.97; He et
    al. 2016's constant scaling, gating at b_g = 0, 1x1-convolution and dropout shortcuts on a ResNet-110 read
    0.46-1.0 and 10^3.8-10^16. Shortcut-only and exclusive gating at b_g = -6 (a gate ~0.0025: near identity)
    stay quiet. A skip up-weighted on purpose before a post-norm (DeepNorm's ``alpha * x + F(x)``) reads as
    amplified: turn the rule off for such a model (``rules={"attenuated_identity": False}``).
    """

    name = "attenuated_identity"

    def __init__(self, share: float = 0.5, departure: float = 3.0, band: float = 0.1, min_blocks: int = 4,
                 patience: int = 3, clear_margin: float = 2.0) -> None:
        super().__init__(patience, clear_margin)
        self.share = check_fraction(share, "share", owner=self.name)
        self.departure = check_number(departure, "departure", owner=self.name)
        self.band = check_fraction(band, "band", owner=self.name)
        self.min_blocks = check_int(min_blocks, "min_blocks", minimum=1, owner=self.name)

    def check(self, m: Measurements) -> list[Alert]:
        """One finding while the chain of skips has stopped being an identity path."""
        h = highway(m, self.band)
        if h is None or h.measured < self.min_blocks:
            self.streak("chain", False)
            return []
        fire = h.share > self.share and h.departure >= self.departure
        clear = h.share <= self.share / self.clear_margin or h.departure < self.departure / self.clear_margin
        n = self.hold("chain", fire, clear)
        if n < self.patience:
            return []
        off = np.flatnonzero(h.off)
        worst = off[np.argsort(-np.abs(np.log10(h.gains[off])))][:3]
        way = "attenuated" if h.compounded < 1 else "amplified"
        gains = h.gains[off]
        return [self.alert(
            m, "warning", None, h.departure, self.departure,
            f"the identity path is {way}: {len(off)} of {h.measured} blocks pass the gradient through their skip "
            f"with a gain of {np.median(gains):.2g} (from {gains.min():.2g} to {gains.max():.2g}; an identity "
            f"skip passes 1), compounding to {h.compounded:.2g} along the chain; most "
            f"{'attenuated' if way == 'attenuated' else 'changed'}: "
            + ", ".join(f"{h.blocks[i]} ({h.gains[i]:.2g})" for i in worst)
            + (f"; for {n} logging steps" if n > 1 else "")
            + ". The network trains like a plain one",
            "keep each shortcut an identity: no scaling, gating, dropout or convolution on the skip path, a "
            "projection only where the shape changes (He et al. 2016, Identity Mappings in Deep Residual "
            "Networks); `gradwatch inspect` shows each block's skip ops",
            subject="identity path",
        )]


class Vanishing(Rule):
    """Early layers get far less gradient, relative to their weights, than the network typically does.

    Among the ``"weight"`` layers (conv/linear, in forward order), the *early* ones are the first ``early``
    fraction. The statistic is median(grad_to_weight of early layers) / median(grad_to_weight of all weight
    layers). Fires (warning) when it is below ``relative`` or the early median is below the absolute
    ``floor``, for ``patience`` consecutive logging steps (at once when the statistic is ``far`` times below
    ``relative``; the floor always needs ``patience``: a solved batch crosses it by decades); critical when
    the statistic is below ``critical``. Relative, so one default holds across models and learning rates; the floor catches a whole
    network whose gradients vanish together. Normalisation layers and embeddings are left out: their ratios
    live on another scale.
    """

    name = "vanishing"

    def __init__(self, relative: float = 0.02, floor: float | None = 1e-7, critical: float | None = 1e-4,
                 early: float = EARLY_FRACTION, patience: int = 3, min_layers: int = 4,
                 clear_margin: float = 2.0, far: float = FAR) -> None:
        super().__init__(patience, clear_margin, far)
        self.relative = check_number(relative, "relative", owner=self.name)
        self.floor = check_number(floor, "floor", owner=self.name, allow_none=True)
        self.critical = check_number(critical, "critical", owner=self.name, allow_none=True)
        self.early = check_fraction(early, "early", owner=self.name)
        self.min_layers = check_int(min_layers, "min_layers", minimum=1, owner=self.name)

    def check(self, m: Measurements) -> list[Alert]:
        """One finding while the early layers' ``grad_to_weight`` stays low, relative to the network or below
        ``floor``."""
        stat = early_ratio(m, self.early, self.min_layers)
        if stat is None:
            self.streak("early", False)
            return []
        ratio, early_med, typical, names = stat.ratio, stat.early_median, stat.typical, stat.early
        rel_low = bool(np.isfinite(ratio) and ratio < self.relative)
        floor_low = self.floor is not None and early_med < self.floor
        clear = bool(np.isfinite(ratio) and ratio >= self.relative * self.clear_margin) and \
            (self.floor is None or early_med >= self.floor * self.clear_margin)
        # Only the relative statistic fires at once when far past: the absolute floor is crossed by decades for
        # one step by any batch the net has already solved (a resnet18 near zero loss: early median 1.6e-8).
        far = bool(np.isfinite(ratio) and ratio < self.relative / self.far)
        n = self.hold("early", rel_low or floor_low, clear, far)
        if not self.firing("early"):
            return []
        severity = "critical" if self.critical is not None and np.isfinite(ratio) and ratio < self.critical \
            else "warning"
        hint = ("typical of deep nets without skips or normalisation, saturating activations (sigmoid/tanh) or a "
                "bad init: add residual connections or BatchNorm/LayerNorm, use ReLU-family activations and "
                "He/Kaiming init; check the layers listed")
        if rel_low or not floor_low:
            value, threshold = ratio, self.relative
            what = (f"early layers ({short_list(names, 3)}) have a median grad_to_weight {early_med:.3g}, "
                    f"{ratio:.3g} times the network's median {typical:.3g}")
        else:  # the whole network is this low, not the early layers against the rest: not a depth problem
            value, threshold = early_med, float(self.floor)
            what = (f"early layers ({short_list(names, 3)}) have a median grad_to_weight {early_med:.3g} < "
                    f"{self.floor:g}, and so has the network as a whole (median {typical:.3g})")
            hint = ("every layer's gradient is this small, not only the early ones': the loss is (near) zero (a "
                    "memorised batch, a solved task), the loss or the learning signal is scaled to ~0, or the "
                    "output saturates; if the loss is still high, check the output layer and the loss")
        return [self.alert(
            m, severity, None, value, threshold,
            f"vanishing gradients: {what}" + (f" for {n} logging steps" if n > 1 else "")
            + "; they have (almost) stopped learning", hint,
        )]


class Exploding(Rule):
    """Early layers far above the typical value, or a spike of the whole-model gradient norm.

    Two conditions, one rule: (1) median(grad_to_weight of early weight layers) / median(all weight layers) above
    ``relative`` for ``patience`` consecutive logging steps, or at once when above ``relative * far`` (with the
    same *early* as :class:`Vanishing`; the lower median of the early depths, so that half of them must read it:
    one layer alone is not "the early layers"); (2) ``grad_norm`` of ``_global`` more than ``spike`` times its
    reference: the ``spike_quantile`` (0.9) of the last ``spike_window`` logging steps' norms, what a hard batch
    of this run reads (:mod:`gradwatch.alerts._spike`; judged after ``warmup`` steps). A spike is ``info`` when it
    lasts less than ``spike_patience`` consecutive logging steps (healthy stock models spike and recover:
    ``docs/validation.md``), ``warning`` once it has lasted that long, ``critical`` when it exceeds
    ``critical_spike``.
    """

    name = "exploding"

    def __init__(self, relative: float = 20.0, spike: float | None = 10.0, critical_spike: float | None = 1e3,
                 early: float = EARLY_FRACTION, patience: int = 3, warmup: int = 5, spike_window: int = 64,
                 spike_quantile: float = 0.9, min_layers: int = 4, spike_patience: int = 3,
                 clear_margin: float = 2.0, far: float = FAR) -> None:
        super().__init__(patience, clear_margin, far)
        self.spike_patience = check_int(spike_patience, "spike_patience", minimum=1, owner=self.name)
        self.relative = check_number(relative, "relative", owner=self.name)
        self.spike = check_number(spike, "spike", owner=self.name, allow_none=True)
        self.critical_spike = check_number(critical_spike, "critical_spike", owner=self.name, allow_none=True)
        self.early = check_fraction(early, "early", owner=self.name)
        self.warmup = check_int(warmup, "warmup", minimum=0, owner=self.name)
        self.spike_window = check_int(spike_window, "spike_window", minimum=1, owner=self.name)
        self.spike_quantile = check_fraction(spike_quantile, "spike_quantile", owner=self.name)
        self.min_layers = check_int(min_layers, "min_layers", minimum=1, owner=self.name)

    def check(self, m: Measurements) -> list[Alert]:
        """Up to two findings: early layers far above the network's typical ``grad_to_weight``, and a ``grad_norm``
        spike."""
        out = []
        # siblings (layers reading one input) count at their smallest ratio: a depth is flooded only if all agree
        stat = early_ratio(m, self.early, self.min_layers, agree="min")
        ratio = stat.ratio if stat is not None else math.nan  # NaN compares False: neither high nor far
        high = bool(ratio > self.relative)
        low = stat is None or bool(ratio <= self.relative / self.clear_margin)
        n = self.hold("early", high, low, far=bool(ratio > self.relative * self.far))
        if self.firing("early") and stat is not None:
            out.append(self.alert(
                m, "warning", None, stat.ratio, self.relative,
                f"exploding gradients toward the input: early layers ({short_list(stat.early, 3)}) have a median "
                f"grad_to_weight {stat.early_median:.3g}, {stat.ratio:.3g} times the network's median "
                f"{stat.typical:.3g}" + (f", for {n} logging steps" if n > 1 else ""),
                "typical of deep nets without skip connections (BatchNorm alone makes gradients grow toward the "
                "input at init); add residual connections, lower the learning rate or warm it up, clip gradients",
                subject="early layers",
            ))
        g = m.whole.get("grad_norm", math.nan)
        if self.spike is not None:
            reference = SpikeReference(self.state, self.spike, self.spike_window, self.spike_quantile, self.warmup)
            base = reference.reference()
            factor = reference.judge(g)
            if np.isfinite(factor) and base is not None:
                held = self.streak("spike", factor > self.spike)
                if held:
                    severity = "critical" if self.critical_spike is not None and factor > self.critical_spike \
                        else ("warning" if held >= self.spike_patience else "info")
                    out.append(self.alert(
                        m, severity, None, factor, self.spike,
                        f"gradient norm spike: the whole-model grad_norm {g:.3g} is {factor:.3g} times its recent "
                        f"upper range {base:.3g} (the {self.spike_quantile:g} quantile of the last "
                        f"{self.spike_window} logging steps)" + (f", for {held} logging steps" if held > 1 else ""),
                        "a bad batch, a too-high learning rate or an unstable layer: clip gradients "
                        "(torch.nn.utils.clip_grad_norm_), lower or warm up the learning rate, look at the "
                        "grad_norm curves of the layers to find where it starts",
                        subject="grad_norm spike",
                    ))
        return out


class DepthTrend(Rule):
    """Gradient magnitude decaying or growing exponentially with depth.

    Fits log10 of the gradient against depth by least squares and fires when, for ``patience`` consecutive
    logging steps, the slope is beyond a bound *and* the fitted change from the first to the last point is more
    than ``min_total`` times (a shallow healthy net can be steep per block without going far: a ResNet-20 at
    init grows ~1.27x per block toward the input, 7x in all). With block flow the profile is ``grad_in``
    (‖dL/dx‖ at each block input, in depth order; bound ``per_block`` decades per block). Without it (no
    residual blocks found, e.g. a plain net) the proxy is ``grad_to_weight`` of the weight layers except the
    output layer (bound ``per_layer`` decades per layer). A positive slope (gradient larger at the output)
    means it decays toward the input; a negative one that it grows toward the input.

    Always ``info``: a profile is context, not a verdict. Healthy stock nets go far both ways — torchvision's
    resnet50 grows 143x over 16 blocks toward the input at initialisation and, trained at SGD 0.05, later
    decayed 133x toward it (ResNeXt and Wide ResNet up to 447x); a 10-layer ReLU MLP at PyTorch's default init
    decays 2,000x and trains (``docs/validation.md``). Whether the early layers are actually starved or flooded is what :class:`Vanishing` and
    :class:`Exploding` judge, on the layers' own ratios.
    """

    name = "depth_trend"

    def __init__(self, per_block: float = 0.1, per_layer: float = 0.05, min_total: float = 100.0,
                 patience: int = 3, min_points: int = 6, clear_margin: float = 2.0) -> None:
        super().__init__(patience, clear_margin)
        self.per_block = check_number(per_block, "per_block", owner=self.name)
        self.per_layer = check_number(per_layer, "per_layer", owner=self.name)
        self.min_total = check_number(min_total, "min_total", owner=self.name)
        self.min_points = check_int(min_points, "min_points", minimum=2, owner=self.name)

    def check(self, m: Measurements) -> list[Alert]:
        """One ``info`` finding while the gradient's depth profile decays or grows too fast and too far."""
        stat = depth_slope(m, self.min_points)
        if stat is None:
            self.streak("decay", False)
            self.streak("growth", False)
            return []
        unit, slope, points = stat
        bound = self.per_block if unit == "block" else self.per_layer
        total = 10 ** (abs(slope) * (points - 1))
        far = total > self.min_total
        near = total <= self.min_total / self.clear_margin
        decay = self.hold("decay", far and slope > bound, near or slope <= bound / self.clear_margin)
        growth = self.hold("growth", far and slope < -bound, near or slope >= -bound / self.clear_margin)
        n = max(decay, growth)
        if n < self.patience:
            return []
        what = "block input gradient ‖dL/dx‖" if unit == "block" else "grad_to_weight of the weight layers"
        direction = "decays toward the input" if slope > 0 else "grows toward the input"
        severity = "info"
        return [self.alert(
            m, severity, None, slope, bound if slope > 0 else -bound,
            f"depth trend: the {what} {direction} by {10 ** abs(slope):.3g}x per {unit} "
            f"(fitted over {points} {unit}s: {total:.3g}x end to end) for {n} logging steps",
            "an exponential profile over depth is the signature of a net that cannot pass gradient through "
            "its depth: add or repair skip connections, normalisation, or the init scale"
            + (" (look for blocks with low skip_share or transmission far from 1)" if unit == "block" else ""),
            subject="decay" if slope > 0 else "growth",
        )]


class NonFinite(Rule):
    """A NaN or Inf gradient: critical at once, naming the first layer in forward order where it appears.

    Forward order is the order the modules ran in on the monitor's first measured step
    (:attr:`Measurements.forward`); layers it did not see, and all layers when it is unknown (:func:`replay`),
    follow in definition order.

    One condition for the whole model (the layer named may change from step to step): one incident, open
    while any gradient is non-finite; while it is open it inhibits every other rule's findings, since after
    a NaN every statistic is garbage (:mod:`gradwatch.alerts.tracker`).

    A NaN born in the backward pass spreads to every layer *before* it in forward order, so the message also
    names the last non-finite layer (where a backward-born NaN starts). Steps an AMP ``GradScaler`` skipped for
    overflow never reach the rules (the monitor drops them; see ``docs/alerts.md``).
    """

    name = "nonfinite"

    def __init__(self, patience: int = 1) -> None:
        super().__init__(patience)

    def check(self, m: Measurements) -> list[Alert]:
        """One ``critical`` finding while any gradient is NaN or Inf, naming the first such layer in forward order."""
        g = m.values("grad_norm")
        bad = np.flatnonzero(~np.isfinite(g))
        whole = m.whole.get("grad_norm", math.nan)
        present = bool(len(bad)) or ("grad_norm" in m.whole and not np.isfinite(whole))
        n = self.streak("any", present)
        if n < self.patience:
            return []
        if len(bad):
            ordered = m.forward_sorted(bad)
            first, last = m.layers[ordered[0]], m.layers[ordered[-1]]
            value = g[ordered[0]]
            where = f"first in forward order: {first}"
            if len(bad) > 1:
                where += f"; {len(bad)} of {len(m.layers)} layers non-finite, the last is {last}"
        else:
            first, value, where = None, whole, "in the whole-model norm"
        bad_w = [m.layers[i] for i in np.flatnonzero(~np.isfinite(m.values("weight_norm")))]
        if bad_w:
            where += f"; weights already non-finite in {short_list(bad_w, 3)}"
        return [self.alert(
            m, "critical", first, value, math.inf,
            f"non-finite gradient ({value}) at step {m.step} ({where})",
            "NaN/Inf in the backward pass: look for log/sqrt/division at 0 or overflow in that layer or the loss "
            "(a NaN born in backward spreads to all earlier layers, so check the last one listed); lower the "
            "learning rate, clip gradients; under float16 use a GradScaler",
            subject="model",
        )]


class DeadLayer(Rule):
    """A trainable layer that does not learn: its gradient is exactly zero, or its update across the
    optimizer step is exactly zero while its gradient is not, for ``patience`` consecutive logging steps.

    Layers whose ``.grad`` is ``None`` are not measured at all (the monitor logs them once); this catches a
    layer that is in the graph but receives nothing (dead ReLUs, a zero gate, an output multiplied by 0, an
    unused layer under ``zero_grad(set_to_none=False)``), and, with an optimizer watched
    (``update_to_weight`` measured), a layer the optimizer does not move: a learning rate of 0 in its param
    group, or a parameter missing from the optimizer. When more than ``max_named`` layers are dead at once
    they are reported as one alert.
    """

    name = "dead_layer"

    def __init__(self, patience: int = 3, max_named: int = 5) -> None:
        super().__init__(patience)
        self.max_named = check_int(max_named, "max_named", minimum=1, owner=self.name)

    def check(self, m: Measurements) -> list[Alert]:
        """One finding per layer with an exactly zero gradient (or update) for ``patience`` logging steps; one in all
        past ``max_named``."""
        before = self.state["streaks"]
        grad, update = m.values("grad_norm"), m.values("update_to_weight")
        zero = [m.layers[i] for i in np.flatnonzero(grad == 0.0)]
        still = [m.layers[i] for i in np.flatnonzero((update == 0.0) & (grad > 0))]
        self.state["streaks"] = streaks = {name: before.get(name, 0) + 1 for name in zero + still}  # others reset
        hint = ("the layer is in the graph but gets no gradient: dead ReLUs (lower the learning rate, "
                "LeakyReLU), a gate or multiplier stuck at 0, or an unused layer; if intended, freeze it "
                "(requires_grad=False) or exclude it from the monitor")
        still_hint = ("it has a gradient but the optimizer does not move it: a learning rate of 0 in its param "
                      "group, or the parameter is missing from the optimizer; if intended, freeze it "
                      "(requires_grad=False) or exclude it from the monitor")
        out = []
        for names, what, hint_ in ((zero, "exactly zero gradient", hint),
                                   (still, "a gradient but exactly zero update", still_hint)):
            firing = [name for name in names if streaks[name] >= self.patience]
            if len(firing) > self.max_named:
                out.append(self.alert(
                    m, "warning", None, 0.0, 0.0,
                    f"{len(firing)} layers have had {what} for {self.patience}+ logging steps: "
                    f"{short_list(firing, self.max_named)}", hint_,
                ))
                continue
            out.extend(self.alert(m, "warning", name, 0.0, 0.0,
                                  f"layer {name} has had {what} for {streaks[name]} logging steps", hint_)
                       for name in firing)
        return out


#: The built-in rules by name, in the order they are evaluated.
RULES: dict[str, type[Rule]] = {
    cls.name: cls for cls in (NonFinite, Instability, SkipCollapse, LostSkip, AttenuatedIdentity, Vanishing,
                              Exploding, DepthTrend, DeadLayer)
}


def default_rules() -> list[Rule]:
    """One instance of every built-in rule with its default settings."""
    return [cls() for cls in RULES.values() if getattr(cls, "on_by_default", True)]


def build_rules(spec: Any) -> list[Rule]:
    """Resolve the ``rules=`` argument of :class:`~gradwatch.Monitor`.

    - ``None``: every built-in rule with defaults;
    - ``False`` or ``[]``: no rules (no detection at all);
    - a dict ``{rule_name: options}``: the built-in rules, each configured with ``options`` (a dict of
      constructor arguments; ``False`` drops the rule; ``True``/``{}`` keeps defaults), e.g.
      ``{"vanishing": {"patience": 5}, "dead_layer": False}``;
    - a list of :class:`Rule` instances (and/or built-in names): exactly those.
    """
    if spec is None:
        return default_rules()
    if spec is False:
        return []
    if isinstance(spec, Mapping):
        unknown = set(spec) - set(RULES)
        if unknown:
            raise ValueError(f"unknown rule(s) {sorted(unknown)}; built-in rules are {list(RULES)}")
        rules = []
        for name, cls in RULES.items():
            opts = spec.get(name, getattr(cls, "on_by_default", True))
            if opts is False:
                continue
            if opts is True:
                opts = {}
            if not isinstance(opts, Mapping):
                raise TypeError(f"rules[{name!r}] must be a dict of options, True or False, got {opts!r}")
            try:
                rules.append(cls(**opts))
            except (TypeError, ValueError) as err:
                raise type(err)(f"rules[{name!r}]: {err}") from None
        return rules
    if isinstance(spec, (str, Rule)) or not isinstance(spec, Iterable):
        raise TypeError("rules must be None, False, a dict of rule options or a list of Rule instances, "
                        f"got {type(spec).__name__}")
    rules = []
    for item in spec:
        if isinstance(item, str):
            if item not in RULES:
                raise ValueError(f"unknown rule {item!r}; built-in rules are {list(RULES)}")
            item = RULES[item]()
        if not isinstance(item, Rule):
            raise TypeError(f"rules entries must be Rule instances or built-in rule names, got {item!r}")
        rules.append(item)
    names = [r.name for r in rules]
    if len(set(names)) != len(names):
        raise ValueError(f"two rules share a name: {names} (rule state is saved by name)")
    return rules


def replay(history: Any, rules: Any = None, kinds: Mapping[str, str] | None = None) -> list[Alert]:
    """Run ``rules`` (as for ``Monitor(rules=...)``) over a recorded history, step by step; return every alert
    they raise (no cooldown). ``kinds`` from :func:`layer_kinds` (without it every layer counts as a weight
    layer). For trying thresholds on a finished run without training again."""
    resolved = build_rules(rules)
    out: list[Alert] = []
    for m in Measurements.from_history(history, kinds):
        for rule in resolved:
            out.extend(rule.check(m))
    return out
