"""The TensorBoard alert texts say which card to read and which of TensorBoard's defaults to change
(issue 27: smoothing turns counts into ramps, "ignore outliers" clips spikes). Read back from the event file."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import gradwatch
from gradwatch.alerts.rule import Rule
from gradwatch.reference.blocks import resnet


def texts(log_dir) -> dict[str, list[tuple[int, str]]]:
    acc = EventAccumulator(str(log_dir), size_guidance={"tensors": 0})
    acc.Reload()
    return {t.removesuffix("/text_summary"): [(e.step, e.tensor_proto.string_val[0].decode()) for e in acc.Tensors(t)]
            for t in acc.Tags()["tensors"] if "alerts/" in t}


class Always(Rule):
    """A rule of one's own that fires on its first look."""

    name = "always"

    def check(self, m):
        return [self.alert(m, "warning", None, 1.0, 0.0, "always fires", "nothing to do")]


def run(model, tmp_path, rules, steps=4, **kw):
    mon = gradwatch.Monitor(model, log_dir=tmp_path, every=1, rules=rules, pictures=0, **kw)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x, y = torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        mon.step()
        opt.step()
    mon.close()
    return mon


def test_collapsed_skip_text_names_the_curve_and_smoothing_and_summary_the_settings(tmp_path):
    torch.manual_seed(0)
    mon = run(resnet(8, skip_fault={1: "detached"}), tmp_path, [gradwatch.alerts.SkipCollapse(patience=1)],
              prefix="student")
    assert [a.rule for a in mon.alerts] == ["skip_collapse"]
    got = texts(tmp_path)
    ((_, opened),) = got["zz_student.alerts/2_warning/skip_collapse"]
    assert opened.startswith("**warning** `skip_collapse`")
    # the last paragraph: the curve in this run's namespace, and the setting it needs
    assert opened.rsplit("\n\n", 1)[1] == "_in TensorBoard:_ `zz_student.health/2_skip_share_min`, smoothing 0"
    ((_, summary),) = got["zz_student.alerts/summary"]
    assert summary.rsplit("\n\n", 1)[1] == (
        "_reading the curves:_ smoothing 0 for `zz_student.alerts/` and `zz_student.health/`; "
        '"Ignore outliers in chart scaling" off for grad-norm spikes; log y-axis (card menu) for ratios not '
        "already log10")


def test_a_rule_of_ones_own_points_at_the_open_counts(tmp_path):
    torch.manual_seed(0)
    run(resnet(8), tmp_path, [Always(patience=1)], steps=2)
    ((_, opened),) = texts(tmp_path)["zz_gradwatch.alerts/2_warning/always"]
    assert "always fires" in opened
    assert opened.endswith("_in TensorBoard:_ `zz_gradwatch.alerts/open/*`, smoothing 0")
