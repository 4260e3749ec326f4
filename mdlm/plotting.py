"""A PNG of a run's training NELBO and evaluation perplexity bound against optimizer steps."""

from pathlib import Path

import matplotlib


matplotlib.use("Agg")  # no display on training machines
import matplotlib.pyplot as plt  # noqa: E402


def plot_training_curves(log_history: list[dict], path: str | Path) -> Path | None:
    """Draw the curves from `Trainer.state.log_history` into `path`; return it, or None when nothing was logged."""
    train = [(e["step"], e["loss"]) for e in log_history if "loss" in e and "step" in e]
    evals = [(e["step"], e["eval_perplexity"]) for e in log_history if "eval_perplexity" in e and "step" in e]
    if not train and not evals:
        return None

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    if train:
        left.plot(*zip(*train), color="tab:blue")
    left.set(title="Training NELBO per token", xlabel="step", ylabel="nats per token")
    if evals:
        right.plot(*zip(*evals), marker="o", color="tab:orange")
        right.set_yscale("log")
    right.set(title="Validation perplexity bound, exp(NELBO)", xlabel="step", ylabel="perplexity (upper bound)")
    for axis in (left, right):
        axis.grid(alpha=0.3)
    figure.tight_layout()

    path = Path(path)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
