"""Where to read an incident in TensorBoard, and which of TensorBoard's defaults to change to read it right.

TensorBoard smooths every line (0.6), so a one-step count or a skip_share that drops to 0 at once is drawn
as a ramp; it leaves outliers out of the y range ("Ignore outliers in chart scaling"), so the gradient-norm
spike the ``exploding`` rule fired on can be off the chart; and its y axes are linear, so a ratio of 0.003
looks like one of 0.03. The health card is an image and reads right whatever the settings; these notes are
for the curves a user opens next. They go at the foot of the TensorBoard text of an opened incident and of
the end-of-run summary (docs/dashboard.md, "TensorBoard's defaults: what to set").
"""

from __future__ import annotations

from ..tags import Tags

__all__ = ["reading_note", "settings_note"]

_SMOOTHING = "smoothing 0"
_OUTLIERS = '"Ignore outliers in chart scaling" off'
_LOG_Y = "log y-axis (card menu)"


def reading_note(tags: Tags, rule: str) -> str:
    """One line: the card to read ``rule``'s incident on and the TensorBoard settings it needs. Rules of
    one's own get the alert counts (they have no card of their own)."""
    figure = {"exploding": "grad_norm", "instability": "grad_norm", "vanishing": "grad_to_weight_early",
              "skip_collapse": "skip_share_min", "lost_skip": "skip_share_min",
              "attenuated_identity": "skip_share_min", "depth_trend": "effective_depth"}.get(rule)
    if figure == "grad_norm":  # a spike: one step, easily smoothed away or clipped out of the y range
        where, how = f"`{tags.health(figure)}`", f"{_SMOOTHING}, {_OUTLIERS}"
    elif figure is not None:  # a drop or a drift, already on a log10 or bounded scale
        where, how = f"`{tags.health(figure)}`", _SMOOTHING
    elif rule == "nonfinite":  # counts per step
        where, how = f"`{tags.layers_group}/nonfinite/*`", _SMOOTHING
    elif rule == "dead_layer":  # per layer: the map has a row per weight layer, no curve has
        where, how = f"`{tags.picture('grad_to_weight')}` (a black row)", '"Show actual image size" on'
    else:
        where, how = f"`{tags.alerts_group}/open/*`", _SMOOTHING
    return f"_in TensorBoard:_ {where}, {how}"


def settings_note(tags: Tags) -> str:
    """One line for the end-of-run summary: the settings under which gradwatch's curves read right."""
    return (f"_reading the curves:_ {_SMOOTHING} for `{tags.alerts_group}/` and `{tags.figures_group}/`; "
            f"{_OUTLIERS} for grad-norm spikes; {_LOG_Y} for ratios not already log10")
