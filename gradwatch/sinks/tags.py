"""Where each value goes on the dashboard: the one owner of gradwatch's TensorBoard tag names.

TensorBoard's Time Series sorts every card by its tag (digits and ``/`` before other characters, otherwise by
character code: uppercase before ``_`` before lowercase), groups the cards by the text before the first ``/``
in that order, and opens the first two groups. gradwatch's names are chosen for that order:

=================================  ========================================================================
``_gradwatch/...``                  the health section, one card: ``1_health``, an image of the open
                                    incidents (rule, layer/block, since which step) and the health figures
                                    with their healthy ranges (``0_unverified`` before it after a failed
                                    self-check). It sorts before the usual (lowercase) names of the user's
                                    groups (``epoch``, ``train_loss``, HF's ``train/``), so it is one of the
                                    two groups TensorBoard opens, and, one card high, it leaves the user's
                                    first group on the first screen
``zz_gradwatch.health/...``         the health figures as curves, numbered so that alphabetical order is
                                    priority order: ``2_skip_share_min``, ``3_grad_to_weight_early_log10``,
                                    ``4_grad_norm_log10``, ``5_transmission_end_to_end_log10``,
                                    ``6_effective_depth``
``zz_gradwatch.alerts/...``         ``open/{info,warning,critical}``, ``count``; texts
                                    ``<rank>_<severity>/<rule>`` per event (critical first in TEXT),
                                    ``summary``
``zz_gradwatch.blocks/...``         histograms across blocks ``<metric>``, ``nonfinite/<metric>``,
                                    ``effective_depth/{p10,p50,p90,n}``
``zz_gradwatch.layers/...``         ``<metric>/_global`` (whole model), histograms across layers
                                    ``<metric>``, ``nonfinite/<metric>``
``zz_gradwatch.pictures/...``       the images: depth × time maps, the profile, the depth distribution
=================================  ========================================================================

The ``zz_`` groups sort after the user's groups. Per-layer and per-block values are not scalar tags by
default: they go into the event file as one tensor per metric and step (``<group>/series/<metric>``, with
the names in ``<group>/series/_names``; plugin ``gradwatch_series``, which TensorBoard shows nowhere), read
back by ``gradwatch report``. So the number of scalar tags per namespace is at most :data:`MAX_SCALAR_TAGS`
whatever the depth. ``layer_scalars=True`` adds one scalar tag per layer (block) and metric,
``<group>/<metric>/<name>``, as before. All names are MLflow-safe (letters, digits, ``_``, ``.``, ``/``).

With ``prefix=""`` the groups are ``_health``, ``zz_health``, ``zz_layers``, ``zz_blocks``, ``zz_alerts``,
``zz_pictures``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from .._checks import check_prefix
from ..alerts.alert import SEVERITIES
from ..names import GLOBAL_NAME
from ..record import StepRecord

__all__ = ["Tags", "Parsed", "DEFAULT_NAMESPACE", "MAX_SCALAR_TAGS", "HEALTH_CARDS", "LOG10_FIGURES"]

#: The namespace of gradwatch's tags unless ``prefix`` says otherwise.
DEFAULT_NAMESPACE = "gradwatch"
#: The most scalar tags one namespace writes without ``layer_scalars`` (27 today: 5 health curves, 4 alerts, 4
#: ``_global``, 4 effective-depth details, 10 ``nonfinite`` counts; 28 with ``0_unverified``), whatever the depth.
MAX_SCALAR_TAGS = 40
_HEALTH_MARK = "_"  # sorts before lowercase group names (and after uppercase ones)
_BULK_MARK = "zz_"  # sorts after every lowercase group name but those starting with zz
_DEPTH_DETAIL = "effective_depth_"

#: The health cards, by figure, in priority order (their numbers make TensorBoard's alphabetical order this
#: order). ``unverified`` and the ``card`` image open the dashboard (``_gradwatch/``); the figures' curves are
#: in ``zz_gradwatch.health/``.
HEALTH_CARDS = {
    "unverified": "0_unverified",
    "card": "1_health",
    "skip_share_min": "2_skip_share_min",
    "grad_to_weight_early": "3_grad_to_weight_early_log10",
    "grad_norm": "4_grad_norm_log10",
    "transmission_end_to_end": "5_transmission_end_to_end_log10",
    "effective_depth": "6_effective_depth",
}
#: The figures written as log10 of their value: ratios and norms spanning decades. On a log scale
#: TensorBoard's smoothing averages factors (0.03 and 0.003 are one apart, not 0.027), and a spike is a
#: bounded step that "ignore outliers" clips less often.
LOG10_FIGURES = frozenset({"grad_to_weight_early", "grad_norm", "transmission_end_to_end"})
_CARD_FIGURE = {card: figure for figure, card in HEALTH_CARDS.items()}
_FIRST_SCREEN = ("unverified", "card")  # in the health group; the other figures' curves go to the bulk
_RANK = {s: 3 - i for i, s in enumerate(SEVERITIES)}  # critical 1, warning 2, info 3


class Parsed(NamedTuple):
    """What a tag holds (:meth:`Tags.parse`): ``name`` (a layer, a block, ``_global``), ``metric`` and whether the
    written value is the log10 of the value."""

    name: str
    metric: str
    log10: bool = False


def _log10(v: float) -> float:
    return math.log10(v) if v > 0 else (-math.inf if v == 0 else math.nan)


class Tags:
    """The tag names for one namespace (``Tags("gradwatch").health("skip_share_min")`` is
    ``"zz_gradwatch.health/2_skip_share_min"``). The namespace is what ``prefix`` options give; it holds no ``/``.

    Args:
        namespace: the namespace, as the ``prefix`` option gives it (``""``: groups ``_health``,
            ``zz_layers``, ...).

    Raises:
        TypeError, ValueError: a namespace that is not a str, or holds a ``/``.
    """

    def __init__(self, namespace: str = DEFAULT_NAMESPACE) -> None:
        self.namespace = check_prefix(namespace)
        ns = self.namespace
        self.health_group = _HEALTH_MARK + (ns or "health")
        self.figures_group, self.layers_group, self.blocks_group, self.alerts_group, self.pictures_group = (
            _BULK_MARK + (f"{ns}.{family}" if ns else family)
            for family in ("health", "layers", "blocks", "alerts", "pictures"))

    @staticmethod
    def namespace_of(tag: str) -> str | None:
        """The namespace of a tag of one of gradwatch's bulk groups (``zz_gradwatch.layers/...`` →
        ``gradwatch``), or None."""
        group = tag.split("/", 1)[0]
        if not group.startswith(_BULK_MARK):
            return None
        head, _, family = group[len(_BULK_MARK):].rpartition(".")
        if family not in ("health", "layers", "blocks", "alerts", "pictures"):
            return "" if group[len(_BULK_MARK):] in ("health", "layers", "blocks", "alerts", "pictures") else None
        return head

    # ------------------------------------------------------------------ single tags
    def health(self, figure: str) -> str:
        """The card of ``figure`` (:data:`HEALTH_CARDS`): ``unverified`` and ``card`` in the health group, the
        figures' curves in ``zz_<namespace>.health``."""
        group = self.health_group if figure in _FIRST_SCREEN else self.figures_group
        return f"{group}/{HEALTH_CARDS.get(figure, figure)}"

    def health_tag(self, figure: str) -> str:
        """Where a health figure goes: its card in the health section, except the effective depth's
        percentiles and block count, which go with the blocks (``zz_gradwatch.blocks/effective_depth/p10``) so
        the health section keeps one card per question."""
        if figure.startswith(_DEPTH_DETAIL):
            return f"{self.blocks_group}/effective_depth/{figure[len(_DEPTH_DETAIL):]}"
        return self.health(figure)

    @property
    def card(self) -> str:
        """The image of the open incidents (rule, layer/block, since which step) and the health figures: the
        health section's card, the first of the dashboard."""
        return self.health("card")

    def layer(self, metric: str, name: str) -> str:
        """The scalar tag of ``metric`` for layer ``name`` (``_global``: always written; others with
        ``layer_scalars``)."""
        return f"{self.layers_group}/{metric}/{name}"

    def block(self, metric: str, name: str) -> str:
        """The scalar tag of ``metric`` for block ``name`` (with ``layer_scalars``)."""
        return f"{self.blocks_group}/{metric}/{name}"

    def series_head(self, metric: str, block: bool) -> str:
        """What precedes the name in :meth:`layer` / :meth:`block` tags."""
        return f"{self.blocks_group if block else self.layers_group}/{metric}/"

    def series(self, metric: str, block: bool) -> str:
        """The tensor tag holding ``metric`` of every layer (or block) at a step, in the order of
        :meth:`series_names`."""
        return f"{self.blocks_group if block else self.layers_group}/series/{metric}"

    def series_names(self, block: bool) -> str:
        """The tensor tag holding the layer (or block) names of the :meth:`series` tensors of the same step."""
        return f"{self.blocks_group if block else self.layers_group}/series/_names"

    def histogram(self, metric: str, block: bool) -> str:
        """The histogram across layers (or blocks) of ``metric``."""
        return f"{self.blocks_group if block else self.layers_group}/{metric}"

    def nonfinite(self, metric: str, block: bool) -> str:
        """The tag counting ``metric``'s NaN/Inf values across layers (or blocks): what its histogram left out."""
        return f"{self.blocks_group if block else self.layers_group}/nonfinite/{metric}"

    def alert_text(self, rule: str, severity: str = "warning") -> str:
        """The text tag of ``rule``'s incident events at ``severity``: critical ones sort first in TEXT."""
        return f"{self.alerts_group}/{_RANK.get(severity, 4)}_{severity}/{rule}"

    @property
    def alert_count(self) -> str:
        """The tag of the number of incident events told per logging step."""
        return f"{self.alerts_group}/count"

    @property
    def kinds(self) -> str:
        """A string tensor (plugin ``gradwatch_series``, shown nowhere): each layer's kind, aligned with the
        layer names of the same step (``gradwatch report`` ranks weight layers)."""
        return f"{self.layers_group}/series/_kinds"

    @property
    def summary(self) -> str:
        """The text tag of the end-of-run summary."""
        return f"{self.alerts_group}/summary"

    def picture(self, name: str) -> str:
        """The image tag of picture ``name`` (``grad_to_weight``, ``skip_share``, ``profile``, ...)."""
        return f"{self.pictures_group}/{name}"

    # ------------------------------------------------------------------ whole records
    def open_incidents(self, severity: str) -> str:
        """The tag of the number of incidents open at ``severity``."""
        return f"{self.alerts_group}/open/{severity}"

    def health_scalars(self, record: StepRecord) -> dict[str, float]:
        """The health section of ``record``: whole-model ``grad_norm`` and the health figures (those that are
        not NaN; :data:`LOG10_FIGURES` as log10), the effective depth's details, and ``unverified`` (1) on every
        record after a failed self-check (:attr:`~gradwatch.StepRecord.verified`). The open incidents are the
        ``card`` image (TensorBoard) and ``open/<severity>`` in the alerts group."""
        out = {}
        if "grad_norm" in record.layer_metrics:
            out[self.health("grad_norm")] = _log10(record.global_value("grad_norm"))
        # a figure the model cannot have (no blocks: no skip_share_min) is left out, not drawn as NaN markers
        for k, v in record.health.items():
            if not math.isnan(v):
                out[self.health_tag(k)] = _log10(float(v)) if k in LOG10_FIGURES else float(v)
        if record.verified is False:  # the self-check failed: said on every step, where the dashboard opens
            out[self.health("unverified")] = 1.0
        return out

    def alert_scalars(self, record: StepRecord) -> dict[str, float]:
        """``alerts/count`` (events told at this step) and ``alerts/open/<severity>`` when alerting is on."""
        if record.alerts is None:
            return {}
        out = {self.alert_count: float(len(record.events))}
        if record.open_incidents is not None:
            out.update({self.open_incidents(s): float(n) for s, n in zip(SEVERITIES, record.open_incidents)})
        return out

    def global_scalars(self, record: StepRecord) -> dict[str, float]:
        """``<metric>/_global``: each layer metric over the whole model."""
        return {self.layer(m, GLOBAL_NAME): float(v) for m, v in zip(record.layer_metrics, record.whole.tolist())}

    def scalars(self, record: StepRecord, counts: bool = False, layer_scalars: bool = False) -> dict[str, float]:
        """The scalars of ``record`` as one flat ``{tag: value}`` dict: health, ``_global``, alerts; with
        ``counts`` the ``nonfinite/<metric>`` counts; with ``layer_scalars`` one per layer (block) and metric.
        What a logger that takes flat dicts receives."""
        out = self.health_scalars(record)
        if layer_scalars:
            for metric, names, values in record.series():
                head = self.series_head(metric, block=metric not in record.layer_metrics)
                out.update(zip((head + n for n in names), values.tolist()))
        else:
            out.update(self.global_scalars(record))
        out.update(self.alert_scalars(record))
        if counts:
            out.update(self.nonfinite_scalars(record))
        return out

    def nonfinite_scalars(self, record: StepRecord) -> dict[str, float]:
        """``{tag: count}``: per metric, the layers (``_global`` left out) or blocks holding NaN or Inf."""
        return {self.nonfinite(m, block=m not in record.layer_metrics): float(c)
                for m, c in record.nonfinite_counts().items()}

    def parse(self, tag: str) -> Parsed | None:
        """What a per-layer, per-block or health scalar tag of this namespace holds (health figures as
        ``("_global", figure)``), or None for any other tag: how ``gradwatch report`` reads event files back."""
        for group in (self.layers_group, self.blocks_group):
            if tag.startswith(group + "/"):
                metric, sep, name = tag[len(group) + 1:].partition("/")
                if group == self.blocks_group and metric == "effective_depth":
                    return Parsed(GLOBAL_NAME, _DEPTH_DETAIL + name)
                if sep and metric not in ("nonfinite", "series"):
                    return Parsed(name, metric)
                return None
        if tag.startswith(self.figures_group + "/"):
            figure = _CARD_FIGURE.get(tag[len(self.figures_group) + 1:])
            if figure is not None and figure != "grad_norm":  # grad_norm: read from the layers
                return Parsed(GLOBAL_NAME, figure, figure in LOG10_FIGURES)
        return None
