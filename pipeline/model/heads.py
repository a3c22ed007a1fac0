"""The classification head on ViTModel: logits from the CLS token (HF's layout). The pretraining
heads are in mae.py and simmim.py."""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from torch import Tensor, nn

from pipeline.config import ModelConfig
from pipeline.model.losses import classification_loss
from pipeline.model.outputs import ImageClassifierOutput
from pipeline.model.vit import ViTModel, init_vit_weights


class ViTForImageClassification(nn.Module):
    """ViTModel without pooler, and a linear classifier on the final-LayerNormed CLS token.

    Parameter names match HF (``vit.*``, ``classifier.*``). Only single-label classification is
    supported: ``labels`` are class indices and the loss is cross-entropy (optionally smoothed).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.vit = ViTModel(config, add_pooling_layer=False)  # initialises its own weights
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        init_vit_weights(self.classifier, config.initializer_range)

    def set_activation_checkpointing(self, spec: str) -> None:
        """"none", "all" or "every-K"; see ModelConfig.activation_checkpointing."""
        self.vit.set_activation_checkpointing(spec)
        self.config = dataclasses.replace(self.config, activation_checkpointing=spec)

    def prune_heads(self, heads_to_prune: dict[int, Iterable[int]]) -> None:
        self.vit.prune_heads(heads_to_prune)

    def forward(self, pixel_values: Tensor, head_mask: Tensor | None = None, labels: Tensor | None = None,
                output_attentions: bool = False, output_hidden_states: bool = False,
                interpolate_pos_encoding: bool = False, label_smoothing: float = 0.0) -> ImageClassifierOutput:
        outputs = self.vit(pixel_values, head_mask=head_mask, output_attentions=output_attentions,
                           output_hidden_states=output_hidden_states,
                           interpolate_pos_encoding=interpolate_pos_encoding)
        logits = self.classifier(outputs.last_hidden_state[:, 0])  # (batch, num_labels) from the CLS token
        loss = None
        if labels is not None:
            if labels.is_floating_point():
                raise ValueError("labels must be class indices (an integer tensor); "
                                 "regression and multi-label targets are not supported")
            loss = classification_loss(logits.view(-1, logits.shape[-1]), labels.view(-1),
                                       label_smoothing=label_smoothing)
        return ImageClassifierOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states,
                                     attentions=outputs.attentions)


def build_model(cfg: ModelConfig) -> ViTForImageClassification:
    """The classification ViT described by ``cfg`` (model section of the config), randomly initialised."""
    return ViTForImageClassification(cfg)
