"""Checks a built wheel as installed in a fresh venv (make test-packaging): its metadata (triton only
where it has wheels, the torch floor CI tests) and that the installed package, not a source tree, is
what imports, with its compiled extension.

    python tools/check_wheel.py dist/perceiver_fast-*.whl
"""

from __future__ import annotations

import sys
import zipfile
from email.parser import Parser
from pathlib import Path

TESTED_TORCH_FLOOR = "torch>=2.11"  # the Makefile's OLDEST_TORCH: the oldest torch CI runs


def requirements(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        metadata = Parser().parsestr(archive.read(name).decode())
        assert any(n.startswith("perceiver_fast/_C") for n in archive.namelist()), "the wheel has no perceiver_fast._C"
    return metadata.get_all("Requires-Dist") or []


def main(wheel: str) -> int:
    required = [r.replace(" ", "") for r in requirements(Path(wheel))]
    triton = [r for r in required if r.startswith("triton")]
    assert triton == ['triton>=3.6;platform_system=="Linux"'], f"triton must be required on Linux only: {triton}"
    assert TESTED_TORCH_FLOOR in required, f"the torch floor must be the one CI tests ({TESTED_TORCH_FLOOR}): {required}"

    import perceiver_fast
    from perceiver_fast import extension

    where = Path(perceiver_fast.__file__).resolve()
    assert Path(sys.prefix).resolve() in where.parents, f"perceiver_fast imported from {where}, not the venv"
    assert extension.compiled is not None, extension.LOAD_ERROR
    print(f"{Path(wheel).name}: requires {', '.join(required)}; imports from {where.parent}, extension loaded")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
