"""Named Perceiver configurations for `perceiver-fast profile`: HF transformers models in their
published configurations (random weights), built for a chosen input length and batch."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .memory_model import ModelShape


@dataclass(frozen=True)
class NamedModel:
    name: str
    description: str
    valid_length: Callable[[int], str | None]  # why an input length cannot be used, None if it can
    build: Callable[[int, torch.dtype], nn.Module]
    inputs: Callable[[int, int, torch.dtype, str], object]
    run: Callable[[nn.Module, object], torch.Tensor]
    shape: Callable[[int, int, torch.dtype], ModelShape] | None  # the memory formula's description; None: none


def _square(length: int) -> str | None:
    side = math.isqrt(length)
    if side * side != length:
        return (f"hf-vision-fourier takes square images: --input-len must be a square number of pixels "
                f"(50176 = 224^2), got {length}; nearest: {side * side} or {(side + 1) ** 2}")
    return None


def _vision_config(length: int):
    from transformers import PerceiverConfig

    return PerceiverConfig(num_latents=512, d_latents=1024, num_blocks=8, num_self_attends_per_block=6,
                           num_self_attention_heads=8, num_cross_attention_heads=1,
                           self_attention_widening_factor=1, cross_attention_widening_factor=1,
                           image_size=math.isqrt(length), num_labels=1000)


def _vision_build(length, dtype):
    from transformers import PerceiverForImageClassificationFourier

    torch.manual_seed(0)
    return PerceiverForImageClassificationFourier(_vision_config(length)).eval().to(dtype)


def _vision_inputs(batch, length, dtype, device):
    side = math.isqrt(length)
    return torch.randn(batch, 3, side, side, dtype=dtype, device=device)


def _vision_shape(batch, length, dtype):
    # 3 pixel channels + 258 Fourier position channels (2 axes x 64 bands x sin/cos + 2 positions).
    return ModelShape(batch=batch, inputs=length, channels=261, raw_channels=3, latents=512, latent_dim=1024,
                      cross_heads=1, cross_qk=261, cross_v=261, self_heads=8, self_layers=8 * 6,
                      element_bytes=torch.finfo(dtype).bits // 8)


def _language_build(length, dtype):
    from transformers import PerceiverConfig, PerceiverForMaskedLM

    torch.manual_seed(0)
    config = PerceiverConfig(max_position_embeddings=length)  # the published hf-language defaults otherwise
    return PerceiverForMaskedLM(config).eval().to(dtype)


def _language_inputs(batch, length, dtype, device):
    return torch.randint(0, 262, (batch, length), device=device)


def _language_shape(batch, length, dtype):
    return ModelShape(batch=batch, inputs=length, channels=768, raw_channels=768, latents=256, latent_dim=1280,
                      cross_heads=8, cross_qk=96, cross_v=96, self_heads=8, self_layers=26,
                      element_bytes=torch.finfo(dtype).bits // 8, decoder_queries=length, decoder_channels=768,
                      decoder_heads=8, decoder_qk=32, decoder_v=96, decoder_dim=262)


# Optical flow frames keep the published 368 x 496 aspect ratio, 23:31: 713 s^2 pixels (s = 16 published).
FLOW_ASPECT = (23, 31)


def _flow_side(length: int) -> int:
    return math.isqrt(length // (FLOW_ASPECT[0] * FLOW_ASPECT[1]))


def _flow_length(length: int) -> str | None:
    area = FLOW_ASPECT[0] * FLOW_ASPECT[1]
    side = _flow_side(length)
    if area * side * side != length or side == 0:
        return (f"hf-optical-flow takes 23:31 frames (368x496 = 182528 pixels published): --input-len must be "
                f"713 s^2 for a whole s, got {length}; nearest: {area * max(side, 1) ** 2} or {area * (side + 1) ** 2}")
    return None


def _flow_build(length, dtype):
    from transformers import PerceiverConfig, PerceiverForOpticalFlow

    side = _flow_side(length)
    torch.manual_seed(0)
    config = PerceiverConfig(num_latents=2048, d_latents=512, d_model=322, num_blocks=1,
                             num_self_attends_per_block=24, num_self_attention_heads=16, num_cross_attention_heads=1,
                             train_size=[FLOW_ASPECT[0] * side, FLOW_ASPECT[1] * side])
    return PerceiverForOpticalFlow(config).eval().to(dtype)


def _flow_inputs(batch, length, dtype, device):
    side = _flow_side(length)
    # Two frames of 3 x 3 patches around each pixel, 3 colours each: 27 values per pixel.
    return torch.randn(batch, 2, 27, FLOW_ASPECT[0] * side, FLOW_ASPECT[1] * side, dtype=dtype, device=device)


NAMED_MODELS = {
    "hf-vision-fourier": NamedModel(
        "hf-vision-fourier", "HF PerceiverForImageClassificationFourier (224x224 -> M = 50176 of C = 261)",
        _square, _vision_build, _vision_inputs, lambda m, x: m(inputs=x).logits, _vision_shape),
    "hf-language": NamedModel(
        "hf-language", "HF PerceiverForMaskedLM (M = 2048 bytes of C = 768, 256 latents, 26 layers)",
        lambda length: None, _language_build, _language_inputs, lambda m, x: m(inputs=x).logits, _language_shape),
    "hf-optical-flow": NamedModel(
        "hf-optical-flow", "HF PerceiverForOpticalFlow (368x496 -> M = 182528 of C = 322, 2048 latents, 24 layers, "
        "a decoder with one query per pixel); no memory formula yet", _flow_length, _flow_build, _flow_inputs,
        lambda m, x: m(inputs=x).logits, None),
}
