"""The rules' fast medians and quantiles give numpy's values (they replace np.nanmedian / np.quantile on the
logging step's hot path)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from gradwatch.alerts._stats import nanmedian, nanmedian_rows, quantile, quantiles


def _samples(seed, count):
    rng = np.random.default_rng(seed)
    for _ in range(count):
        r, c = int(rng.integers(1, 6)), int(rng.integers(1, 45))
        x = rng.lognormal(0, 3, (r, c)) * rng.choice([1, -1], (r, c))
        x[rng.random((r, c)) < rng.choice([0, 0, 0.1, 0.5, 1.0])] = np.nan  # some rows NaN only
        for value, share in ((np.inf, 0.1), (-np.inf, 0.1), (1e300, 0.2)):
            if rng.random() < 0.1:
                x[rng.random((r, c)) < share] = value
        yield rng, x


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy's own nanmedian of an all-NaN row
def test_medians_equal_numpys_nanmedian_bit_for_bit():
    for _, x in _samples(0, 2000):
        assert np.array_equal(nanmedian_rows(x), np.nanmedian(x, axis=1), equal_nan=True)
        for row in x:
            assert np.array_equal(nanmedian(row), np.nanmedian(row), equal_nan=True)
            assert np.array_equal(nanmedian(list(row)), np.nanmedian(row), equal_nan=True)
    assert math.isnan(nanmedian([])) and nanmedian([3.0, 1.0, 2.0, 10.0]) == 2.5
    assert nanmedian_rows(np.empty((2, 0))).shape == (2,)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy's lerp of infinite values
def test_quantiles_equal_numpys_linear_method_bit_for_bit():
    for rng, x in _samples(1, 2000):
        for row in x:
            for q in (0.0, 0.1, 0.5, 0.9, 1.0, float(rng.random())):
                assert np.array_equal(quantile(row, q), np.quantile(row, q), equal_nan=True), (row, q)
            qs = (0.9, 0.1, float(rng.random()))  # several from one sort: the same values
            assert np.array_equal(quantiles(row, qs), np.quantile(row, qs), equal_nan=True), (row, qs)
    assert math.isnan(quantile([], 0.5)) and quantile([1.0, 2.0, 3.0, 4.0], 0.9) == pytest.approx(3.7)
    assert all(math.isnan(v) for v in quantiles([], (0.1, 0.9)))
