"""Rules against brute force on random layer configurations (hypothesis, bounded)."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from tests.autogram._helpers import assert_gramian_exact


@settings(max_examples=15)
@given(
    dim=st.integers(1, 3),
    groups=st.sampled_from([1, 2]),
    kernel=st.integers(1, 3),
    stride=st.integers(1, 2),
    padding=st.integers(0, 2),
    dilation=st.integers(1, 2),
    bias=st.booleans(),
    batch=st.integers(1, 3),
    batch_dim=st.sampled_from([0, None]),
)
def test_conv(dim, groups, kernel, stride, padding, dilation, bias, batch, batch_dim):
    conv_type = [nn.Conv1d, nn.Conv2d, nn.Conv3d][dim - 1]
    conv = conv_type(2, 4, kernel, stride, padding, dilation, groups, bias)
    size = (kernel - 1) * dilation + 1 + stride
    x = torch.randn(batch, 2, *[size] * dim)
    assert_gramian_exact([conv], lambda: conv(x).sin().flatten(1).sum(1), batch_dim)


@settings(max_examples=15)
@given(
    positions=st.lists(st.integers(1, 3), max_size=2),
    tasks=st.integers(1, 3),
    batch=st.integers(1, 4),
    bias=st.booleans(),
)
def test_linear_any_leading_shape(positions, tasks, batch, bias):
    linear = nn.Linear(3, tasks, bias=bias)
    x = torch.randn(batch, *positions, 3)
    output = lambda: linear(x).pow(2).reshape(batch, -1, tasks).sum(1)  # noqa: E731
    assert_gramian_exact([linear], output, 0)  # [batch, tasks]


@settings(max_examples=10)
@given(
    vocabulary=st.integers(2, 5),
    positions=st.integers(1, 4),
    padding_idx=st.sampled_from([None, 0]),
    frequency=st.booleans(),
)
def test_embedding(vocabulary, positions, padding_idx, frequency):
    embedding = nn.Embedding(vocabulary, 2, padding_idx=padding_idx, scale_grad_by_freq=frequency)
    index = torch.randint(0, vocabulary, (3, positions))
    assert_gramian_exact([embedding], lambda: embedding(index).exp().sum((1, 2)), 0)
