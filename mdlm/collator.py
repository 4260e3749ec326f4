"""The MDLM data collator: draws `t` per example and masks tokens with probability `1 - alpha_t`."""

from dataclasses import dataclass, field

import torch

from .noise_schedule import LogLinearSchedule, sample_times


# Spacing between the mask-noise seeds of different ranks, so rank r's stream never overlaps rank r+1's seed.
RANK_SEED_STRIDE = 1_000_003


@dataclass
class DataCollatorForMaskedDiffusion:
    """Turn clean token blocks into noised MDLM training examples.

    Input features carry `input_ids` and optionally `attention_mask`. Packed blocks of `max_seq_length + 1` ids (the
    layout causal-LM pipelines produce) lose their last token, so the model sees `max_seq_length` tokens. Unpacked
    examples of different lengths are right-padded with `pad_token_id`; set `drop_last_token=False` for them when
    their last token is real text.

    End-of-document tokens are structure: they never get a label and never count in the NELBO's token count. By
    default they are never masked either, so the model sees document boundaries; `noise_eod=True` masks them like
    other tokens (still without a label). Padding is never masked, never counted and hidden from attention.

    Returns `input_ids` (x_t), `labels` (the clean token at masked counted positions, -100 elsewhere),
    `attention_mask` and `t` (one time per example).

    Noise comes from the collator's own generators, not the global torch RNG, because the Trainer seeds every rank
    identically: each rank draws its own masks, while all ranks share the offset of the low-discrepancy time strata,
    which span the global batch of `batch_size * world_size` examples.

    Args:
        mask_token_id (`int`): Id that replaces masked tokens.
        eod_token_id (`int`, *optional*): End-of-document id.
        pad_token_id (`int`, *optional*): Padding id; needed only for batches of unequal lengths.
        noise_eps (`float`): The schedule's `eps` in `alpha_t = 1 - (1 - eps) * t`.
        sampling_eps (`float`): Lower end of `t`.
        noise_eod (`bool`): Mask end-of-document tokens too.
        drop_last_token (`bool`): Drop each example's last token (for packed blocks of `max_seq_length + 1`).
        seed (`int`): Seed of the noise generators. Rank r uses `seed + r * RANK_SEED_STRIDE` for masks.
        rank (`int`, *optional*) and world_size (`int`, *optional*): Read from `torch.distributed` on the first
            call when not given.
    """

    mask_token_id: int
    eod_token_id: int | None = None
    pad_token_id: int | None = None
    noise_eps: float = 1e-3
    sampling_eps: float = 1e-3
    noise_eod: bool = False
    drop_last_token: bool = True
    seed: int = 0
    rank: int | None = None
    world_size: int | None = None
    _mask_generator: torch.Generator | None = field(default=None, init=False, repr=False)
    _offset_generator: torch.Generator | None = field(default=None, init=False, repr=False)
    _worker_id: int | None = field(default=None, init=False, repr=False)

    def __post_init__(self):
        self.schedule = LogLinearSchedule(self.noise_eps)

    def reseeded(self, seed: int) -> "DataCollatorForMaskedDiffusion":
        """Return a copy with fresh generators, e.g. for an evaluation that must draw the same noise every time."""
        return DataCollatorForMaskedDiffusion(
            mask_token_id=self.mask_token_id, eod_token_id=self.eod_token_id, pad_token_id=self.pad_token_id,
            noise_eps=self.noise_eps, sampling_eps=self.sampling_eps, noise_eod=self.noise_eod,
            drop_last_token=self.drop_last_token, seed=seed, rank=self.rank, world_size=self.world_size,
        )

    def _init_generators(self):
        if self.rank is None or self.world_size is None:
            distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
            self.rank = torch.distributed.get_rank() if distributed else 0
            self.world_size = torch.distributed.get_world_size() if distributed else 1
        base_seed = self.seed
        worker = torch.utils.data.get_worker_info()
        self._worker_id = worker.id if worker is not None else None
        if worker is not None:
            # Each loader worker collates its own batches from a copy of this collator, so copies seeded alike would
            # repeat each other's noise. The worker seed differs per worker and per epoch and, since the Trainer
            # seeds every rank alike, is the same on every rank, which keeps the time offsets shared.
            base_seed = (self.seed + worker.seed) % 2**62
        self._offset_generator = torch.Generator().manual_seed(base_seed)
        self._mask_generator = torch.Generator().manual_seed(base_seed + self.rank * RANK_SEED_STRIDE)

    def state_dict(self) -> dict:
        """Return the noise generators' states with the rank and world size they belong to, for a checkpoint."""
        if self._mask_generator is None:
            self._init_generators()
        return {
            "rank": self.rank,
            "world_size": self.world_size,
            "mask_generator": self._mask_generator.get_state(),
            "offset_generator": self._offset_generator.get_state(),
        }

    def load_state_dict(self, state: dict):
        """Continue the noise streams saved by `state_dict`, so a resumed run draws the noise it would have drawn."""
        if self._mask_generator is None:
            self._init_generators()
        if (state["rank"], state["world_size"]) != (self.rank, self.world_size):
            raise ValueError(
                f"The noise state belongs to rank {state['rank']} of {state['world_size']}, but this collator is rank "
                f"{self.rank} of {self.world_size}. Load the state saved by the same rank of a run of the same size."
            )
        self._mask_generator.set_state(state["mask_generator"])
        self._offset_generator.set_state(state["offset_generator"])

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        worker = torch.utils.data.get_worker_info()
        if self._mask_generator is None or (worker is not None and worker.id != self._worker_id):
            self._init_generators()
        input_ids, attention_mask = self._stack(features)
        t = sample_times(
            input_ids.shape[0], self.sampling_eps, generator=self._mask_generator,
            offset_generator=self._offset_generator, rank=self.rank, world_size=self.world_size,
        )
        noised, labels = self.mask_tokens(input_ids, attention_mask, t)
        return {"input_ids": noised, "attention_mask": attention_mask, "labels": labels, "t": t}

    def mask_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, t: torch.Tensor):
        """Mask each maskable token with probability `1 - alpha_t`; return `(x_t, labels)`."""
        real = attention_mask.bool()
        is_eod = input_ids == self.eod_token_id if self.eod_token_id is not None else torch.zeros_like(real)
        maskable = real if self.noise_eod else real & ~is_eod
        counted = real & ~is_eod

        move_chance = self.schedule.mask_probability(t)[:, None]
        draws = torch.rand(input_ids.shape, generator=self._mask_generator)
        masked = (draws < move_chance) & maskable

        noised = input_ids.masked_fill(masked, self.mask_token_id)
        labels = torch.where(masked & counted, input_ids, -100)
        return noised, labels

    def _stack(self, features: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [torch.as_tensor(f["input_ids"], dtype=torch.long) for f in features]
        masks = [
            torch.as_tensor(f["attention_mask"], dtype=torch.long) if "attention_mask" in f else torch.ones_like(r)
            for f, r in zip(features, rows)
        ]
        if self.drop_last_token:
            rows = [r[:-1] for r in rows]
            masks = [m[:-1] for m in masks]
        length = max(r.shape[0] for r in rows)
        if any(r.shape[0] != length for r in rows) and self.pad_token_id is None:
            raise ValueError(
                "Examples of different lengths need padding, but pad_token_id is None. "
                "Set pad_token_id on the collator, or pack the data into equal blocks."
            )
        input_ids = torch.full((len(rows), length), self.pad_token_id if self.pad_token_id is not None else 0)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, (r, m) in enumerate(zip(rows, masks)):
            input_ids[i, : r.shape[0]] = r
            attention_mask[i, : m.shape[0]] = m
        return input_ids, attention_mask


__all__ = ["DataCollatorForMaskedDiffusion"]
