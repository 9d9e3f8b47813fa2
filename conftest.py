"""Test markers: GPU tests skip cleanly (with the reason) without a supported GPU.

- @pytest.mark.gpu   needs a CUDA GPU that flashgdn supports (SM90, SM100, SM103)
- @pytest.mark.sm90  needs a Hopper GPU (what the kernels are verified on)
"""
import pytest


def _gpu_facts():
    try:
        import torch
    except ImportError:  # pragma: no cover
        return None, "torch is not installed"
    if not torch.cuda.is_available():
        return None, "no CUDA GPU available"
    cc = torch.cuda.get_device_capability()
    return cc, None


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU supported by flashgdn (SM90/SM100/SM103)")
    config.addinivalue_line("markers", "sm90: needs a Hopper (SM90) GPU")


def pytest_collection_modifyitems(config, items):
    cc, why = _gpu_facts()
    if cc is not None:  # flashgdn.device needs torch, which _gpu_facts has found
        from flashgdn.device import SUPPORTED_ARCHS
    for item in items:
        if "gpu" in item.keywords or "sm90" in item.keywords:
            if cc is None:
                item.add_marker(pytest.mark.skip(reason=why))
            elif "sm90" in item.keywords and cc != (9, 0):
                item.add_marker(pytest.mark.skip(reason=f"needs SM90, this GPU is SM{cc[0]}{cc[1]}"))
            elif cc not in SUPPORTED_ARCHS:
                item.add_marker(pytest.mark.skip(reason=f"SM{cc[0]}{cc[1]} is not supported by flashgdn"))


@pytest.fixture(autouse=True)
def _fresh_fast_path(monkeypatch):
    """Each test starts with no remembered fast keys (flashgdn.fastpath), so that the kernels one
    test stubs never serve another test's calls."""
    from flashgdn import fastpath

    monkeypatch.setattr(fastpath, "FAST", {})
