"""Model level: a whole named Perceiver (perceiver_fast.profiler.models: HF transformers models in
their published configurations, random weights), HF's own and after `pf.patch` (and with its
attention alone patched, `linear=False`); the deployment runtimes are runtime_providers.py. The
case's name is the model's; M its input length (hf-vision-fourier: pixels), padded_inputs the
inputs at the end of every item that a padding mask hides. A forward+backward at this level is a
training step: forward, backward and an AdamW step.

Every row records its largest logit error against the float32 model run by HF eagerly on the same
inputs (`max_logit_error`), and the patched model's rows the time of each op in one more call
(`op_ms`, torch.profiler)."""

from __future__ import annotations

import functools

import torch

from ..profiler.memory_model import predicted_peak_bytes
from ..profiler.models import NAMED_MODELS
from .cases import Case
from .providers import Provider, make_call, missing_module, with_backward

# Ops listed in a patched model's profile (the rest summed as "other").
PROFILED_OPS = 8


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


@functools.cache
def _float32_logits(case: Case, device: str) -> torch.Tensor:
    """The float32 model's logits on the case's inputs, run by HF eagerly (the reference of every row's
    max_logit_error); once per process."""
    # Drawn as every provider's prepare draws them: after building the model (which seeds torch itself).
    model = NAMED_MODELS[case.name].build(case.M, torch.float32).to(device)
    inputs, mask = model_inputs(case, torch.float32, device, backward=False)
    with torch.no_grad():
        return model(inputs=inputs, attention_mask=mask).logits.float()


def max_logit_error(case: Case, device: str, logits: torch.Tensor) -> float:
    """The largest absolute difference between `logits` and the float32 model's (HF, eager)."""
    return (logits.float() - _float32_logits(case, device)).abs().max().item()


def op_profile(call) -> dict[str, float]:
    """ms per op (self CPU time) of one more call, the PROFILED_OPS largest and the rest as "other"."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        call()
    times = {event.key: event.self_cpu_time_total / 1e3 for event in profile.key_averages()}
    largest = sorted(times, key=times.get, reverse=True)
    return {**{name: times[name] for name in largest[:PROFILED_OPS]},
            "other": sum(times[name] for name in largest[PROFILED_OPS:])}


def model_extras(profiled: bool):
    """The extra fields of a model row: max_logit_error of an inference forward (a training step's
    logits come from dropped attention and moving weights: none), and op_ms where `profiled`."""
    def extras(case, dtype, device, call, result):
        training = isinstance(result, tuple)  # make_call's (logits, gradients) of a training step
        fields = {} if training else {"max_logit_error": max_logit_error(case, device, result)}
        return {**fields, "op_ms": op_profile(call)} if profiled else fields
    return extras


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


def _provider(name: str, patched: bool, linear: bool = True) -> Provider:
    def prepare(case, dtype, device, backward):
        model = with_attention_dropout(NAMED_MODELS[case.name].build(case.M, dtype).to(device), case.dropout)
        if patched:
            import perceiver_fast as pf

            pf.patch(model, linear=linear)
        inputs, mask = model_inputs(case, dtype, device, backward)
        leaves = [inputs] if inputs.requires_grad else []
        # Every named model is an HF Perceiver: the padding mask goes in as its attention_mask.
        # A training step at this level: forward, backward and an AdamW step.
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6) if backward else None
        return make_call(lambda: model(inputs=inputs, attention_mask=mask).logits, leaves, backward, optimizer)

    def forward_bytes(case, dtype):
        # The profiler's model of an inference forward's peak (perceiver_fast/profiler/memory_model.py);
        # a model it does not cover is started unchecked.
        shape = NAMED_MODELS[case.name].shape
        return 0 if shape is None else predicted_peak_bytes(shape(case.B, case.M, dtype), patched)

    return Provider(name, "model", _refusal, prepare, predicted_bytes=with_backward(forward_bytes),
                    extras=model_extras(profiled=patched and linear))


def model_providers() -> list[Provider]:
    return [_provider("HF + pf.patch", patched=True), _provider("HF + pf.patch (attention only)", True, linear=False),
            _provider("HF", patched=False)]
