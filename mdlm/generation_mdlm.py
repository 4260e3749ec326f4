"""Sampling from MDLM: ancestral, cached, confidence-ordered and semi-autoregressive generation."""

import torch


class MdlmGenerationMixin:
    """Generation methods of [`MdlmForMaskedDiffusion`]."""
