"""The providers of each level a case can be at: op, layer, model, sharded, generation."""

from __future__ import annotations

from .generation_providers import generation_providers
from .model_providers import model_providers
from .providers import Provider, layer_providers, op_providers
from .runtime_providers import runtime_providers
from .sharded_providers import sharded_providers

LEVELS = {"op": op_providers, "layer": layer_providers, "model": lambda: model_providers() + runtime_providers(),
          "sharded": sharded_providers, "generation": generation_providers}


def providers_for(level: str) -> list[Provider]:
    return LEVELS[level]()
