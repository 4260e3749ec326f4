"""The Masked Diffusion Language Model (MDLM, Sahoo et al., 2024, arXiv:2406.07524) as a `transformers` model.

The network is a bidirectional pre-norm transformer: RMSNorm, SwiGLU feed-forward, no biases, rotary (optionally
partial) or learned absolute positions, attention through `scaled_dot_product_attention`. On top of it sits the
SUBS parameterization: the mask token and padded vocabulary ids get zero probability, and a position whose input
is not the mask token predicts its input token with probability one.

This file imports only torch, transformers and its sibling files, because `save_pretrained` copies it next to
checkpoints for `trust_remote_code=True` loading.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils import ModelOutput, logging

from .configuration_mdlm import MdlmConfig
from .generation_mdlm import MdlmGenerationMixin
from .noise_schedule import LogLinearSchedule, counted_token_mask


logger = logging.get_logger(__name__)


@dataclass
class MdlmOutput(ModelOutput):
    """
    Output of [`MdlmForMaskedDiffusion`].

    Args:
        loss (`torch.FloatTensor`, *optional*): The NELBO per counted token, returned when `labels` and `t` are given.
            With `num_items_in_batch` it is the batch's NELBO sum divided by that number instead.
        logits (`torch.FloatTensor` of shape `(batch_size, sequence_length, vocab_size)`, *optional*): SUBS
            log-probabilities `log p_theta(x_0 | x_t)` in float32. Skipped when the loss is computed, unless
            `return_logits=True`, because training needs the output layer only at masked positions.
        nelbo_sum (`torch.FloatTensor`, *optional*): Sum over masked counted positions of `-log p / t`.
        num_counted_tokens (`torch.LongTensor`, *optional*): Number of positions that are neither padding nor
            end-of-document.
        example_nelbo (`torch.FloatTensor` of shape `(batch_size,)`, *optional*): `nelbo_sum` per example.
        example_num_counted_tokens (`torch.LongTensor` of shape `(batch_size,)`, *optional*): Counted tokens per
            example.
        hidden_states (`tuple(torch.FloatTensor)`, *optional*): Embeddings and the output of each block, returned
            with `output_hidden_states=True`.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    nelbo_sum: torch.FloatTensor | None = None
    num_counted_tokens: torch.LongTensor | None = None
    example_nelbo: torch.FloatTensor | None = None
    example_num_counted_tokens: torch.LongTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None


class MdlmRotaryEmbedding(nn.Module):
    """Cos and sin tables for the first `rotary_dim` dimensions of each head.

    The tables are computed from the config on first use and kept per device, so nothing depends on buffers that
    `from_pretrained` may leave uninitialized when it builds the model on the meta device.
    """

    def __init__(self, config: MdlmConfig):
        super().__init__()
        self.rotary_dim = config.rotary_dim
        self.rope_theta = config.rope_theta
        self._tables: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def inverse_frequencies(self, device: torch.device) -> torch.Tensor:
        exponents = torch.arange(0, self.rotary_dim, 2, dtype=torch.float64, device=device) / self.rotary_dim
        return (1.0 / self.rope_theta**exponents).float()

    def tables(self, num_positions: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Return `cos` and `sin` of shape `(num_positions, rotary_dim)` in float32, cached and grown as needed."""
        key = (str(device), 0)
        cached = self._tables.get(key)
        if cached is None or cached[0].shape[0] < num_positions:
            positions = torch.arange(num_positions, dtype=torch.float32, device=device)
            angles = torch.outer(positions, self.inverse_frequencies(device))
            angles = torch.cat((angles, angles), dim=-1)
            cached = (angles.cos(), angles.sin())
            self._tables[key] = cached
        return cached[0][:num_positions], cached[1][:num_positions]

    def forward(self, position_ids: torch.Tensor | None, seq_len: int, device: torch.device):
        """Return `cos`, `sin` broadcastable to `(batch, heads, seq_len, rotary_dim)`."""
        if position_ids is None:
            cos, sin = self.tables(seq_len, device)
            return cos[None, None], sin[None, None]
        cos, sin = self.tables(int(position_ids.max()) + 1, device)
        return cos[position_ids][:, None], sin[position_ids][:, None]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first `cos.shape[-1]` dimensions of `x` and pass the rest through.

    The rotary dimensions are two halves `(x1, x2)`, and the result is `(x1 cos - x2 sin, x2 cos + x1 sin)`.
    `cos` and `sin` must broadcast against `x[..., :rotary_dim]`. They are float32, so type promotion runs the
    arithmetic in float32 for bfloat16 or float16 inputs, with one rounding back to `x.dtype` at the end.
    """
    return rotate_with_signed_sin(x, cos, signed_sin(sin))


def signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """Return `(-sin, sin)` over the two halves of the rotary dimensions, the factor of the swapped halves."""
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def rotate_with_signed_sin(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """Compute `apply_rotary` from the table that `signed_sin` returns, which the model builds once per forward."""
    rotary_dim = cos.shape[-1]
    rotated, passed = x[..., :rotary_dim], x[..., rotary_dim:]
    swapped = rotated.unflatten(-1, (2, rotary_dim // 2)).flip(-2).flatten(-2)  # (x2, x1)
    rotated = torch.addcmul(rotated * cos, swapped, sin_signed).to(x.dtype)
    if passed.shape[-1] == 0:
        return rotated
    return torch.cat((rotated, passed), dim=-1)


class MdlmAttention(nn.Module):
    """Bidirectional multi-head self-attention with a fused query-key-value projection."""

    def __init__(self, config: MdlmConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.attention_dropout = config.attention_dropout
        self.qkv_proj = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=False)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, hidden_states, rotary=None, attention_mask=None):
        """`rotary` is the pair `(cos, signed_sin(sin))`, each broadcastable to `(batch, seq, 1, 1, rotary_dim)`."""
        B, L, D = hidden_states.shape
        qkv = self.qkv_proj(hidden_states).view(B, L, 3, self.num_heads, self.head_dim)
        # Splitting, not permuting, keeps each gradient in the (B, L, 3, heads, head_dim) layout, so the backward
        # pass fills the projection's gradient with one concatenation instead of a stack and a copy.
        query_key, value = qkv.split((2, 1), dim=2)

        if rotary is not None:
            cos, sin_signed = rotary
            query_key = rotate_with_signed_sin(query_key, cos, sin_signed)  # queries and keys rotate in one pass
        query, key = (part.transpose(1, 2) for part in query_key.unbind(2))  # each (B, heads, L, head_dim)
        # SDPA saves the value for its backward pass. A contiguous copy lets the whole projection output be freed
        # after the rotary, where a view of it would keep the queries and keys alive too.
        value = value.squeeze(2).contiguous().transpose(1, 2)

        dropout = self.attention_dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout)
        return self.o_proj(out.transpose(1, 2).reshape(B, L, D))


class MdlmMLP(nn.Module):
    """SwiGLU feed-forward `W_down(silu(W_gate x) * W_up x)`, with gate and up fused into one matmul."""

    def __init__(self, config: MdlmConfig):
        super().__init__()
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class MdlmBlock(GradientCheckpointingLayer):
    """Pre-norm block: `x + attention(RMSNorm(x))`, then `x + SwiGLU(RMSNorm(x))`."""

    def __init__(self, config: MdlmConfig):
        super().__init__()
        self.attention_norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.attention = MdlmAttention(config)
        self.mlp_norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = MdlmMLP(config)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, hidden_states, rotary=None, attention_mask=None):
        hidden_states = hidden_states + self.dropout(
            self.attention(self.attention_norm(hidden_states), rotary, attention_mask)
        )
        hidden_states = hidden_states + self.dropout(self.mlp(self.mlp_norm(hidden_states)))
        return hidden_states


class MdlmPreTrainedModel(PreTrainedModel):
    config_class = MdlmConfig
    config: MdlmConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MdlmBlock"]
    _supports_sdpa = True

    def _init_weights(self, module):
        """Normal(0, initializer_range) weights; the residual output projections are further scaled by
        `1 / sqrt(2 * num_hidden_layers)` so the residual stream's variance does not grow with depth."""
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.RMSNorm):
            init.ones_(module.weight)
        if isinstance(module, (MdlmAttention, MdlmMLP)):
            output = module.o_proj if isinstance(module, MdlmAttention) else module.down_proj
            init.normal_(output.weight, mean=0.0, std=std / math.sqrt(2 * self.config.num_hidden_layers))


class MdlmModel(MdlmPreTrainedModel):
    """The transformer body: embeddings, blocks and the final RMSNorm. Returns hidden states."""

    def __init__(self, config: MdlmConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        if config.use_rope:
            self.rotary = MdlmRotaryEmbedding(config)
        else:
            self.embed_positions = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout)
        self.layers = nn.ModuleList(MdlmBlock(config) for _ in range(config.num_hidden_layers))
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(self, input_ids, attention_mask=None, position_ids=None, output_hidden_states=False):
        B, L = input_ids.shape
        if L > self.config.max_position_embeddings:
            raise ValueError(
                f"Sequence length {L} exceeds max_position_embeddings={self.config.max_position_embeddings}. "
                "Use shorter blocks or a model configured for longer ones."
            )
        hidden_states = self.embed_tokens(input_ids)

        documents = None
        if self.config.document_attention:
            documents = document_ids(input_ids, self.config.eod_token_id)
            if position_ids is None:
                position_ids = document_position_ids(documents)

        rotary = None
        if self.config.use_rope:
            cos, sin = self.rotary(position_ids, L, input_ids.device)  # (batch or 1, 1, L, rotary_dim)
            # The attention rotates queries and keys in its (B, L, 2, heads, head_dim) layout. Every layer shares
            # one signed sine table, which each layer's backward pass keeps.
            rotary = (cos.transpose(1, 2).unsqueeze(2), signed_sin(sin).transpose(1, 2).unsqueeze(2))
        else:
            positions = position_ids if position_ids is not None else torch.arange(L, device=input_ids.device)
            hidden_states = hidden_states + self.embed_positions(positions)
        hidden_states = self.dropout(hidden_states)

        sdpa_mask = document_attention_mask(documents, attention_mask) if documents is not None else None
        if sdpa_mask is None:
            sdpa_mask = key_padding_mask(attention_mask)

        all_hidden_states = (hidden_states,) if output_hidden_states else None
        for layer in self.layers:
            hidden_states = layer(hidden_states, rotary=rotary, attention_mask=sdpa_mask)
            if output_hidden_states:
                all_hidden_states += (hidden_states,)

        return self.norm(hidden_states), all_hidden_states


def key_padding_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """Turn a (batch, seq) 1/0 mask into a boolean SDPA mask over keys, or None when nothing is padded.

    Returning None keeps the fused attention kernels available. A row that is all padding attends to every key
    instead of none, because softmax over no keys is NaN; its outputs are ignored anyway.
    """
    if attention_mask is None:
        return None
    keys = attention_mask.bool()
    if bool(keys.all()):
        return None
    keys = keys | ~keys.any(dim=-1, keepdim=True)
    return keys[:, None, None, :]  # (B, 1, 1, L): broadcast over heads and queries


def document_ids(input_ids: torch.Tensor, eod_token_id: int) -> torch.Tensor:
    """Number the packed documents of each row from 0.

    A token belongs to the document that the next end-of-document token ends, and that token belongs to it too.
    Tokens after the last end-of-document token form a final document.
    """
    is_eod = (input_ids == eod_token_id).long()
    return is_eod.cumsum(dim=-1) - is_eod


def document_position_ids(documents: torch.Tensor) -> torch.Tensor:
    """Return each token's position inside its document, 0 at the document's first token."""
    positions = torch.arange(documents.shape[-1], device=documents.device).expand_as(documents)
    starts = torch.ones_like(documents, dtype=torch.bool)
    starts[:, 1:] = documents[:, 1:] != documents[:, :-1]
    document_start = torch.where(starts, positions, 0).cummax(dim=-1).values
    return positions - document_start


def document_attention_mask(documents: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """Return a boolean SDPA mask of shape (B, 1, L, L) that lets each query see only the keys of its own document
    that are not padding, or None when every row contains a single document.

    None leaves the choice to `key_padding_mask`, which keeps the fused kernels for unpacked batches. A query with
    no visible key (a document made only of padding) attends to every key, because softmax over no keys is NaN.
    Its outputs are ignored anyway.
    """
    if not bool(documents[:, -1].any()):  # the last token's document index counts the boundaries before it
        return None
    allowed = documents[:, :, None] == documents[:, None, :]  # (B, L queries, L keys)
    if attention_mask is not None:
        allowed = allowed & attention_mask.bool()[:, None, :]
        allowed = allowed | ~allowed.any(dim=-1, keepdim=True)
    return allowed[:, None]


REMOTE_CODE_AUTO_MAP = {
    "AutoConfig": "configuration_mdlm.MdlmConfig",
    "AutoModel": "modeling_mdlm.MdlmForMaskedDiffusion",
    "AutoModelForMaskedLM": "modeling_mdlm.MdlmForMaskedDiffusion",
}


class MdlmForMaskedDiffusion(MdlmGenerationMixin, MdlmPreTrainedModel):
    """MDLM: the transformer body, an output layer and the SUBS parameterization, with the NELBO as loss.

    Call it with `labels` (the clean token at masked positions, -100 elsewhere) and `t` (one time per example) to
    get the NELBO; call it with `input_ids` alone to get `log p_theta(x_0 | x_t)` for every position.
    """

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    # `num_items_in_batch` is accepted, so the Trainer passes its token count instead of averaging per micro-batch.
    accepts_loss_kwargs = True

    def __init__(self, config: MdlmConfig):
        super().__init__(config)
        # Saved checkpoints map AutoModel and AutoModelForMaskedLM to this class, as LLaDA and Dream checkpoints do.
        config.auto_map = {**(getattr(config, "auto_map", None) or {}), **REMOTE_CODE_AUTO_MAP}
        self.model = MdlmModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.schedule = LogLinearSchedule(config.noise_eps)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def never_predicted_ids(self, vocab_size: int, device: torch.device) -> torch.Tensor:
        """Return a boolean `(vocab_size,)` mask of the ids that SUBS gives probability zero."""
        never_predicted = torch.zeros(vocab_size, dtype=torch.bool, device=device)
        never_predicted[self.config.mask_token_id] = True
        never_predicted[self.config.num_predicted_ids :] = True
        pad_token_id, eod_token_id = self.config.pad_token_id, self.config.eod_token_id
        if pad_token_id is not None and pad_token_id != eod_token_id:
            never_predicted[pad_token_id] = True  # padding is never a target, so it is never generated either
        return never_predicted

    def subs_log_probs(self, logits: torch.Tensor, input_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Apply SUBS to raw logits and return float32 log-probabilities.

        The mask token, the pad token (unless it doubles as end-of-document) and ids at or beyond
        `config.num_predicted_ids` get probability zero. Where `input_ids` is
        given, positions whose input is not the mask token put all mass on that input token.
        """
        never_predicted = self.never_predicted_ids(logits.shape[-1], logits.device)
        log_probs = logits.float().masked_fill(never_predicted, -math.inf).log_softmax(dim=-1)
        if input_ids is not None:
            unmasked = input_ids != self.config.mask_token_id
            carry_over = torch.full_like(log_probs, -math.inf)
            carry_over.scatter_(-1, input_ids.unsqueeze(-1), 0.0)
            log_probs = torch.where(unmasked.unsqueeze(-1), carry_over, log_probs)
        return log_probs

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        labels: torch.LongTensor | None = None,
        t: torch.Tensor | None = None,
        num_items_in_batch: torch.Tensor | int | None = None,
        return_logits: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> MdlmOutput:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`): Noised tokens `x_t`.
            attention_mask (`torch.Tensor`, *optional*): 1 for real tokens, 0 for padding, which no position attends to.
            position_ids (`torch.LongTensor`, *optional*): Positions for the rotary or learned embeddings. With
                `config.document_attention` they default to positions that restart at 0 in every document.
            labels (`torch.LongTensor`, *optional*): The clean token at masked counted positions, -100 elsewhere.
            t (`torch.Tensor` of shape `(batch_size,)`, *optional*): Diffusion time of each example; needed with `labels`.
            num_items_in_batch (`int` or `torch.Tensor`, *optional*): Counted tokens over the whole accumulated,
                all-rank batch. The loss is then `nelbo_sum / num_items_in_batch`, so summing micro-batch losses
                gives the NELBO per token of the full batch.
            return_logits (`bool`, *optional*): Also return the full log-probabilities when `labels` are given.
        """
        output_hidden_states = output_hidden_states or self.config.output_hidden_states
        hidden_states, all_hidden_states = self.model(
            input_ids, attention_mask=attention_mask, position_ids=position_ids,
            output_hidden_states=output_hidden_states,
        )

        logits = None
        if labels is None or return_logits:
            logits = self.subs_log_probs(self.lm_head(hidden_states), input_ids)

        loss = nelbo_sum = num_counted = example_nelbo = example_num_counted = None
        if labels is not None:
            if t is None:
                raise ValueError("`labels` were given without `t`; the NELBO weight 1/t needs each example's time.")
            example_nelbo = self.masked_nelbo(hidden_states, labels, t)
            counted = counted_token_mask(
                input_ids, labels, attention_mask, self.config.mask_token_id, self.config.eod_token_id
            )
            example_num_counted = counted.sum(dim=-1)
            nelbo_sum = example_nelbo.sum()
            num_counted = example_num_counted.sum()
            denominator = num_items_in_batch if num_items_in_batch is not None else num_counted.clamp(min=1)
            loss = nelbo_sum / denominator

        return MdlmOutput(
            loss=loss, logits=logits, nelbo_sum=nelbo_sum, num_counted_tokens=num_counted,
            example_nelbo=example_nelbo, example_num_counted_tokens=example_num_counted,
            hidden_states=all_hidden_states,
        )

    def masked_nelbo(self, hidden_states: torch.Tensor, labels: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Return each example's `sum over masked positions of w(t) * -log p_theta(x_0 | x_t)`, shape (batch,).

        The output layer runs only at masked positions. Unmasked positions contribute zero under SUBS, because
        they copy their input with probability one.
        """
        batch_size, seq_len = labels.shape
        # One data-dependent `nonzero` finds the masked positions and the selections below reuse it, so
        # torch.compile breaks the graph once here instead of three times. The backward pass of `index_select` is
        # an `index_add`, which took two thirds of the time of boolean indexing's `index_put` on one CPU core.
        positions = (labels != -100).flatten().nonzero().squeeze(-1)  # (num_masked,); may be empty, giving zeros
        rows = hidden_states.flatten(0, 1).index_select(0, positions)  # (num_masked, hidden)
        targets = labels.flatten().index_select(0, positions)
        # The ids that SUBS never predicts get -inf logits in place, so at most two (num_masked, vocab) float32
        # tensors exist in the forward pass. In place is safe because the matmul's backward does not read its
        # output. Adding 0 or -inf passes the gradient through, where masked_fill's backward would allocate a copy.
        logits = self.lm_head(rows).float()
        never_predicted = self.never_predicted_ids(logits.shape[-1], logits.device)
        zero_probability = torch.zeros(never_predicted.shape, device=logits.device)
        zero_probability.masked_fill_(never_predicted, -math.inf)
        logits.add_(zero_probability)
        token_nll = F.cross_entropy(logits, targets, reduction="none")  # -log p_theta(x_0 | x_t)
        example_index = positions // seq_len
        weighted = self.schedule.loss_weight(t.float())[example_index] * token_nll
        return torch.zeros(batch_size, device=weighted.device, dtype=weighted.dtype).index_add(
            0, example_index, weighted
        )


MdlmForMaskedDiffusion.register_for_auto_class("AutoModel")

__all__ = ["MdlmConfig", "MdlmModel", "MdlmForMaskedDiffusion", "MdlmPreTrainedModel", "MdlmOutput"]
