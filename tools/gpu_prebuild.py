"""The extension prebuilt for the GPU machine, so that no GPU minute goes to compiling: `make gpu-prebuild`.

The GPU machine runs Python 3.12 with torch 2.11.0+cu130 and reaches no package index. `make gpu-prebuild`
installs this tree into an environment with that Python and torch (.venv-gpu-machine) with its CUDA kernels
built for sm_90a, then runs this tool with that environment's Python:

    python tools/gpu_prebuild.py           # keep the installed extension in .gpu-prebuilt/ and check it
    python tools/gpu_prebuild.py --check   # check what .gpu-prebuilt/ holds against this tree and Python

.gpu-prebuilt/ holds the extension, stripped of debug information, and manifest.json: the Python
tag, torch and CUDA versions, the arch and a hash of the sources it was built from. `make gpu` (tools/gpu_run.py)
installs it in place of a build when `verdict` finds it matches the running Python, torch, GPU and
sources. The checks: it matches here, it loads beside this torch with its CUDA functions, it is small enough
to travel with a run, and cuobjdump finds an sm_90 cubin of every `__global__` kernel of csrc/cuda.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.machinery
import importlib.util
import json
import re
import shutil
import subprocess
import sys
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PREBUILT = ROOT / ".gpu-prebuilt"
MANIFEST = "manifest.json"
ARCH = "sm_90a"  # the H100 and H200: wgmma and setmaxnreg need the "a" target
# What travels to the GPU machine is capped at 64 MiB, the tree included.
MAX_BYTES = 16 * 2**20
CUDA_FUNCTIONS = ("cuda_attention_forward", "cuda_attention_backward")


SOURCE_SUFFIXES = (".cpp", ".h", ".cu", ".cuh")  # what setup.py builds from; a stray file in csrc/ may not travel


def sources_digest(root: Path = ROOT) -> str:
    """sha256 over setup.py and every C++ and CUDA source, names and contents: what the extension is built from."""
    digest = hashlib.sha256()
    files = [root / "setup.py", *sorted(p for p in (root / "csrc").rglob("*") if p.suffix in SOURCE_SUFFIXES)]
    for path in files:
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def read_manifest(folder: Path | None = None) -> dict | None:
    path = (folder or PREBUILT) / MANIFEST
    return json.loads(path.read_text()) if path.exists() else None


def verdict(manifest: dict | None, torch_version: str, capability: tuple[int, int] | None,
            digest: str | None = None) -> str | None:
    """None when the prebuilt extension of `manifest` can run here (this Python, this torch, a Hopper GPU or
    none, these sources), else why not, in words."""
    if manifest is None:
        return f"no prebuilt extension in {PREBUILT.name}/ (make gpu-prebuild makes one)"
    own = "_C" + importlib.machinery.EXTENSION_SUFFIXES[0]  # what this Python's `import perceiver_fast._C` loads first
    if manifest["extension"] != own:
        return f"built for another Python ({manifest['extension']}); this one loads {own}"
    if manifest["torch"] != torch_version:
        return f"built against torch {manifest['torch']}; this is torch {torch_version}"
    if capability is not None and capability != (9, 0):
        return f"built for {manifest['arch']}; this GPU is sm_{capability[0]}{capability[1]}"
    if manifest["sources"] != (digest or sources_digest()):
        return "built from other sources: csrc/ or setup.py changed since (make gpu-prebuild again)"
    return None


def install(manifest: dict, folder: Path | None = None, package: Path = ROOT / "perceiver_fast") -> Path:
    """Copies the prebuilt extension of `folder` (.gpu-prebuilt/) into the tree's package, where
    `import perceiver_fast` finds it."""
    target = package / manifest["extension"]
    shutil.copy2((folder or PREBUILT) / manifest["extension"], target)
    return target


def installed_extension() -> Path:
    """The extension that `pip install .` put into this Python's site-packages (this file's folder, not the
    tree, is first on sys.path)."""
    spec = importlib.util.find_spec("perceiver_fast._C")
    if spec is None or spec.origin is None:
        raise SystemExit("gpu_prebuild: this Python has no perceiver_fast._C installed (make gpu-prebuild installs it)")
    origin = Path(spec.origin)
    if origin.parent == ROOT / "perceiver_fast":
        raise SystemExit(f"gpu_prebuild: {origin} is the tree's own build, not the installed one")
    return origin


def keep(extension: Path) -> dict:
    """Copies `extension`, stripped of debug information, into .gpu-prebuilt/ with its manifest."""
    import torch

    shutil.rmtree(PREBUILT, ignore_errors=True)
    PREBUILT.mkdir()
    target = PREBUILT / extension.name
    subprocess.run(["strip", "--strip-debug", "-o", str(target), str(extension)], check=True)
    nvcc = subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout.strip().splitlines()
    manifest = {"extension": extension.name, "python": sys.version.split()[0], "torch": torch.__version__,
                "cuda": torch.version.cuda, "arch": ARCH, "nvcc": nvcc[-1] if nvcc else None,
                "sources": sources_digest(), "built": date.today().isoformat()}
    (PREBUILT / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def kernel_names(root: Path = ROOT) -> set[str]:
    """The `__global__` functions of csrc/cuda."""
    pattern = re.compile(r"__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s+)?(\w+)\s*\(")
    return {name for path in (root / "csrc" / "cuda").glob("*.cu*") for name in pattern.findall(path.read_text())}


def cuobjdump() -> str | None:
    """cuobjdump from the CUDA toolkit, else the one triton carries."""
    found = shutil.which("cuobjdump")
    if found:
        return found
    spec = importlib.util.find_spec("triton")
    if spec is None or spec.origin is None:
        return None
    carried = Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(carried) if carried.exists() else None


def problems(manifest: dict | None) -> list[str]:
    """What is wrong with .gpu-prebuilt/ for the GPU machine, checked from here (no GPU needed)."""
    import torch

    why = verdict(manifest, torch.__version__, None)
    if why:
        return [why]
    found = []
    path = PREBUILT / manifest["extension"]
    if path.stat().st_size > MAX_BYTES:
        found.append(f"{path.name} is {path.stat().st_size / 2**20:.1f} MiB, over the {MAX_BYTES // 2**20} MiB it may "
                     f"take of what travels to the GPU machine")
    load = ("import importlib.util as u, sys, torch; s = u.spec_from_file_location('perceiver_fast._C', sys.argv[1]); "
            "m = u.module_from_spec(s); s.loader.exec_module(m); print(' '.join(dir(m)))")
    loaded = subprocess.run([sys.executable, "-c", load, str(path)], capture_output=True, text=True)
    if loaded.returncode != 0:
        found.append(f"{path.name} does not load beside torch {torch.__version__}: "
                     f"{(loaded.stderr.strip().splitlines() or ['?'])[-1]}")
    else:
        missing = [name for name in CUDA_FUNCTIONS if name not in loaded.stdout.split()]
        if missing:
            found.append(f"{path.name} lacks the CUDA binding's {', '.join(missing)}: built without its CUDA kernels")
    tool = cuobjdump()
    if tool is None:
        return found + ["no cuobjdump (CUDA toolkit or triton) to list the extension's cubins"]
    listed = subprocess.run([tool, "--list-elf", str(path)], capture_output=True, text=True).stdout
    if "sm_90" not in listed:
        found.append(f"no sm_90 cubin in {path.name} (cuobjdump --list-elf: {listed.strip() or 'nothing'})")
    symbols = subprocess.run([tool, "-symbols", str(path)], capture_output=True, text=True).stdout
    absent = sorted(name for name in kernel_names() if name not in symbols)
    if absent:
        found.append(f"kernels of csrc/cuda without machine code in {path.name}: {', '.join(absent)}")
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="only check what .gpu-prebuilt/ holds (default: keep the installed extension first)")
    args = parser.parse_args(argv)
    manifest = read_manifest() if args.check else keep(installed_extension())
    found = problems(manifest)
    for problem in found:
        print(f"gpu_prebuild: {problem}")
    if found:
        return 1
    size = (PREBUILT / manifest["extension"]).stat().st_size / 2**20
    print(f"gpu_prebuild: {PREBUILT.name}/{manifest['extension']} ({size:.1f} MiB): Python {manifest['python']}, "
          f"torch {manifest['torch']}, {manifest['arch']}, {len(kernel_names())} kernels with sm_90 machine code, "
          f"sources {manifest['sources'][:12]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
