"""Devices no fused backend serves (mps, xpu; here the meta device stands in for them), and an
installation whose compiled extension does not load."""

import logging
import tempfile
import subprocess
import sys
import textwrap

import pytest
import torch

import perceiver_fast as pf

STAND_IN = "meta"  # a device torch runs plain ops on and none of the library's kernels do
DEVICES = [STAND_IN] + (["mps"] if torch.backends.mps.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_reference_backend_runs_on_any_device(device):
    q, k = torch.randn(2, 3, 5, 8, device=device), torch.randn(2, 3, 9, 8, device=device)
    v = torch.randn(2, 3, 9, 4, device=device)
    out = pf.cross_attention(q, k, v, key_mask=torch.ones(2, 9, dtype=torch.bool, device=device), causal=True)
    assert out.shape == (2, 3, 5, 4) and out.device.type == device
    verdicts = pf.explain(pf.cross_attention, q, k, v)
    assert verdicts["reference"] == [] and f"device {device} not supported" in verdicts["cpu"][0]
    weight = torch.randn(6, 8, device=device)
    assert pf.linear(q, weight, activation="gelu").shape == (2, 3, 5, 6)


def _lucidrains_lm():
    lucidrains = pytest.importorskip("perceiver_pytorch")
    return lucidrains.PerceiverLM(num_tokens=30, dim=24, depth=1, max_seq_len=40, num_latents=8, latent_dim=32,
                                  cross_heads=1, cross_dim_head=16, latent_heads=2, latent_dim_head=16).eval()


@pytest.mark.parametrize("device", DEVICES)
def test_patched_model_runs_the_library_code_where_no_fused_backend_does(device, caplog):
    from perceiver_fast.patching import registry

    registry._devices_logged.discard(device)
    patched, unpatched = _lucidrains_lm(), _lucidrains_lm()
    pf.patch(patched)
    tokens = torch.randint(0, 30, (2, 40), device=device)
    with caplog.at_level(logging.INFO, logger="perceiver_fast.patching"):
        outputs = [patched.to(device)(tokens) for _ in range(2)]
    want = unpatched.to(device)(tokens)
    assert all(out.shape == want.shape and out.device.type == device for out in outputs)
    lines = [r.getMessage() for r in caplog.records if "no fused backend" in r.getMessage()]
    assert lines == [f"pf.patch: no fused backend runs on {device}; the patched modules run the library's own "
                     f"computation there"]


def _import_in_subprocess(prelude: str) -> str:
    script = "import sys, warnings\n" + prelude + textwrap.dedent("""
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import perceiver_fast as pf
            import torch
        messages = [str(w.message) for w in caught if w.category.__name__ == "ExtensionWarning"]
        assert len(messages) == 1, messages
        print(messages[0])
        q = torch.randn(1, 1, 4, 8)
        print(pf.explain(pf.cross_attention, q, q, q)["cpu"][0])
        assert pf.cross_attention(q, q, q).shape == (1, 1, 4, 8)  # the reference runs it
        from perceiver_fast.installation import installation_report
        print("\\n".join(installation_report()))
    """)
    # Run away from the source tree, so that it imports the installed package (make test-packaging's wheel).
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tempfile.gettempdir())
    assert result.returncode == 0, result.stderr
    return result.stdout


def _extension_failing_with(error: str) -> str:
    """The prelude of a process whose perceiver_fast._C import raises `error` (Python source)."""
    return textwrap.dedent(f"""
        import importlib.abc, importlib.util
        class Failing(importlib.abc.MetaPathFinder, importlib.abc.Loader):
            def find_spec(self, name, path, target=None):
                return importlib.util.spec_from_loader(name, self) if name == "perceiver_fast._C" else None
            def create_module(self, spec):
                raise {error}
            def exec_module(self, module):
                pass
        sys.meta_path.insert(0, Failing())
    """)


def test_extension_that_does_not_load_is_named_once_with_its_cause():
    # An extension built against another torch: its load fails on a symbol this torch lacks.
    prelude = _extension_failing_with('ImportError("_C.so: undefined symbol: _ZN3c104impl3cow11cow_deleterEPv")')
    warning, explained, *report = _import_in_subprocess(prelude).splitlines()
    cause = "the C++ extension perceiver_fast._C does not load: _C.so: undefined symbol"
    assert warning.startswith(cause) and "built against another torch" in warning and explained.startswith(cause)
    assert report[1].startswith(f"extension: not loaded: {cause}")
    assert "pip install --no-build-isolation ." in warning


def test_extension_not_built_says_how_to_build_it():
    # What Python raises where the package has no _C file (before this message it read "circular import").
    prelude = _extension_failing_with('ModuleNotFoundError("No module named \'perceiver_fast._C\'", '
                                      'name="perceiver_fast._C")')
    out = _import_in_subprocess(prelude)
    warning, explained, *report = out.splitlines()
    cause = "the C++ extension perceiver_fast._C is not built"
    assert warning.startswith(cause) and explained.startswith(cause)
    assert report[1].startswith(f"extension: not loaded: {cause}")
    assert "pip install --no-build-isolation ." in warning and "circular import" not in out


def test_info_command_reports_the_installation():
    result = subprocess.run([sys.executable, "-m", "perceiver_fast.cli", "info"], capture_output=True, text=True,
                            cwd=tempfile.gettempdir())
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"perceiver-fast {pf.__version__}, torch {torch.__version__}")
    assert lines[1].startswith("extension: loaded") and "backend cpu: available" in lines
