"""Issue 28 item 19: with ``eval_every`` > 1 a run's test error is a few points (one, in a
short run): each is drawn as a marker, and the training loss is drawn beside it."""
from __future__ import annotations

import pytest

pytest.importorskip("matplotlib")
import matplotlib.pyplot as plt  # noqa: E402

from dcmkd.engine.plots import plot_test_error, training_loss  # noqa: E402
from dcmkd.report.curves import plot_row_curves  # noqa: E402
from dcmkd.report.results import CellStats, PaperValue  # noqa: E402

#: three epochs, evaluated at the last only (eval_every=3)
HISTORY = [
    {"epoch": 1, "lr": 0.1, "train/net0/ce": 2.0, "train/net0/dcm1": 0.5,
     "train/net0/C1/acc": 0.3, "train/net1/ce": 2.2, "train/net1/C1/acc": 0.2},
    {"epoch": 2, "lr": 0.1, "train/net0/ce": 1.5, "train/net0/dcm1": 0.25,
     "train/net0/C1/acc": 0.5, "train/net1/ce": 1.9, "train/net1/C1/acc": 0.3},
    {"epoch": 3, "lr": 0.1, "train/net0/ce": 1.0, "train/net0/dcm1": 0.25,
     "train/net0/C1/acc": 0.7, "train/net1/ce": 1.7, "train/net1/C1/acc": 0.4,
     "test/net0/C1/top1": 40.0, "test/net1/C1/top1": 55.0},
]


@pytest.fixture
def figures(monkeypatch):
    """The figures the plotting functions close, kept for inspection."""
    kept = []
    close = plt.close

    def keep(fig=None):
        kept.append(fig)
        close(fig)

    monkeypatch.setattr(plt, "close", keep)
    return kept


def test_training_loss_is_the_sum_of_a_networks_logged_terms():
    assert training_loss(HISTORY[0], 0) == pytest.approx(2.5)      # ce + dcm1, not the acc
    assert training_loss(HISTORY[2], 1) == pytest.approx(1.7)
    assert training_loss({"epoch": 1, "lr": 0.1}, 0) is None
    assert training_loss({"train/net10/ce": 3.0}, 1) is None         # net10 is not net1


def test_a_run_evaluated_once_shows_its_point_beside_the_training_loss(tmp_path, figures):
    plot_test_error(HISTORY, ["resnet32", "resnet20"], tmp_path / "test_error.png")
    assert (tmp_path / "test_error.png").stat().st_size > 0
    test_ax, loss_ax = figures[0].axes
    for n, line in enumerate(test_ax.lines):      # one point each, drawn as a marker
        assert line.get_marker() == "o"
        assert list(line.get_xdata()) == [3] and list(line.get_ydata()) == [[40.0, 55.0][n]]
    assert [line.get_label() for line in test_ax.lines] == ["net0 resnet32", "net1 resnet20"]
    assert list(loss_ax.lines[0].get_xdata()) == [1, 2, 3]
    assert list(loss_ax.lines[0].get_ydata()) == pytest.approx([2.5, 1.75, 1.25])
    assert list(loss_ax.lines[1].get_ydata()) == pytest.approx([2.2, 1.9, 1.7])


def test_report_curves_of_single_points_have_markers_and_a_loss_row(tmp_path, figures):
    paper = PaperValue(top1=None, std=None, top5=None)
    stats = [CellStats("ResNet-20 ×2", "DCM", "net0", "resnet20", paper, [40.0],
                       curves=[[(3, 40.0)]]),
             CellStats("ResNet-20 ×2", "DML", "net0", "resnet20", paper, [45.0, 47.0],
                       curves=[[(3, 45.0)], [(3, 47.0)]])]
    plot_row_curves(stats, ["net0"], "ResNet-20 ×2", tmp_path / "a.png")
    (ax,) = figures[0].axes
    assert [line.get_marker() for line in ax.lines] == ["o", "o"]
    assert list(ax.lines[1].get_ydata()) == [46.0]                   # the mean of two seeds
    losses = {("DCM", "net0"): [[(1, 2.5), (2, 1.75), (3, 1.25)]],
              ("DML", "net0"): [[(1, 3.0), (3, 2.0)], [(1, 2.0), (2, 1.0), (3, 1.0)]]}
    plot_row_curves(stats, ["net0"], "ResNet-20 ×2", tmp_path / "b.png", losses)
    test_ax, loss_ax = figures[1].axes
    assert list(loss_ax.lines[0].get_ydata()) == pytest.approx([2.5, 1.75, 1.25])
    assert list(loss_ax.lines[1].get_xdata()) == [1, 3]               # epochs both seeds have
    assert list(loss_ax.lines[1].get_ydata()) == pytest.approx([2.5, 1.5])
    assert (tmp_path / "b.png").stat().st_size > 0
