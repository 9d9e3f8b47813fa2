"""benchmarks/layout_floors.py's copy kernel moves what it claims (Triton's interpreter on CPU where
Triton is installed; the timing itself needs a GPU)."""
import pytest
import torch

from helpers import load_benchmark


@pytest.mark.parametrize("T", (1, 3))
def test_every_pattern_copies_its_rows(monkeypatch, T):
    pytest.importorskip("triton", reason="Triton is not installed (the floors' copy kernel is a Triton kernel)")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    module = load_benchmark("layout_floors")
    monkeypatch.setattr(module, "HV", 2)
    monkeypatch.setattr(module, "D", 16)
    kernel = module._kernel()
    gen = torch.Generator().manual_seed(1)
    found = module.patterns(5, T, torch.float32, 8, "cpu", gen)
    assert [p[0] for p in found] == (["packed", "padded"] if T == 1 else ["buffer", "token slots"])
    for name, writes, src, dst, src_slots, dst_slots in found:
        before = src.clone()
        if src.data_ptr() != dst.data_ptr():
            dst.fill_(float("nan"))
        module.copy_rows(kernel, src, dst, src_slots, dst_slots, writes, (8, 4))
        module.check(before, dst, src_slots, dst_slots, writes)
        if name == "padded":
            assert src.stride(2) == 16 + 8
        if name == "token slots":  # the other slots of the pool keep their states
            others = torch.ones(src.shape[0], dtype=torch.bool)
            others[dst_slots.long()] = False
            assert torch.equal(dst[others], before[others])


def test_no_gpu_says_so(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert load_benchmark("layout_floors").main([]) == 2
    assert "no CUDA device" in capsys.readouterr().err
