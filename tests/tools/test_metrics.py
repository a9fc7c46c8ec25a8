"""Metrics against values worked out by hand."""

import math

import numpy as np
import pytest
import torch

from laplace_llm.tools.metrics import accuracy, brier, ece, nll, plot_reliability, reliability_data

# Four examples, three classes. Confidence (max prob), prediction, correct?
#   row 0: conf .62, pred 0, label 0 -> correct
#   row 1: conf .68, pred 1, label 2 -> wrong
#   row 2: conf .93, pred 2, label 2 -> correct
#   row 3: conf .34, pred 0, label 1 -> wrong
PROBS = np.array(
    [
        [0.62, 0.30, 0.08],
        [0.20, 0.68, 0.12],
        [0.04, 0.03, 0.93],
        [0.34, 0.33, 0.33],
    ]
)
LABELS = np.array([0, 2, 2, 1])


def test_accuracy_by_hand():
    assert accuracy(PROBS, LABELS) == 0.5  # rows 0 and 2 of 4


def test_nll_by_hand():
    # -(log .62 + log .12 + log .93 + log .33) / 4
    # = (0.478036 + 2.120264 + 0.072571 + 1.108663) / 4 = 0.944883
    assert nll(PROBS, LABELS) == pytest.approx(0.944883, abs=1e-6)


def test_nll_clamps_zero_probability():
    probs = np.array([[1.0, 0.0], [0.5, 0.5]])
    # row 0: -log(1e-12) = 27.631021; row 1: -log .5 = 0.693147; mean 14.162084
    assert nll(probs, [1, 0]) == pytest.approx(14.162084, abs=1e-6)


def test_brier_by_hand():
    # row 0: .38² + .30² + .08²  = .1444 + .09   + .0064 = .2408
    # row 1: .20² + .68² + .88²  = .04   + .4624 + .7744 = 1.2768
    # row 2: .04² + .03² + .07²  = .0016 + .0009 + .0049 = .0074
    # row 3: .34² + .67² + .33²  = .1156 + .4489 + .1089 = .6734
    # mean = 2.1984 / 4 = .5496
    assert brier(PROBS, LABELS) == pytest.approx(0.5496, abs=1e-12)


def test_ece_ten_bins_by_hand():
    # Bins of width .1, (lo, hi]: .34 -> bin 3; .62 and .68 -> bin 6; .93 -> bin 9.
    # bin 3: acc 0,  conf .34 -> gap .34, weight 1/4
    # bin 6: acc .5, conf .65 -> gap .15, weight 2/4
    # bin 9: acc 1,  conf .93 -> gap .07, weight 1/4
    # ECE = (.34 + 2 * .15 + .07) / 4 = .1775
    assert ece(PROBS, LABELS, n_bins=10) == pytest.approx(0.1775, abs=1e-12)


def test_ece_fifteen_bins_by_hand():
    # Width 1/15: .34*15 = 5.1 -> bin 5; .62*15 = 9.3 -> 9; .68*15 = 10.2 -> 10;
    # .93*15 = 13.95 -> 13. Every row alone in its bin:
    # gaps .34, |1 - .62| = .38, |0 - .68| = .68, |1 - .93| = .07 -> 1.47 / 4 = .3675
    assert ece(PROBS, LABELS, n_bins=15) == pytest.approx(0.3675, abs=1e-12)


def test_reliability_data_ten_bins_by_hand():
    data = reliability_data(PROBS, LABELS, n_bins=10)
    np.testing.assert_allclose(data["bin_edges"], np.linspace(0, 1, 11))
    assert data["count"].tolist() == [0, 0, 0, 1, 0, 0, 2, 0, 0, 1]
    full = data["count"] > 0
    np.testing.assert_allclose(data["confidence"][full], [0.34, 0.65, 0.93])
    np.testing.assert_allclose(data["accuracy"][full], [0.0, 0.5, 1.0])
    assert np.isnan(data["confidence"][~full]).all() and np.isnan(data["accuracy"][~full]).all()


def test_confidence_on_a_bin_edge_goes_to_the_lower_bin():
    probs = np.array([[0.5, 0.5], [1.0, 0.0], [0.7, 0.3]])
    # .5 -> (.4, .5] = bin 4; 1.0 -> bin 9; .7 (just below linspace's .7000…1) -> bin 6
    assert reliability_data(probs, [0, 0, 0], n_bins=10)["count"].tolist() == [
        0, 0, 0, 0, 1, 0, 1, 0, 0, 1,
    ]


def test_perfectly_confident_and_right_is_zero_everywhere():
    probs = np.eye(3)[[0, 2, 1, 1]]
    labels = [0, 2, 1, 1]
    assert accuracy(probs, labels) == 1.0
    assert ece(probs, labels) == 0.0
    assert brier(probs, labels) == 0.0
    assert nll(probs, labels) == pytest.approx(0.0, abs=1e-12)


def test_torch_inputs_give_the_same_values():
    probs, labels = torch.tensor(PROBS, dtype=torch.float64), torch.tensor(LABELS)
    for metric in (accuracy, nll, brier, ece):
        assert metric(probs, labels) == pytest.approx(metric(PROBS, LABELS), abs=1e-12)


@pytest.mark.parametrize(
    "probs, labels, match",
    [
        (PROBS[:, 0], LABELS, r"probs must be \(N, C\)"),
        (PROBS, LABELS[:3], r"labels must be \(N,\) = \(4,\)"),
        (PROBS, [0, 1, 2, 3], r"labels must be in \[0, 3\)"),
        (PROBS, [0.5, 1, 2, 0], "integer class indices"),
    ],
)
def test_bad_inputs_are_rejected(probs, labels, match):
    with pytest.raises(ValueError, match=match):
        accuracy(probs, labels)


def test_plot_reliability_writes_png_with_one_panel_per_model(tmp_path):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(200, 4)) * 3
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    labels = rng.integers(0, 4, size=200)
    for n_bins in (10, 15):
        assert reliability_data(probs, labels, n_bins)["count"].sum() == 200

    tempered = np.exp(logits / 3) / np.exp(logits / 3).sum(1, keepdims=True)
    path = plot_reliability(
        {"MAP": probs, "Laplace": tempered}, labels, tmp_path / "figs" / "rel.png", n_bins=15
    )
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 5000
    # IHDR: width and height as big-endian 32-bit ints at bytes 16..24; figure
    # (3.2 * 2) x 3.4 inches at 100 dpi.
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (640, 340)
    assert not math.isnan(ece(tempered, labels))


# ---------------------------------------------------------------- selective prediction
def test_risk_coverage_by_hand():
    """Confidences .93 (right), .68 (wrong), .62 (right), .34 (wrong) in that order."""
    from laplace_llm.tools.metrics import risk_coverage

    curve = risk_coverage(PROBS, LABELS)
    np.testing.assert_allclose(curve["coverage"], [0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(curve["risk"], [0.0, 0.5, 1 / 3, 0.5])


def test_aurc_by_hand_and_bounds():
    """AURC is the mean risk over k = 1..N: (0 + 1/2 + 1/3 + 1/2) / 4."""
    from laplace_llm.tools.metrics import aurc

    assert aurc(PROBS, LABELS) == pytest.approx((0 + 0.5 + 1 / 3 + 0.5) / 4, abs=1e-12)
    # a ranking that puts every error last reaches the optimum e + (1 - e) log(1 - e)
    # only in the limit; for N = 4 with 2 errors it is (0 + 0 + 1/3 + 1/2) / 4
    perfect = np.array([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.6, 0.4]])
    assert aurc(perfect, [0, 0, 1, 1]) == pytest.approx((0 + 0 + 1 / 3 + 1 / 2) / 4)
    assert aurc(perfect, [1, 1, 0, 0]) == pytest.approx((1 + 1 + 2 / 3 + 1 / 2) / 4)


def test_risk_coverage_ties_do_not_depend_on_row_order():
    """Equal confidences are answered together, so permuting rows changes nothing."""
    from laplace_llm.tools.metrics import aurc, risk_coverage

    probs = np.array([[0.6, 0.4], [0.6, 0.4], [0.9, 0.1], [0.6, 0.4]])
    labels = np.array([0, 1, 0, 1])
    curve = risk_coverage(probs, labels)
    np.testing.assert_allclose(curve["coverage"], [0.25, 1.0])
    np.testing.assert_allclose(curve["risk"], [0.0, 0.5])
    # k = 1: risk 0; k = 2, 3, 4 share the tie group's risk 1/2
    assert aurc(probs, labels) == pytest.approx((0 + 0.5 * 3) / 4)
    perm = [3, 1, 2, 0]
    assert aurc(probs[perm], labels[perm]) == aurc(probs, labels)


def test_entropy_confidence_orders_like_negated_entropy():
    from laplace_llm.tools.metrics import confidence

    h = -(PROBS * np.log(PROBS)).sum(1)
    np.testing.assert_allclose(confidence(PROBS, "entropy"), -h)
    with pytest.raises(ValueError, match="kind must be one of"):
        confidence(PROBS, "margin")


def test_ood_auroc_equals_pairwise_count():
    """Mann–Whitney form against the O(n·m) count of ordered pairs (ties count 1/2)."""
    from laplace_llm.tools.metrics import confidence, ood_auroc

    rng = np.random.default_rng(0)
    p_in = rng.dirichlet([0.3] * 4, size=40)
    p_out = rng.dirichlet([2.0] * 4, size=25)
    p_out[:3] = p_in[:3]  # some exact ties
    for kind in ("max_prob", "entropy"):
        s_in, s_out = confidence(p_in, kind), confidence(p_out, kind)
        pairs = (s_in[:, None] > s_out[None, :]) + 0.5 * (s_in[:, None] == s_out[None, :])
        assert ood_auroc(p_in, p_out, kind) == pytest.approx(pairs.mean(), abs=1e-12)
    assert ood_auroc(p_in, p_in) == pytest.approx(0.5)


def test_plot_risk_coverage_writes_png(tmp_path):
    from laplace_llm.tools.metrics import plot_risk_coverage

    out = plot_risk_coverage({"a": PROBS, "b": PROBS[::-1]}, LABELS, tmp_path / "rc.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
