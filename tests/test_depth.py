"""Effective depth (gradwatch.depth): the path-length distribution is the normalised elementary symmetric
polynomials of the per-block ratios, stable at any depth, over the main chain of blocks."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from gradwatch.depth import DEPTH, chain, effective_depth, path_length_distribution


def test_the_distribution_is_the_normalised_elementary_symmetric_polynomials():
    r = np.random.default_rng(0).uniform(0.05, 3.0, 8)
    e = [sum(math.prod(r[list(s)]) for s in itertools.combinations(range(8), k)) for k in range(9)]
    np.testing.assert_allclose(path_length_distribution(r), np.array(e) / sum(e), rtol=1e-12)


def test_hundreds_of_blocks_neither_overflow_nor_lose_the_mean():
    r = np.full(500, 40.0)  # e_250 alone is ~C(500, 250) 40^250: far past float64
    dist = path_length_distribution(r)
    assert np.isfinite(dist).all() and dist.sum() == pytest.approx(1.0)
    assert (np.arange(501) * dist).sum() == pytest.approx(500 * 40 / 41)


def test_figures_edge_cases_skip_only_branch_only_and_unmeasured_blocks():
    blocks = ["a", "b", "c", "d"]
    got = effective_depth(blocks, np.array([1.0, 1.0, 1.0, 1.0]), np.array([0.0, 0.0, 0.0, 0.0]))
    assert got["effective_depth"] == 0 and got["effective_depth_p90"] == 0 and got["effective_depth_n"] == 4
    got = effective_depth(blocks, np.array([0.0, 1.0, 1.0, np.nan]), np.array([1.0, 1.0, 1.0, 1.0]))
    assert got["effective_depth_n"] == 3 and got["effective_depth"] == pytest.approx(1 + 0.5 + 0.5)  # no skip: 1
    assert all(math.isnan(v) for v in effective_depth([], np.zeros(0), np.zeros(0)).values())
    assert set(got) == set(DEPTH)


def test_the_chain_leaves_out_blocks_nested_in_other_blocks():
    names = ["stem", "layer1.0", "layer1.0.inner", "layer1.1", "h.0[0]", "h.0[1]", "h.0.mlp", "h.10[0]"]
    assert [names[i] for i in chain(names)] == ["stem", "layer1.0", "layer1.1", "h.0[0]", "h.0[1]", "h.10[0]"]
