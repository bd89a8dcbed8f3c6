"""Where each value goes on the dashboard: the one owner of gradwatch's TensorBoard tag names.

TensorBoard groups cards by the text before the first ``/`` and sorts the groups (it opens the first two).
gradwatch keeps its tags in its own namespace, ``gradwatch`` by default (``Monitor(prefix=...)``), so the
user's own metrics keep their places and gradwatch's sections sit together:

=============================  ============================================================================
``gradwatch/...``               the health section: one card per question (``grad_norm``,
                                ``effective_depth``, ``grad_to_weight_early``, ``open_incidents``,
                                ``skip_share_min``, ``transmission_end_to_end``; ``unverified`` after a
                                failed self-check)
``gradwatch.layers/...``        per layer: ``<metric>/<layer>``, a histogram across layers ``<metric>``, and
                                ``nonfinite/<metric>`` (values the histogram left out)
``gradwatch.blocks/...``        per residual block: ``<metric>/<block>``, histograms, ``nonfinite/<metric>``;
                                ``effective_depth/{p10,p50,p90,n}``
``gradwatch.alerts/...``        ``open/{info,warning,critical}`` (open incidents per severity), ``count``
                                (events told per step), one text per event ``<rule>``, ``summary``
``gradwatch.pictures/...``      the images: depth × time maps and the latest gradient profile
=============================  ============================================================================

With ``prefix=""`` the sections are ``health``, ``layers``, ``blocks``, ``alerts`` and ``pictures``.
"""

from __future__ import annotations

import math

from .._checks import check_prefix
from ..alerts.alert import SEVERITIES
from ..names import GLOBAL_NAME
from ..record import StepRecord

__all__ = ["Tags", "DEFAULT_NAMESPACE"]

#: The namespace of gradwatch's tags unless ``prefix`` says otherwise.
DEFAULT_NAMESPACE = "gradwatch"
_DEPTH_DETAIL = "effective_depth_"


class Tags:
    """The tag names for one namespace (``Tags("gradwatch").layer("grad_norm", "conv1")`` is
    ``"gradwatch.layers/grad_norm/conv1"``). The namespace is what ``prefix`` options give; it holds no ``/``
    (TensorBoard groups cards by the text before the first one).

    Args:
        namespace: the namespace, as the ``prefix`` option gives it (``""``: sections ``health/``,
            ``layers/``, ...).

    Raises:
        TypeError, ValueError: a namespace that is not a str, or holds a ``/``.
    """

    def __init__(self, namespace: str = DEFAULT_NAMESPACE) -> None:
        self.namespace = check_prefix(namespace)
        ns = self.namespace
        self.health_group = ns or "health"
        self.layers_group, self.blocks_group, self.alerts_group, self.pictures_group = (
            f"{ns}.{family}" if ns else family for family in ("layers", "blocks", "alerts", "pictures"))

    # ------------------------------------------------------------------ single tags
    def health(self, key: str) -> str:
        """A card of the health section (``grad_norm``, a :data:`~gradwatch.health.HEALTH` figure,
        ``open_incidents``)."""
        return f"{self.health_group}/{key}"

    def health_tag(self, figure: str) -> str:
        """Where a health figure goes: its card in the health section, except the effective depth's
        percentiles and block count, which go with the blocks (``gradwatch.blocks/effective_depth/p10``) so
        the health section keeps one card per question."""
        if figure.startswith(_DEPTH_DETAIL):
            return f"{self.blocks_group}/effective_depth/{figure[len(_DEPTH_DETAIL):]}"
        return self.health(figure)

    def layer(self, metric: str, name: str) -> str:
        """The tag of ``metric`` for layer ``name``."""
        return f"{self.layers_group}/{metric}/{name}"

    def block(self, metric: str, name: str) -> str:
        """The tag of ``metric`` for block ``name``."""
        return f"{self.blocks_group}/{metric}/{name}"

    def series_head(self, metric: str, block: bool) -> str:
        """What precedes the name in :meth:`layer` / :meth:`block` tags."""
        return f"{self.blocks_group if block else self.layers_group}/{metric}/"

    def histogram(self, metric: str, block: bool) -> str:
        """The histogram across layers (or blocks) of ``metric``: sorts first among that metric's cards."""
        return f"{self.blocks_group if block else self.layers_group}/{metric}"

    def nonfinite(self, metric: str, block: bool) -> str:
        """The tag counting ``metric``'s NaN/Inf values across layers (or blocks): what its histogram left out."""
        return f"{self.blocks_group if block else self.layers_group}/nonfinite/{metric}"

    def alert_text(self, rule: str) -> str:
        """The text tag of ``rule``'s incident events."""
        return f"{self.alerts_group}/{rule}"

    @property
    def alert_count(self) -> str:
        """The tag of the number of incident events told per logging step."""
        return f"{self.alerts_group}/count"

    @property
    def kinds(self) -> str:
        """A text, written with the layout: the layers' kinds as JSON (``gradwatch report`` ranks weight layers)."""
        return f"{self.layers_group}/kinds"

    @property
    def summary(self) -> str:
        """The text tag of the end-of-run summary."""
        return f"{self.alerts_group}/summary"

    def picture(self, name: str) -> str:
        """The image tag of picture ``name`` (``grad_to_weight``, ``skip_share``, ``profile``)."""
        return f"{self.pictures_group}/{name}"

    # ------------------------------------------------------------------ whole records
    def open_incidents(self, severity: str) -> str:
        """The tag of the number of incidents open at ``severity``."""
        return f"{self.alerts_group}/open/{severity}"

    def health_scalars(self, record: StepRecord) -> dict[str, float]:
        """The health section of ``record``: whole-model ``grad_norm``, the health figures (those that are not
        NaN), and, when alerting
        is on, ``open_incidents`` (open at warning or critical: what needs a look; the split per severity is
        in the alerts section), and ``unverified`` (1) on every record after a failed self-check
        (:attr:`~gradwatch.StepRecord.verified`). Alphabetical, as TensorBoard shows them."""
        out = {self.health("grad_norm"): record.global_value("grad_norm")} if "grad_norm" in record.layer_metrics \
            else {}
        # a figure the model cannot have (no blocks: no skip_share_min) is left out, not drawn as NaN markers
        out.update({self.health_tag(k): float(v) for k, v in record.health.items() if not math.isnan(v)})
        if record.open_incidents is not None:
            out[self.health("open_incidents")] = float(sum(record.open_incidents[1:]))
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

    def scalars(self, record: StepRecord, counts: bool = False) -> dict[str, float]:
        """Every scalar of ``record`` as one flat ``{tag: value}`` dict (health, per layer with ``_global``,
        per block, alerts; with ``counts`` the ``nonfinite/<metric>`` counts): what a logger that takes flat
        dicts receives."""
        out = self.health_scalars(record)
        for metric, names, values in record.series():
            head = self.series_head(metric, block=metric not in record.layer_metrics)
            out.update(zip((head + n for n in names), values.tolist()))
        out.update(self.alert_scalars(record))
        if counts:
            out.update(self.nonfinite_scalars(record))
        return out

    def nonfinite_scalars(self, record: StepRecord) -> dict[str, float]:
        """``{tag: count}``: per metric, the layers (``_global`` left out) or blocks holding NaN or Inf."""
        return {self.nonfinite(m, block=m not in record.layer_metrics): float(c)
                for m, c in record.nonfinite_counts().items()}

    def parse(self, tag: str) -> tuple[str, str] | None:
        """``(name, metric)`` of a per-layer or per-block tag of this namespace (health figures as
        ``("_global", figure)``), or None for any other tag: how ``gradwatch report`` reads event files back."""
        for group in (self.layers_group, self.blocks_group):
            if tag.startswith(group + "/"):
                metric, sep, name = tag[len(group) + 1:].partition("/")
                if group == self.blocks_group and metric == "effective_depth":
                    return GLOBAL_NAME, _DEPTH_DETAIL + name
                if sep and metric not in ("nonfinite", "kinds"):
                    return name, metric
                return None
        if tag.startswith(self.health_group + "/"):
            key = tag[len(self.health_group) + 1:]
            # grad_norm: read from the layers; open_incidents and unverified (the self-check's mark) are flags
            if "/" not in key and key not in ("grad_norm", "open_incidents", "unverified"):
                return GLOBAL_NAME, key
        return None
