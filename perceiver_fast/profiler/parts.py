"""Per-part profiling of a model's forward (and backward): the parts are found by module, timed
through torch.profiler ranges opened and closed by module hooks, and their memory measured as
the peak during each part above the memory in use when the call started."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..peak_memory import memory_kib, peak_extra_mib, release_freed_memory

PARTS = ("input preprocessing", "input cross-attention", "latent self-attention", "MLPs", "decoder")


def find_parts(model: nn.Module) -> dict[str, list[nn.Module]]:
    """The modules of each part, outermost first, for HF transformers, lucidrains and krasserm Perceivers.

    HF by module path (input_preprocessor, encoder.cross_attention.attention,
    encoder.self_attends.*.attention, *.mlp, decoder); the others by class: lucidrains' PreNorm
    around an Attention with a context norm is cross-attention, without one self-attention;
    krasserm's CrossAttention and SelfAttention; FeedForward and MLP modules are MLPs. A module
    inside one already taken is not counted again. Pass `parts` to profile_model for other models.
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
                cls == "PreNorm" and type(getattr(module, "fn", None)).__name__ == "FeedForward"):
            add("MLPs", name, module)
    return dict(parts)


@dataclass
class PartStats:
    ms: float = 0.0
    peak_mib: float = 0.0  # peak during the part above the memory in use when the call started
    calls: int = 0


@dataclass
class Profile:
    parts: dict[str, PartStats] = field(default_factory=dict)
    total_ms: float = 0.0
    peak_mib: float = 0.0

    def other_ms(self) -> float:
        return max(0.0, self.total_ms - sum(p.ms for p in self.parts.values()))


class _Tracker:
    """Module hooks that open a torch.profiler range per part call (outermost part only) and, when
    measuring memory, record each part's peak."""

    def __init__(self, parts: dict[str, list[nn.Module]], device: str, memory: bool):
        self.device, self.memory = device, memory
        self.active: tuple[str, object] | None = None
        self.stats = {name: PartStats() for name in parts}
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

    def _enter(self, name):
        def hook(module, args):
            if self.active is not None:
                return
            if self.device == "cuda":
                torch.cuda.synchronize()
            if self.memory:
                if self.device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                else:
                    Path("/proc/self/clear_refs").write_text("5")
            record = torch.autograd.profiler.record_function(name)
            record.__enter__()
            self.active = (name, record, time.perf_counter())
        return hook

    def _exit(self, name):
        def hook(module, args, output):
            if self.active is None or self.active[0] != name:
                return
            if self.device == "cuda":
                torch.cuda.synchronize()
            _, record, start = self.active
            record.__exit__(None, None, None)
            stats = self.stats[name]
            stats.ms += (time.perf_counter() - start) * 1e3
            stats.calls += 1
            if self.memory:
                peak_kib = (torch.cuda.max_memory_allocated() / 1024 if self.device == "cuda"
                            else memory_kib("VmHWM"))
                stats.peak_mib = max(stats.peak_mib, (peak_kib - self.start_kib) / 1024)
            self.active = None
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


def profile_model(model: nn.Module, run, *, device: str = "cpu", backward: bool = False,
                  parts: dict[str, list[nn.Module]] | None = None, trace: str | None = None) -> Profile:
    """Profiles run(model) (one untimed call first): per-part time from torch.profiler ranges, per-part
    peak memory in a second call, the whole call's peak in a third. With backward, run's output is
    summed and backpropagated (parts are timed in the forward; the backward counts in the total).
    trace: also write the first timed call's Chrome trace there."""
    parts = find_parts(model) if parts is None else parts

    def call():
        if not backward:
            with torch.no_grad():
                return run(model)
        out = run(model)
        out.float().sum().backward()
        model.zero_grad(set_to_none=True)
        return None

    call()
    profile = Profile()
    tracker = _Tracker(parts, device, memory=False)
    activities = [torch.profiler.ProfilerActivity.CPU] + (
        [torch.profiler.ProfilerActivity.CUDA] if device == "cuda" else [])
    prof = torch.profiler.profile(activities=activities)
    try:
        with _profiler_log_silenced():
            prof.__enter__()
        try:
            start = time.perf_counter()
            call()
            if device == "cuda":
                torch.cuda.synchronize()
            profile.total_ms = (time.perf_counter() - start) * 1e3
        finally:
            with _profiler_log_silenced():
                prof.__exit__(None, None, None)
    finally:
        tracker.remove()
    if trace:
        prof.export_chrome_trace(trace)
    timed = tracker.stats

    tracker = _Tracker(parts, device, memory=True)
    try:
        if device == "cpu":
            release_freed_memory()
        tracker.start_kib = tracker._current_kib()
        call()
    finally:
        tracker.remove()
    for name, stats in timed.items():
        stats.peak_mib = tracker.stats[name].peak_mib
    profile.parts = timed
    _, profile.peak_mib = peak_extra_mib(call, device)
    return profile
