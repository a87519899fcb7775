"""The named case sets of `perceiver-fast bench --set NAME`: which cases each runs, with which
providers and passes, on which devices."""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial
from typing import Callable

from .cases import DECODE, KINDS, PASSES, Case, case_from_shape, load_shapes, model_case, sweep


@dataclass(frozen=True)
class CaseSet:
    name: str
    about: str
    cases: Callable[[str], list[Case]]  # for the device
    providers: tuple[str, ...] = ()  # the providers it runs; empty: every provider of each case's level
    passes: tuple[str, ...] = PASSES
    devices: tuple[str, ...] = ("cuda", "cpu")
    dtypes: tuple[str, ...] = ("float32", "bfloat16")  # the default of --dtypes


def quick_cases(device: str) -> list[Case]:
    """The default set: minutes on a 2-core CPU. Batch 1; one sweep of input length for the plots."""
    big = device == "cuda"
    cases = sweep(case_from_shape("hf-vision-fourier-cross", "op"), [3136, 12544, 50176] + ([200704] if big else []))
    cases += [case_from_shape("krasserm-clm-ar", "op", batch=1), case_from_shape("hf-vision-self", "op"),
              case_from_shape("hf-language-cross", "op")]
    cases += sweep(case_from_shape("hf-vision-fourier-cross", "layer"), [3136, 12544, 50176])
    cases += [case_from_shape("hf-vision-self", "layer")]
    return cases


def full_cases(device: str) -> list[Case]:
    """Every cross, causal and latent shape of shapes.json, at published batch sizes where they fit."""
    op = []
    for name, shape in load_shapes().items():
        if shape["kind"] not in KINDS:
            continue
        op.append(case_from_shape(name, "op", batch=None if device == "cuda" else 1))
    lengths = [3136, 12544, 50176, 200704] + ([802816] if device == "cuda" else [])
    cases = sweep(case_from_shape("hf-vision-fourier-cross", "op"), lengths)
    cases += [c for c in op if c.name != "hf-vision-fourier-cross"]
    cases += sweep(case_from_shape("hf-vision-fourier-cross", "layer"), lengths[:4])
    cases += [case_from_shape("hf-vision-self", "layer"), case_from_shape("hf-language-cross", "layer"),
              case_from_shape("long-input-1m", "layer")]
    return cases


def cpu_backend_cases(device: str) -> list[Case]:
    """The cpu backend's target cases: long inputs at head dims 64 and 261, and two latent self-attentions
    (small square problems, where the scores are cheap to materialise and the backward must be tight)."""
    op = partial(Case, level="op", kind="cross", N=512, M=50176, dqk=64, dv=64)
    return [op(name="b1-h1-m50k-d64", B=1, H=1),
            op(name="b1-h8-m50k-d64", B=1, H=8),
            op(name="b4-h1-m262k-d64", B=4, H=1, N=256, M=262144),
            op(name="b1-h1-m50k-d261", B=1, H=1, dqk=261, dv=261),
            op(name="latent-b8-h8-n512-d64", kind="latent", B=8, H=8, M=512),
            op(name="latent-b4-h8-n512-d128", kind="latent", B=4, H=8, M=512, dqk=128, dv=128)]


def sharded_cases(device: str) -> list[Case]:
    """The million-input cross-attention layer on one process (2 threads, and 1) and sharded over 2
    processes of one thread each: the same 2 cores either way."""
    layer = replace(case_from_shape("long-input-1m", "layer"), level="sharded")
    return [replace(layer, threads=2), replace(layer, threads=1), replace(layer, ranks=2, threads=1)]


def layer_cases(device: str) -> list[Case]:
    """HF vision-fourier's cross-attention layer at batch 4, and the million-input stress shape."""
    return [case_from_shape("hf-vision-fourier-cross", "layer", batch=4), case_from_shape("long-input-1m", "layer")]


def model_cases(device: str) -> list[Case]:
    """HF vision-fourier's 224 x 224 images at batch 1, and HF language's MLM at batch 2 of 2048 bytes."""
    return [model_case("hf-vision-fourier", 224 * 224), model_case("hf-language", 2048, batch=2)]


def deployment_cases(device: str) -> list[Case]:
    return [model_case("hf-vision-fourier", 224 * 224)]


def training_cases(device: str) -> list[Case]:
    """Training steps with HF's default attention dropout (0.1): HF vision-fourier's cross-attention
    layer at batch 4 (and the same step without dropout, what dropout costs), and whole models with
    an AdamW step: the HF vision-fourier classifier on 224 x 224 images and HF language's MLM at
    batch 2 of 2048 bytes."""
    layer = case_from_shape("hf-vision-fourier-cross", "layer", batch=4)
    return [layer, replace(layer, dropout=0.1), replace(model_case("hf-vision-fourier", 224 * 224), dropout=0.1),
            replace(model_case("hf-language", 2048, batch=2), dropout=0.1)]


def generation_cases(device: str) -> list[Case]:
    """Perceiver AR decoding (issue 14): a krasserm CausalSequenceModel of 8 latent layers of 512
    channels (8 heads), 512 latents, after prompts of 4k, 16k and 64k tokens; 16 new tokens per call."""
    decode = partial(Case, level="generation", kind="causal", B=1, H=8, N=512, dqk=64, dv=64, C=512,
                     latent_dim=512, new_tokens=16)
    return [decode(name=f"krasserm-ar-prompt-{m // 1024}k", M=m) for m in (4096, 16384, 65536)]


def overhead_cases(device: str) -> list[Case]:
    """A tiny cross-attention, timed over loops of 2000 calls: what the Python layer adds to a call."""
    return [Case(name="tiny", level="op", kind="cross", B=1, H=1, N=4, M=8, dqk=16, dv=16, calls=2000)]


def gpu_cases(device: str) -> list[Case]:
    """The GPU targets: six op-level cases (long inputs, head dims SDPA's flash path cannot take, Perceiver
    AR's causal shape, a latent self-attention), HF vision-fourier's cross-attention layer at batch 8 (the
    shortcut input method), HF language's at batch 32 (C = 768 over heads of 32 and 160: the projection
    method), and the whole HF vision-fourier model (forward, and forward+backward: a training step's work)."""
    op = partial(Case, level="op", kind="cross", B=1, H=1, N=512)
    return [op(name="gpu-1-h8-m262k-d64", H=8, M=262144, dqk=64, dv=64),
            op(name="gpu-2-m1m-d128", M=1048576, dqk=128, dv=128),
            op(name="gpu-3-b8-m50k-d261", B=8, M=50176, dqk=261, dv=261),
            op(name="gpu-4-n2048-m182k-d322", N=2048, M=182528, dqk=322, dv=322),
            op(name="gpu-5-ar-h16-n1024-m131k-d64", kind="causal", H=16, N=1024, M=131072, dqk=64, dv=64),
            op(name="gpu-6-latent-b64-h8-n512-d128", kind="latent", B=64, H=8, M=512, dqk=128, dv=128),
            case_from_shape("hf-vision-fourier-cross", "layer", batch=8),
            case_from_shape("hf-language-cross", "layer", batch=32),
            model_case("hf-vision-fourier", 224 * 224)]


SETS = {s.name: s for s in (
    CaseSet("quick", "the default, minutes on a 2-core CPU: op and layer level, batch 1, input-length sweeps",
            quick_cases),
    CaseSet("full", "every published cross, causal and latent shape, published batch sizes where they fit, "
                    "longer sweeps; providers too slow to set up for the quick set run on the CPU too", full_cases),
    CaseSet("cpu-backend", "op level, the cpu backend against SDPA and eager attention on its target cases",
            cpu_backend_cases, providers=("perceiver_fast[cpu]", "sdpa", "eager"), devices=("cpu",)),
    CaseSet("layer", "HF's cross-attention layer, the same layer on SDPA and after pf.patch, at batch 4 and at a "
                     "million inputs", layer_cases, providers=("HF", "HF on SDPA", "HF + pf.patch")),
    CaseSet("overhead", "the per-call overhead of the Python layer: pf.cross_attention on a tiny input against "
                        "the registered op and the C++ kernels it runs", overhead_cases,
            providers=("perceiver_fast[cpu]", "registered op[cpu]", "C++ kernel[cpu]"), devices=("cpu",)),
    CaseSet("gpu", "the GPU targets in bfloat16: six op-level cases against SDPA, FlexAttention and flash-attn, "
                   "the vision-fourier and language layers and the whole vision-fourier model", gpu_cases,
            providers=("perceiver_fast[triton]", "perceiver_fast[cuda]", "sdpa", "flex_attention", "flash_attn",
                       "HF", "HF on SDPA", "HF + pf.patch"), devices=("cuda",), dtypes=("bfloat16",)),
    CaseSet("sharded", "the million-input cross-attention layer (pf.nn.CrossAttention) on one process and with its "
                       "input sharded over 2 processes (gloo), time, peak memory per rank and bytes all-reduced",
            sharded_cases, devices=("cpu",), dtypes=("float32",)),
    CaseSet("model", "whole HF models (the vision-fourier classifier at batch 1, the language MLM at batch 2 x 2048), "
                     "inference: HF, after pf.patch (and with its attention alone patched), and the model exported to "
                     "ONNX Runtime and OpenVINO, each in its own process", model_cases, passes=("forward",),
            providers=("HF", "HF + pf.patch", "HF + pf.patch (attention only)", "ONNX Runtime", "OpenVINO")),
    CaseSet("deployment", "the vision-fourier classifier at batch 1 in float32 by each deployment route: HF and "
                          "pf.patch eager, the patched model as an AOTInductor package, and ONNX files of HF's model "
                          "and of the patched one in ONNX Runtime and OpenVINO, each in its own process",
            deployment_cases, passes=("forward",), dtypes=("float32",),
            providers=("HF", "HF + pf.patch", "AOTInductor (pf.patch)", "ONNX Runtime", "OpenVINO",
                       "ONNX Runtime (pf.patch)", "OpenVINO (pf.patch)")),
    CaseSet("training", "training steps (forward+backward) with attention dropout 0.1: HF's vision-fourier "
                        "cross-attention layer at batch 4 (and without dropout), and the whole vision-fourier "
                        "classifier and language MLM with an AdamW step, HF against HF + pf.patch",
            training_cases, providers=("HF", "HF + pf.patch", "HF + pf.patch (attention only)"),
            passes=("forward+backward",)),
    CaseSet("generation", "Perceiver AR decoding, ms per new token: krasserm's CausalSequenceModel (8 latent "
                          "layers of 512 channels, 512 latents) after 4k, 16k and 64k-token prompts, its own "
                          "cached forward against perceiver_fast.generation", generation_cases,
            providers=("pf.generation", "pf.generation + pf.patch", "krasserm cached forward"), passes=(DECODE,)),
)}
