"""benchmarks/stage_flashinfer_fused.py: FlashInfer's fused decode step from a wheel into a stripped install."""
import zipfile

import pytest

from helpers import load_benchmark


def test_stages_only_the_fused_step_and_keeps_what_is_there(tmp_path):
    wheel = tmp_path / "flashinfer_python-0.7.2.post1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("flashinfer/gdn_kernels/experimental/gdn_fused_decode.py", "def gdn_fused_decode_step(): ...\n")
        zf.writestr("flashinfer/gdn_kernels/experimental/kernel/__init__.py", "")
        zf.writestr("flashinfer/trace/templates/gdn.py", "T = 1\n")
        zf.writestr("flashinfer/fi_trace.py", "new\n")
        zf.writestr("flashinfer/gdn_decode.py", "from the wheel\n")  # not part of the fused step
    site = tmp_path / "site"
    module = load_benchmark("stage_flashinfer_fused")
    with pytest.raises(SystemExit, match="no flashinfer package"):
        module.main([str(wheel), str(site)])
    (site / "flashinfer").mkdir(parents=True)
    (site / "flashinfer" / "gdn_decode.py").write_text("stripped\n")
    (site / "flashinfer" / "fi_trace.py").write_text("kept\n")
    assert module.stage(wheel, site) == 3
    assert (site / "flashinfer/gdn_kernels/experimental/gdn_fused_decode.py").read_text().startswith("def gdn_fused")
    assert (site / "flashinfer/gdn_kernels/experimental/kernel/__init__.py").exists()
    assert (site / "flashinfer/trace/templates/gdn.py").read_text() == "T = 1\n"
    assert (site / "flashinfer/fi_trace.py").read_text() == "kept\n"
    assert (site / "flashinfer/gdn_decode.py").read_text() == "stripped\n"
    assert module.stage(wheel, site) == 0  # a second run writes nothing
