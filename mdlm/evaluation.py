"""Evaluation of trained MDLMs: the NELBO bound on perplexity, generative perplexity and unigram entropy.

- `perplexity_bound` estimates the NELBO per token of held-out text, whose `exp` bounds the model's perplexity
  from above, with a Monte Carlo standard error.
- `generative_perplexity` scores generated samples with a causal language model (the "judge").
- `unigram_entropy` measures how varied the tokens inside each sample are. A sampler that repeats a few likely
  tokens can reach a low generative perplexity, and its low entropy exposes it.

NOTE: generative perplexity is computed here with `transformers` directly. The `evaluate` package's `perplexity`
metric is not used, because it downloads its code from the Hugging Face Hub when loaded.
"""

import dataclasses
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging

from .collator import DataCollatorForMaskedDiffusion
from .data import looks_like_local_path


logger = logging.get_logger(__name__)

# Two-sided 95% quantile of the standard normal distribution, for the confidence interval of the bound.
NORMAL_QUANTILE_95 = 1.959963984540054

# Largest exponent passed to `math.exp`, so that an untrained model's huge NELBO gives a large finite number.
MAX_EXPONENT = 700.0


@dataclass
class PerplexityBound:
    """Result of [`perplexity_bound`]. NELBO values are in nats per counted token.

    Args:
        nelbo_per_token (`float`): Estimated NELBO of the evaluation set divided by its counted tokens.
        standard_error (`float`): Standard error of `nelbo_per_token`, in nats. It is NaN for a single sequence.
        perplexity_bound (`float`): `exp(nelbo_per_token)`, an upper bound on the perplexity.
        perplexity_interval_95 (`tuple[float, float]`): `exp(nelbo_per_token -/+ 1.96 * standard_error)`.
        num_tokens (`int`): Counted tokens (neither padding nor end-of-document) over all sequences.
        num_sequences (`int`): Evaluated sequences.
        mc_samples (`int`): Draws of `t` and masks per sequence.
        seed (`int`): Seed of the draws.
    """

    nelbo_per_token: float
    standard_error: float
    perplexity_bound: float
    perplexity_interval_95: tuple[float, float]
    num_tokens: int
    num_sequences: int
    mc_samples: int
    seed: int


@torch.no_grad()
def perplexity_bound(
    model: PreTrainedModel,
    dataset: Iterable[dict],
    collator: DataCollatorForMaskedDiffusion,
    batch_size: int = 32,
    mc_samples: int = 1,
    seed: int = 0,
) -> PerplexityBound:
    r"""Estimate the NELBO per token of `dataset` under an MDLM, and its standard error.

    For each sequence i, the collator draws `mc_samples` = K times `t_ik` and masks, and the model returns the
    single-draw NELBO estimates `N_ik`. The K times are stratified: one uniform offset `u_i` per sequence, and
    `t_ik` at `(u_i + k / K) mod 1`, rescaled to `[sampling_eps, 1]`. Every sequence gets its own offset, so the
    per-sequence means `N_i = mean_k N_ik` are independent across sequences given the text, and each `N_i` is
    unbiased for the sequence's NELBO. The estimate is the ratio `R = sum_i N_i / sum_i c_i`, where `c_i` is the
    number of counted tokens of sequence i. This is the same quantity as the trainer's `eval_loss`.

    The standard error treats the n sequences as a sample from the text distribution and linearizes the ratio
    (the delta method): `SE(R) = sqrt(n / (n - 1) * sum_i (N_i - R * c_i)^2) / sum_i c_i`. It covers both the
    Monte Carlo noise of `t` and the masks and the spread between sequences. Only the Monte Carlo part shrinks as
    K grows, so the error levels off at the spread between sequences. Adjacent blocks of one document are
    correlated, which this formula ignores, so it somewhat understates the error on packed text.

    The noise comes from a copy of `collator` seeded with `seed` for a single process, so the same model, data
    and seed give the same result, whatever `batch_size` is (up to float rounding in batched matrix products).

    NOTE: like training, this draws `t` from `[sampling_eps, 1]` rather than `(0, 1]`, so the result differs
    from the exact continuous-time bound by a relative amount of order `sampling_eps` (1e-3 by default).

    Args:
        model (`MdlmForMaskedDiffusion`): The model. It runs in eval mode, and its mode is restored afterwards.
        dataset (iterable of `dict`): Examples with `input_ids` (and optionally `attention_mask`), in the layout
            `collator` expects, e.g. packed blocks of `max_seq_length + 1` ids from `tokenize_and_pack`.
        collator (`DataCollatorForMaskedDiffusion`): Sets the masking rules. Its own seed is not used.
        batch_size (`int`): Rows per forward pass, where each sequence contributes `mc_samples` rows.
        mc_samples (`int`): Draws of `t` and masks per sequence (K above).
        seed (`int`): Seed of the draws.

    Returns:
        [`PerplexityBound`]
    """
    check_positive_int("batch_size", batch_size)
    check_positive_int("mc_samples", mc_samples)
    noise = dataclasses.replace(collator, seed=seed, rank=0, world_size=1)

    was_training = model.training
    model.eval()
    try:
        row_nelbo, row_tokens = nelbo_of_draws(model, dataset, noise, batch_size, mc_samples)
    finally:
        model.train(was_training)
    if row_nelbo.numel() == 0:
        raise ValueError("The evaluation dataset is empty. Pass at least one sequence.")

    draw_nelbo = row_nelbo.view(-1, mc_samples)  # (num_sequences, K)
    draw_tokens = row_tokens.view(-1, mc_samples)
    # Every draw of a sequence counts the same tokens: padding and end-of-document never count, masked or not.
    assert bool((draw_tokens == draw_tokens[:, :1]).all()), "counted tokens differ between draws of a sequence"
    nelbo_per_token, standard_error = ratio_estimate(draw_nelbo.mean(dim=1), draw_tokens[:, 0])

    half_width = NORMAL_QUANTILE_95 * standard_error
    return PerplexityBound(
        nelbo_per_token=nelbo_per_token,
        standard_error=standard_error,
        perplexity_bound=bounded_exp(nelbo_per_token),
        perplexity_interval_95=(bounded_exp(nelbo_per_token - half_width), bounded_exp(nelbo_per_token + half_width)),
        num_tokens=int(draw_tokens[:, 0].sum()),
        num_sequences=draw_nelbo.shape[0],
        mc_samples=mc_samples,
        seed=seed,
    )


def nelbo_of_draws(model, dataset, noise, batch_size: int, mc_samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the NELBO estimate and the counted tokens of every draw, in float64, sequence by sequence.

    Rows `i * mc_samples` to `(i + 1) * mc_samples - 1` belong to sequence i. The collator is called once per
    sequence with `mc_samples` copies of it, which draws one fresh offset for that sequence's stratified times.
    """
    row_nelbo, row_tokens, pending = [], [], []

    def flush():
        batch = concatenate_batches(pending, noise.pad_token_id)
        pending.clear()
        for start in range(0, batch["input_ids"].shape[0], batch_size):
            rows = {name: value[start : start + batch_size].to(model.device) for name, value in batch.items()}
            outputs = model(**rows)
            row_nelbo.append(outputs.example_nelbo.double().cpu())
            row_tokens.append(outputs.example_num_counted_tokens.double().cpu())

    for example in dataset:
        pending.append(noise([example] * mc_samples))
        if len(pending) * mc_samples >= batch_size:
            flush()
    if pending:
        flush()
    if not row_nelbo:
        return torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.float64)
    return torch.cat(row_nelbo), torch.cat(row_tokens)


def concatenate_batches(batches: list[dict], pad_token_id: int | None) -> dict[str, torch.Tensor]:
    """Stack collator outputs row-wise, right-padding shorter ones (padding is hidden, unlabeled and uncounted)."""
    length = max(batch["input_ids"].shape[1] for batch in batches)
    pad_values = {"input_ids": pad_token_id if pad_token_id is not None else 0, "attention_mask": 0, "labels": -100}
    stacked = {}
    for name in ("input_ids", "attention_mask", "labels"):
        stacked[name] = torch.cat(
            [F.pad(batch[name], (0, length - batch[name].shape[1]), value=pad_values[name]) for batch in batches]
        )
    stacked["t"] = torch.cat([batch["t"] for batch in batches])
    return stacked


def ratio_estimate(sequence_nelbo: torch.Tensor, sequence_tokens: torch.Tensor) -> tuple[float, float]:
    """Return `R = sum(N_i) / sum(c_i)` and its delta-method standard error over sequences (NaN when n < 2)."""
    sequence_nelbo = sequence_nelbo.double()
    sequence_tokens = sequence_tokens.double()
    total_tokens = float(sequence_tokens.sum())
    if total_tokens <= 0:
        raise ValueError("The evaluation set has no counted tokens: every position is padding or end-of-document.")
    ratio = float(sequence_nelbo.sum()) / total_tokens

    num_sequences = sequence_nelbo.shape[0]
    if num_sequences < 2:
        return ratio, math.nan
    residuals = sequence_nelbo - ratio * sequence_tokens
    variance_of_sum = num_sequences / (num_sequences - 1) * float((residuals**2).sum())
    return ratio, math.sqrt(variance_of_sum) / total_tokens


def bounded_exp(exponent: float) -> float:
    return math.exp(min(exponent, MAX_EXPONENT))


@dataclass
class GenerativePerplexity:
    """Result of [`generative_perplexity`] and [`causal_lm_perplexity`].

    Args:
        perplexity (`float`): `exp(nll_per_token)`.
        nll_per_token (`float`): Negative log-likelihood under the causal LM, in nats per token of its tokenizer,
            pooled over all samples (total NLL divided by total tokens).
        standard_error (`float`): Standard error of `nll_per_token` over samples, in nats, computed like that of
            [`perplexity_bound`] with samples in place of sequences. It is NaN for a single sample.
        num_tokens (`int`): Scored tokens of the causal LM's tokenizer, over all samples.
        num_samples (`int`): Scored samples.
        max_length (`int`): Longest window the causal LM saw, in its tokens.
        stride (`int`): Tokens scored per window after a sample's first window.
        causal_lm (`str`, *optional*): Name or path of the causal LM.
    """

    perplexity: float
    nll_per_token: float
    standard_error: float
    num_tokens: int
    num_samples: int
    max_length: int
    stride: int
    causal_lm: str | None = None


def generative_perplexity(
    samples: Sequence[str] | Sequence[Sequence[int]] | torch.Tensor,
    causal_lm_name_or_path: str,
    sample_tokenizer: PreTrainedTokenizerBase | None = None,
    batch_size: int = 8,
    max_length: int | None = None,
    stride: int | None = None,
    skip_special_tokens: bool = False,
    device: str | torch.device | None = None,
) -> GenerativePerplexity:
    """Load a causal LM with `AutoModelForCausalLM` and return the perplexity of `samples` under it.

    Token ids are decoded to text with `sample_tokenizer` (the MDLM's tokenizer), and the text is tokenized again
    with the causal LM's own tokenizer, so the two tokenizers may differ. See [`causal_lm_perplexity`] for how
    samples are scored, including those longer than the causal LM's context.

    Args:
        samples (list of `str`, list of token id lists, or `torch.Tensor` of shape `(num_samples, length)`):
            Generated text or token ids.
        causal_lm_name_or_path (`str`): Folder or Hub name of the causal LM and its tokenizer.
        sample_tokenizer (`PreTrainedTokenizerBase`, *optional*): Decodes token ids, so it is required for them.
        batch_size (`int`): Windows per forward pass of the causal LM.
        max_length (`int`, *optional*): Window length in the causal LM's tokens. Defaults to its context.
        stride (`int`, *optional*): Tokens scored per window after the first. Defaults to `max_length // 2`.
        skip_special_tokens (`bool`): Drop special tokens such as end-of-document when decoding ids. By default
            they stay in the text, and a causal LM whose tokenizer has a special token with the same string
            (GPT-2 and the mdlm tokenizer both use `<|endoftext|>`) reads them as that token.
        device (`str` or `torch.device`, *optional*): Device of the causal LM. Defaults to CUDA when available.

    Returns:
        [`GenerativePerplexity`]
    """
    texts = samples_to_texts(samples, sample_tokenizer, skip_special_tokens)
    model, tokenizer = load_causal_lm(causal_lm_name_or_path, device)
    result = causal_lm_perplexity(texts, model, tokenizer, batch_size, max_length, stride)
    return dataclasses.replace(result, causal_lm=causal_lm_name_or_path)


def samples_to_texts(samples, sample_tokenizer=None, skip_special_tokens: bool = False) -> list[str]:
    """Return `samples` as a list of strings, decoding token ids with `sample_tokenizer`."""
    if isinstance(samples, torch.Tensor):
        samples = list(samples)
    samples = list(samples)
    if not samples:
        raise ValueError("No samples were given. Pass at least one text or token id sequence.")
    if all(isinstance(sample, str) for sample in samples):
        return samples
    if sample_tokenizer is None:
        raise ValueError(
            "Samples given as token ids need sample_tokenizer to decode them. Pass the MDLM's tokenizer, or texts."
        )
    return [
        sample_tokenizer.decode(as_id_list(sample), skip_special_tokens=skip_special_tokens) for sample in samples
    ]


def load_causal_lm(name_or_path: str, device: str | torch.device | None = None):
    """Load a causal LM and its tokenizer for scoring, in eval mode on `device` (default: CUDA when available)."""
    if looks_like_local_path(name_or_path) and not Path(name_or_path).expanduser().is_dir():
        raise FileNotFoundError(
            f"Causal LM folder {name_or_path} not found. Pass a folder saved with save_pretrained (model and "
            "tokenizer) or a Hub name such as `gpt2`."
        )
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    model = AutoModelForCausalLM.from_pretrained(name_or_path).to(device)
    model.eval()
    return model, tokenizer


@torch.no_grad()
def causal_lm_perplexity(
    texts: Sequence[str],
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    batch_size: int = 8,
    max_length: int | None = None,
    stride: int | None = None,
) -> GenerativePerplexity:
    """Score texts with a loaded causal LM and return the perplexity pooled over all their tokens.

    Each text is tokenized without special tokens, and the tokenizer's BOS token (its EOS token when it has no
    BOS, as with the mdlm tokenizer) is put in front, so that every token of the text is scored, the first one
    included. Without either, the first token serves as context only and is not scored.

    A text longer than `max_length` tokens is scored with a sliding window: every window contains at most
    `max_length` tokens and scores the next `stride` tokens not yet scored. Each token is scored exactly once,
    and every token after the first window sees at least `max_length - stride` tokens of context.

    Args:
        texts (list of `str`): The texts to score.
        model (`PreTrainedModel`): A causal LM in eval mode.
        tokenizer (`PreTrainedTokenizerBase`): Its tokenizer.
        batch_size (`int`): Windows per forward pass.
        max_length (`int`, *optional*): Window length. Defaults to the model's `max_position_embeddings` (or
            `n_positions`).
        stride (`int`, *optional*): In `[1, max_length - 1]`. Defaults to `max_length // 2`.

    Returns:
        [`GenerativePerplexity`]
    """
    check_positive_int("batch_size", batch_size)
    max_length, stride = resolve_window(model.config, max_length, stride)
    start_token_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id

    windows = []  # (window token ids, index in the window of its first scored token)
    window_samples = []  # index of the text each window belongs to
    for index, text in enumerate(texts):
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        if start_token_id is not None:
            ids = [start_token_id, *ids]
        for start, end, first_scored in plan_scoring_windows(len(ids), max_length, stride):
            windows.append((ids[start:end], first_scored - start))
            window_samples.append(index)

    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    sample_nll = torch.zeros(len(texts), dtype=torch.float64)
    sample_tokens = torch.zeros(len(texts), dtype=torch.float64)
    for first in range(0, len(windows), batch_size):
        window_nll, window_tokens = score_windows(model, windows[first : first + batch_size], pad_token_id)
        samples = torch.tensor(window_samples[first : first + batch_size])
        sample_nll.index_add_(0, samples, window_nll)
        sample_tokens.index_add_(0, samples, window_tokens)
    if sample_tokens.sum() == 0:
        raise ValueError("The samples contain no token to score. Pass non-empty texts.")

    nll_per_token, standard_error = ratio_estimate(sample_nll, sample_tokens)
    return GenerativePerplexity(
        perplexity=bounded_exp(nll_per_token), nll_per_token=nll_per_token, standard_error=standard_error,
        num_tokens=int(sample_tokens.sum()), num_samples=len(texts), max_length=max_length, stride=stride,
    )


def resolve_window(config, max_length: int | None, stride: int | None) -> tuple[int, int]:
    """Return the window length and stride, defaulting to the model's context and half of it."""
    context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if max_length is None:
        if context is None:
            raise ValueError("The causal LM's config states no context length. Pass max_length.")
        max_length = context
    if not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"Invalid max_length={max_length!r}: a window needs at least 2 tokens.")
    if context is not None and max_length > context:
        raise ValueError(f"max_length={max_length} exceeds the causal LM's context of {context} tokens.")
    if stride is None:
        stride = max_length // 2
    if not isinstance(stride, int) or not 1 <= stride < max_length:
        raise ValueError(
            f"Invalid stride={stride!r}: it must lie in [1, max_length - 1] = [1, {max_length - 1}], so every "
            "window keeps at least one token of context."
        )
    return max_length, stride


def plan_scoring_windows(num_ids: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """Return `(start, end, first_scored)` of each window over `num_ids` token ids.

    A window covers ids `[start, end)`, and scores ids `[first_scored, end)`, each predicted from the ids before
    it in the window. Id 0 is context only. The first window scores up to `max_length - 1` ids and each later
    one the next `stride`.
    """
    windows = []
    first_scored = 1
    while first_scored < num_ids:
        end = min(num_ids, max_length if first_scored == 1 else first_scored + stride)
        start = max(0, end - max_length)
        windows.append((start, end, first_scored))
        first_scored = end
    return windows


def score_windows(model, windows: list[tuple[list[int], int]], pad_token_id: int):
    """Return, per window, the summed NLL (nats) of its scored tokens and their number, both float64 on the CPU."""
    length = max(len(ids) for ids, _ in windows)
    input_ids = torch.full((len(windows), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(windows), length), dtype=torch.long)
    scored = torch.zeros((len(windows), length), dtype=torch.bool)
    for row, (ids, first_scored) in enumerate(windows):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
        scored[row, first_scored : len(ids)] = True

    device = model.device
    logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
    # The logits at position j predict the token at position j + 1.
    token_nll = F.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), input_ids[:, 1:].to(device), reduction="none"
    )
    scored = scored[:, 1:].to(device)
    window_nll = (token_nll.double() * scored).sum(dim=1)
    return window_nll.cpu(), scored.sum(dim=1).double().cpu()


def unigram_entropy(token_id_sequences, ignore_token_ids: Iterable[int] = ()) -> float:
    """Return the entropy of each sequence's token frequencies, in nats, averaged over sequences.

    For one sequence with token counts `n_v` and length `n`, the entropy is `-sum_v (n_v / n) * log(n_v / n)`.
    It is at most `log(n)` (every token distinct), so compare only samples of equal length. Divide by `log(2)`
    for bits.

    Args:
        token_id_sequences (list of token id lists, list of 1-D tensors, or a 2-D `torch.Tensor`): The samples.
        ignore_token_ids (iterable of `int`): Ids left out before counting, e.g. padding.
    """
    entropies = sequence_unigram_entropies(token_id_sequences, ignore_token_ids)
    return sum(entropies) / len(entropies)


def sequence_unigram_entropies(token_id_sequences, ignore_token_ids: Iterable[int] = ()) -> list[float]:
    """Return the unigram entropy, in nats, of every sequence. See [`unigram_entropy`]."""
    if isinstance(token_id_sequences, torch.Tensor):
        token_id_sequences = list(token_id_sequences)
    ignored = set(ignore_token_ids)
    entropies = []
    for index, sequence in enumerate(token_id_sequences):
        counts = Counter(token for token in as_id_list(sequence) if token not in ignored)
        length = sum(counts.values())
        if length == 0:
            raise ValueError(f"Sequence {index} has no tokens left to count. Drop it or ignore fewer ids.")
        entropies.append(-sum(count / length * math.log(count / length) for count in counts.values()))
    if not entropies:
        raise ValueError("No sequences were given. Pass at least one token id sequence.")
    return entropies


def as_id_list(sequence) -> list[int]:
    if isinstance(sequence, torch.Tensor):
        if sequence.dim() != 1:
            raise ValueError(f"Invalid token id tensor of shape {tuple(sequence.shape)}: pass 1-D sequences.")
        return sequence.tolist()
    return [int(token) for token in sequence]


def check_positive_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"Invalid {name}={value!r}: it must be a positive integer.")


__all__ = [
    "GenerativePerplexity",
    "PerplexityBound",
    "causal_lm_perplexity",
    "generative_perplexity",
    "load_causal_lm",
    "perplexity_bound",
    "unigram_entropy",
]
