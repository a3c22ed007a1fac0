"""Model outputs with HF's field names, readable as attributes and as keys.

They are dicts (as HF's ``ModelOutput`` is) for a practical reason: wrappers that walk a
module's outputs to hook its tensors (DeepSpeed ZeRO-3's backward hooks) traverse tuples,
lists and dicts only. A dataclass output hides its tensors from them, and ZeRO-3's backward
then fails with "active_backward_submodules is empty".
"""
from __future__ import annotations

from torch import Tensor


class ModelOutput(dict):
    """A dict whose keys are also attributes; ``None`` fields are kept, so every name exists."""

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value) -> None:
        self[name] = value


class ViTModelOutput(ModelOutput):
    """HF's ``BaseModelOutputWithPooling`` fields."""

    def __init__(self, last_hidden_state: Tensor, pooler_output: Tensor | None = None,
                 hidden_states: tuple[Tensor, ...] | None = None, attentions: tuple[Tensor, ...] | None = None):
        # last_hidden_state (batch, tokens, hidden) after the final LayerNorm; pooler_output
        # (batch, pooler_output_size); hidden_states: embeddings + each layer's output (before the
        # final LN); attentions: per layer (batch, heads, tokens, tokens).
        super().__init__(last_hidden_state=last_hidden_state, pooler_output=pooler_output,
                         hidden_states=hidden_states, attentions=attentions)


class ImageClassifierOutput(ModelOutput):
    """HF's ``ImageClassifierOutput`` fields: loss (scalar, with labels) and logits (batch, num_labels)."""

    def __init__(self, loss: Tensor | None, logits: Tensor, hidden_states: tuple[Tensor, ...] | None = None,
                 attentions: tuple[Tensor, ...] | None = None):
        super().__init__(loss=loss, logits=logits, hidden_states=hidden_states, attentions=attentions)
