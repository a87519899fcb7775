"""Per-part profiling of a model's forward (and backward): the parts are found by module, timed
through torch.profiler ranges opened and closed by module hooks, and their memory measured as
the peak during each part above the memory in use when the call started."""

from __future__ import annotations

import bisect
import contextlib
import os
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..peak_memory import allocator_for_timing, memory_kib, peak_extra_mib, release_freed_memory

PARTS = ("input preprocessing", "input cross-attention", "latent self-attention", "MLPs", "decoder")


def find_parts(model: nn.Module) -> dict[str, list[nn.Module]]:
    """The modules of each part, outermost first, for HF transformers, lucidrains and krasserm Perceivers.

    HF by module path (input_preprocessor, encoder.cross_attention.attention,
    encoder.self_attends.*.attention, *.mlp, decoder); the others by class: lucidrains' PreNorm
    around an Attention with a context norm is cross-attention, without one self-attention;
    krasserm's CrossAttention and SelfAttention; FeedForward and MLP modules are MLPs (with HF's
    LayerNorm before each, which lucidrains and krasserm keep inside theirs). A module
    inside one already taken is not counted again. Pass `parts` to profile_model(s) for other models.
    """
    parts: dict[str, list[nn.Module]] = defaultdict(list)
    taken: set[str] = set()

    def add(part, name, module):
        if any(name == t or name.startswith(t + ".") for t in taken):
            return
        taken.add(name)
        parts[part].append(module)

    for name, module in model.named_modules():
        cls = type(module).__name__
        if name.endswith("input_preprocessor") or name.endswith("embeddings.word_embeddings") \
                or name.endswith("token_input_adapter") or name.endswith("input_adapter"):
            add("input preprocessing", name, module)
        elif name.endswith("decoder") and "PerceiverModel" not in cls:
            add("decoder", name, module)
        elif name.endswith("encoder.cross_attention.attention") or cls == "CrossAttention":
            add("input cross-attention", name, module)
        elif (".self_attends." in name and name.endswith(".attention")) or cls == "SelfAttention":
            add("latent self-attention", name, module)
        elif cls == "PreNorm" and getattr(module, "norm_context", None) is not None:
            add("input cross-attention", name, module)
        elif cls == "PreNorm" and type(getattr(module, "fn", None)).__name__ == "Attention":
            add("latent self-attention", name, module)
        elif name.endswith(".mlp") or cls in ("FeedForward", "MLP", "PerceiverMLP") or (
                name.endswith(".layernorm") and ("cross_attention" in name or ".self_attends." in name)) or (
                cls == "PreNorm" and type(getattr(module, "fn", None)).__name__ == "FeedForward"):
            add("MLPs", name, module)
    return dict(parts)


def parameter_bytes_by_part(model: nn.Module, parts: dict[str, list[nn.Module]]) -> dict[str, int]:
    """Bytes of the trainable parameters of each part, and of the rest under "other" (each counted once)."""
    owner = {id(p): name for name, modules in parts.items() for module in modules for p in module.parameters()}
    sizes: dict[str, int] = defaultdict(int)
    for parameter in model.parameters():
        if parameter.requires_grad:
            sizes[owner.get(id(parameter), "other")] += parameter.numel() * parameter.element_size()
    return dict(sizes)


@dataclass
class PartStats:
    ms: float = 0.0                 # forward: wall time of the part's calls
    peak_mib: float = 0.0           # forward: peak above the memory in use when the call started
    calls: int = 0
    backward_ms: float = 0.0        # backward: time of the autograd nodes the part's forward created
    backward_peak_mib: float = 0.0  # backward: peak while those nodes ran, same baseline


@dataclass
class Profile:
    parts: dict[str, PartStats] = field(default_factory=dict)
    forward_ms: float = 0.0
    backward_ms: float = 0.0
    optimizer_ms: float = 0.0       # the optimizer's step, when one was given
    peak_mib: float = 0.0
    backward: bool = False

    @property
    def total_ms(self) -> float:
        return self.forward_ms + self.backward_ms + self.optimizer_ms

    def other_ms(self) -> float:
        """Forward time outside the parts: the glue between them (residual adds, reshapes, the loss)."""
        return max(0.0, self.forward_ms - sum(p.ms for p in self.parts.values()))

    def other_backward_ms(self) -> float:
        """Backward time outside the parts' nodes: the gradients of that glue and the autograd engine's
        own work between nodes."""
        return max(0.0, self.backward_ms - sum(p.backward_ms for p in self.parts.values()))


class _Tracker:
    """Module hooks that open a torch.profiler range per part call (outermost part only), note the
    autograd sequence numbers each call hands out, and, when measuring memory, record each part's peak.

    The backward is attributed through those sequence numbers: every autograd node created during a
    part's forward (and the gradient accumulation of the part's own parameters) is the part's; its
    time and peak are measured by node hooks, whatever order the engine runs the nodes in."""

    def __init__(self, parts: dict[str, list[nn.Module]], device: str, memory: bool):
        self.device, self.memory = device, memory
        self.active: tuple[nn.Module, object, float, int] | None = None  # the open part call
        self.stats = {name: PartStats() for name in parts}
        self.ranges: list[tuple[int, int, str]] = []  # [first, last) sequence numbers of each part call
        self.part_of_parameter = {id(p): name for name, modules in parts.items()
                                  for module in modules for p in module.parameters()}
        self.start_kib = 0
        self.handles = []
        for name, modules in parts.items():
            for module in modules:
                self.handles.append(module.register_forward_pre_hook(self._enter(name)))
                self.handles.append(module.register_forward_hook(self._exit(name)))

    def _current_kib(self) -> float:
        if self.device == "cuda":
            return torch.cuda.memory_allocated() / 1024
        return memory_kib("VmRSS")

    def _reset_peak(self):
        if self.device == "cuda":
            torch.cuda.synchronize()
            if self.memory:
                torch.cuda.reset_peak_memory_stats()
        elif self.memory:
            Path("/proc/self/clear_refs").write_text("5")

    def _peak_mib(self) -> float:
        peak_kib = torch.cuda.max_memory_allocated() / 1024 if self.device == "cuda" else memory_kib("VmHWM")
        return (peak_kib - self.start_kib) / 1024

    def _enter(self, name):
        def hook(module, args):
            if self.active is not None:
                return
            self._reset_peak()
            record = torch.autograd.profiler.record_function(name)
            record.__enter__()
            self.active = (module, record, time.perf_counter(), torch._C._autograd._get_sequence_nr())
        return hook

    def _exit(self, name):
        def hook(module, args, output):
            if self.active is None or self.active[0] is not module:  # the outermost call of a part only
                return
            if self.device == "cuda":
                torch.cuda.synchronize()
            _, record, start, first_sequence_nr = self.active
            record.__exit__(None, None, None)
            stats = self.stats[name]
            stats.ms += (time.perf_counter() - start) * 1e3
            stats.calls += 1
            if self.memory:
                stats.peak_mib = max(stats.peak_mib, self._peak_mib())
            self.ranges.append((first_sequence_nr, torch._C._autograd._get_sequence_nr(), name))
            self.active = None
        return hook

    def _part_of_node(self, node, starts: list[int]) -> str | None:
        if type(node).__name__ == "AccumulateGrad":
            return self.part_of_parameter.get(id(node.variable))
        index = bisect.bisect_right(starts, node._sequence_nr()) - 1
        if index >= 0 and node._sequence_nr() < self.ranges[index][1]:
            return self.ranges[index][2]
        return None

    def watch_backward(self, output: torch.Tensor) -> None:
        """Hooks on every node of output's graph that belongs to a part: its time (and peak) count there."""
        self.ranges.sort()
        starts = [first for first, _, _ in self.ranges]
        seen, pending = set(), [output.grad_fn]
        while pending:
            node = pending.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            pending.extend(next_node for next_node, _ in node.next_functions)
            name = self._part_of_node(node, starts)
            if name is not None:
                node.register_prehook(self._node_start())
                node.register_hook(self._node_end(self.stats[name]))

    def _node_start(self):
        def hook(grad_outputs):
            self._reset_peak()
            self.node_start = time.perf_counter()
        return hook

    def _node_end(self, stats: PartStats):
        def hook(grad_inputs, grad_outputs):
            if self.device == "cuda":
                torch.cuda.synchronize()
            stats.backward_ms += (time.perf_counter() - self.node_start) * 1e3
            if self.memory:
                stats.backward_peak_mib = max(stats.backward_peak_mib, self._peak_mib())
        return hook

    def remove(self):
        for handle in self.handles:
            handle.remove()


@contextlib.contextmanager
def _profiler_log_silenced():
    """The profiler's C++ side logs its start and stop to the process's stderr ("USDT: ...
    profiler_start"): file descriptor 2 goes to /dev/null for those two calls only."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


OPTIMIZERS = {
    # What a training step adds: AdamW keeps two moments per parameter (exp_avg and exp_avg_sq, in
    # the parameter's dtype), SGD with momentum one buffer.
    "adamw": lambda params: torch.optim.AdamW(params, lr=1e-5),
    "sgd": lambda params: torch.optim.SGD(params, lr=1e-5, momentum=0.9),
}


class _Step:
    """One call of run(model) as the profile makes it: forward, or forward, backward and the optimizer's step."""

    def __init__(self, model: nn.Module, run, device: str, backward: bool, optimizer: str | None):
        self.model, self.run, self.device, self.backward = model, run, device, backward
        self.optimizer = (OPTIMIZERS[optimizer]([p for p in model.parameters() if p.requires_grad])
                          if optimizer else None)

    def _time(self) -> float:
        if self.device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def __call__(self, tracker: _Tracker | None = None) -> tuple[float, float, float]:
        """(forward, backward, optimizer step) ms of one call; tracker: watch the backward's nodes."""
        start = self._time()
        if not self.backward:
            with torch.no_grad():
                self.run(self.model)
            return (self._time() - start) * 1e3, 0.0, 0.0
        out = self.run(self.model)
        forward_end = self._time()
        if tracker is not None:
            tracker.watch_backward(out)
        backward_start = self._time()
        out.float().sum().backward()
        backward_end = self._time()
        if self.optimizer is not None:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        step_end = self._time()
        self.model.zero_grad(set_to_none=True)
        return ((forward_end - start) * 1e3, (backward_end - backward_start) * 1e3,
                (step_end - backward_end) * 1e3 if self.optimizer is not None else 0.0)


def profile_models(models: list[nn.Module], run, *, device: str = "cpu", backward: bool = False,
                   optimizer: str | None = None, parts: list[dict[str, list[nn.Module]]] | None = None,
                   labels: list[str] | None = None, trace: str | None = None,
                   progress: Callable[[str], None] | None = None) -> list[Profile]:
    """Profiles run(model) for each model: per-part peak memory in one call, the whole call's peak in
    another, then per-part time from torch.profiler ranges in a third, each after an untimed call.

    Memory first, for every model, then time: on the CPU the memory calls run with malloc returning
    every freed block above 128 KiB to the system (release_freed_memory), so that blocks an earlier
    call freed cannot stay resident and inflate a peak; the timed calls then run with malloc as it
    settles in a long run (allocator_for_timing), as in training, not paying page faults for every block.

    backward: run's output is summed and backpropagated, and the backward is attributed to the parts
    whose forward created its nodes. optimizer ("adamw", "sgd", None; backward only): each call ends
    with that optimizer's step, its state created in the first call (so it lies under the peaks'
    baseline, as the weights do). parts: each model's parts (default: find_parts). labels: how progress
    names each model. trace: also write the first
    model's timed call's Chrome trace there. progress: called with a line as each call starts."""
    if optimizer is not None and not backward:
        raise ValueError("optimizer: a step needs the backward (backward=True)")
    if optimizer is not None and optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer: one of {', '.join(OPTIMIZERS)} or None, got {optimizer!r}")
    labels = labels or [f"model {i + 1}" for i in range(len(models))]
    steps = [_Step(model, run, device, backward, optimizer) for model in models]
    all_parts = [find_parts(model) for model in models] if parts is None else parts
    profiles = [Profile(backward=backward) for _ in models]

    def announce(label: str, what: str):
        if progress is not None:
            progress(f"{label}: {what}")

    if device == "cpu":
        release_freed_memory()
    for step, parts, profile, label in zip(steps, all_parts, profiles, labels):
        announce(label, "untimed first call")
        step()
        announce(label, "per-part memory call")
        tracker = _Tracker(parts, device, memory=True)
        try:
            if device == "cpu":
                release_freed_memory()
            tracker.start_kib = tracker._current_kib()
            step(tracker)
        finally:
            tracker.remove()
        profile.parts = tracker.stats
        announce(label, "whole-call peak memory call")
        _, profile.peak_mib = peak_extra_mib(step, device)

    if device == "cpu":
        allocator_for_timing()
    activities = [torch.profiler.ProfilerActivity.CPU] + (
        [torch.profiler.ProfilerActivity.CUDA] if device == "cuda" else [])
    for index, (step, parts, profile, label) in enumerate(zip(steps, all_parts, profiles, labels)):
        announce(label, "untimed call")
        step()
        announce(label, "timed call (torch.profiler ranges, node hooks)")
        tracker = _Tracker(parts, device, memory=False)
        prof = torch.profiler.profile(activities=activities)
        try:
            with _profiler_log_silenced():
                prof.__enter__()
            try:
                profile.forward_ms, profile.backward_ms, profile.optimizer_ms = step(tracker)
            finally:
                with _profiler_log_silenced():
                    prof.__exit__(None, None, None)
        finally:
            tracker.remove()
        if trace and index == 0:
            prof.export_chrome_trace(trace)
        for name, timed in tracker.stats.items():
            stats = profile.parts[name]
            stats.ms, stats.calls, stats.backward_ms = timed.ms, timed.calls, timed.backward_ms
    return profiles


def profile_model(model: nn.Module, run, *, parts: dict[str, list[nn.Module]] | None = None, **kwargs) -> Profile:
    """profile_models for one model; parts: its parts (default: find_parts)."""
    return profile_models([model], run, parts=None if parts is None else [parts], **kwargs)[0]
