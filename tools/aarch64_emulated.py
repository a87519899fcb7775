"""The cpu contract tests on Linux aarch64, emulated on an x86-64 machine by qemu-user: `make test-aarch64`.

Steps, each skipped when it has finished before (delete the folder to start over):

  sysroot  Debian bookworm for arm64 (debootstrap's first stage, its packages unpacked, no chroot)
           with Python 3.11 and its headers
  site     torch and the test tools for aarch64, pip-installed into a folder (see AARCH64_TORCH)
  build    csrc/ (the CPU extension's sources, as setup.py picks them) cross-compiled by Debian's
           aarch64 g++ against that torch, warnings in our files as errors, linked into
           perceiver_fast/_C.cpython-311-aarch64-linux-gnu.so beside the x86-64 build; every object
           is rebuilt when a source or header is newer
  test     pytest under qemu-aarch64 with the arguments after `--`; a process the tests start with
           sys.executable runs emulated too (sys.executable is a wrapper that starts qemu)

The host needs debootstrap, dpkg, qemu-user and g++-aarch64-linux-gnu (the Makefile installs them).
Speed under emulation says nothing about an ARM CPU: this checks results only.

    python tools/aarch64_emulated.py [--dir build/aarch64] [-- pytest arguments]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEBIAN = ("bookworm", "http://deb.debian.org/debian")
PYTHON = "python3.11"  # bookworm's; the wheels below are for it
# The newest torch whose aarch64 wheel on PyPI is a CPU build: from 2.11 on, PyPI's aarch64 wheels are
# CUDA builds whose libtorch_cpu needs CUDA's libraries (libcudart, libcupti) to load, and cuDNN's
# aarch64 wheel is not on the registry. setup.py's floor (2.11) is for x86-64, where CI tests it.
AARCH64_TORCH = "torch==2.10.0"
# torch's dependencies, triton (setup.py requires it on Linux; 3.6.0 is torch 2.10's), setuptools (for
# torch.compile's C++ builds) and the test tools.
PACKAGES = ["filelock", "typing-extensions", "sympy", "networkx", "jinja2", "fsspec", "numpy", "triton==3.6.0",
            "setuptools", "pytest", "hypothesis"]
CXX = os.environ.get("AARCH64_CXX", "aarch64-linux-gnu-g++")
# setup.py's compiler_flags() for Linux, plus what torch's BuildExtension adds for an extension.
CXX_FLAGS = ["-std=c++17", "-O3", "-ffp-contract=off", "-fopenmp", "-fPIC", "-DNDEBUG", "-Wall", "-Werror",
             "-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C"]
EXTENSION = ROOT / "perceiver_fast" / "_C.cpython-311-aarch64-linux-gnu.so"


def run(command: list, **kwargs) -> None:
    subprocess.run([str(c) for c in command], check=True, **kwargs)


DONE = ".perceiver-fast-done"  # written when a step has finished, so an interrupted one starts over


def make_sysroot(sysroot: Path) -> None:
    if (sysroot / DONE).exists():
        return
    shutil.rmtree(sysroot, ignore_errors=True)
    suite, mirror = DEBIAN
    run(["debootstrap", "--foreign", "--arch=arm64", "--variant=minbase", f"--include={PYTHON},lib{PYTHON}-dev",
         suite, sysroot, mirror], stdout=subprocess.DEVNULL)
    # The first stage unpacks only the essential packages; the rest wait for a second stage run inside
    # the system, which needs binfmt_misc: unpacking them is all the tests need.
    for deb in sorted((sysroot / "var" / "cache" / "apt" / "archives").glob("*.deb")):
        run(["dpkg", "-x", deb, sysroot])
    (sysroot / DONE).touch()


def make_site(site: Path) -> None:
    if (site / DONE).exists():
        return
    shutil.rmtree(site, ignore_errors=True)
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--target", site, "--only-binary=:all:",
           "--platform", "manylinux_2_28_aarch64", "--python-version", "3.11", "--implementation", "cp"]
    # Without its dependencies: pip judges their markers by this machine, and torch's x86-64 ones are CUDA's.
    run([*pip, "--no-deps", AARCH64_TORCH])
    run([*pip, "--upgrade", *PACKAGES])
    (site / DONE).touch()


def extension_sources() -> list[Path]:
    """setup.py's CPU extension: every csrc/ .cpp but the CUDA binding."""
    return sorted(p for p in (ROOT / "csrc").rglob("*.cpp") if p.name != "cuda_binding.cpp")


def build(sysroot: Path, site: Path, objects: Path) -> None:
    include = sysroot / "usr" / "include"
    torch_dir = site / "torch"
    includes = [f"-isystem{p}" for p in (torch_dir / "include", torch_dir / "include" / "torch" / "csrc" / "api" / "include",
                                          include / PYTHON, include)]
    newest_header = max(p.stat().st_mtime for p in (ROOT / "csrc").rglob("*.h"))
    objects.mkdir(parents=True, exist_ok=True)

    def compile_one(source: Path) -> Path:
        obj = objects / (source.relative_to(ROOT / "csrc").as_posix().replace("/", "_") + ".o")
        if not obj.exists() or obj.stat().st_mtime < max(source.stat().st_mtime, newest_header):
            print(f"aarch64 {source.relative_to(ROOT)}", flush=True)
            run([CXX, *CXX_FLAGS, *includes, "-c", source, "-o", obj])
        return obj

    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        built = list(pool.map(compile_one, extension_sources()))
    run([CXX, "-shared", "-fopenmp", *built, f"-L{torch_dir / 'lib'}", "-lc10", "-ltorch", "-ltorch_cpu",
         "-ltorch_python", "-o", EXTENSION])


def python_wrapper(folder: Path, sysroot: Path) -> Path:
    """An x86-64 script that runs the aarch64 Python under qemu, and names itself as its argv[0], so that
    sys.executable is the script and subprocesses of the tests are emulated as well."""
    folder.mkdir(parents=True, exist_ok=True)
    wrapper = folder / "python3"
    wrapper.write_text(f'#!/bin/sh\nexec qemu-aarch64 -L "{sysroot}" -0 "$0" "{sysroot}/usr/bin/{PYTHON}" "$@"\n')
    wrapper.chmod(0o755)
    return wrapper


def compiler_wrapper(folder: Path, sysroot: Path) -> Path:
    """The cross compiler for torch.compile's C++ code. It asks for -march=native, which a cross compiler
    cannot resolve: aarch64's baseline (NEON) instead. Python.h includes the multiarch pyconfig.h from
    the system's include folder, the sysroot's here: searched after the compiler's own."""
    wrapper = folder / "cxx"
    wrapper.write_text(f'#!/bin/bash\nexec "{CXX}" "${{@/#-march=native/-march=armv8-a}}" -idirafter "{sysroot}/usr/include"\n')
    wrapper.chmod(0o755)
    return wrapper


def test(sysroot: Path, site: Path, wrapper: Path, pytest_args: list[str]) -> int:
    # PYTHONHOME: the interpreter's argv[0] is the wrapper, so it cannot find its library by itself.
    # PYTHONPATH: this tree too, for the tests' subprocesses, which start outside it. CXX: torch.compile's
    # C++ code built by the cross compiler (this machine's g++ would build x86-64 code).
    env = {**os.environ, "PYTHONHOME": str(sysroot / "usr"), "PYTHONPATH": f"{ROOT}{os.pathsep}{site}",
           "CXX": str(compiler_wrapper(wrapper.parent, sysroot))}
    for name in ("TRITON_INTERPRET", "VIRTUAL_ENV"):
        env.pop(name, None)
    command = [str(wrapper), "-m", "pytest", "-p", "no:cacheprovider", *pytest_args]
    return subprocess.run(command, cwd=ROOT, env=env).returncode


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=ROOT / "build" / "aarch64",
                        help="where the sysroot, the aarch64 packages and the objects go (default build/aarch64)")
    parser.add_argument("pytest_args", nargs="*", help="after --: the tests and pytest's options")
    args = parser.parse_args(argv)
    folder = args.dir.resolve()
    sysroot, site = folder / "sysroot", folder / "site"
    for name, step in (("sysroot", lambda: make_sysroot(sysroot)), ("site", lambda: make_site(site)),
                       ("build", lambda: build(sysroot, site, folder / "objects"))):
        start = time.perf_counter()
        step()
        print(f"aarch64 {name}: {time.perf_counter() - start:.0f} s", flush=True)
    start = time.perf_counter()
    code = test(sysroot, site, python_wrapper(folder / "bin", sysroot), args.pytest_args or ["-q", "tests"])
    print(f"aarch64 test: {time.perf_counter() - start:.0f} s (qemu-aarch64, exit code {code})", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
