"""Training throughput, peak memory and MFU of `MdlmForMaskedDiffusion` against `LlamaForCausalLM` of the same shape.

Both models get the same hidden size, depth, heads, SwiGLU width, vocabulary and sequence length, no biases,
RMSNorm, tied embeddings, SDPA attention and no dropout. They train with AdamW on the same clean tokens in one
process: Llama reads them as `input_ids` and `labels`, MDLM reads the noised batch that a masked-diffusion
collator would make from them. The two models alternate step by step, and the order flips every step, so slow
drift of a shared machine hits both alike. Each repeat gives one tokens-per-second figure per model and one ratio.

Training FLOPs per token (forward plus backward is 3 times the forward, and a multiply-add is 2 FLOPs):

    6 * N  +  12 * num_hidden_layers * hidden_size * seq_len  +  6 * hidden_size * vocab_size * f

`N` is the number of non-embedding parameters (the tied embedding and output matrix excluded). The second term is
the attention scores `Q K^T` and the weighted sum `A V` over all `seq_len` keys. It is the same for both models,
although Llama's causal SDPA kernel may skip the masked upper triangle. The third term is the output layer, which
Llama computes at every position (`f = 1`) and MDLM only at masked positions (`f` is the masked fraction of the
benchmark's own batches, about 0.5 under the log-linear schedule). MFU divides the achieved FLOP/s by the rate of a
large matrix multiplication timed before each repeat, in the dtype the model's matrix multiplications use; the
median over repeats is printed.

Example:

    python benchmarks/bench_train.py --shape tiny --steps 10 --repeats 5
"""

import contextlib
import logging
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch
from transformers import HfArgumentParser, LlamaConfig, LlamaForCausalLM

from mdlm import MdlmConfig, MdlmForMaskedDiffusion
from mdlm.noise_schedule import LogLinearSchedule, sample_times


logger = logging.getLogger(__name__)

MODEL_NAMES = ("mdlm", "llama")
IGNORE_INDEX = -100
ABLATIONS = ("none", "full_output_layer", "attention_mask_tensor", "uncached_rotary")


@dataclass(frozen=True)
class ModelShape:
    """Sizes shared by both models, and the default batch size."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    vocab_size: int
    tokenizer_vocab_size: int
    seq_len: int
    batch_size: int

    @property
    def mask_token_id(self) -> int:
        return self.tokenizer_vocab_size - 1

    @property
    def eod_token_id(self) -> int:
        return self.tokenizer_vocab_size - 2


SHAPES = {
    # The mask token is the last tokenizer id and the end-of-document token the one before it, as with GPT-2's
    # 50256 `<|endoftext|>` plus one added mask token. The gpt2 table is padded to 50304, a multiple of 64.
    "tiny": ModelShape(256, 4, 4, 640, 4096, 4096, 128, 16),
    "gpt2": ModelShape(768, 12, 12, 2048, 50304, 50258, 1024, 2),
}


@dataclass
class BenchmarkArguments:
    shape: str = field(default="tiny", metadata={"help": f"Model and batch shape, one of {sorted(SHAPES)}."})
    device: str = field(default="cpu", metadata={"help": "Torch device, such as cpu or cuda."})
    dtype: str = field(
        default="float32", metadata={"help": "float32, or bf16 for bfloat16 autocast with float32 weights."}
    )
    steps: int = field(default=5, metadata={"help": "Timed optimizer steps per model per repeat."})
    repeats: int = field(default=3, metadata={"help": "Number of timed rounds; the models alternate in each."})
    warmup_steps: int = field(
        default=2,
        metadata={"help": "Untimed optimizer steps per model before the repeats. At least 3 with --torch_compile, "
                          "which compiles again once the number of masked positions changes."},
    )
    batch_size: int | None = field(default=None, metadata={"help": "Sequences per step. Default: the shape's."})
    torch_compile: bool = field(default=False, metadata={"help": "Wrap both models in torch.compile."})
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "Recompute each block's activations in the backward pass, in both models."}
    )
    document_attention: bool = field(
        default=False,
        metadata={
            "help": "Pack documents ended by the end-of-document token. MDLM attends within each document; Llama gets "
            "position_ids that restart per document, which gives it a block-diagonal causal mask."
        },
    )
    mean_document_length: int = field(
        default=0, metadata={"help": "Mean document length in tokens with --document_attention. Default: seq_len / 4."}
    )
    matmul_size: int = field(default=0, metadata={"help": "Side of the square matmul that sets the peak rate. "
                                                          "Default: 2048 on CPU, 8192 on CUDA."})
    num_threads: int = field(
        default=0,
        metadata={"help": "CPU threads for torch (torch.set_num_threads). Default 0 keeps torch's choice. One thread "
                          "gives steadier numbers on a machine that other jobs share."},
    )
    seed: int = field(default=0, metadata={"help": "Seed of the weights and the token data."})
    ablation: str = field(
        default="none",
        metadata={
            "help": "Undo one optimization in MDLM to measure what it brings: full_output_layer runs the output layer "
            "and SUBS at every position and then picks the masked ones; attention_mask_tensor gives SDPA an "
            "all-true mask tensor; uncached_rotary rebuilds the rotary tables in every forward pass. Llama is "
            "unchanged."
        },
    )

    def __post_init__(self):
        if self.shape not in SHAPES:
            raise ValueError(f"Unknown --shape {self.shape!r}. Choose one of {sorted(SHAPES)}.")
        if self.ablation not in ABLATIONS:
            raise ValueError(f"Unknown --ablation {self.ablation!r}. Choose one of {list(ABLATIONS)}.")
        if self.dtype not in ("float32", "bf16"):
            raise ValueError(f"Invalid --dtype {self.dtype!r}: use float32 or bf16.")
        for name in ("steps", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"Invalid --{name} {getattr(self, name)}: it must be at least 1.")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"Invalid --batch_size {self.batch_size}: it must be at least 1.")
        for name in ("warmup_steps", "mean_document_length", "matmul_size", "num_threads"):
            if getattr(self, name) < 0:
                raise ValueError(f"Invalid --{name} {getattr(self, name)}: it must be 0 or more.")


def build_models(shape: ModelShape, args: BenchmarkArguments) -> dict[str, torch.nn.Module]:
    """Build MDLM and Llama with the same sizes, seeded the same, in float32 on `args.device`."""
    common = dict(
        vocab_size=shape.vocab_size,
        hidden_size=shape.hidden_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        intermediate_size=shape.intermediate_size,
        max_position_embeddings=shape.seq_len,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        attention_dropout=0.0,
    )
    mdlm_config = MdlmConfig(
        **common,
        hidden_dropout=0.0,
        mask_token_id=shape.mask_token_id,
        eod_token_id=shape.eod_token_id,
        tokenizer_vocab_size=shape.tokenizer_vocab_size,
    )
    if args.document_attention:
        mdlm_config = MdlmConfig(**mdlm_config.to_diff_dict() | {"document_attention": True})
    llama_config = LlamaConfig(
        **common,
        num_key_value_heads=shape.num_attention_heads,
        attention_bias=False,
        mlp_bias=False,
        use_cache=False,
    )
    llama_config._attn_implementation = "sdpa"

    models = {}
    for name, model_class, config in (("mdlm", MdlmForMaskedDiffusion, mdlm_config),
                                      ("llama", LlamaForCausalLM, llama_config)):
        torch.manual_seed(args.seed)
        model = model_class(config).to(args.device)
        model.train()
        if args.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        models[name] = model
    return models


def full_output_layer_nelbo(model: MdlmForMaskedDiffusion):
    """Return a `masked_nelbo` that computes SUBS log-probabilities at every position, then gathers the masked ones.

    This is the direct implementation that the model avoids: it materializes `(batch, seq, vocab)` float32 tensors.
    """

    def masked_nelbo(hidden_states, labels, t):
        log_probs = model.subs_log_probs(model.lm_head(hidden_states))  # (batch, seq, vocab) float32
        targets = labels.clamp(min=0)
        token_nll = -log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        token_nll = torch.where(labels != IGNORE_INDEX, token_nll, 0.0)
        return (model.schedule.loss_weight(t.float())[:, None] * token_nll).sum(dim=-1)

    return masked_nelbo


def uncached_rotary_tables(rotary):
    """Return a `tables` method that drops the cache first, so each forward pass rebuilds cos and sin."""
    cached_tables = rotary.tables

    def tables(num_positions, device):
        rotary._tables.clear()
        return cached_tables(num_positions, device)

    return tables


def attention_with_mask_tensor(attention_forward):
    """Wrap an attention `forward` so that SDPA always gets a boolean mask tensor, all true when nothing is masked.

    Without padding the model passes no mask, which lets SDPA pick a fused kernel that takes none.
    """

    def forward(hidden_states, rotary=None, attention_mask=None):
        if attention_mask is None:
            batch_size, seq_len, _ = hidden_states.shape
            attention_mask = torch.ones(batch_size, 1, 1, seq_len, dtype=torch.bool, device=hidden_states.device)
        return attention_forward(hidden_states, rotary, attention_mask)

    return forward


def apply_ablation(model: MdlmForMaskedDiffusion, ablation: str) -> MdlmForMaskedDiffusion:
    """Undo one optimization of `model` in place (see `--ablation`). The results stay the same."""
    if ablation == "full_output_layer":
        model.masked_nelbo = full_output_layer_nelbo(model)
    elif ablation == "attention_mask_tensor":
        for layer in model.model.layers:
            layer.attention.forward = attention_with_mask_tensor(layer.attention.forward)
    elif ablation == "uncached_rotary":
        model.model.rotary.tables = uncached_rotary_tables(model.model.rotary)
    return model


def check_ablation_keeps_loss(model: MdlmForMaskedDiffusion, ablation: str, batch: dict) -> float:
    """Apply `ablation` to `model` and return the absolute change of the loss on `batch`, about zero if correct."""
    with torch.no_grad():
        before = model(**batch).loss
        apply_ablation(model, ablation)
        after = model(**batch).loss
    return float((after - before).abs())


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """Return the number of parameters (a tied matrix counted once) and the non-embedding part of it."""
    total = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings().weight.numel()
    return total, total - embedding


def list_extra_tensors(model: torch.nn.Module) -> str:
    """List the model's buffers, which parameter counts leave out."""
    buffers = [f"{name} {tuple(buffer.shape)}" for name, buffer in model.named_buffers()]
    return ", ".join(buffers) if buffers else "none"


def make_documents(shape: ModelShape, batch_size: int, mean_length: int, generator: torch.Generator):
    """Return clean tokens with end-of-document tokens at random document ends, and Llama's restarting positions."""
    tokens = torch.randint(0, shape.eod_token_id, (batch_size, shape.seq_len), generator=generator)
    # Each position ends a document with probability 1 / mean_length, so lengths are geometric with that mean.
    ends = torch.rand(batch_size, shape.seq_len, generator=generator) < 1.0 / mean_length
    tokens[ends] = shape.eod_token_id

    # A document starts at position 0 and after every end-of-document token. Positions count from its start.
    starts = torch.zeros_like(ends)
    starts[:, 0] = True
    starts[:, 1:] = ends[:, :-1]
    index = torch.arange(shape.seq_len).expand(batch_size, -1)
    document_start = torch.where(starts, index, 0).cummax(dim=-1).values
    position_ids = index - document_start
    return tokens, position_ids


def make_batches(
    shape: ModelShape,
    args: BenchmarkArguments,
    batch_size: int,
    count: int,
    generator: torch.Generator,
    time: float | None = None,
):
    """Return `count` pairs of batches made from the same clean tokens: (MDLM's noised batch, Llama's batch).

    MDLM's times come from `sample_times`, or are all `time` when it is given.
    """
    schedule = LogLinearSchedule(eps=1e-3)
    pairs = []
    for _ in range(count):
        if args.document_attention:
            mean_length = args.mean_document_length or max(shape.seq_len // 4, 2)
            clean, position_ids = make_documents(shape, batch_size, mean_length, generator)
        else:
            clean = torch.randint(0, shape.eod_token_id, (batch_size, shape.seq_len), generator=generator)
            position_ids = None

        t = sample_times(batch_size, generator=generator)
        if time is not None:
            t = torch.full_like(t, time)
        masked = torch.rand(batch_size, shape.seq_len, generator=generator) < schedule.mask_probability(t)[:, None]
        masked &= clean != shape.eod_token_id  # end-of-document tokens stay visible
        mdlm_batch = {
            "input_ids": torch.where(masked, shape.mask_token_id, clean),
            "labels": torch.where(masked, clean, IGNORE_INDEX),
            "t": t,
        }
        llama_batch = {"input_ids": clean, "labels": clean}
        if position_ids is not None:
            llama_batch["position_ids"] = position_ids
        pairs.append(({k: v.to(args.device) for k, v in mdlm_batch.items()},
                      {k: v.to(args.device) for k, v in llama_batch.items()}))
    return pairs


def training_flops_per_token(shape: ModelShape, non_embedding_params: int, output_fraction: float) -> float:
    """Return the training FLOPs per token, by the formula in this file's docstring."""
    body = 6 * non_embedding_params
    attention = 12 * shape.num_hidden_layers * shape.hidden_size * shape.seq_len
    output_layer = 6 * shape.hidden_size * shape.vocab_size * output_fraction
    return body + attention + output_layer


def synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_matmul_rate(device: torch.device, dtype: torch.dtype, size: int, repeats: int = 5) -> float:
    """Return the best FLOP/s of `repeats` timed `size x size` matrix multiplications (2 * size^3 FLOPs each)."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    torch.matmul(a, b)
    synchronize(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.matmul(a, b)
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def autocast_context(device: torch.device, dtype: str):
    if dtype == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_step(model, optimizer, batch, device: torch.device, dtype: str) -> torch.Tensor:
    with autocast_context(device, dtype):
        loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def time_training_step(model, optimizer, batch, device: torch.device, dtype: str) -> float:
    """Run one optimizer step and return its elapsed seconds."""
    synchronize(device)
    start = time.perf_counter()
    loss = train_step(model, optimizer, batch, device, dtype)
    loss.item()  # waits for the step on asynchronous devices
    synchronize(device)
    return time.perf_counter() - start


def persistent_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Return the bytes of the parameters and optimizer states, each storage counted once.

    Gradients are left out because every step ends with `zero_grad(set_to_none=True)`.
    """
    storages = {}
    tensors = list(model.parameters())
    for state in optimizer.state.values():
        tensors.extend(value for value in state.values() if torch.is_tensor(value))
    for tensor in tensors:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def peak_step_bytes_cpu(model, optimizer, batch, device: torch.device, dtype: str) -> int:
    """Return the peak bytes allocated through PyTorch's CPU allocator during one training step, beyond the bytes
    allocated before the step.

    The profiler records every allocation and free of the CPU allocator with its size, kernels' scratch buffers
    included, and the peak of their running sum is the step's transient peak. Process RSS would also count freed
    memory that malloc keeps, and the other model's memory, so it is not used.
    """
    # NOTE: the allocation events come from the profiler's private event tree (`_EventType`, torch 2.13), which
    # other torch versions may rename.
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        train_step(model, optimizer, batch, device, dtype)
    allocations = []
    pending = list(profiler.profiler.kineto_results.experimental_event_tree())
    while pending:
        event = pending.pop()
        if event.tag == _EventType.Allocation:
            allocations.append((event.start_time_ns, event.extra_fields.alloc_size))
        pending.extend(event.children)
    allocations.sort()
    running = peak = 0
    for _, size in allocations:
        running += size
        peak = max(peak, running)
    return peak


def peak_step_bytes_cuda(model, optimizer, batch, device: torch.device, dtype: str) -> int:
    """Return `max_memory_allocated` during one training step minus the bytes allocated before it."""
    synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    train_step(model, optimizer, batch, device, dtype)
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def peak_training_bytes(model, optimizer, batch, device: torch.device, dtype: str) -> int:
    """Return parameters plus optimizer states plus the transient peak of one step."""
    measure = peak_step_bytes_cuda if device.type == "cuda" else peak_step_bytes_cpu
    transient = measure(model, optimizer, batch, device, dtype)
    return persistent_bytes(model, optimizer) + transient


def spread(values: list[float], digits: int = 3) -> str:
    return f"{min(values):.{digits}f} / {statistics.median(values):.{digits}f} / {max(values):.{digits}f}"


def describe_machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model_name = "unknown CPU"
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    model_name = line.split(":", 1)[1].strip()
                    break
    return f"{model_name}, {torch.get_num_threads()} torch threads"


@dataclass
class Measurements:
    """Results of the timed repeats: one entry per repeat in each list."""

    tokens_per_second: dict[str, list[float]]
    matmul_rates: list[float]
    matmul_label: str
    masked_fraction: float


def warm_up(args, shape, batch_size, runners, optimizers, generator, device):
    """Run untimed steps, which also compile the models under --torch_compile."""
    warmup_steps = max(args.warmup_steps, 3 if args.torch_compile else 1)
    for pair in make_batches(shape, args, batch_size, warmup_steps, generator):
        for index, name in enumerate(MODEL_NAMES):
            train_step(runners[name], optimizers[name], pair[index], device, args.dtype)


def run_repeats(args, shape, batch_size, runners, optimizers, generator, device) -> Measurements:
    """Time `args.steps` steps per model in each repeat, the two models alternating step by step."""
    matmul_dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    matmul_size = args.matmul_size or (8192 if device.type == "cuda" else 2048)
    tokens_per_step = batch_size * shape.seq_len
    tokens_per_second = {name: [] for name in MODEL_NAMES}
    matmul_rates = []
    masked_positions = all_positions = 0

    for repeat in range(args.repeats):
        # The rate is measured again in every repeat, because other work on a shared machine changes it.
        matmul_rates.append(measure_matmul_rate(device, matmul_dtype, matmul_size))
        pairs = make_batches(shape, args, batch_size, args.steps, generator)
        for mdlm_batch, _ in pairs:
            masked_positions += int((mdlm_batch["labels"] != IGNORE_INDEX).sum())
            all_positions += mdlm_batch["labels"].numel()

        # The order flips every step, so both models see the same machine load.
        seconds = dict.fromkeys(MODEL_NAMES, 0.0)
        for step, pair in enumerate(pairs):
            order = MODEL_NAMES if step % 2 == 0 else MODEL_NAMES[::-1]
            for name in order:
                index = MODEL_NAMES.index(name)
                seconds[name] += time_training_step(runners[name], optimizers[name], pair[index], device, args.dtype)
        for name in MODEL_NAMES:
            tokens_per_second[name].append(args.steps * tokens_per_step / seconds[name])
        logger.info(f"repeat {repeat + 1}/{args.repeats}: " + ", ".join(
            f"{name} {tokens_per_second[name][-1]:,.0f} tokens/s" for name in MODEL_NAMES))

    matmul_label = f"{matmul_size}x{matmul_size} {matmul_dtype}"
    return Measurements(tokens_per_second, matmul_rates, matmul_label, masked_positions / all_positions)


def print_setup(args, shape, batch_size, device, models) -> dict[str, int]:
    """Print the command, machine, shape and parameter counts, and return each model's non-embedding count."""
    print(f"command: {' '.join(sys.argv)}")
    print(f"machine: {describe_machine(device)}; torch {torch.__version__}")
    print(f"shape {args.shape}: hidden {shape.hidden_size}, layers {shape.num_hidden_layers}, heads "
          f"{shape.num_attention_heads}, ffn {shape.intermediate_size}, vocab {shape.vocab_size}, seq {shape.seq_len}, "
          f"batch {batch_size}; dtype {args.dtype}; compile {args.torch_compile}; "
          f"checkpointing {args.gradient_checkpointing}; document_attention {args.document_attention}; "
          f"ablation {args.ablation}")
    non_embedding = {}
    for name, model in models.items():
        total, non_embedding[name] = count_parameters(model)
        print(f"{name} parameters: {total:,} ({non_embedding[name]:,} non-embedding); "
              f"buffers: {list_extra_tensors(model)}")
    return non_embedding


def print_results(args, shape, measurements: Measurements, non_embedding, peak_bytes, worst_peak_bytes,
                  memory_masked_fraction):
    tokens_per_second = measurements.tokens_per_second
    # The full_output_layer ablation runs MDLM's output layer at every position, as Llama does.
    mdlm_fraction = 1.0 if args.ablation == "full_output_layer" else measurements.masked_fraction
    output_fraction = {"mdlm": mdlm_fraction, "llama": 1.0}
    ratios = [ours / theirs for ours, theirs in zip(tokens_per_second["mdlm"], tokens_per_second["llama"])]

    print(f"matmul rate ({measurements.matmul_label}) GFLOP/s min / median / max over repeats: "
          f"{spread([rate / 1e9 for rate in measurements.matmul_rates], digits=1)}")
    print(f"masked fraction of positions (MDLM output layer): {measurements.masked_fraction:.3f} timed, "
          f"{memory_masked_fraction:.3f} in the memory step, 0.999 expected at t = 1"
          + ("; the output layer runs at every position under this ablation"
             if args.ablation == "full_output_layer" else ""))
    print("model  tokens/s min / median / max     peak MiB   (t = 1)   GFLOP/token  MFU (median)")
    for name in MODEL_NAMES:
        flops = training_flops_per_token(shape, non_embedding[name], output_fraction[name])
        mfu = statistics.median(
            rate * flops / matmul_rate for rate, matmul_rate in zip(tokens_per_second[name], measurements.matmul_rates)
        )
        print(f"{name:6} {spread(tokens_per_second[name], digits=0):>30} {peak_bytes[name] / 2**20:10.1f} "
              f"{worst_peak_bytes[name] / 2**20:9.1f} "
              f"{flops / 1e9:12.4f} {mfu:8.1%}")
    print(f"ratio mdlm / llama tokens/s (min / median / max over {args.repeats} repeats): {spread(ratios)}")
    print(f"ratio mdlm / llama peak memory: {peak_bytes['mdlm'] / peak_bytes['llama']:.3f}, "
          f"{worst_peak_bytes['mdlm'] / worst_peak_bytes['llama']:.3f} at t = 1")


def main():
    (args,) = HfArgumentParser(BenchmarkArguments).parse_args_into_dataclasses()
    logging.basicConfig(format="%(asctime)s %(message)s", level=logging.INFO, stream=sys.stdout)
    if args.num_threads > 0:
        torch.set_num_threads(args.num_threads)
    shape = SHAPES[args.shape]
    batch_size = args.batch_size or shape.batch_size
    device = torch.device(args.device)

    models = build_models(shape, args)
    non_embedding = print_setup(args, shape, batch_size, device, models)
    optimizers = {name: torch.optim.AdamW(model.parameters(), lr=1e-4) for name, model in models.items()}
    runners = {name: torch.compile(model) if args.torch_compile else model for name, model in models.items()}

    generator = torch.Generator().manual_seed(args.seed)
    if args.ablation != "none":
        check_batch = make_batches(shape, args, batch_size, 1, torch.Generator().manual_seed(args.seed + 1))[0][0]
        difference = check_ablation_keeps_loss(models["mdlm"], args.ablation, check_batch)
        print(f"ablation {args.ablation}: MDLM loss changes by {difference:.2e} on one batch")
    warm_up(args, shape, batch_size, runners, optimizers, generator, device)
    measurements = run_repeats(args, shape, batch_size, runners, optimizers, generator, device)

    # Peak memory on one sampled batch, and on the same tokens at t = 1, where MDLM's output layer runs at almost
    # every position, as Llama's always does.
    memory_pair = make_batches(shape, args, batch_size, 1, generator)[0]
    worst_pair = (
        make_batches(shape, args, batch_size, 1, torch.Generator().manual_seed(args.seed), time=1.0)[0]
    )
    peak_bytes, worst_peak_bytes = {}, {}
    for index, name in enumerate(MODEL_NAMES):
        peak_bytes[name] = peak_training_bytes(runners[name], optimizers[name], memory_pair[index], device, args.dtype)
        worst_peak_bytes[name] = peak_training_bytes(runners[name], optimizers[name], worst_pair[index], device,
                                                     args.dtype)
    memory_masked_fraction = float((memory_pair[0]["labels"] != IGNORE_INDEX).float().mean())
    print_results(args, shape, measurements, non_embedding, peak_bytes, worst_peak_bytes, memory_masked_fraction)


if __name__ == "__main__":
    main()
