"""mdlm: Masked Diffusion Language Models (Sahoo et al., 2024) for the Hugging Face stack."""

from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM

from .collator import DataCollatorForMaskedDiffusion
from .configuration_mdlm import MdlmConfig
from .modeling_mdlm import MdlmForMaskedDiffusion, MdlmModel, MdlmOutput, MdlmPreTrainedModel
from .trainer import MdlmTrainer


AutoConfig.register(MdlmConfig.model_type, MdlmConfig, exist_ok=True)
AutoModel.register(MdlmConfig, MdlmForMaskedDiffusion, exist_ok=True)
AutoModelForMaskedLM.register(MdlmConfig, MdlmForMaskedDiffusion, exist_ok=True)

__version__ = "0.1.0"

__all__ = [
    "DataCollatorForMaskedDiffusion",
    "MdlmConfig",
    "MdlmForMaskedDiffusion",
    "MdlmModel",
    "MdlmOutput",
    "MdlmPreTrainedModel",
    "MdlmTrainer",
]
