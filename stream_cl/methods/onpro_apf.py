"""APF (adaptive prototypical feedback): mix replay samples of classes whose prototypes are close.

All random draws come from the caller's CPU generator; index bookkeeping runs on the CPU (a few
dozen numbers), pixel mixing on the images' device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F


@dataclass(frozen=True, slots=True)
class Mixed:
    """A mixed replay batch: ``x = (1 − λ) x_a + λ x_b`` with class keys ``a``, ``b`` (``b = a`` if λ = 0)."""

    x: torch.Tensor
    a: torch.Tensor
    b: torch.Tensor
    lam: torch.Tensor


def unmixed(x: torch.Tensor, keys: torch.Tensor) -> Mixed:
    return Mixed(x, keys, keys, torch.zeros(keys.shape[0], device=keys.device))


def pair_probabilities(mu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Class pairs (a < b, ``pdist`` order) and P_ab = softmax over pairs of 1 / ‖μ_a − μ_b‖."""
    k = mu.shape[0]
    pairs = torch.triu_indices(k, k, offset=1, device=mu.device).T
    dist = F.pdist(mu.float()).clamp_min(1e-8)
    return pairs, torch.softmax(1.0 / dist, dim=0)


def allocate(probs: torch.Tensor, total: int, gen: torch.Generator) -> torch.Tensor:
    """Integer counts ``round(P · total)``, fixed up by ±1 at random pairs to sum to ``total``."""
    counts = torch.round(probs.cpu().double() * total).long()
    diff = total - int(counts.sum())
    if diff > 0:
        counts[torch.randperm(len(counts), generator=gen)[:diff]] += 1
    elif diff < 0:
        positive = torch.nonzero(counts > 0).squeeze(1)
        counts[positive[torch.randperm(len(positive), generator=gen)[:-diff]]] -= 1
    return counts


def sample_beta(alpha: float, n: int, gen: torch.Generator) -> torch.Tensor:
    """``n`` draws of Beta(α, α), α ≤ 1, by Jöhnk's rejection method in log space (vectorised)."""
    out = torch.empty(0, dtype=torch.float64)
    while out.shape[0] < n:
        log_xy = torch.rand(2, 2 * n + 8, generator=gen, dtype=torch.float64).clamp_min(1e-300).log() / alpha
        norm = torch.logsumexp(log_xy, dim=0)
        out = torch.cat([out, (log_xy[0] - norm)[norm <= 0].exp()])
    return out[:n]


def uniform_mixup(x: torch.Tensor, keys: torch.Tensor, gen: torch.Generator, *, p: float, lam_max: float) -> Mixed:
    """kornia-0.6.8 ``RandomMixUpV2(p, lambda_val=(0, lam_max))``: a batch-level Bernoulli(p), then
    per sample λ ~ U(0, lam_max) with probability p (else 0); partners from a random permutation."""
    n = x.shape[0]
    perm = torch.randperm(n, generator=gen)
    u = torch.rand(n + 1, generator=gen)
    lam = torch.where(u[1:] < p, torch.rand(n, generator=gen) * lam_max, 0.0) * float(u[0] < p)
    lam_d = lam.to(x.device)
    mixed = (1 - lam_d.view(-1, *[1] * (x.dim() - 1))) * x + lam_d.view(-1, *[1] * (x.dim() - 1)) * x[perm.to(x.device)]
    b = torch.where(lam_d > 0, keys[perm.to(keys.device)], keys)
    return Mixed(mixed, keys, b, lam_d)


def _pick(pool_keys: torch.Tensor, wanted: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """For each wanted class, a uniformly drawn pool index of that class (with replacement)."""
    weights = (pool_keys[None, :] == wanted[:, None]).double()
    return torch.multinomial(weights, 1, generator=gen).squeeze(1)


def targeted_mixup(
    pool_x: torch.Tensor,
    pool_keys: torch.Tensor,
    mu_keys: torch.Tensor,
    mu: torch.Tensor,
    n: int,
    gen: torch.Generator,
    *,
    p: float,
    alpha: float,
) -> Mixed | None:
    """The APF part: ``n`` samples from pairs of confusable classes, members drawn from the pool.

    Pairs are drawn by :func:`pair_probabilities`; one Bernoulli(p) per pair decides whether its
    samples are mixed (λ ~ Beta(α, α)) or pure class-a samples. A class absent from the pool is
    replaced by a random prototype class that is present. None if fewer than two usable classes.
    """
    keys_cpu, mu_keys = pool_keys.cpu(), mu_keys.cpu()
    usable = mu_keys[torch.isin(mu_keys, keys_cpu)]
    if n == 0 or mu.shape[0] < 2 or usable.numel() == 0:
        return None
    pairs, probs = pair_probabilities(mu)
    counts = allocate(probs, n, gen)
    pair_of = torch.arange(len(counts)).repeat_interleave(counts)
    mix = (torch.rand(len(counts), generator=gen) < p)[pair_of]
    sides = []
    for column in (0, 1):
        cls = mu_keys[pairs[:, column].cpu()][pair_of]
        missing = ~torch.isin(cls, keys_cpu)
        cls[missing] = usable[torch.randint(len(usable), (int(missing.sum()),), generator=gen)]
        sides.append(cls)
    ia, ib = _pick(keys_cpu, sides[0], gen), _pick(keys_cpu, sides[1], gen)
    lam = torch.where(mix, sample_beta(alpha, n, gen), 0.0).float().to(pool_x.device)
    shape = (-1, *[1] * (pool_x.dim() - 1))
    x = (1 - lam.view(shape)) * pool_x[ia.to(pool_x.device)] + lam.view(shape) * pool_x[ib.to(pool_x.device)]
    a, b = sides[0].to(pool_keys.device), sides[1].to(pool_keys.device)
    return Mixed(x, a, torch.where(lam > 0, b, a), lam)


def apf_batch(
    replay_x: torch.Tensor,
    replay_keys: torch.Tensor,
    pool_x: torch.Tensor,
    pool_keys: torch.Tensor,
    mu_keys: torch.Tensor,
    mu: torch.Tensor,
    gen: torch.Generator,
    *,
    base_rate: float,
    p: float,
    alpha: float,
    lam_max: float,
) -> Mixed:
    """APF over a raw replay batch of size m: ⌊m · base_rate⌋ replay samples through uniform mixup,
    the rest targeted at confusable pairs (remaining replay samples, unmixed, if no pairs exist)."""
    m = replay_x.shape[0]
    m_u = int(m * base_rate)
    order = torch.randperm(m, generator=gen).to(replay_x.device)
    head, tail = order[:m_u], order[m_u:]
    uniform = uniform_mixup(replay_x[head], replay_keys[head], gen, p=p, lam_max=lam_max)
    targeted = targeted_mixup(pool_x, pool_keys, mu_keys, mu, m - m_u, gen, p=p, alpha=alpha)
    if targeted is None:
        targeted = unmixed(replay_x[tail], replay_keys[tail])
    return Mixed(*(torch.cat([getattr(uniform, f), getattr(targeted, f)]) for f in ("x", "a", "b", "lam")))
