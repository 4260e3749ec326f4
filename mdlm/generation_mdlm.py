"""Sampling from MDLM: ancestral, cached, confidence-ordered, block-wise and semi-autoregressive generation.

MDLM (Sahoo et al., 2024, arXiv:2406.07524) generates by running the masking process backwards. Starting from a
sequence of mask tokens at t = 1, the ancestral sampler walks down the times `t_k = 1 - (1 - time_eps) * k / K`.
Going from t to s < t, a masked position stays masked with probability `(1 - alpha_s) / (1 - alpha_t)` and
otherwise takes a token drawn from `p_theta(x_0 | x_t)`. Unmasked tokens never change, because under SUBS the
model copies them.

This file imports only torch, transformers and its sibling files, because `save_pretrained` copies it next to
checkpoints for `trust_remote_code=True` loading.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers.utils import ModelOutput, logging

from .noise_schedule import LogLinearSchedule


SAMPLERS = ("ddpm", "ddpm_cache", "confidence")

# Maximum number of float64 elements in one chunk of rows that is filtered and searched; 2**24 take 128 MiB.
MAX_DRAW_ELEMENTS = 2**24


def sample_categorical(log_probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.LongTensor:
    """Draw one category per row of `log_probs` by inverse-CDF sampling in float64.

    The cumulative sum and the uniform draw are float64, so a category of probability 1e-12, far below float32
    resolution, is still drawn at its rate. Gumbel-max with float32 noise truncates that tail, because a float32
    uniform from `torch.rand` is a multiple of 2**-24 (checked on the CPU with torch 2.13).

    Args:
        log_probs (`torch.Tensor` of shape `(..., num_categories)`): Log-probabilities, normalized or not. `-inf`
            marks categories that are never drawn, and every row needs at least one finite entry.
        generator (`torch.Generator`, *optional*): Source of the single float64 uniform drawn per row.

    Returns:
        `torch.LongTensor` of shape `log_probs.shape[:-1]`: the drawn category indices.
    """
    uniform = draw_uniform(log_probs.shape[:-1], generator, log_probs.device)
    return inverse_cdf(log_probs, uniform)


def draw_uniform(shape: torch.Size | tuple[int, ...], generator: torch.Generator | None, device) -> torch.Tensor:
    """Draw float64 uniforms in [0, 1) on the generator's device and move them to `device`."""
    source_device = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, dtype=torch.float64, device=source_device).to(device)


def inverse_cdf(log_probs: torch.Tensor, uniform: torch.Tensor) -> torch.LongTensor:
    """Return, per row, the first category whose float64 cumulative probability exceeds `uniform` times the total."""
    log_probs = log_probs.double()
    probs = (log_probs - log_probs.amax(dim=-1, keepdim=True)).exp()
    cdf = probs.cumsum(dim=-1)
    total = cdf[..., -1:]

    # The target stays strictly below the total, so the search never runs past the last category with mass, and
    # a category of probability zero never has a cumulative value above the target that its predecessor lacks.
    target = torch.minimum(uniform.unsqueeze(-1) * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, target, right=True).squeeze(-1)


def adjust_log_probs(log_probs: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0) -> torch.Tensor:
    """Apply temperature and nucleus (top-p) filtering to rows of log-probabilities, in float64.

    Args:
        log_probs (`torch.Tensor` of shape `(..., vocab_size)`): Log-probabilities.
        temperature (`float`): Divides the log-probabilities; must be positive.
        top_p (`float`): Keeps the smallest set of most likely tokens whose probability sum reaches `top_p`. The
            most likely token always stays.

    Returns:
        `torch.Tensor` (float64): unnormalized log-probabilities with `-inf` outside the nucleus.
    """
    log_probs = log_probs.double()
    if temperature != 1.0:
        log_probs = log_probs / temperature
    if top_p >= 1.0:
        return log_probs

    sorted_log_probs, order = log_probs.sort(dim=-1, descending=True)
    sorted_probs = sorted_log_probs.softmax(dim=-1)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    sorted_log_probs = sorted_log_probs.masked_fill(mass_before >= top_p, -math.inf)
    return torch.empty_like(log_probs).scatter_(-1, order, sorted_log_probs)


class TokenDrawer:
    """Source of every random number of one generation: float64 uniforms and tokens with temperature and top-p.

    Args:
        generator (`torch.Generator`, *optional*): The random stream; `None` uses torch's global one.
        temperature (`float`): Sampling temperature. 0 picks the most likely token without drawing.
        top_p (`float`): Nucleus probability mass in (0, 1]; 1 keeps the whole vocabulary.
    """

    def __init__(self, generator: torch.Generator | None, temperature: float, top_p: float):
        self.generator = generator
        self.temperature = temperature
        self.top_p = top_p

    def uniform(self, shape: torch.Size | tuple[int, ...], device) -> torch.Tensor:
        return draw_uniform(shape, self.generator, device)

    def tokens(self, log_probs: torch.Tensor) -> torch.LongTensor:
        """Draw one token per row of `log_probs` (rows, vocab_size), using one uniform per row and none when greedy."""
        num_rows, vocab_size = log_probs.shape
        if self.temperature == 0:
            return log_probs.argmax(dim=-1)
        if num_rows == 0:
            return torch.empty(0, dtype=torch.long, device=log_probs.device)

        uniform = self.uniform((num_rows,), log_probs.device)
        rows_per_chunk = max(1, MAX_DRAW_ELEMENTS // vocab_size)
        chunks = [
            inverse_cdf(adjust_log_probs(rows, self.temperature, self.top_p), uniforms)
            for rows, uniforms in zip(log_probs.split(rows_per_chunk), uniform.split(rows_per_chunk))
        ]
        return torch.cat(chunks)


class ForwardPassCounter:
    """Calls the model on a window of token ids, returns SUBS log-probabilities and counts the forward passes."""

    def __init__(self, model):
        self.model = model
        self.num_forward_passes = 0

    def __call__(self, input_ids: torch.LongTensor) -> torch.Tensor:
        self.num_forward_passes += 1
        return self.model(input_ids=input_ids).logits


class AncestralSampler:
    """MDLM's ancestral sampler (`ddpm`), and its cached variant (`ddpm_cache`).

    It steps through the times `t_k = 1 - (1 - time_eps) * k / num_steps`. Going from t to s < t, each masked
    target position stays masked with probability `(1 - alpha_s) / (1 - alpha_t)` and otherwise takes a token
    drawn from `p_theta(x_0 | x_t)`. With `use_cache`, a step that unmasks nothing keeps the model output for the
    next step, because the input did not change and the model takes no time input. Both variants draw the same
    random numbers in the same order, so with the same generator they return the same tokens.

    Args:
        denoiser (`ForwardPassCounter`): The model call.
        drawer (`TokenDrawer`): The random numbers.
        schedule (`LogLinearSchedule`): Gives `alpha_t`.
        mask_token_id (`int`): The mask token.
        time_eps (`float`): The last time `t_K` of the chain.
        use_cache (`bool`): Reuse the model output after a step that unmasked nothing.
        final_denoise (`bool`): After the last step, fill every target still masked with the most likely token.
    """

    def __init__(self, denoiser, drawer, schedule, mask_token_id, time_eps, use_cache, final_denoise):
        self.denoiser = denoiser
        self.drawer = drawer
        self.schedule = schedule
        self.mask_token_id = mask_token_id
        self.time_eps = time_eps
        self.use_cache = use_cache
        self.final_denoise = final_denoise

    def denoise(
        self, x: torch.LongTensor, targets: torch.BoolTensor, num_steps: int, on_step: Callable
    ) -> torch.LongTensor:
        """Denoise the masked positions of `x` that `targets` marks in `num_steps` steps.

        `on_step(x, is_final_denoise)` receives the window after each step and after the final fill.
        """
        if not bool((targets & (x == self.mask_token_id)).any()):
            return x
        times = torch.linspace(1.0, self.time_eps, num_steps + 1, dtype=torch.float64).tolist()

        log_probs = None
        for t, s in zip(times[:-1], times[1:]):
            if log_probs is None:
                log_probs = self.denoiser(x)
            alpha_t = self.schedule.alpha(torch.tensor(t, dtype=torch.float64))
            alpha_s = self.schedule.alpha(torch.tensor(s, dtype=torch.float64))
            stay_probability = float((1.0 - alpha_s) / (1.0 - alpha_t))

            # Every step draws one uniform per position and one per unmasked position, whether or not the model
            # output is cached, so `ddpm` and `ddpm_cache` consume the generator identically.
            uniform = self.drawer.uniform(x.shape, x.device)
            unmask = targets & (x == self.mask_token_id) & (uniform >= stay_probability)
            x = x.masked_scatter(unmask, self.drawer.tokens(log_probs[unmask]))

            if not self.use_cache or bool(unmask.any()):
                log_probs = None
            on_step(x, False)

        if self.final_denoise:
            x = self.fill_remaining(x, targets, log_probs, on_step)
        return x

    def fill_remaining(self, x, targets, log_probs, on_step) -> torch.LongTensor:
        """Set every target still masked to its most likely token, as the step from `time_eps` to 0 does."""
        remaining = targets & (x == self.mask_token_id)
        if not bool(remaining.any()):
            return x
        if log_probs is None:
            log_probs = self.denoiser(x)
        x = torch.where(remaining, log_probs.argmax(dim=-1), x)
        on_step(x, True)
        return x


class ConfidenceSampler:
    """Confidence-ordered unmasking: MaskGIT and LLaDA with a fixed count per step, or Fast-dLLM with a threshold.

    Each step draws a candidate token for every masked target (most likely token when the temperature is 0) and
    scores it with its confidence, the probability `p_theta(candidate | x_t)` before temperature and top-p. The
    step unmasks the `ceil(remaining / steps_left)` most confident positions of each row. This spreads the
    positions evenly and always fills the window within `num_steps`. With `confidence_threshold`, every position
    whose confidence exceeds the threshold is unmasked as well, so fewer steps may suffice. The loop stops as
    soon as no target is masked, so it never runs more than `num_steps` forward passes.

    Args:
        denoiser (`ForwardPassCounter`): The model call.
        drawer (`TokenDrawer`): The random numbers.
        mask_token_id (`int`): The mask token.
        confidence_threshold (`float`, *optional*): Unmask every position with a higher confidence.
    """

    def __init__(self, denoiser, drawer, mask_token_id, confidence_threshold=None):
        self.denoiser = denoiser
        self.drawer = drawer
        self.mask_token_id = mask_token_id
        self.confidence_threshold = confidence_threshold

    def denoise(
        self, x: torch.LongTensor, targets: torch.BoolTensor, num_steps: int, on_step: Callable
    ) -> torch.LongTensor:
        """Unmask every position of `x` that `targets` marks within `num_steps` steps.

        `on_step(x, False)` receives the window after each step.
        """
        for step in range(num_steps):
            masked = targets & (x == self.mask_token_id)
            if not bool(masked.any()):
                break
            log_probs = self.denoiser(x)

            candidates = x.masked_scatter(masked, self.drawer.tokens(log_probs[masked]))
            candidate_log_probs = log_probs.gather(-1, candidates.unsqueeze(-1)).squeeze(-1)
            confidence = candidate_log_probs.double().exp().masked_fill(~masked, -1.0)

            chosen = masked & self.select_most_confident(confidence, masked.sum(dim=-1), num_steps - step)
            if self.confidence_threshold is not None:
                chosen |= masked & (confidence > self.confidence_threshold)
            x = torch.where(chosen, candidates, x)
            on_step(x, False)
        return x

    @staticmethod
    def select_most_confident(confidence: torch.Tensor, num_masked: torch.Tensor, steps_left: int) -> torch.BoolTensor:
        """Mark the `ceil(num_masked / steps_left)` most confident positions of each row; ties go to the left."""
        quota = (num_masked + steps_left - 1) // steps_left
        order = confidence.argsort(dim=-1, descending=True, stable=True)
        rank = order.argsort(dim=-1)
        return rank < quota.unsqueeze(-1)


@dataclass
class MdlmDenoisingStep:
    """State of a generation after one denoising step, as passed to the `callback` of `generate`.

    Args:
        window_index (`int`): Index of the context window being denoised; above 0 only in semi-autoregressive
            generation.
        window_start (`int`): Position of the window's first token in the whole sequence.
        prefix_length (`int`): Number of fixed tokens at the start of the window (prompt or earlier text).
        step (`int`): Denoising steps completed in this window.
        num_steps (`int`): Denoising steps per window.
        is_final_denoise (`bool`): Whether this report follows the final fill of the remaining masks.
        window_ids (`torch.LongTensor` of shape `(batch_size, window_length)`): The window, masks included.
        committed_ids (`torch.LongTensor` of shape `(batch_size, window_start + prefix_length)`): The finished text
            before the window's new tokens.
        num_forward_passes (`int`): Forward passes so far, over all windows.
    """

    window_index: int
    window_start: int
    prefix_length: int
    step: int
    num_steps: int
    is_final_denoise: bool
    window_ids: torch.LongTensor
    committed_ids: torch.LongTensor
    num_forward_passes: int

    @property
    def sequences(self) -> torch.LongTensor:
        """The whole sequence so far: the finished text followed by the window's new, partly masked tokens."""
        return torch.cat([self.committed_ids, self.window_ids[:, self.prefix_length :]], dim=1)


@dataclass
class MdlmGenerationOutput(ModelOutput):
    """
    Output of [`MdlmGenerationMixin.generate`] with `return_dict_in_generate=True` or `output_trajectory=True`.

    Args:
        sequences (`torch.LongTensor` of shape `(num_samples, seq_len)`, or a list of 1-D `torch.LongTensor`):
            The generated token ids, prompt included. A list when `stop_at_eod=True`, because rows differ in length.
        trajectory (`tuple(torch.LongTensor)`, *optional*): With `output_trajectory=True`, the whole sequence on
            the CPU at the start of each window, after each denoising step and after each final fill. Entries grow
            longer from window to window in semi-autoregressive generation.
        num_forward_passes (`int`): Number of model calls, each on a batch of `num_samples` windows.
    """

    sequences: torch.LongTensor | list[torch.LongTensor] | None = None
    trajectory: tuple[torch.LongTensor, ...] | None = None
    num_forward_passes: int | None = None


class DenoisingProgress:
    """Passes each denoising step to the trajectory, the user's callback and the progress bar."""

    def __init__(self, counter, num_steps, num_windows, record_trajectory, callback, show_progress):
        self.counter = counter
        self.num_steps = num_steps
        self.trajectory = [] if record_trajectory else None
        self.callback = callback
        self.progress_bar = None
        if show_progress:
            self.progress_bar = logging.tqdm(total=num_steps * num_windows, desc="Denoising steps", unit="step")
        self.window_index = -1
        self.window_start = 0
        self.prefix_length = 0
        self.committed_ids = None
        self.step = 0

    def start_window(self, window_start, prefix_length, committed_ids, window_ids):
        self.window_index += 1
        self.window_start = window_start
        self.prefix_length = prefix_length
        self.committed_ids = committed_ids
        self.step = 0
        if self.trajectory is not None:
            self.trajectory.append(self.whole_sequence(window_ids))

    def report(self, window_ids: torch.LongTensor, is_final_denoise: bool):
        if not is_final_denoise:
            self.step += 1
            if self.progress_bar is not None:
                self.progress_bar.update(1)
        if self.trajectory is not None:
            self.trajectory.append(self.whole_sequence(window_ids))
        if self.callback is not None:
            self.callback(
                MdlmDenoisingStep(
                    window_index=self.window_index, window_start=self.window_start, prefix_length=self.prefix_length,
                    step=self.step, num_steps=self.num_steps, is_final_denoise=is_final_denoise,
                    window_ids=window_ids, committed_ids=self.committed_ids,
                    num_forward_passes=self.counter.num_forward_passes,
                )
            )

    def finish_window(self):
        """Move the bar to the end of the window, since the confidence sampler may stop before `num_steps`."""
        if self.progress_bar is not None:
            self.progress_bar.update((self.window_index + 1) * self.num_steps - self.progress_bar.n)

    def close(self):
        if self.progress_bar is not None:
            self.progress_bar.close()

    def whole_sequence(self, window_ids: torch.LongTensor) -> torch.LongTensor:
        return torch.cat([self.committed_ids, window_ids[:, self.prefix_length :]], dim=1).cpu()


def plan_windows(prompt_length: int, seq_len: int, context: int, stride_length: int) -> list[tuple[int, int, int]]:
    """Split generation into context windows and return `(window_start, prefix_length, num_new_tokens)` of each.

    While the text fits, a window keeps all of it as prefix and fills the rest of the context. After that, each
    window keeps the last `context - stride_length` tokens as prefix and generates `stride_length` new ones. The
    last window may need fewer new tokens, and then keeps a longer prefix.
    """
    windows = []
    text_length = prompt_length
    while text_length < seq_len:
        remaining = seq_len - text_length
        prefix_length = min(text_length, context - min(stride_length, remaining))
        num_new = min(remaining, context - prefix_length)
        windows.append((text_length - prefix_length, prefix_length, num_new))
        text_length += num_new
    return windows


def split_into_blocks(targets: torch.BoolTensor, block_length: int) -> list[torch.BoolTensor]:
    """Split the target positions into left-to-right blocks of `block_length` positions.

    The blocks start at the first column that contains a target in any row. Blocks without targets are kept, so the
    step budget per block does not depend on the template.
    """
    target_columns = targets.any(dim=0).nonzero()
    if len(target_columns) == 0:
        return []
    first = int(target_columns[0])
    window_length = targets.shape[1]
    positions = torch.arange(window_length, device=targets.device)
    blocks = []
    for start in range(first, window_length, block_length):
        in_block = (positions >= start) & (positions < start + block_length)
        blocks.append(targets & in_block)
    return blocks


def split_steps(num_steps: int, num_blocks: int) -> list[int]:
    """Spread `num_steps` over `num_blocks` as evenly as possible, earlier blocks taking the remainder."""
    base, extra = divmod(num_steps, num_blocks)
    return [base + (1 if block < extra else 0) for block in range(num_blocks)]


def cut_at_first_eod(sequences: torch.LongTensor, eod_token_id: int, start: int) -> list[torch.LongTensor]:
    """Return each row up to, not including, its first `eod_token_id` at or after position `start`."""
    rows = []
    for row in sequences:
        hits = (row[start:] == eod_token_id).nonzero()
        end = start + int(hits[0]) if len(hits) > 0 else row.shape[0]
        rows.append(row[:end])
    return rows


def as_generator(generator: torch.Generator | int | None) -> torch.Generator | None:
    """Return `generator` as is, or a CPU generator seeded with it when it is an integer."""
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    if isinstance(generator, int) and not isinstance(generator, bool):
        return torch.Generator().manual_seed(generator)
    raise ValueError(f"Invalid generator={generator!r}: pass a torch.Generator, an integer seed or None.")


class MdlmGenerationMixin:
    """Generation methods of [`MdlmForMaskedDiffusion`].

    The entry point is named `generate`. In transformers 5, `PreTrainedModel` has no `generate` of its own, and
    this mixin does not inherit transformers' `GenerationMixin`, so nothing is overridden. Because the class name
    ends in `GenerationMixin`, transformers' `can_generate()` returns True. Models therefore get a
    `generation_config`, which `save_pretrained` writes and `generate` ignores.
    """

    @torch.no_grad()
    def generate(
        self,
        num_samples: int | None = None,
        seq_len: int | None = None,
        num_steps: int = 128,
        sampler: str = "ddpm_cache",
        temperature: float = 1.0,
        top_p: float = 1.0,
        generator: torch.Generator | int | None = None,
        prompt_ids: torch.LongTensor | None = None,
        template_ids: torch.LongTensor | None = None,
        final_denoise: bool = True,
        stop_at_eod: bool = False,
        confidence_threshold: float | None = None,
        block_length: int | None = None,
        stride_length: int | None = None,
        time_eps: float = 1e-5,
        output_trajectory: bool = False,
        return_dict_in_generate: bool = False,
        callback: Callable[[MdlmDenoisingStep], None] | None = None,
        show_progress: bool = False,
    ) -> torch.LongTensor | list[torch.LongTensor] | MdlmGenerationOutput:
        r"""
        Generate token ids by reverse diffusion, in eval mode and without gradients. The training mode is restored
        afterwards.

        Sequences longer than `config.max_position_embeddings` are generated semi-autoregressively, window by
        window. Each window is conditioned on the last `context - stride_length` tokens so far as a fixed prefix,
        and the last window keeps a longer prefix when it needs fewer than `stride_length` new tokens.

        Args:
            num_samples (`int`, *optional*): Number of sequences, generated as one batch. Defaults to the number of
                rows of `prompt_ids` or `template_ids`, else 1.
            seq_len (`int`, *optional*): Length of each returned sequence in tokens, prompt included. Defaults to
                the template's length, else `config.max_position_embeddings`.
            num_steps (`int`): Denoising steps per context window. With `block_length`, the window's steps are
                split evenly over its blocks.
            sampler (`str`): `"ddpm"`, `"ddpm_cache"` or `"confidence"`. `"ddpm"` is MDLM's ancestral sampler.
                `"ddpm_cache"` runs the same chain and returns the same tokens, but reuses the model output after
                a step that unmasked nothing. `"confidence"` unmasks the most confident positions first, as
                described under `confidence_threshold`.
            temperature (`float`): Divides the log-probabilities before drawing; 0 takes the most likely token.
            top_p (`float`): Nucleus sampling mass in (0, 1]; 1 disables it.
            generator (`torch.Generator` or `int`, *optional*): Random source. An integer seeds a new CPU
                generator, and random numbers are drawn on the generator's device, so a seed gives the same draws
                on every device.
            prompt_ids (`torch.LongTensor` of shape `(prompt_length,)` or `(num_samples, prompt_length)`,
                *optional*): A fixed prefix that every sequence starts with.
            template_ids (`torch.LongTensor` of shape `(seq_len,)` or `(num_samples, seq_len)`, *optional*): An
                infilling template. Positions that contain `config.mask_token_id` are generated, and the others are
                kept. It must fit in one context window and cannot be combined with `prompt_ids`.
            final_denoise (`bool`): After the ancestral sampler's last step (at `t = time_eps`), fill every
                position still masked with its most likely token, as MDLM does for the step to t = 0. Without it,
                a few mask tokens may survive. The confidence sampler always fills every position.
            stop_at_eod (`bool`): Return each sequence only up to its first `config.eod_token_id` after the prompt.
                The result is then a list of 1-D tensors.
            confidence_threshold (`float`, *optional*): For `sampler="confidence"` only. Each step also unmasks
                every position whose confidence exceeds this probability (Fast-dLLM parallel decoding). The
                confidence is `p_theta` of the drawn candidate, which is the max probability when `temperature=0`.
            block_length (`int`, *optional*): Decode each window in left-to-right blocks of this many positions,
                each block fully denoised before the next starts.
            stride_length (`int`, *optional*): New tokens per window in semi-autoregressive generation, in
                [1, context). Defaults to half the context.
            time_eps (`float`): Last time of the ancestral chain, in (0, 1).
            output_trajectory (`bool`): Also return the sequence after every step. Implies an output object.
            return_dict_in_generate (`bool`): Return an [`MdlmGenerationOutput`] with `num_forward_passes`.
            callback (`Callable[[MdlmDenoisingStep], None]`, *optional*): Called after every denoising step.
            show_progress (`bool`): Show a tqdm bar over denoising steps.

        Returns:
            `torch.LongTensor` of shape `(num_samples, seq_len)`, a list of 1-D tensors when `stop_at_eod=True`,
            or an [`MdlmGenerationOutput`] when `return_dict_in_generate` or `output_trajectory` is set.
        """
        if stride_length is None:
            stride_length = max(1, self.config.max_position_embeddings // 2)
        check_generation_arguments(
            self.config, num_steps, sampler, temperature, top_p, confidence_threshold, block_length, stride_length,
            time_eps, stop_at_eod,
        )
        prompt, template = self._prepare_conditioning(num_samples, prompt_ids, template_ids)
        seq_len = self._resolve_seq_len(seq_len, prompt, template)
        if template is not None:
            windows = [(0, 0, seq_len)]
        else:
            windows = plan_windows(prompt.shape[1], seq_len, self.config.max_position_embeddings, stride_length)

        counter = ForwardPassCounter(self)
        sampler_object = self._build_sampler(
            sampler, counter, TokenDrawer(as_generator(generator), temperature, top_p), final_denoise,
            confidence_threshold, time_eps,
        )
        progress = DenoisingProgress(counter, num_steps, len(windows), output_trajectory, callback, show_progress)

        was_training = self.training
        self.eval()
        try:
            sequences = self._denoise_windows(
                sampler_object, progress, windows, prompt, template, num_steps, block_length
            )
        finally:
            self.train(was_training)
            progress.close()

        if stop_at_eod:
            sequences = cut_at_first_eod(sequences, self.config.eod_token_id, start=prompt.shape[1])
        if not (return_dict_in_generate or output_trajectory):
            return sequences
        trajectory = tuple(progress.trajectory) if output_trajectory else None
        return MdlmGenerationOutput(
            sequences=sequences, trajectory=trajectory, num_forward_passes=counter.num_forward_passes
        )

    def _denoise_windows(self, sampler, progress, windows, prompt, template, num_steps, block_length):
        """Denoise the planned windows one after another and return the joined sequences."""
        mask_token_id = self.config.mask_token_id
        text = prompt
        for window_start, prefix_length, num_new in windows:
            if template is not None:
                window = template
                targets = template == mask_token_id
            else:
                new_masks = torch.full((text.shape[0], num_new), mask_token_id, dtype=torch.long, device=text.device)
                window = torch.cat([text[:, window_start:], new_masks], dim=1)
                targets = torch.zeros_like(window, dtype=torch.bool)
                targets[:, prefix_length:] = True

            progress.start_window(window_start, prefix_length, text, window)
            window = self._denoise_window(sampler, window, targets, num_steps, block_length, progress.report)
            progress.finish_window()
            text = torch.cat([text, window[:, prefix_length:]], dim=1)
        return text

    @staticmethod
    def _denoise_window(sampler, window, targets, num_steps, block_length, on_step) -> torch.LongTensor:
        """Denoise one window at once, or block by block from left to right when `block_length` is set."""
        if block_length is None:
            return sampler.denoise(window, targets, num_steps, on_step)

        blocks = split_into_blocks(targets, block_length)
        if num_steps < len(blocks):
            raise ValueError(
                f"num_steps={num_steps} is smaller than the {len(blocks)} blocks of block_length={block_length}. "
                f"Use num_steps >= {len(blocks)} or a larger block_length."
            )
        for block_targets, block_steps in zip(blocks, split_steps(num_steps, len(blocks))):
            window = sampler.denoise(window, block_targets, block_steps, on_step)
        return window

    def _build_sampler(self, sampler, counter, drawer, final_denoise, confidence_threshold, time_eps):
        if sampler == "confidence":
            return ConfidenceSampler(counter, drawer, self.config.mask_token_id, confidence_threshold)
        schedule = LogLinearSchedule(self.config.noise_eps)
        return AncestralSampler(
            counter, drawer, schedule, self.config.mask_token_id, time_eps,
            use_cache=sampler == "ddpm_cache", final_denoise=final_denoise,
        )

    def _prepare_conditioning(self, num_samples, prompt_ids, template_ids):
        """Return the prompt as `(num_samples, prompt_length)` (empty without one) and the template as
        `(num_samples, seq_len)` or None, both on the model's device."""
        if prompt_ids is not None and template_ids is not None:
            raise ValueError(
                "Both prompt_ids and template_ids were given. Pass only one. A template can contain the prompt "
                "itself, with mask_token_id at the positions to fill."
            )
        conditioning_ids = prompt_ids if prompt_ids is not None else template_ids
        name = "prompt_ids" if prompt_ids is not None else "template_ids"
        if conditioning_ids is None:
            num_samples = 1 if num_samples is None else num_samples
            check_positive("num_samples", num_samples)
            return torch.empty((num_samples, 0), dtype=torch.long, device=self.device), None

        conditioning_ids = self._check_token_ids(name, conditioning_ids)
        if num_samples is None:
            num_samples = conditioning_ids.shape[0]
        check_positive("num_samples", num_samples)
        if conditioning_ids.shape[0] not in (1, num_samples):
            raise ValueError(
                f"{name} has {conditioning_ids.shape[0]} rows but num_samples={num_samples}. Pass one row, or one "
                "per sample."
            )
        conditioning_ids = conditioning_ids.expand(num_samples, -1).clone()
        if prompt_ids is not None:
            if bool((conditioning_ids == self.config.mask_token_id).any()):
                raise ValueError(
                    f"prompt_ids contains mask_token_id={self.config.mask_token_id}. Use template_ids to fill "
                    "positions inside a text."
                )
            return conditioning_ids, None
        return conditioning_ids[:, :0], conditioning_ids

    def _check_token_ids(self, name: str, token_ids) -> torch.LongTensor:
        """Return `token_ids` as a 2-D LongTensor on the model's device, or raise ValueError."""
        token_ids = torch.as_tensor(token_ids, device=self.device)
        if token_ids.dtype.is_floating_point or token_ids.dtype == torch.bool or token_ids.dim() not in (1, 2):
            raise ValueError(
                f"Invalid {name} of dtype {token_ids.dtype} and shape {tuple(token_ids.shape)}: pass integer token "
                "ids of shape (length,) or (num_samples, length)."
            )
        token_ids = token_ids.long()
        if token_ids.dim() == 1:
            token_ids = token_ids.unsqueeze(0)
        if token_ids.numel() > 0 and (int(token_ids.min()) < 0 or int(token_ids.max()) >= self.config.vocab_size):
            raise ValueError(
                f"{name} contains ids outside [0, vocab_size={self.config.vocab_size}): min {int(token_ids.min())}, "
                f"max {int(token_ids.max())}. Tokenize with the model's tokenizer."
            )
        return token_ids

    def _resolve_seq_len(self, seq_len, prompt, template) -> int:
        context = self.config.max_position_embeddings
        if template is not None:
            if seq_len is not None and seq_len != template.shape[1]:
                raise ValueError(
                    f"seq_len={seq_len} differs from the template length {template.shape[1]}. Leave seq_len unset "
                    "or make them equal."
                )
            if template.shape[1] > context:
                raise ValueError(
                    f"The template length {template.shape[1]} exceeds max_position_embeddings={context}. Templates "
                    "must fit in one context window."
                )
            return template.shape[1]
        if seq_len is None:
            seq_len = context
        check_positive("seq_len", seq_len)
        if seq_len <= prompt.shape[1]:
            raise ValueError(
                f"seq_len={seq_len} leaves nothing to generate after the {prompt.shape[1]}-token prompt. seq_len "
                "counts the prompt, so pass a larger one."
            )
        return seq_len


def check_positive(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"Invalid {name}={value!r}: it must be a positive integer.")


def check_generation_arguments(
    config, num_steps, sampler, temperature, top_p, confidence_threshold, block_length, stride_length, time_eps,
    stop_at_eod,
) -> None:
    """Raise ValueError on a sampling setting that `generate` cannot use, naming the value and the fix."""
    check_positive("num_steps", num_steps)
    if sampler not in SAMPLERS:
        raise ValueError(f"Invalid sampler={sampler!r}: choose one of {', '.join(SAMPLERS)}.")
    if not temperature >= 0:
        raise ValueError(f"Invalid temperature={temperature}: use 0 for the most likely token or a positive value.")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"Invalid top_p={top_p}: it must lie in (0, 1]; 1 disables nucleus sampling.")
    if confidence_threshold is not None:
        if sampler != "confidence":
            raise ValueError(
                f"confidence_threshold={confidence_threshold} applies only to sampler='confidence', not "
                f"sampler={sampler!r}. Drop it or switch samplers."
            )
        if not 0.0 < confidence_threshold <= 1.0:
            raise ValueError(f"Invalid confidence_threshold={confidence_threshold}: it must lie in (0, 1].")
    if block_length is not None:
        check_positive("block_length", block_length)
    check_positive("stride_length", stride_length)
    if stride_length >= config.max_position_embeddings:
        raise ValueError(
            f"Invalid stride_length={stride_length}: it must be smaller than max_position_embeddings="
            f"{config.max_position_embeddings}, so every window keeps some earlier text as prefix."
        )
    if not 0.0 < time_eps < 1.0:
        raise ValueError(f"Invalid time_eps={time_eps}: it must lie in (0, 1).")
    if stop_at_eod and config.eod_token_id is None:
        raise ValueError("stop_at_eod=True needs config.eod_token_id, which is None. Set it or drop stop_at_eod.")


__all__ = [
    "MdlmGenerationMixin",
    "MdlmGenerationOutput",
    "MdlmDenoisingStep",
    "sample_categorical",
    "adjust_log_probs",
    "plan_windows",
    "SAMPLERS",
]
