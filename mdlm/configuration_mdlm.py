"""Configuration of the Masked Diffusion Language Model (MDLM, Sahoo et al., 2024, arXiv:2406.07524)."""

from transformers import PreTrainedConfig


FFN_MULTIPLE = 64


def default_intermediate_size(hidden_size: int) -> int:
    """Return the SwiGLU width `floor(8 * hidden_size / (3 * 64)) * 64` (512 -> 1344, 768 -> 2048)."""
    return (8 * hidden_size) // (3 * FFN_MULTIPLE) * FFN_MULTIPLE


class MdlmConfig(PreTrainedConfig):
    r"""
    Configuration of [`MdlmForMaskedDiffusion`]: a bidirectional pre-norm transformer (RMSNorm, SwiGLU, no biases,
    rotary or learned positions) trained with the MDLM objective.

    The seed's short names are accepted as aliases: `d_model` for `hidden_size`, `n_layers` for
    `num_hidden_layers`, `n_heads` for `num_attention_heads` and `d_ff` for `intermediate_size`.

    Args:
        vocab_size (`int`): Size of the embedding table, mask token and any padding ids included.
        hidden_size (`int`): Width of the residual stream.
        num_hidden_layers (`int`): Number of transformer blocks.
        num_attention_heads (`int`): Number of attention heads; must divide `hidden_size`.
        intermediate_size (`int`, *optional*): SwiGLU width. `None` resolves to
            `floor(8 * hidden_size / (3 * 64)) * 64`, and the resolved number is saved.
        max_position_embeddings (`int`): Longest sequence the model accepts.
        use_rope (`bool`): Rotary position embeddings when True, learned absolute position embeddings when False.
        rope_theta (`float`): Base of the rotary frequencies.
        rope_percent (`float`): Fraction of each head's dimensions that rotate, in (0, 1]. The rotary dimension is
            `head_dim * rope_percent` rounded down to an even number.
        rms_norm_eps (`float`): Epsilon of every RMSNorm.
        initializer_range (`float`): Standard deviation of the normal initialization of weights.
        tie_word_embeddings (`bool`): Share the input embedding and the output projection.
        hidden_dropout (`float`): Dropout after the attention and the feed-forward outputs.
        attention_dropout (`float`): Dropout on the attention probabilities.
        mask_token_id (`int`): Id of the absorbing mask token. It is never predicted.
        eod_token_id (`int`, *optional*): End-of-document id. It is structure, never a prediction target.
        document_attention (`bool`): Treat each block as packed documents, each ended by `eod_token_id`. A token
            attends only to tokens of its own document, and rotary or learned positions restart at 0 after every
            end-of-document token. Boundaries are read from `input_ids`, so a masked end-of-document token joins
            its two documents. Keep end-of-document tokens unmasked, as the collator does by default. Needs
            `eod_token_id`.
        pad_token_id (`int`, *optional*): Padding id.
        tokenizer_vocab_size (`int`, *optional*): Number of ids the tokenizer uses. Ids from there up to
            `vocab_size` only pad the embedding table and are never predicted. `None` means all ids are real.
        noise_eps (`float`): The log-linear schedule's `eps` in `alpha_t = 1 - (1 - eps) * t`.
        sampling_eps (`float`): Lower end of the training times, `t` in `[sampling_eps, 1]`.
    """

    model_type = "mdlm"
    attribute_map = {
        "d_model": "hidden_size",
        "n_layers": "num_hidden_layers",
        "n_heads": "num_attention_heads",
        "d_ff": "intermediate_size",
    }

    vocab_size: int = 4096
    hidden_size: int = 512
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    intermediate_size: int | None = None
    max_position_embeddings: int = 1024
    use_rope: bool = True
    rope_theta: float = 10000.0
    rope_percent: float = 1.0
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    tie_word_embeddings: bool = True
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    mask_token_id: int = 4095
    eod_token_id: int | None = None
    document_attention: bool = False
    pad_token_id: int | None = None
    tokenizer_vocab_size: int | None = None
    noise_eps: float = 1e-3
    sampling_eps: float = 1e-3

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.intermediate_size is None:
            self.intermediate_size = default_intermediate_size(self.hidden_size)
        self.validate_mdlm()

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rotary_dim(self) -> int:
        """Number of leading dimensions of each head that rotate (even)."""
        return int(self.head_dim * self.rope_percent) // 2 * 2

    @property
    def num_predicted_ids(self) -> int:
        """Number of ids that are real tokens: the tokenizer's vocabulary, or the whole table."""
        return self.tokenizer_vocab_size if self.tokenizer_vocab_size is not None else self.vocab_size

    def validate_mdlm(self):
        """Raise `ValueError` on sizes, rotary settings or token ids that cannot build a model."""
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "intermediate_size", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"Invalid {name}={value!r}: it must be a positive integer.")
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"Invalid num_attention_heads={self.num_attention_heads}: it must divide hidden_size="
                f"{self.hidden_size}. Pick a head count such as {_divisor_hint(self.hidden_size)}."
            )
        if self.use_rope:
            if not 0.0 < self.rope_percent <= 1.0:
                raise ValueError(f"Invalid rope_percent={self.rope_percent}: it must lie in (0, 1].")
            if self.rotary_dim < 2:
                raise ValueError(
                    f"rope_percent={self.rope_percent} with head_dim={self.head_dim} gives a rotary dimension of "
                    f"{self.rotary_dim}; at least 2 dimensions must rotate. Raise rope_percent or head_dim."
                )
            if self.rope_theta <= 0:
                raise ValueError(f"Invalid rope_theta={self.rope_theta}: it must be positive.")
        if not 0 <= self.mask_token_id < self.vocab_size:
            raise ValueError(
                f"Invalid mask_token_id={self.mask_token_id}: it must lie in [0, vocab_size={self.vocab_size}). "
                "Add a mask token to the tokenizer and set vocab_size to len(tokenizer)."
            )
        if self.tokenizer_vocab_size is not None and not self.mask_token_id < self.tokenizer_vocab_size <= self.vocab_size:
            raise ValueError(
                f"Invalid tokenizer_vocab_size={self.tokenizer_vocab_size}: it must lie in "
                f"(mask_token_id={self.mask_token_id}, vocab_size={self.vocab_size}]."
            )
        for name in ("eod_token_id", "pad_token_id"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < self.vocab_size:
                raise ValueError(f"Invalid {name}={value}: it must lie in [0, vocab_size={self.vocab_size}).")
        if self.document_attention and self.eod_token_id is None:
            raise ValueError(
                "document_attention=True needs eod_token_id, because documents are the spans that end-of-document "
                "tokens close. Set eod_token_id or turn document_attention off."
            )
        if not 0.0 < self.noise_eps < 1.0:
            raise ValueError(f"Invalid noise_eps={self.noise_eps}: it must lie in (0, 1).")
        if not 0.0 < self.sampling_eps < 1.0:
            raise ValueError(f"Invalid sampling_eps={self.sampling_eps}: it must lie in (0, 1).")


def _divisor_hint(hidden_size: int) -> str:
    divisors = [str(n) for n in (4, 6, 8, 12, 16) if hidden_size % n == 0]
    return ", ".join(divisors) if divisors else "1"


MdlmConfig.register_for_auto_class()

__all__ = ["MdlmConfig", "default_intermediate_size"]
