"""`torch.compile` on a tiny model gives the eager loss and a working backward pass.

The test compiles with the default inductor backend, which on CPU needs a C++ compiler, and it is skipped only
when none is found. With an empty inductor cache the test used about 40 seconds of CPU time (user plus system,
AMD EPYC, two cores), most of it in g++ building the kernels. A warm cache in /tmp/torchinductor_$USER cuts that
to about 25 seconds.
"""

import os
import shutil
import sys

import pytest
import torch

from conftest import MASK_ID, random_tokens, tiny_model


def find_cxx_compiler() -> str | None:
    """Return the path of the C++ compiler that inductor calls by default, or None when it is missing.

    Inductor (torch 2.13) runs `$CXX`, else clang++ on macOS and g++ elsewhere.
    """
    default = "clang++" if sys.platform == "darwin" else "g++"
    return shutil.which(os.environ.get("CXX", default))


def noised_batch():
    clean = random_tokens(2, 16)
    masked = torch.rand(clean.shape, generator=torch.Generator().manual_seed(0)) < 0.5
    return {
        "input_ids": torch.where(masked, MASK_ID, clean),
        "attention_mask": torch.ones_like(clean),
        "labels": torch.where(masked, clean, -100),
        "t": torch.tensor([0.4, 0.7]),
    }


@pytest.mark.skipif(find_cxx_compiler() is None, reason="torch.compile's CPU backend needs a C++ compiler")
def test_compiled_loss_matches_eager():
    torch._dynamo.reset()
    batch = noised_batch()
    eager_model = tiny_model().train()
    eager_loss = eager_model(**batch).loss
    eager_loss.backward()

    model = tiny_model().train()
    compiled = torch.compile(model)
    loss = compiled(**batch).loss
    loss.backward()

    torch.testing.assert_close(loss.detach(), eager_loss.detach(), rtol=1e-5, atol=1e-5)
    for (name, parameter), eager_parameter in zip(model.named_parameters(), eager_model.parameters()):
        assert parameter.grad is not None, name
        torch.testing.assert_close(parameter.grad, eager_parameter.grad, rtol=1e-4, atol=1e-5, msg=name)
