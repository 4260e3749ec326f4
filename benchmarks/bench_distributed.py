"""Training throughput of MdlmTrainer on two CPU processes over gloo against one process, same model and global batch.

The single-process run trains with `global_batch_size` sequences per step and `--single_process_threads` OpenMP
threads. The distributed run starts `--num_processes` ranks under `torch.distributed.run`, each with
`global_batch_size / num_processes` sequences per step and `--threads_per_process` threads. Both train the same
randomly initialized model on the same random packed blocks with the MDLM collator and AdamW, through the real
Trainer loop (DDP and the all-rank token count included). The two runs alternate for `--repeats` rounds.

Tokens per second counts every position of every sequence in the global batch, `global_batch_size * seq_len`
per optimizer step. The clock runs from the end of the last warmup step to the end of the last step, so process
start, model construction and the first steps are left out.

Example (two cores: one process with two threads against two processes with one thread each):

    python benchmarks/bench_distributed.py --repeats 3
"""

import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from datasets import Dataset
from transformers import HfArgumentParser, TrainerCallback, TrainingArguments

from mdlm import MdlmConfig, MdlmForMaskedDiffusion
from mdlm.collator import DataCollatorForMaskedDiffusion
from mdlm.trainer import MdlmTrainer


logger = logging.getLogger(__name__)

MASK_TOKEN_ID = 4095
EOD_TOKEN_ID = 4094
# Timeout of one benchmark run, far above its expected length, so a hung rank cannot stall the benchmark.
RUN_TIMEOUT_S = 1800


@dataclass
class BenchmarkArguments:
    hidden_size: int = field(default=128, metadata={"help": "Model width. Default 128."})
    num_hidden_layers: int = field(default=4, metadata={"help": "Transformer blocks. Default 4."})
    num_attention_heads: int = field(default=4, metadata={"help": "Attention heads. Default 4."})
    vocab_size: int = field(default=4096, metadata={"help": "Vocabulary size, mask and end-of-document ids included."})
    seq_len: int = field(default=128, metadata={"help": "Tokens per sequence. Default 128."})
    global_batch_size: int = field(default=16, metadata={"help": "Sequences per optimizer step, all ranks together."})
    steps: int = field(default=20, metadata={"help": "Timed optimizer steps per run. Default 20."})
    warmup_steps: int = field(default=3, metadata={"help": "Untimed optimizer steps before the timed ones."})
    repeats: int = field(default=3, metadata={"help": "Rounds; each round runs one process, then the ranks."})
    num_processes: int = field(default=2, metadata={"help": "Ranks of the distributed run. Default 2."})
    threads_per_process: int = field(default=1, metadata={"help": "OMP_NUM_THREADS of each rank. Default 1."})
    single_process_threads: int = field(
        default=2, metadata={"help": "OMP_NUM_THREADS of the single process. Default 2 (the cores of two ranks)."}
    )
    worker: bool = field(default=False, metadata={"help": "Internal: train and time in this process."})
    result_file: str | None = field(default=None, metadata={"help": "Internal: where rank 0 writes its timing."})

    def __post_init__(self):
        if self.global_batch_size % self.num_processes != 0:
            raise ValueError(
                f"Invalid --global_batch_size {self.global_batch_size}: it must be a multiple of --num_processes "
                f"{self.num_processes}, so every rank gets the same number of sequences."
            )
        for name in ("steps", "repeats", "num_processes", "threads_per_process", "single_process_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"Invalid --{name} {getattr(self, name)}: it must be at least 1.")


class StepTimer(TrainerCallback):
    """Record the wall-clock time at the end of every optimizer step."""

    def __init__(self):
        self.step_end_times = []

    def on_step_end(self, args, state, control, **kwargs):
        self.step_end_times.append(time.perf_counter())


def build_model(args: BenchmarkArguments) -> MdlmForMaskedDiffusion:
    config = MdlmConfig(
        vocab_size=args.vocab_size, tokenizer_vocab_size=args.vocab_size, hidden_size=args.hidden_size,
        num_hidden_layers=args.num_hidden_layers, num_attention_heads=args.num_attention_heads,
        max_position_embeddings=args.seq_len, mask_token_id=MASK_TOKEN_ID, eod_token_id=EOD_TOKEN_ID,
    )
    torch.manual_seed(0)
    return MdlmForMaskedDiffusion(config)


def build_dataset(args: BenchmarkArguments) -> Dataset:
    """Random packed blocks of `seq_len + 1` tokens, enough for every step of one epoch."""
    num_blocks = args.global_batch_size * (args.warmup_steps + args.steps)
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, EOD_TOKEN_ID, (num_blocks, args.seq_len + 1), generator=generator)
    return Dataset.from_dict({"input_ids": tokens.tolist()})


def train_and_time(args: BenchmarkArguments):
    """Train in this process (one rank when launched by torchrun) and write rank 0's tokens per second."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as output_dir:
        training_args = TrainingArguments(
            output_dir=output_dir, per_device_train_batch_size=args.global_batch_size // world_size,
            max_steps=args.warmup_steps + args.steps, learning_rate=1e-3, save_strategy="no", report_to="none",
            logging_strategy="no", disable_tqdm=True, use_cpu=True, ddp_backend="gloo" if world_size > 1 else None,
            ddp_find_unused_parameters=False, dataloader_pin_memory=False,
        )
        collator = DataCollatorForMaskedDiffusion(mask_token_id=MASK_TOKEN_ID, eod_token_id=EOD_TOKEN_ID)
        trainer = MdlmTrainer(
            model=build_model(args), args=training_args, train_dataset=build_dataset(args), data_collator=collator,
            callbacks=[timer],
        )
        trainer.train()

    if trainer.is_world_process_zero():
        timed_seconds = timer.step_end_times[-1] - timer.step_end_times[args.warmup_steps - 1]
        tokens = args.steps * args.global_batch_size * args.seq_len
        result = {"tokens_per_second": tokens / timed_seconds, "world_size": world_size,
                  "threads": torch.get_num_threads()}
        Path(args.result_file).write_text(json.dumps(result))


def worker_flags(args: BenchmarkArguments, result_file: Path) -> list[str]:
    flags = []
    for name, value in asdict(args).items():
        if name not in ("worker", "result_file"):
            flags += [f"--{name}", str(value)]
    return flags + ["--worker", "--result_file", str(result_file)]


def run_once(args: BenchmarkArguments, distributed: bool) -> dict:
    """Run one timed training in fresh processes and return rank 0's result."""
    script = str(Path(__file__).resolve())
    threads = args.threads_per_process if distributed else args.single_process_threads
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    with tempfile.TemporaryDirectory() as folder:
        result_file = Path(folder) / "result.json"
        launcher = [sys.executable]
        if distributed:
            launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.num_processes}"]
        command = launcher + [script] + worker_flags(args, result_file)
        completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
        if completed.returncode != 0:
            raise RuntimeError(f"Benchmark run failed: {' '.join(command)}\n{completed.stderr[-4000:]}")
        return json.loads(result_file.read_text())


def main():
    args = HfArgumentParser(BenchmarkArguments).parse_args_into_dataclasses()[0]
    if args.worker:
        train_and_time(args)
        return

    logging.basicConfig(format="%(message)s", level=logging.INFO)
    logger.info(
        f"Model {args.hidden_size} wide, {args.num_hidden_layers} layers, {args.num_attention_heads} heads, "
        f"vocab {args.vocab_size}; global batch {args.global_batch_size} x {args.seq_len} tokens; "
        f"{args.warmup_steps} warmup + {args.steps} timed steps; {os.cpu_count()} CPUs visible."
    )
    single, distributed = [], []
    for repeat in range(args.repeats):
        single.append(run_once(args, distributed=False))
        distributed.append(run_once(args, distributed=True))
        logger.info(
            f"round {repeat + 1}: 1 process x {single[-1]['threads']} threads {single[-1]['tokens_per_second']:.0f} "
            f"tokens/s, {args.num_processes} processes x {distributed[-1]['threads']} thread(s) "
            f"{distributed[-1]['tokens_per_second']:.0f} tokens/s"
        )

    single_median = statistics.median(result["tokens_per_second"] for result in single)
    distributed_median = statistics.median(result["tokens_per_second"] for result in distributed)
    logger.info(f"median, 1 process x {args.single_process_threads} threads: {single_median:.0f} tokens/s")
    logger.info(
        f"median, {args.num_processes} processes x {args.threads_per_process} thread(s) (gloo): "
        f"{distributed_median:.0f} tokens/s"
    )
    logger.info(f"ratio distributed / single: {distributed_median / single_median:.2f}")


if __name__ == "__main__":
    main()
