"""The Linear kernel on both paths (closed form, per-objective gradients) vs brute force."""

import itertools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import torchjd.autogram._rules._linear as linear_module
from torchjd.autogram._rules._linear import (
    block_features,
    gram_parts,
    one_position_gramian,
    self_gram,
    weight_gramian,
    weight_gramian_and_jacobian,
)
from torchjd.autogram._workspace import Workspaces


def reference(X: torch.Tensor, Gamma: torch.Tensor) -> torch.Tensor:
    P, B, R, T, _ = Gamma.shape
    rows = []
    for i in range(B):
        for r in range(R):
            blocks = [
                sum(torch.outer(Gamma[p, i, r, t], X[p, i, t]) for t in range(T)) for p in range(P)
            ]
            rows.append(torch.cat([b.flatten() for b in blocks]))
    J = torch.stack(rows)
    return J @ J.T


@given(
    P=st.integers(1, 2),
    B=st.integers(1, 4),
    R=st.integers(1, 3),
    T=st.integers(1, 6),
    d_in=st.integers(1, 5),
    d_out=st.sampled_from([1, 2, 40]),
    chunk_bytes=st.sampled_from([None, 1, 300]),
)
def test_weight_gramian(P, B, R, T, d_in, d_out, chunk_bytes):
    """Both paths, whole or in blocks of features or samples (chunk_bytes=1: one at a time)."""
    X = torch.randn(P, B, T, d_in, dtype=torch.float64)
    Gamma = torch.randn(P, B, R, T, d_out, dtype=torch.float64)
    G = weight_gramian(X, Gamma, chunk_bytes)
    torch.testing.assert_close(G, reference(X, Gamma), rtol=1e-10, atol=0)


@pytest.mark.parametrize(
    "shape",
    [(1, 3, 1, 1, 4, 2), (1, 2, 1, 3, 5, 40), (2, 3, 2, 3, 2, 2), (1, 3, 2, 4, 3, 5)],
    ids=["closed_form_one_position", "closed_form", "per_objective", "per_objective_R2"],
)
@pytest.mark.parametrize("chunk_bytes", [1, 100])
def test_chunked_equals_whole(shape, chunk_bytes):
    P, B, R, T, d_in, d_out = shape
    X = torch.randn(P, B, T, d_in, dtype=torch.float64)
    Gamma = torch.randn(P, B, R, T, d_out, dtype=torch.float64)
    whole = weight_gramian(X, Gamma, chunk_bytes=1 << 40)
    torch.testing.assert_close(weight_gramian(X, Gamma, chunk_bytes), whole, rtol=1e-12, atol=0)
    torch.testing.assert_close(whole, reference(X, Gamma), rtol=1e-10, atol=0)


@given(
    B=st.integers(1, 5),
    R=st.integers(1, 3),
    d_in=st.integers(1, 5),
    d_out=st.sampled_from([1, 2, 7]),
    with_bias=st.booleans(),
)
def test_one_position_gramian(B, R, d_in, d_out, with_bias):
    """The bias folded into the closed form, against the per-objective gradients of weight and
    bias (``γ_ir x_iᵀ`` and ``γ_ir``)."""
    X = torch.randn(B, d_in, dtype=torch.float64)
    Gamma = torch.randn(B, R, d_out, dtype=torch.float64)
    rows = []
    for i in range(B):
        for r in range(R):
            weight = torch.outer(Gamma[i, r], X[i]).flatten()
            rows.append(torch.cat([weight, Gamma[i, r]]) if with_bias else weight)
    J = torch.stack(rows)
    G = one_position_gramian(X, Gamma, with_bias)
    torch.testing.assert_close(G, J @ J.T, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("rows", [1, 5, 31, 32, 40, 48, 63, 64, 96, 100, 127, 128, 131, 200])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_self_gram(monkeypatch, rows, dtype):
    """By blocks of rows (every size from 32 rows on), the same as one product."""
    monkeypatch.setattr(linear_module, "PARTS_MIN_PRODUCT", 0)
    A = torch.randn(rows, 6, dtype=torch.float64)
    G = self_gram(A.to(dtype))
    tolerance = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(G.double(), A @ A.T, rtol=tolerance, atol=tolerance)


@given(rows=st.integers(1, 600), columns=st.integers(1, 1 << 16))
def test_gram_parts(rows, columns):
    """Consecutive blocks that cover the rows, at most 8, of multiples of 16 rows but the last,
    one block for small products."""
    parts = gram_parts(rows, columns)
    assert parts[0][0] == 0
    assert parts[-1][1] == rows
    assert all(stop == start for (_, stop), (start, _) in itertools.pairwise(parts))
    assert len(parts) <= 8
    assert all(stop - start >= 16 and (stop - start) % 16 == 0 for start, stop in parts[:-1])
    if rows * rows * columns < linear_module.PARTS_MIN_PRODUCT:
        assert parts == [(0, rows)]
    else:  # blocks from PARTS_MIN_ROWS rows on
        assert (len(parts) > 1) == (rows >= linear_module.PARTS_MIN_ROWS)


@pytest.mark.parametrize("min_features", [1, 3])
@pytest.mark.parametrize(
    ("shape", "chunk_bytes"),
    [((1, 3, 1, 4, 2, 7), None), ((2, 3, 1, 3, 2, 5), None), ((2, 3, 2, 3, 2, 5), 100)],
    ids=["one_objective", "groups", "groups_R2_chunks"],
)
def test_blocks_in_one_buffer(monkeypatch, shape, chunk_bytes, min_features):
    """Per-objective gradients formed by blocks of features in one reused buffer (the last block
    narrower), each block's Gramian taken right away: the same Gramian as formed whole. With one
    objective per sample, blocks of about BLOCK_BYTES; with several, of at most chunk_bytes."""
    monkeypatch.setattr(linear_module, "BLOCK_BYTES", 1)
    monkeypatch.setattr(linear_module, "MIN_BLOCK_FEATURES", min_features)
    monkeypatch.setattr(linear_module, "per_objective_is_cheaper", lambda *args: True)
    P, B, R, T, d_in, d_out = shape
    X = torch.randn(P, B, T, d_in, dtype=torch.float64)
    Gamma = torch.randn(P, B, R, T, d_out, dtype=torch.float64)
    G = weight_gramian(X, Gamma, chunk_bytes)
    torch.testing.assert_close(G, reference(X, Gamma), rtol=1e-10, atol=0)


@pytest.mark.parametrize("min_features", [1, 3])
def test_blocks_of_strided_rows(monkeypatch, min_features):
    """Rows of samples and positions interleaved (sequence-first inputs, as the projections of
    an attention): every block of one objective per sample is a slice of one strided view."""
    monkeypatch.setattr(linear_module, "BLOCK_BYTES", 1)
    monkeypatch.setattr(linear_module, "MIN_BLOCK_FEATURES", min_features)
    monkeypatch.setattr(linear_module, "per_objective_is_cheaper", lambda *args: True)
    B, T, d_in, d_out = 3, 4, 2, 7
    X = torch.randn(T, B, d_in, dtype=torch.float64).transpose(0, 1).unsqueeze(0)
    Gamma = torch.randn(T, 1, B, d_out, dtype=torch.float64).permute(2, 1, 0, 3).unsqueeze(0)
    assert not X.is_contiguous()
    assert not Gamma.is_contiguous()
    G = weight_gramian(X, Gamma)
    torch.testing.assert_close(G, reference(X, Gamma), rtol=1e-10, atol=0)


@pytest.mark.parametrize("R", [1, 2])
def test_interleaved_positions_made_adjacent(monkeypatch, R):
    """Positions of a sample ``B`` rows apart (the projections of an attention), in a step that
    keeps nothing: the products read a copy of the inputs whose positions are adjacent rows (the
    output gradients as they are), and the Gramian is exact."""
    monkeypatch.setattr(linear_module, "per_objective_is_cheaper", lambda *args: True)
    seen = []

    def spy(X, Gamma, chunk_bytes=None):
        seen.append((X, Gamma))
        return weight_gramian(X, Gamma, chunk_bytes)

    monkeypatch.setattr(linear_module, "weight_gramian", spy)
    B, T, d_in, d_out = 3, 4, 2, 5
    X = torch.randn(T, B, d_in, dtype=torch.float64).transpose(0, 1)
    Gamma = torch.randn(R, T, B, d_out, dtype=torch.float64).permute(2, 0, 1, 3)
    with Workspaces().active(fused=False):
        G, J = weight_gramian_and_jacobian(X, Gamma)
    assert J is None
    [(X_used, Gamma_used)] = seen
    assert X_used.stride(-2) == d_in
    assert Gamma_used.data_ptr() == Gamma.data_ptr()
    assert Gamma_used.stride(-2) == B * d_out
    torch.testing.assert_close(X_used[0], X)
    torch.testing.assert_close(Gamma_used[0], Gamma)
    torch.testing.assert_close(G, reference(X.unsqueeze(0), Gamma.unsqueeze(0)), rtol=1e-10, atol=0)


@pytest.mark.parametrize(("B", "R"), [(43, 3), (64, 2), (130, 1), (32, 4), (33, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_blocks_of_many_rows(monkeypatch, B, R, dtype):
    """Blocks of at least 64 rows (sample, objective): each block's Gramian from its blocks of
    rows on and above the diagonal, the others mirrored at the end (the last block of features
    narrower, with the same blocks of rows); with several objectives, the products of a block
    one per objective, the rows reordered at the end."""
    monkeypatch.setattr(linear_module, "BLOCK_BYTES", 1)
    monkeypatch.setattr(linear_module, "MIN_BLOCK_FEATURES", 2)
    monkeypatch.setattr(linear_module, "PARTS_MIN_PRODUCT", 0)
    monkeypatch.setattr(linear_module, "per_objective_is_cheaper", lambda *args: True)
    T, d_in, d_out = 2, 2, 5
    X = torch.randn(1, B, T, d_in, dtype=torch.float64)
    Gamma = torch.randn(1, B, R, T, d_out, dtype=torch.float64)
    G = weight_gramian(X.to(dtype), Gamma.to(dtype))
    tolerance = 1e-10 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(G.double(), reference(X, Gamma), rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize(
    ("d_out", "feature_bytes", "chunk_bytes", "expected"),
    [(384, 1 << 14, 1 << 24, 64), (10, 1 << 14, 1 << 24, 10), (384, 1 << 17, 1 << 24, 16),
     (384, 1 << 17, 1 << 18, 2), (384, 1 << 17, 1, 1)],
)  # fmt: skip
def test_block_features(d_out, feature_bytes, chunk_bytes, expected):
    """About BLOCK_BYTES per block, at least MIN_BLOCK_FEATURES features, within chunk_bytes."""
    assert block_features(d_out, feature_bytes, chunk_bytes) == expected


@pytest.mark.parametrize(
    ("feature_bytes", "chunk_bytes", "objectives", "expected"),
    [(1 << 16, 1 << 24, 4, 64), (1 << 17, 1 << 24, 4, 32), (1 << 16, 1 << 20, 4, 16),
     (1 << 14, 1 << 24, 2, 128)],
)  # fmt: skip
def test_block_features_per_objective(feature_bytes, chunk_bytes, objectives, expected):
    """About BLOCK_BYTES per objective of a sample: with R objectives each, the features of one
    objective's block, within chunk_bytes."""
    assert block_features(384, feature_bytes, chunk_bytes, objectives) == expected
