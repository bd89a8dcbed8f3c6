"""gradwatch report: event files read back equal the monitor's own history; rankings, incidents, exports."""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

import gradwatch
from gradwatch.report import events as report
from gradwatch.reference.blocks import resnet
from gradwatch.cli import main


def _run(log_dir, broken=False, steps=8, **kw):
    torch.manual_seed(0)
    model = resnet(8, width=4, skip_fault={0: "detached"} if broken else None)  # the first block's skip cut
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    mon = gradwatch.Monitor(model, optimizer=opt, every=1, log_dir=log_dir, pictures=0, **kw)
    for s in range(steps):
        g = torch.Generator().manual_seed(s)
        F.cross_entropy(model(torch.randn(8, 3, 8, 8, generator=g)), torch.randint(0, 10, (8,), generator=g)).backward()
        opt.step()
        opt.zero_grad()
    mon.close()
    return mon


def test_the_table_read_back_is_the_monitors_history(tmp_path):
    mon = _run(tmp_path / "a")
    table = report.load(tmp_path)
    assert list(table.columns) == list(report.COLUMNS) and set(table.run) == {"a"}
    got = table.set_index(["step", "name", "metric"]).value.sort_index()
    want = mon.history().set_index(["step", "name", "metric"]).value.sort_index()
    assert got.index.equals(want.index)
    np.testing.assert_allclose(got.to_numpy(), want.to_numpy().astype(np.float32), rtol=1e-6)  # stored as float32


def test_a_cut_skip_tops_the_ranking_and_its_incident_is_listed(tmp_path, capsys):
    _run(tmp_path / "healthy")
    _run(tmp_path / "broken", broken=True)
    reports = {r.run: r for r in report.summarize(tmp_path)}
    assert set(reports) == {"healthy", "broken"}
    broken = reports["broken"]
    assert broken.low_blocks.index[0] == "layer1.0" and broken.low_blocks["median"].iloc[0] < 1e-3
    assert broken.health.loc["skip_share_min", "last"] < 1e-3 < reports["healthy"].health.loc["skip_share_min", "min"]
    assert [(e["rule"], e["name"]) for e in broken.incidents] == [("skip_collapse", "layer1.0")]
    assert not reports["healthy"].incidents
    kinds = {n: k for n, k in zip(*_names_kinds())}
    assert all(kinds[n] == "weight" for n in broken.low_layers.index)  # norm layers' ratios are not ranked
    assert main(["report", str(tmp_path)]) == 1  # a warning incident: the exit status says so
    out = capsys.readouterr().out
    assert "== broken" in out and "[warning] skip_collapse (layer1.0) from step" in out and "== healthy" in out


def _names_kinds():
    model = resnet(8, width=4)
    kinds = gradwatch.measure.layers.layer_kinds(model)
    return list(kinds), list(kinds.values())


def test_exports_csv_json_and_one_self_contained_html_page(tmp_path, capsys):
    _run(tmp_path / "runs" / "a", steps=4)
    csv, page = tmp_path / "t.csv", tmp_path / "r.html"
    assert main(["report", str(tmp_path / "runs"), "--csv", str(csv), "--html", str(page)]) == 0
    frame = pd.read_csv(csv)
    assert list(frame.columns) == list(report.COLUMNS) and len(frame) == len(report.load(tmp_path / "runs"))
    text = page.read_text()
    assert text.count("data:image/png;base64,") == 4  # drawn from the table (no picture in this run's events)
    assert "src=\"http" not in text and "<script" not in text
    capsys.readouterr()
    assert main(["report", str(tmp_path / "runs"), "--json"]) == 0
    (run,) = json.loads(capsys.readouterr().out)
    assert run["run"] == "a" and run["steps"] == [0, 3, 4] and "grad_to_weight_early" in run["health"]


def test_bad_input_gets_a_clear_message_and_a_non_zero_exit(tmp_path, capsys):
    assert main(["report", str(tmp_path / "missing")]) == 3
    assert "is not a folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 3
    assert "no gradwatch values found" in capsys.readouterr().out
    _run(tmp_path / "r", steps=2)
    assert main(["report", str(tmp_path / "r"), "--csv", str(tmp_path / "x.txt")]) == 4
    assert "must end in .csv" in capsys.readouterr().err


def test_an_output_path_that_cannot_be_written_fails_before_the_report_is_printed(tmp_path, capsys):
    _run(tmp_path / "r", steps=2)
    (tmp_path / "a_file").write_text("")
    for option, path, why in [("--csv", "/unwritable/x.csv", "No such file or directory"),
                              ("--html", str(tmp_path / "a_file" / "r.html"), "Not a directory"),
                              ("--html", str(tmp_path), "it is a folder"),
                              ("--csv", str(tmp_path / "x.txt"), "must end in .csv")]:
        assert main(["report", str(tmp_path / "r"), option, path]) == 4
        out, err = capsys.readouterr()
        assert not out, f"{option} {path}: the report was printed before failing"
        assert err.count("\n") == 1 and err.startswith("gradwatch report: ") and why in err
    csv = tmp_path / "t.csv"
    csv.write_text("kept")  # an existing file checked by opening it for appending: left as it was
    assert main(["report", str(tmp_path / "r"), "--csv", str(csv), "--html", str(tmp_path / "r.html")]) == 0
    assert capsys.readouterr().out.startswith("== r") and len(pd.read_csv(csv)) > 0 and (tmp_path / "r.html").exists()


def test_several_namespaces_in_one_folder_are_runs_of_their_own(tmp_path):
    _run(tmp_path, steps=2, prefix="gradwatch")
    _run(tmp_path, steps=3, prefix="other")
    table = report.load(tmp_path)
    assert sorted(table.run.unique()) == [f"{os.path.basename(tmp_path)} [gradwatch]",
                                          f"{os.path.basename(tmp_path)} [other]"]
    assert table.groupby("run").step.max().tolist() == [1, 2]


def test_the_report_gives_the_link_that_pins_the_users_own_charts(tmp_path, capsys):
    """TensorBoard opens two groups (the health card and, under Lightning, ``epoch``): the report's link pins the
    first charts the user logged, never gradwatch's (any namespace) or the trainer's ``epoch``."""
    import urllib.parse

    from torch.utils.tensorboard import SummaryWriter

    torch.manual_seed(0)
    model = resnet(8, width=4)
    writer = SummaryWriter(str(tmp_path / "run"))
    mon = gradwatch.Monitor(model, every=1, writer=writer, pictures=0, prefix="student")
    for s in range(2):
        g = torch.Generator().manual_seed(s)
        loss = F.cross_entropy(model(torch.randn(8, 3, 8, 8, generator=g)), torch.randint(0, 10, (8,), generator=g))
        loss.backward()
        mon.step()
        model.zero_grad()
        for tag, v in (("train_loss", loss.item()), ("train_acc", 0.5), ("epoch", 0.0), ("val_loss", 1.0)):
            writer.add_scalar(tag, v, s)
    mon.close()
    writer.close()
    (r,) = report.summarize(tmp_path)
    assert r.own_scalars == ["train_loss", "train_acc", "val_loss"]
    assert main(["report", str(tmp_path)]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    link = urllib.parse.urlsplit(line.rsplit(" ", 1)[1])
    pins = json.loads(urllib.parse.parse_qs(link.query)["pinnedCards"][0])
    assert [p["tag"] for p in pins] == ["train_loss", "train_acc"]  # the first two: one row above the health card
