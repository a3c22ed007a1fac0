"""The ViT model: pure torch, HuggingFace-compatible parameter names and file format.

Imports only torch, safetensors, the standard library and ``pipeline.config``; distribution,
precision and sharding are applied from outside.
"""
from pipeline.config import ModelConfig
from pipeline.config import ModelConfig as ViTConfig
from pipeline.model.flops import vit_flops
from pipeline.model.flops_masked import mae_flops, simmim_flops
from pipeline.model.heads import ImageClassifierOutput, ViTForImageClassification, build_model
from pipeline.model.hf import config_from_hf, config_to_hf, from_pretrained, save_pretrained
from pipeline.model.mae import ViTMAEForPreTraining, ViTMAEForPreTrainingOutput, ViTMAEModel
from pipeline.model.masking import mae_noise, simmim_mask
from pipeline.model.simmim import MaskedImageModelingOutput, ViTForMaskedImageModeling
from pipeline.model.vit import (
    PatchEmbeddings,
    ViTAttention,
    ViTEmbeddings,
    ViTEncoder,
    ViTIntermediate,
    ViTLayer,
    ViTModel,
    ViTModelOutput,
    ViTOutput,
    ViTPooler,
    ViTSelfAttention,
    ViTSelfOutput,
)

__all__ = [
    "ImageClassifierOutput", "ModelConfig", "PatchEmbeddings", "ViTAttention", "ViTConfig", "ViTEmbeddings",
    "ViTEncoder", "ViTForImageClassification", "ViTIntermediate", "ViTLayer", "ViTModel", "ViTModelOutput",
    "ViTOutput", "ViTPooler", "ViTSelfAttention", "ViTSelfOutput", "build_model", "config_from_hf",
    "config_to_hf", "from_pretrained", "save_pretrained", "vit_flops",
    # masked-image pretraining
    "MaskedImageModelingOutput", "ViTForMaskedImageModeling", "ViTMAEForPreTraining", "ViTMAEForPreTrainingOutput",
    "ViTMAEModel", "mae_flops", "mae_noise", "simmim_flops", "simmim_mask",
]
