import torch

from torchjd.linalg._gramian import gramian, normalized, regularized


def test_gramian_is_exactly_symmetric():
    J = torch.randn(7, 33)
    G = gramian(J)
    assert torch.equal(G, G.T)
    torch.testing.assert_close(G, J @ J.T)


def test_normalized():
    G = torch.diag(torch.tensor([1.0, 3.0]))
    torch.testing.assert_close(normalized(G, 1e-4), G / 4)
    assert torch.equal(normalized(1e-6 * G, 1e-4), torch.zeros(2, 2))
    assert normalized(torch.full((2, 2), float("nan")), 1e-4).isnan().all()


def test_regularized():
    G = torch.zeros(3, 3)
    torch.testing.assert_close(regularized(G, 0.5), 0.5 * torch.eye(3))
    assert regularized(G, 0.0) is G
