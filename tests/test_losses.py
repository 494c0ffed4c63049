import torch
from torch.distributions import Bernoulli, Normal, kl_divergence

from aligndraw.losses import bernoulli_nll, gaussian_kl, gaussian_log_prob


def test_gaussian_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    mu_q, ls_q, mu_p, ls_p = (torch.randn(5, 7, generator=g, dtype=torch.float64) for _ in range(4))
    ours = gaussian_kl(mu_q, ls_q, mu_p, ls_p)
    ref = kl_divergence(Normal(mu_q, ls_q.exp()), Normal(mu_p, ls_p.exp())).sum(-1)
    torch.testing.assert_close(ours, ref)
    assert (ours >= 0).all()


def test_gaussian_kl_zero_for_equal_distributions():
    mu, ls = torch.randn(3, 4), torch.randn(3, 4)
    torch.testing.assert_close(gaussian_kl(mu, ls, mu, ls), torch.zeros(3))


def test_bernoulli_nll_matches_distribution_on_binary_and_continuous_targets():
    logits = torch.randn(2, 1, 4, 4, dtype=torch.float64)
    binary = (torch.rand(2, 1, 4, 4) > 0.5).double()
    ref = -Bernoulli(logits=logits).log_prob(binary).flatten(1).sum(-1)
    torch.testing.assert_close(bernoulli_nll(logits, binary), ref)
    cont = torch.rand(2, 1, 4, 4, dtype=torch.float64)
    p = torch.sigmoid(logits)
    ref_c = -(cont * p.log() + (1 - cont) * (1 - p).log()).flatten(1).sum(-1)
    torch.testing.assert_close(bernoulli_nll(logits, cont), ref_c)


def test_gaussian_log_prob_matches_normal():
    z, mu, ls = (torch.randn(3, 5, dtype=torch.float64) for _ in range(3))
    torch.testing.assert_close(gaussian_log_prob(z, mu, ls), Normal(mu, ls.exp()).log_prob(z).sum(-1))
