"""A model of the user's own for `perceiver-fast profile --model FILE.py:FUNCTION` or `MODULE:FUNCTION`.

FUNCTION() returns (model, make_inputs): an nn.Module that pf.patch patches (an HF, lucidrains or
krasserm Perceiver, or one holding such modules: the profile compares it with its patched copy; the
command stops with an error naming --model where there is nothing to patch, perceiver_fast.nn's
modules included, which are fused already) and make_inputs(batch, input_len, dtype, device), which
returns the model's inputs for that batch and input length: a tensor (called as model(x)), a tuple
(model(*args)) or a dict (model(**kwargs)). The profile's output is the model's output tensor, or
the first floating-point tensor of what it returns (a tuple, a ModelOutput).
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
from pathlib import Path

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from .models import NamedModel


class UserModelError(ValueError):
    """The --model spec cannot give a model; the message says why."""


def _load_function(spec: str):
    location, _, function = spec.rpartition(":")
    if not location or not function:
        raise UserModelError(f"a named model, FILE.py:FUNCTION or MODULE:FUNCTION, got {spec!r}")
    if location.endswith(".py"):
        path = Path(location)
        if not path.is_file():
            raise UserModelError(f"no file {location}")
        module_spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(location)
        except ImportError as error:
            raise UserModelError(f"cannot import module {location!r}: {error}") from error
    if not callable(getattr(module, function, None)):
        raise UserModelError(f"{location} has no function {function!r}")
    return getattr(module, function)


def _first_tensor(result) -> torch.Tensor:
    if hasattr(result, "to_tuple"):
        result = result.to_tuple()
    leaves, _ = tree_flatten(result)
    found = next((t for t in leaves if isinstance(t, torch.Tensor) and t.is_floating_point()), None)
    if found is None:
        raise UserModelError(f"the model returned no floating-point tensor, got {type(result).__name__}")
    return found


def _call(model: nn.Module, inputs):
    if isinstance(inputs, dict):
        return _first_tensor(model(**inputs))
    if isinstance(inputs, tuple):
        return _first_tensor(model(*inputs))
    return _first_tensor(model(inputs))


def user_model(spec: str) -> NamedModel:
    """The model FILE.py:FUNCTION or MODULE:FUNCTION gives, as the profiler's named models are described.

    It has no memory formula (`shape` is None): the profile reports measured figures only.
    """
    made = _load_function(spec)()
    if not (isinstance(made, tuple) and len(made) == 2 and isinstance(made[0], nn.Module) and callable(made[1])):
        raise UserModelError(f"{spec} must return (model, make_inputs): an nn.Module and a function, "
                             f"got {type(made).__name__}")
    model, make_inputs = made
    return NamedModel(name=spec, description=f"{type(model).__name__} from {spec}", valid_length=lambda length: None,
                      build=lambda length, dtype: copy.deepcopy(model).to(dtype),
                      inputs=lambda batch, length, dtype, device: make_inputs(batch, length, dtype, device),
                      run=_call, shape=None)
