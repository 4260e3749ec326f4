"""The MDLM noise schedule, time sampling and NELBO.

MDLM (Sahoo et al., 2024, arXiv:2406.07524) corrupts a clean token x_0 by replacing it with the mask token with
probability `1 - alpha_t`. With the SUBS parameterization (the model never predicts the mask token and copies
unmasked tokens), the continuous-time negative ELBO of a sequence is

    NELBO = E_t [ sum over masked positions of  w(t) * -log p_theta(x_0 | x_t) ],   w(t) = -alpha'_t / (1 - alpha_t).

For the log-linear schedule `alpha_t = 1 - (1 - eps) * t` the weight is exactly `1 / t`. Dividing the sum by the
number of counted tokens (neither padding nor end-of-document) gives the NELBO per token, whose `exp` bounds the
perplexity from above.

This module imports only torch, because the modeling file imports it and is copied next to checkpoints.
"""

import torch


class LogLinearSchedule:
    """The schedule `alpha_t = 1 - (1 - eps) * t`, with `alpha_0 = 1` (clean) and `alpha_1 = eps` (almost all masked)."""

    def __init__(self, eps: float = 1e-3):
        self.eps = eps

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        return 1.0 - (1.0 - self.eps) * t

    def mask_probability(self, t: torch.Tensor) -> torch.Tensor:
        """Probability `1 - alpha_t` that a token is masked at time t."""
        return (1.0 - self.eps) * t

    def loss_weight(self, t: torch.Tensor) -> torch.Tensor:
        """The NELBO weight `-alpha'_t / (1 - alpha_t) = (1 - eps) / ((1 - eps) * t) = 1 / t`."""
        return 1.0 / t


def sample_times(
    batch_size: int,
    sampling_eps: float = 1e-3,
    generator: torch.Generator | None = None,
    offset_generator: torch.Generator | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> torch.Tensor:
    """Draw `t` in `[sampling_eps, 1]` with low-discrepancy (antithetic) sampling.

    One uniform offset `u` is drawn for the global batch of `batch_size * world_size` examples, and example `i`
    takes `t_i = (u + i / n) mod 1`, rescaled to `[sampling_eps, 1]`. Each rank takes its own slice of the strata,
    so the strata span the global batch. `offset_generator` must produce the same `u` on every rank; it defaults
    to `generator`, which is right for a single process.
    """
    if offset_generator is None:
        offset_generator = generator
    global_size = batch_size * world_size
    offset = torch.rand((), generator=offset_generator, dtype=torch.float64)
    strata = torch.arange(rank * batch_size, (rank + 1) * batch_size, dtype=torch.float64) / global_size
    uniform = (offset + strata) % 1.0
    return (sampling_eps + (1.0 - sampling_eps) * uniform).to(torch.float32)


def counted_token_mask(
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor | None,
    mask_token_id: int,
    eod_token_id: int | None,
) -> torch.Tensor:
    """Return the positions that count in the NELBO's denominator: every real token that is not end-of-document.

    A position counts when it is masked with a label (a masked real token), or when it is visible, not padding,
    and not end-of-document. A masked end-of-document token carries no label, so it does not count.
    """
    visible = input_ids != mask_token_id
    if eod_token_id is not None:
        visible = visible & (input_ids != eod_token_id)
    if attention_mask is not None:
        visible = visible & attention_mask.bool()
    return (labels != -100) | visible


__all__ = ["LogLinearSchedule", "sample_times", "counted_token_mask"]
