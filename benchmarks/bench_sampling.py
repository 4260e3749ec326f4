"""Forward passes and seconds per sample of each MDLM sampler at several step counts.

Every sampler runs at every step count in one process, with the same seeds, and the order of the samplers rotates
from repeat to repeat. The reference is `ddpm`, MDLM's ancestral sampler, at the same step count: the script prints
each sampler's seconds per sample divided by `ddpm`'s, per repeat, as min / median / max. It also times one plain
forward pass at the sampling batch size, so seconds per pass can be read against the model's own cost.

Without `--model_name_or_path` the model is a freshly initialized one of the `run_mdlm.py` default shape (256 wide,
4 layers, 4 heads, 4096 ids, 128 tokens). A forward pass costs the same whatever the weights. The pass counts of
`ddpm` and `ddpm_cache` do not depend on the weights either, because a masked position unmasks with a probability
that depends only on the schedule. With `confidence_threshold`, the `confidence` sampler's count does depend on them.

Example:

    python benchmarks/bench_sampling.py --num_steps 16 64 256 --num_samples 4 --batch_size 4 --repeats 3
    python benchmarks/bench_sampling.py --model_name_or_path outputs/mdlm --num_steps 128 1000 --batch_size 1
"""

import logging
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch
from transformers import AutoModelForMaskedLM, HfArgumentParser

from mdlm import MdlmConfig, MdlmForMaskedDiffusion

from bench_train import spread, synchronize  # the script's own folder is on sys.path


logger = logging.getLogger(__name__)

SAMPLERS = ("ddpm", "ddpm_cache", "confidence")
REFERENCE_SAMPLER = "ddpm"

# The shape that `run_mdlm.py` trains by default, with the shipped 4,096-id tokenizer.
DEFAULT_SHAPE = dict(
    vocab_size=4096, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, max_position_embeddings=128,
    mask_token_id=1, eod_token_id=0, pad_token_id=2, tokenizer_vocab_size=4096,
)


@dataclass
class SamplingBenchmarkArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Checkpoint folder or Hub model id. Default: a fresh model of run_mdlm.py's default shape."},
    )
    samplers: list[str] = field(
        default_factory=lambda: list(SAMPLERS), metadata={"help": f"Samplers to time, from {list(SAMPLERS)}."}
    )
    num_steps: list[int] = field(
        default_factory=lambda: [16, 64, 256], metadata={"help": "Denoising step counts to time."}
    )
    num_samples: int = field(default=4, metadata={"help": "Samples per sampler, step count and repeat."})
    batch_size: int = field(default=4, metadata={"help": "Samples per generate call."})
    seq_len: int | None = field(
        default=None, metadata={"help": "Tokens per sample. Default: the model's max_position_embeddings."}
    )
    repeats: int = field(default=3, metadata={"help": "Timed rounds over all samplers and step counts."})
    device: str = field(default="cpu", metadata={"help": "Torch device, such as cpu or cuda."})
    num_threads: int = field(
        default=0,
        metadata={"help": "CPU threads for torch (torch.set_num_threads). Default 0 keeps torch's choice."},
    )
    seed: int = field(default=0, metadata={"help": "Seed of the fresh model's weights and of the sampling draws."})

    def __post_init__(self):
        unknown = [name for name in self.samplers if name not in SAMPLERS]
        if unknown:
            raise ValueError(f"Unknown --samplers {unknown}. Choose from {list(SAMPLERS)}.")
        if REFERENCE_SAMPLER not in self.samplers:
            raise ValueError(
                f"Invalid --samplers {self.samplers}: it must include {REFERENCE_SAMPLER!r}, which the ratios "
                "compare to."
            )
        for name in ("num_samples", "batch_size", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"Invalid --{name} {getattr(self, name)}: it must be at least 1.")
        if any(steps < 1 for steps in self.num_steps):
            raise ValueError(f"Invalid --num_steps {self.num_steps}: every step count must be at least 1.")
        if self.num_samples % self.batch_size:
            raise ValueError(
                f"--num_samples {self.num_samples} is not a multiple of --batch_size {self.batch_size}. "
                "Pick a number of samples that fills every batch."
            )


def load_model(args: SamplingBenchmarkArguments) -> MdlmForMaskedDiffusion:
    if args.model_name_or_path is None:
        torch.manual_seed(args.seed)
        model = MdlmForMaskedDiffusion(MdlmConfig(**DEFAULT_SHAPE))
    else:
        model = AutoModelForMaskedLM.from_pretrained(args.model_name_or_path, trust_remote_code=True)
    return model.to(args.device).eval()


def time_forward_pass(model, batch_size: int, seq_len: int, repeats: int = 5) -> float:
    """Return the median seconds of one no-grad forward pass on an all-masked batch."""
    device = model.device
    input_ids = torch.full((batch_size, seq_len), model.config.mask_token_id, device=device)
    seconds = []
    with torch.no_grad():
        model(input_ids)
        for _ in range(repeats):
            synchronize(device)
            start = time.perf_counter()
            model(input_ids)
            synchronize(device)
            seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def time_sampler(model, args, sampler: str, num_steps: int, seq_len: int) -> tuple[float, float]:
    """Draw `args.num_samples` samples and return (seconds per sample, forward passes per sample)."""
    device = model.device
    seconds = 0.0
    forward_passes = 0
    for batch_index in range(args.num_samples // args.batch_size):
        synchronize(device)
        start = time.perf_counter()
        output = model.generate(
            num_samples=args.batch_size, seq_len=seq_len, num_steps=num_steps, sampler=sampler,
            generator=args.seed + batch_index, return_dict_in_generate=True,
        )
        synchronize(device)
        seconds += time.perf_counter() - start
        forward_passes += output.num_forward_passes * args.batch_size
    return seconds / args.num_samples, forward_passes / args.num_samples


def main():
    (args,) = HfArgumentParser(SamplingBenchmarkArguments).parse_args_into_dataclasses()
    logging.basicConfig(format="%(asctime)s %(message)s", level=logging.INFO, stream=sys.stdout)
    if args.num_threads > 0:
        torch.set_num_threads(args.num_threads)

    model = load_model(args)
    seq_len = args.seq_len or model.config.max_position_embeddings
    print(f"command: {' '.join(sys.argv)}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}; model "
          f"{args.model_name_or_path or 'fresh, default shape'}: {model.num_parameters():,} parameters; "
          f"{args.num_samples} samples of {seq_len} tokens in batches of {args.batch_size}")
    forward_seconds = time_forward_pass(model, args.batch_size, seq_len)
    print(f"one forward pass at batch {args.batch_size}: {forward_seconds * 1e3:.1f} ms")

    # Untimed warm-up, so the first timed call does not pay for lazy initialization.
    time_sampler(model, args, REFERENCE_SAMPLER, 2, seq_len)

    seconds = {(sampler, steps): [] for sampler in args.samplers for steps in args.num_steps}
    passes = {}
    for repeat in range(args.repeats):
        order = args.samplers[repeat % len(args.samplers):] + args.samplers[: repeat % len(args.samplers)]
        for steps in args.num_steps:
            for sampler in order:
                per_sample, passes[sampler, steps] = time_sampler(model, args, sampler, steps, seq_len)
                seconds[sampler, steps].append(per_sample)
        logger.info(f"repeat {repeat + 1}/{args.repeats} done")

    print(f"seconds per sample and ratio to {REFERENCE_SAMPLER} are min / median / max over {args.repeats} repeats")
    print(f"{'sampler':12} {'steps':>6} {'passes/sample':>14} {'s/sample':>26} {'ms/pass':>8} "
          f"{'ratio to ' + REFERENCE_SAMPLER:>24}")
    for steps in args.num_steps:
        reference = seconds[REFERENCE_SAMPLER, steps]
        for sampler in args.samplers:
            timings = seconds[sampler, steps]
            ratios = [ours / theirs for ours, theirs in zip(timings, reference)]
            # One pass serves a whole batch, so its time is the batch's seconds divided by the passes it made.
            ms_per_pass = 1e3 * statistics.median(timings) * args.batch_size / passes[sampler, steps]
            print(f"{sampler:12} {steps:6d} {passes[sampler, steps]:14.2f} {spread(timings, 3):>26} "
                  f"{ms_per_pass:8.1f} {spread(ratios, 3):>24}")


if __name__ == "__main__":
    main()
