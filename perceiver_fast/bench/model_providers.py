"""Model level: a whole named Perceiver (perceiver_fast.profiler.models: HF transformers models in
their published configurations, random weights), HF's own and after `pf.patch`. The case's name
is the model's; M its input length (hf-vision-fourier: pixels), padded_inputs the inputs at the
end of every item that a padding mask hides."""

from __future__ import annotations

import torch

from ..profiler.memory_model import predicted_peak_bytes
from ..profiler.models import NAMED_MODELS
from .cases import Case
from .providers import Provider, make_call, missing_module, with_backward


def model_inputs(case: Case, dtype, device, backward):
    """The model's input (gradients to it where it is not token ids) and its padding mask, None without padding."""
    inputs = NAMED_MODELS[case.name].inputs(case.B, case.M, dtype, device)
    if backward and inputs.is_floating_point():
        inputs.requires_grad_()
    mask = None
    if case.padded_inputs:
        mask = torch.ones(case.B, case.M, device=device)
        mask[:, case.M - case.padded_inputs:] = 0
    return inputs, mask


def _refusal(case: Case, dtype, device) -> str | None:
    if case.name not in NAMED_MODELS:
        return f"no named model {case.name!r}; the named models: {', '.join(NAMED_MODELS)}"
    return missing_module("transformers") or NAMED_MODELS[case.name].valid_length(case.M)


def with_attention_dropout(model: torch.nn.Module, p: float) -> torch.nn.Module:
    """model in training mode with every attention dropout at p (an HF Perceiver's only dropouts are
    its attention's), or as it is for p = 0."""
    if not p:
        return model
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = p
    return model.train()


def _provider(name: str, patched: bool) -> Provider:
    def prepare(case, dtype, device, backward):
        model = with_attention_dropout(NAMED_MODELS[case.name].build(case.M, dtype).to(device), case.dropout)
        if patched:
            import perceiver_fast as pf

            pf.patch(model)
        inputs, mask = model_inputs(case, dtype, device, backward)
        leaves = ([inputs] if inputs.requires_grad else []) + list(model.parameters())
        # Every named model is an HF Perceiver: the padding mask goes in as its attention_mask.
        return make_call(lambda: model(inputs=inputs, attention_mask=mask).logits, leaves, backward)

    def forward_bytes(case, dtype):
        # The profiler's model of an inference forward's peak (perceiver_fast/profiler/memory_model.py);
        # a model it does not cover is started unchecked.
        shape = NAMED_MODELS[case.name].shape
        return 0 if shape is None else predicted_peak_bytes(shape(case.B, case.M, dtype), patched)

    return Provider(name, "model", _refusal, prepare, predicted_bytes=with_backward(forward_bytes))


def model_providers() -> list[Provider]:
    return [_provider("HF + pf.patch", patched=True), _provider("HF", patched=False)]
