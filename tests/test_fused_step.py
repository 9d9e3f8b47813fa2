"""CPU tests of gdn_fused_decode_step: the composed reference against flashgdn's decode reference
and a step-by-step conv, and the argument checks (clear errors, nothing written)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import flashgdn
from flashgdn import api, fused_step
from flashgdn import validation as val
from flashgdn.kernels import policy
from flashgdn.spec import SYNC_WORDS, KernelArgs
from flashgdn import reference as ref
from helpers import BF16, clone_fused, load_benchmark, make_fused_inputs

GEOMETRY = dict(B=3, H=2, HV=4, D=64, hidden=128)


def _conv_by_hand(x, weight, bias, state):
    """The causal conv1d update of one row, written out: y = silu(sum_j window[j] w[j] + bias)."""
    W = weight.shape[1]
    acc = torch.zeros(x.shape, dtype=torch.float64)
    for j in range(W - 1):
        acc += state[:, j].double() * weight[:, j].double()
    acc += x.double() * weight[:, W - 1].double()
    if bias is not None:
        acc += bias.double()
    return F.silu(acc).to(BF16), torch.cat([state[:, 1:], x[:, None]], 1)


@pytest.mark.parametrize("layout", ["SD", "DS"])
@pytest.mark.parametrize("width,bias", [(4, True), (2, False), (3, True)])
def test_reference_composes_the_steps(layout, width, bias):
    kw = make_fused_inputs(**GEOMETRY, width=width, bias=bias, conv_layout=layout, slots=[4, -1, 0], P=6, seed=3)
    expect = clone_fused(kw)
    out, conv_state, ssm_state = ref.gdn_fused_decode_step(**kw, compute_dtype=torch.float64)
    assert conv_state is kw["conv_state"] and ssm_state is kw["ssm_state"]
    assert out.shape == (3, 1, 4, 64) and out.dtype == BF16

    H, HV, D = 2, 4, 64
    ba = (expect["hidden_states"].double() @ expect["w_ba"].double()).to(BF16)
    y = torch.zeros_like(expect["mixed_qkv"])
    for i, slot in enumerate([4, -1, 0]):
        if slot < 0:
            continue
        st = expect["conv_state"][slot]
        y[i], new = _conv_by_hand(expect["mixed_qkv"][i], expect["conv_weight"], expect["conv_bias"], st)
        expect["conv_state"][slot] = new
    q = y[:, : H * D].view(3, 1, H, D)
    k = y[:, H * D : 2 * H * D].view(3, 1, H, D)
    v = y[:, 2 * H * D :].view(3, 1, HV, D)
    o, _ = ref.gated_delta_rule_decode_pretranspose(
        q, k, v, None, expect["A_log"], ba[:, None, HV:], expect["dt_bias"], ba[:, None, :HV],
        initial_state=expect["ssm_state"], initial_state_indices=expect["state_indices"],
        compute_dtype=torch.float64,
    )
    torch.testing.assert_close(out, o, atol=0, rtol=0)
    assert torch.equal(conv_state, expect["conv_state"])
    assert torch.equal(ssm_state, expect["ssm_state"])
    assert torch.equal(out[1], torch.zeros_like(out[1]))  # padding row
    # Slots no row names are untouched (conv_state: 1, 2, 3, 5).
    for s in (1, 2, 3, 5):
        assert torch.equal(conv_state[s], make_fused_inputs(**GEOMETRY, width=width, bias=bias, conv_layout=layout,
                                                            slots=[4, -1, 0], P=6, seed=3)["conv_state"][s])


def test_reference_scale_zero_means_default():
    kw = make_fused_inputs(**GEOMETRY, seed=5)
    a = ref.gdn_fused_decode_step(**{**clone_fused(kw), "scale": 0.0})[0]
    b = ref.gdn_fused_decode_step(**{**clone_fused(kw), "scale": 64 ** -0.5})[0]
    assert torch.equal(a, b)


def test_reference_index_past_the_pools_is_nan_and_touches_nothing():
    kw = make_fused_inputs(**GEOMETRY, slots=[1, 7, 2], P=7, seed=6)
    before = clone_fused(kw)
    out = ref.gdn_fused_decode_step(**kw)[0]
    assert torch.isnan(out[1]).all() and not torch.isnan(out[0]).any()
    for s in (0, 3, 4, 5, 6):
        assert torch.equal(kw["conv_state"][s], before["conv_state"][s])
        assert torch.equal(kw["ssm_state"][s], before["ssm_state"][s])


# ----------------------------------------------------------------------------- argument checks


def _valid():
    return make_fused_inputs(**GEOMETRY, P=7, seed=1)


def _expect(kw, exc, match):
    before = {n: t.clone() for n, t in kw.items() if isinstance(t, torch.Tensor)}
    with pytest.raises(exc, match=match):
        flashgdn.gdn_fused_decode_step(**kw)
    for n, t in before.items():
        assert torch.equal(kw[n], t), f"{n} changed by a call that failed validation"


def test_valid_cpu_call_fails_only_on_the_device():
    _expect(_valid(), ValueError, "must be a CUDA tensor")


BAD = [
    ("hidden_states", lambda kw: kw["hidden_states"].float(), TypeError, "hidden_states must have dtype bfloat16"),
    ("hidden_states", lambda kw: kw["hidden_states"][:, :96], ValueError, r"hidden\) must be a positive multiple of 64"),
    ("w_ba", lambda kw: kw["w_ba"][:, :6], ValueError, r"w_ba must have shape \[128, 8\]"),
    ("w_ba", lambda kw: kw["w_ba"].t().contiguous().t(), ValueError, "w_ba must have its last dim contiguous"),
    ("mixed_qkv", lambda kw: kw["mixed_qkv"][:, :-64], ValueError, "mixed_qkv must have shape .* does not split"),
    ("mixed_qkv", lambda kw: kw["mixed_qkv"][:2], ValueError, r"mixed_qkv must have shape \[3, \*\]"),
    ("conv_weight", lambda kw: torch.zeros(512, 5, dtype=BF16), ValueError, "conv width.* must be one of"),
    ("conv_bias", lambda kw: kw["conv_bias"].float(), TypeError, "conv_bias must have dtype bfloat16"),
    ("conv_state", lambda kw: kw["conv_state"][:, :, :2], ValueError, r"conv_state must have shape \[\*, 512, 3\]"),
    ("conv_state", lambda kw: kw["conv_state"][:5], ValueError, "same number of slots"),
    ("conv_state", lambda kw: kw["conv_state"][:1].expand(7, -1, -1), ValueError, "conv_state must not overlap itself"),
    ("ssm_state", lambda kw: kw["ssm_state"].half(), TypeError, "ssm_state must have dtype"),
    ("ssm_state", lambda kw: kw["ssm_state"][..., :32], ValueError, r"ssm_state must have shape \[P, HV=4, D, D\]"),
    ("A_log", lambda kw: kw["A_log"].to(BF16), TypeError, "A_log must have dtype float32"),
    ("dt_bias", lambda kw: kw["dt_bias"][:3], ValueError, r"dt_bias must have shape \[4\]"),
    ("state_indices", lambda kw: kw["state_indices"].long(), TypeError, "state_indices must have dtype int32"),
    ("state_indices", lambda kw: kw["state_indices"][:2], ValueError, r"state_indices must have shape \[3\]"),
    ("out", lambda kw: torch.ones(3, 1, 4, 64), TypeError, "out must have dtype bfloat16"),
    ("out", lambda kw: torch.ones(3, 4, 64, dtype=BF16), ValueError, r"out must have shape \[3, 1, 4, 64\]"),
    ("scale", lambda kw: "0.1", TypeError, "scale must be a float or None"),
    ("scale", lambda kw: float("nan"), ValueError, "scale must be finite"),
]


@pytest.mark.parametrize("name,make,exc,match", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_argument_raises_naming_it(name, make, exc, match):
    kw = _valid()
    kw[name] = make(kw)
    _expect(kw, exc, match)


def test_misaligned_w_ba_rows():
    kw = _valid()
    wide = torch.randn(128, 12).to(BF16)
    kw["w_ba"] = wide[:, 2:10]  # row stride 12: not a multiple of the 8-column blocks
    _expect(kw, ValueError, "w_ba row stride must be a multiple of 8 elements")


def test_workspace_is_reused_and_grows_by_doubling(monkeypatch):
    monkeypatch.setattr(fused_step, "_WORKSPACES", {})
    monkeypatch.setattr(fused_step, "_current_stream", lambda device: 7)
    cpu = torch.device("cpu")
    H, HV, D = 2, 4, 64  # qkv_dim 512
    q1, b1, s1 = fused_step._workspace(cpu, 3, H, HV, D, 0, counters=True)
    q2, b2, s2 = fused_step._workspace(cpu, 16, H, HV, D, 0, counters=True)
    assert q1.data_ptr() == q2.data_ptr() and q2.shape == (16, 512) and b2.shape == (16, 8)
    assert q1.shape == (3, 512) and b1.shape == (3, 8)
    # the one-launch step's counters: zero, one tensor for every batch of the stream's workspace
    assert s1 is s2 and s1.dtype == torch.int32 and s1.tolist() == [0] * SYNC_WORDS
    assert all(x is y for x, y in zip(fused_step._workspace(cpu, 3, H, HV, D, 0, True), (q1, b1, s1)))  # sliced once
    q3, _, s3 = fused_step._workspace(cpu, 17, H, HV, D, 0, True)
    assert s3 is not s1 and s3.tolist() == [0] * SYNC_WORDS  # a grown workspace: new counters, zero
    assert q3.data_ptr() != q1.data_ptr() and fused_step._WORKSPACES[(cpu, 7, 512, 4, 0, True)].qkv.shape[0] == 32
    assert fused_step._workspace(cpu, 5, H, HV, D, 0, True)[0].data_ptr() == q3.data_ptr()
    # a two-launch step's workspace is another, its counters never read: set by no fill (a CUDA graph captured on a
    # stream new to the step would replay a fill kernel with every call)
    monkeypatch.setattr(torch, "zeros", lambda *a, **k: pytest.fail("a two-launch workspace filled its counters"))
    q4, _, s4 = fused_step._workspace(cpu, 5, H, HV, D, 0)
    assert q4.data_ptr() != q3.data_ptr() and s4 is not s3 and s4.shape == (SYNC_WORDS,)
    monkeypatch.setattr(fused_step, "_current_stream", lambda device: 8)  # another stream: its own workspace
    assert fused_step._workspace(cpu, 5, H, HV, D, 0)[0].data_ptr() != q4.data_ptr()


def test_workspace_of_partial_sums_feeds_the_decode_their_views(monkeypatch):
    """With the split projection (policy.ConvGateConfig.partial_sums) the workspace holds fp32
    partial sums [parts, rows, 2 HV], a workspace of its own beside the bf16 one; the decode's a and
    b are [parts, B, 1, HV] views of it (b the first HV columns, a the rest), which api.kernel_spec
    reads as KernelSpec.gate_parts."""
    from flashgdn.device import DeviceFacts

    monkeypatch.setattr(fused_step, "_WORKSPACES", {})
    monkeypatch.setattr(fused_step, "_current_stream", lambda device: 7)
    cpu = torch.device("cpu")
    H, HV, D, B = 2, 4, 64, 3
    qkv, ba, _ = fused_step._workspace(cpu, B, H, HV, D, 5)
    q, k, v, a, b = fused_step._decode_views(B, H, HV, D, qkv, ba)
    assert [t.shape for t in (q, k, v)] == [(B, 1, H, D), (B, 1, H, D), (B, 1, HV, D)]
    assert ba.dtype == torch.float32 and ba.shape == (5, B, 2 * HV) and a.shape == b.shape == (5, B, 1, HV)
    assert fused_step._workspace(cpu, B, H, HV, D, 0)[1].data_ptr() != ba.data_ptr()
    ba.copy_(torch.arange(ba.numel(), dtype=torch.float32).reshape(ba.shape))
    assert torch.equal(b[:, :, 0], ba[:, :, :HV]) and torch.equal(a[:, :, 0], ba[:, :, HV:])
    args = KernelArgs(q, k, v, a, b, torch.zeros(HV), torch.zeros(HV), torch.zeros(8, HV, D, D),
                      state_indices=torch.zeros(B, dtype=torch.int32), output=torch.empty(B, 1, HV, D, dtype=BF16))
    p = val.Problem(B=B, T=1, H=H, HV=HV, K=D, V=D)
    spec = api.kernel_spec("klast", p, args, api.CallOptions(None, True), DeviceFacts("sm_90a", 132, "sm90-hbm3"))
    assert spec.gate_parts == 5 and spec.gate_dtype == "float32" and spec.row_form == "batch"


def test_a_table_setting_switches_the_table_for_its_block():
    """Inside `switched` the device's table has the setting's fields (an added dict's entries beside
    the table's own); on the way out it is the table again."""
    from flashgdn.bench.table_setting import parse_setting, switched
    from flashgdn.cache import CompileCache
    from flashgdn.kernels import policy

    table = policy.DEVICE_TABLES["sm90-hbm3e"]
    setting = parse_setting("prefetch_bytes+={'commit': 3},conv_gate_rows=2")
    with switched("sm90-hbm3e", setting, CompileCache(lambda spec: None)):
        inside = policy.DEVICE_TABLES["sm90-hbm3e"]
        assert inside.prefetch_bytes == {**table.prefetch_bytes, "commit": 3} and inside.conv_gate_rows == 2
        assert inside.tiles == table.tiles
    assert policy.DEVICE_TABLES["sm90-hbm3e"] is table


def test_table_settings_name_table_fields():
    """The timing scripts' settings (flashgdn.bench.table_setting) are DeviceTable fields with literal
    values, commas inside a literal included, and field+= adds a dict's entries to a dict field;
    anything else is a usage error."""
    import argparse

    from flashgdn.bench.table_setting import Added, label, parse_setting

    assert parse_setting("conv_gate_threads=256") == {"conv_gate_threads": 256}
    assert parse_setting("table") == {} and label({}) == "table"
    assert parse_setting("conv_gate_threads_small=None") == {"conv_gate_threads_small": None}
    assert parse_setting("fused_step_pdl=False") == {"fused_step_pdl": False}
    assert parse_setting("conv_gate_threads=512,conv_gate_prefetch=True") == {
        "conv_gate_threads": 512, "conv_gate_prefetch": True}
    both = "commit_mma_min_tokens={'float32': 8, 'bfloat16': 4},conv_gate_rows=2"
    assert parse_setting(both) == {"commit_mma_min_tokens": {"float32": 8, "bfloat16": 4}, "conv_gate_rows": 2}
    assert parse_setting(label(parse_setting(both))) == parse_setting(both)
    added = parse_setting("prefetch_bytes+={'commit': 4194304},conv_gate_rows=2")
    assert added == {"prefetch_bytes": {"commit": 4194304}, "conv_gate_rows": 2}
    assert isinstance(added["prefetch_bytes"], Added) and not isinstance(parse_setting(both)["conv_gate_rows"], Added)
    assert label(added) == "prefetch_bytes+={'commit': 4194304},conv_gate_rows=2" and parse_setting(label(added)) == added
    for bad, match in (("threads=256", "DeviceTable field"), ("conv_gate_threads", "DeviceTable field"),
                       ("conv_gate_threads=512,", "DeviceTable field"),
                       ("conv_gate_threads=many", "Python literal"),
                       ("conv_gate_rows+=2", "dict field"), ("prefetch_bytes+=4", "dict field")):
        with pytest.raises(argparse.ArgumentTypeError, match=match):
            parse_setting(bad)


def test_fused_table_without_a_gpu_says_so():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert load_benchmark("fused_table").main(["--settings", "conv_gate_threads=256"]) == 2  # times nothing
    assert load_benchmark("fused_timeline").main(["--settings", "table", "fused_step_pdl=False", "--graph"]) == 2
    assert load_benchmark("composed_parts").main(["--conv-configs"]) == 2


def test_composed_parts_times_each_conv_config_and_restores_the_autotuner(monkeypatch):
    """composed_parts.py --conv-configs: the composed path under each config of the conv kernel's
    autotuner alone, fastest first, then the config the autotuner picks by itself; its configs and
    cache are as they were afterwards."""
    import types

    module = load_benchmark("composed_parts")
    tuner = types.SimpleNamespace(configs=["c1", "c2", "c3"], cache={("old",): "c3"})

    def prepare(row, inp):
        def call():  # a tuner of one config runs it; of several, it picks c2
            tuner.cache[("key",)] = tuner.configs[0] if len(tuner.configs) == 1 else "c2"
        return call, None

    times = {"c1": 3.0, "c2": 1.0, "c3": 2.0}
    monkeypatch.setattr(module, "fla_conv_autotuner", lambda: tuner)
    monkeypatch.setattr(module, "fused_step_inputs", lambda row, device, seed: {})
    monkeypatch.setattr(module, "COMPOSED", types.SimpleNamespace(prepare=prepare))
    monkeypatch.setattr(module, "median_us", lambda call, iters: (call(), times[tuner.cache[("key",)]])[1])
    assert module.by_conv_config(None, 1, 0) == [(1.0, "c2"), (2.0, "c3"), (3.0, "c1"), ["c2"]]
    assert tuner.configs == ["c1", "c2", "c3"] and tuner.cache == {}


def test_fused_table_times_its_columns_in_turns(monkeypatch, capsys):
    """fused_table.py --rounds R: the columns (settings, composed, decode alone) timed in
    flashgdn.bench.timing.turns' order, each the median of its rounds."""
    from flashgdn.bench.timing import in_turns, turns

    assert list(turns(3, 3)) == [0, 1, 2, 2, 1, 0, 0, 1, 2]
    assert list(turns(2, 1)) == [0, 1]
    ran = []
    calls = [lambda: ran.append("a") or len(ran), lambda: ran.append("b") or len(ran)]
    assert in_turns(calls, 3) == [[1, 4, 5], [2, 3, 6]]
    assert ran == ["a", "b", "b", "a", "a", "b"]
    module = load_benchmark("fused_table")
    order = []
    times = {"step": iter([10.0, 30.0, 20.0]), "composed": iter([15.0, 45.0, 30.0])}

    def fake(name):
        def timed(*args):
            order.append(name)
            return next(times[name])
        return timed

    monkeypatch.setattr(module, "gpu_missing", lambda script: False)
    monkeypatch.setattr(module, "step_us", fake("step"))
    monkeypatch.setattr(module, "composed_us", fake("composed"))
    assert module.main(["--settings", "table", "--batch-size", "16", "--state-dtype", "bf16", "--composed",
                        "--rounds", "3"]) == 0
    assert order == ["step", "composed", "composed", "step", "step", "composed"]
    row = capsys.readouterr().out.splitlines()[-1].split()
    assert row[:3] == ["bf16", "16", "20.00"] and row[5] == "30.00"
    with pytest.raises(SystemExit):
        module.main(["--settings", "table", "--rounds", "0"])


def test_tune_times_its_shapes_in_turns(monkeypatch, capsys):
    """tune.py --rounds R: every CTA shape that builds, timed in turns (timing.turns), each the median
    of its pooled samples; a shape that does not fit reads nan."""
    import dataclasses
    import sys

    module = load_benchmark("tune")
    timed = []

    def build(spec, prefetch):
        if spec.tile == (8, 8, 8):
            raise ValueError("does not fit")
        return lambda *args, tile=spec.tile: timed.append(tile)

    def fake_time_fn(fn, iters):
        fn()
        return [float(len(timed))] * iters, "cupti"

    @dataclasses.dataclass(frozen=True)
    class Spec:  # a kernel spec's one field tune.py replaces
        tile: tuple = None

    monkeypatch.setattr(module, "facts_of", lambda device: None)
    monkeypatch.setattr(module, "_args", lambda *a: ())
    monkeypatch.setattr(module, "kernel_spec", lambda *a: Spec())
    monkeypatch.setattr(module, "_build", build)
    monkeypatch.setattr(module, "time_fn", fake_time_fn)
    monkeypatch.setattr(sys, "argv", ["tune.py", "--batch-size", "4", "--tiles", "(4,1,8),(8,8,8),(4,2,8)",
                                      "--rounds", "3", "--iters", "2"])
    module.main()
    assert timed == [(4, 1, 8), (4, 2, 8), (4, 2, 8), (4, 1, 8), (4, 1, 8), (4, 2, 8)]
    # (4, 1, 8): samples 1, 4, 5 (twice each); (4, 2, 8): 2, 3, 6.
    assert capsys.readouterr().out.splitlines()[-1].split() == ["4", "4.00", "nan", "3.00"]


def test_fused_timeline_summary():
    """Per kernel of a call its median duration, each later kernel's start after the first, and the
    call's span (µs), from (start, end, name) records in ns, and the first call's kernel names."""
    calls = [[(0, 5000, "conv"), (3000, 12000, "decode")], [(100, 4100, "conv"), (2100, 13100, "decode")],
             [(0, 6000, "conv"), (4000, 10000, "decode")]]
    assert load_benchmark("fused_timeline").summary(calls).split() == [
        "k0", "5.00", "k1", "9.00", "k1@", "3.00", "span", "12.00", "[conv", "|", "decode]"]


@pytest.mark.parametrize("regime, change, expected", [
    # The H200 table at large batch: 4 rows per gate CTA only for a w_ba of 512 KiB or more (this
    # one is 240 KiB).
    ("large", dict(conv_gate_threads=512), (512, 5, 3, 1, False)),
    ("large", dict(conv_gate_rows_min_bytes=0, conv_gate_prefetch=True), (128, 20, 3, 4, True)),
    ("large", dict(conv_gate_rows_min_bytes=240 << 10), (128, 20, 3, 4, False)),
    # At small batch: conv_gate_threads_small (None: conv_gate_threads) and one row per gate CTA.
    ("small", {}, (512, 5, 3, 1, False)),
    ("small", dict(conv_gate_threads_small=None, conv_gate_rows_min_bytes=0), (128, 20, 3, 1, False)),
    # The "gemm" regime: conv CTAs only (the projection is a cuBLAS GEMM), one row each, no prefetch.
    ("gemm", dict(conv_gate_rows_min_bytes=0, conv_gate_prefetch=True), (128, 20, 0, 1, False)),
    # The split regime: the small regime's CTA size, the split projection (3 column blocks padded to
    # 4 lanes: 128 rows a pass at 512 threads, 32 at 128), conv_gate_split_batch_rows, no prefetch.
    ("split", dict(conv_gate_split_rows=640, conv_gate_prefetch=True), (512, 5, 8, 1, False)),
    ("split", dict(conv_gate_threads_small=None, conv_gate_split_rows=640, conv_gate_split_batch_rows=2),
     (128, 20, 8, 2, False)),
    ("split", dict(conv_gate_split_rows=1700), (512, 5, 3, 1, False)),  # 1792 rows: a partial last slice
    ("split", dict(conv_gate_split_rows=0), (512, 5, 3, 1, False)),  # no slices: column-block gate CTAs
    ("split", dict(conv_gate_split_rows=1 << 20), (512, 5, 1, 1, False)),  # one slice of all 5120 rows
    # The other regimes never split.
    ("small", dict(conv_gate_split_rows=640), (512, 5, 3, 1, False)),
    ("large", dict(conv_gate_split_rows=640), (128, 20, 3, 1, False)),
    ("gemm", dict(conv_gate_split_rows=640), (128, 20, 0, 1, False)),
])
def test_conv_gate_settings_reach_the_build(monkeypatch, regime, change, expected):
    """A table's conv/gate CTA size (its CTA counts follow it) per regime, its batch rows per gate
    CTA (large regime, w_ba of conv_gate_rows_min_bytes or more) and the gate CTA's prefetch."""
    import dataclasses

    from flashgdn.kernels import policy
    from flashgdn.spec import ConvGateSpec

    spec = ConvGateSpec(H=4, HV=12, D=128, hidden=5120, width=4, has_bias=True, arch="sm_90a",
                        device_class="sm90-hbm3e", regime=regime)
    monkeypatch.setitem(policy.DEVICE_TABLES, "sm90-hbm3e", dataclasses.replace(policy.SM90_HBM3E, **change))
    config = policy.ConvGateConfig.for_spec(spec)
    assert (config.threads, config.conv_ctas, config.gate_ctas, config.gate_rows, config.gate_prefetch) == expected
    split = regime == "split" and change.get("conv_gate_split_rows", 256) > 0
    assert config.partial_sums == (config.gate_ctas if split else 0) and bool(config.split_rows) == split
    if split:
        assert config.split_rows % (config.threads // 4) == 0 and -(-5120 // config.split_rows) == config.gate_ctas


@pytest.mark.parametrize("table, hidden, HV, rows", [
    ("sm90-hbm3", 5120, 48, 2),  # Qwen3.5 TP1: a 960 KiB w_ba
    ("sm90-hbm3", 2048, 32, 1),  # Qwen3-Next TP1: 256 KiB
    ("sm90-hbm3e", 5120, 48, 1),  # the H200 table: one row at every size
])
def test_split_batch_rows_by_table_and_w_ba_size(table, hidden, HV, rows):
    """The tables' batch rows per split gate CTA: the H100's two from a 512 KiB w_ba
    (conv_gate_split_batch_rows_min_bytes), one below it; the H200's one."""
    from flashgdn.kernels import policy
    from flashgdn.spec import ConvGateSpec

    spec = ConvGateSpec(H=16, HV=HV, D=128, hidden=hidden, width=4, has_bias=False, arch="sm_90a",
                        device_class=table, regime="split")
    assert policy.ConvGateConfig.for_spec(spec).gate_rows == rows


def test_split_gate_rows_are_whole_passes():
    """A slice of the split projection is whole passes of threads // CBp rows (CBp: the row's column
    blocks padded to a power of two), at most those covering hidden; none where the padded blocks
    outnumber the threads."""
    from flashgdn.kernels.policy import split_gate_rows

    assert split_gate_rows(5120, 48, 512, 256) == 256  # 12 blocks -> 16 lanes, 32 rows a pass: 20 slices
    assert split_gate_rows(2048, 32, 512, 256) == 256  # 8 blocks, 64 rows a pass: 8 slices
    assert split_gate_rows(2048, 8, 512, 256) == 256  # 2 blocks, 256 rows a pass
    assert split_gate_rows(2048, 8, 512, 100) == 256  # never less than one pass
    assert split_gate_rows(192, 6, 128, 4096) == 192  # 12 columns in blocks of 4: 3 blocks -> 4 lanes
    assert split_gate_rows(5120, 48, 512, 0) == 0
    assert split_gate_rows(4096, 1024, 128, 256) == 0  # 256 blocks, 128 threads


def test_step_spec_pairs_one_conv_gate_build_with_its_decode():
    """A StepSpec holds a conv/gate build and the K-last T = 1 pool decode of the same geometry and
    target that reads its workspace; anything else is refused by name, and so is a decode whose
    partial sums differ from the conv/gate build's (at build time, by the kernel layer)."""
    import dataclasses

    from flashgdn import engine_specs
    from flashgdn.device import DeviceFacts
    from flashgdn.kernels import build
    from flashgdn.spec import StepSpec
    from flashgdn.validation import Problem

    facts = DeviceFacts("sm_90a", 132, "sm90-hbm3e")
    [step] = engine_specs.kernel_specs("fused-step", Problem(16, 1, 16, 48, 128, 128), facts, io=torch.bfloat16,
                                       state=torch.bfloat16, hidden=5120)
    assert step.conv.regime == "split" and step.decode.gate_parts == 20 and step.arch == "sm_90a"
    assert step.one_launch == policy.fused_step_one_launch(step.conv, step.decode)
    one = "/1launch" if step.one_launch else ""
    assert step.short_name() == f"step[{step.conv.short_name()}+{step.decode.short_name()}{one}]"
    for conv, decode, message in (
        (step.conv, dataclasses.replace(step.decode, row_form="flat", gate_parts=0, gate_dtype="bfloat16"),
         "K-last T = 1 pool decode"),
        (step.conv, dataclasses.replace(step.decode, index_dtype=None), "K-last T = 1 pool decode"),
        (dataclasses.replace(step.conv, HV=32), step.decode, "geometries differ"),
        (dataclasses.replace(step.conv, arch="sm_100a"), step.decode, "targets differ"),
        (step.conv, dataclasses.replace(step.decode, index_dtype="int64"), "slots int32"),
    ):
        with pytest.raises(ValueError, match=message):
            StepSpec(conv, decode)
    # one launch: the decode waits for its inputs, and the conv/gate CTAs project (not the gemm regime)
    for conv, decode in ((step.conv, dataclasses.replace(step.decode, pdl_wait=False)),
                         (dataclasses.replace(step.conv, regime="gemm"), step.decode)):
        with pytest.raises(ValueError, match="one launch needs a decode that waits"):
            StepSpec(conv, decode, one_launch=True)
    with pytest.raises(ValueError, match="adds up 0 partial sums of the projection, the conv/gate build writes 20"):
        build.make_kernel(StepSpec(step.conv, dataclasses.replace(step.decode, gate_parts=0, gate_dtype="bfloat16")))


@pytest.mark.parametrize("table", ["sm90-hbm3", "sm90-hbm3e"])
def test_one_launch_where_the_table_names_the_regime_and_the_decode_fills_whole_ctas(monkeypatch, table):
    """policy.fused_step_one_launch: a step is one launch in the table's fused_step_one_launch conv/gate regimes
    (none in either table; here the small and split ones), where the decode's CTA divides the conv/gate CTA and
    a batch row's decode CTAs fill whole conv/gate-sized CTAs; the kernel layer refuses a one-launch StepSpec
    that does not."""
    import dataclasses

    from flashgdn import engine_specs
    from flashgdn.device import DeviceFacts
    from flashgdn.kernels import build
    from flashgdn.spec import StepSpec

    def steps(B, H, HV, D, state):
        facts = DeviceFacts("sm_90a", 132, table)
        return engine_specs.kernel_specs("fused-step", val.Problem(B, 1, H, HV, D, D), facts, io=torch.bfloat16,
                                         state=state, hidden=2048)

    assert policy.DEVICE_TABLES[table].fused_step_one_launch == ()  # off: slower than two launches on the H100
    t = dataclasses.replace(policy.DEVICE_TABLES[table], fused_step_one_launch=("small", "split"))
    monkeypatch.setitem(policy.DEVICE_TABLES, table, t)
    for B, regime in ((1, "small"), (24, "split"), (64, "large")):
        [step] = steps(B, 16, 32, 128, torch.bfloat16)
        assert step.conv.regime == regime and step.one_launch == (regime != "large")
        assert step.one_launch == policy.fused_step_one_launch(step.conv, step.decode)
    # the large regime's 128-thread conv/gate CTAs hold no 256-thread decode CTA (bf16 state, small decode)
    [step] = steps(1, 16, 32, 128, torch.bfloat16)
    assert policy.BuildConfig.for_spec(step.decode).tile[0] == 8
    monkeypatch.setitem(policy.DEVICE_TABLES, table, dataclasses.replace(t, fused_step_one_launch=("large",)))
    large = dataclasses.replace(step.conv, regime="large")
    assert policy.ConvGateConfig.for_spec(large).threads == 128
    assert not policy.fused_step_one_launch(large, step.decode)
    with pytest.raises(ValueError, match="do not fill whole CTAs"):
        build.make_kernel(StepSpec(large, step.decode, one_launch=True))
    # one value head of 64 channels: 2 decode CTAs of 32 rows per batch row, 2 in a 512-thread CTA
    monkeypatch.setitem(policy.DEVICE_TABLES, table, t)
    [step] = steps(1, 1, 1, 64, torch.bfloat16)
    tile = policy.BuildConfig.for_spec(step.decode).tile
    assert (policy.klast_cta_rows(tile, 64, "bfloat16"), tile[0]) == (32, 8) and step.one_launch
    # an odd count of decode CTAs per batch row (one value head of 64 rows in 64-row CTAs) does not fill them
    monkeypatch.setitem(policy.DEVICE_TABLES, table, dataclasses.replace(t, tiles={
        **t.tiles, ("klast", "small", "bfloat16"): (8, 2, 8)}))
    [odd] = steps(1, 1, 1, 64, torch.bfloat16)
    assert not odd.one_launch
    with pytest.raises(ValueError, match="do not fill whole CTAs"):
        build.make_kernel(StepSpec(odd.conv, odd.decode, one_launch=True))


@pytest.mark.parametrize("table, batch, HV, given, expected", [
    ("sm90-hbm3e", 33, 32, None, "split"),  # B * HV = 1056 = 8 per SM
    ("sm90-hbm3e", 34, 32, None, "large"),
    ("sm90-hbm3e", 256, 8, None, "large"),  # B * HV = 2048: 15.5 per SM
    ("sm90-hbm3e", 256, 8, "small", "small"),  # a precompile of the small regime
    ("sm90-hbm3e", 82, 32, None, "large"),  # 2624 = 19.9 per SM
    ("sm90-hbm3e", 83, 32, None, "gemm"),  # 2656: from 20 per SM the b/a projection is cuBLAS's
    ("sm90-hbm3e", 64, 48, None, "gemm"),
    ("sm90-hbm3", 12, 32, None, "small"),  # B * HV = 384 <= 3 per SM
    ("sm90-hbm3", 13, 32, None, "split"),  # 416: the H100 table splits the projection from 3 per SM...
    ("sm90-hbm3", 33, 32, None, "split"),  # ...up to the small regime's end, the H200's 8 per SM
    ("sm90-hbm3", 34, 32, None, "large"),
    ("sm90-hbm3", 1, 32, "split", "split"),  # a precompile of the split regime
    ("sm90-hbm3-nosmall", 1, 32, "split", "large"),  # a table without it (nor a small regime)
    ("sm90-hbm3", 82, 32, None, "large"),  # the H100 table's gemm regime from 20 per SM, as the H200's
    ("sm90-hbm3", 4096, 32, None, "gemm"),
    ("sm90-hbm3", 1, 32, "gemm", "gemm"),
    ("sm90-hbm3-nosmall", 1, 32, None, "large"),  # a table without a small regime
    ("sm90-hbm3-nosmall", 1, 32, "small", "large"),
])
def test_conv_gate_regime(monkeypatch, table, batch, HV, given, expected):
    """The conv/gate kernel's batch regime has its own threshold (the decode's is policy.regime),
    and only tables with a small (gemm) conv/gate regime build one."""
    import dataclasses

    from flashgdn.kernels import policy

    monkeypatch.setitem(policy.DEVICE_TABLES, "sm90-hbm3-nosmall",
                        dataclasses.replace(policy.SM90_HBM3, conv_gate_small_heads_per_sm=0))
    assert policy.conv_gate_regime(batch, HV, 132, table, "sm_90a", given) == expected
    # A step the split regime does not serve (policy.split_serves) stays in the small regime there.
    no_split = policy.conv_gate_regime(batch, HV, 132, table, "sm_90a", given, split=False)
    assert no_split == ("small" if expected == "split" else expected)


@pytest.mark.parametrize("table", ["sm90-hbm3", "sm90-hbm3e"])
def test_the_split_regime_serves_the_measured_w_ba_sizes(table):
    """The tables' split regime serves a bf16 state with a w_ba of 256 KiB or more (the TP1 shapes:
    hidden 2048 and HV 32, hidden 5120 and HV 48) and an fp32 one up to 512 KiB (Qwen3-Next TP1's
    256 KiB, not Qwen3.5 TP1's 960), neither for the TP4 shapes' w_ba."""
    from flashgdn.kernels import policy

    serves = lambda hidden, HV, sdt: policy.split_serves(table, "sm_90a", hidden, HV, sdt)  # noqa: E731
    assert serves(2048, 32, "bfloat16") and serves(5120, 48, "bfloat16")
    assert serves(2048, 32, "float32") and not serves(5120, 48, "float32")
    for sdt in ("float32", "bfloat16"):
        assert not serves(2048, 8, sdt) and not serves(5120, 12, sdt)


def test_conv_gate_gemm_regime_and_its_precompile_pairs(monkeypatch):
    """A table's conv_gate_gemm_heads_per_sm puts B * HV above it per SM in the "gemm" regime; a
    precompile of the decode's large regime builds the small, split (where it serves the step), large
    and gemm conv/gate builds before it, of the small regime the small one; every shipped table keeps the gemm threshold at or above the
    decode's small one (else a gemm call could pair with a small decode no precompile builds)."""
    import dataclasses

    from flashgdn import engine_specs
    from flashgdn.device import DeviceFacts
    from flashgdn.kernels import policy
    from flashgdn.spec import StepSpec
    from flashgdn.validation import Problem

    for table in policy.DEVICE_TABLES.values():
        assert not table.conv_gate_gemm_heads_per_sm or (
            table.conv_gate_gemm_heads_per_sm >= table.small_regime_heads_per_sm)
    monkeypatch.setitem(policy.DEVICE_TABLES, "sm90-hbm3e", dataclasses.replace(
        policy.SM90_HBM3E, conv_gate_gemm_heads_per_sm=16))
    regime = lambda B, HV, given=None: policy.conv_gate_regime(B, HV, 132, "sm90-hbm3e", "sm_90a", given)  # noqa: E731
    assert regime(66, 32) == "large" and regime(67, 32) == "gemm" and regime(33, 32) == "split"
    assert [regime(B, 32) for B in (12, 13, 33, 34)] == ["small", "split", "split", "large"]
    # The conv/gate's small and split regimes reach past the decode's small one (3 and 8 heads per SM
    # against 2): a large decode can follow a small conv/gate build too.
    assert regime(1, 32, "gemm") == "gemm" and policy.conv_gate_regimes("sm90-hbm3e", "sm_90a", "large") == (
        "small", "split", "large", "gemm")
    assert policy.conv_gate_regimes("sm90-hbm3e", "sm_90a", "large", split=False) == ("small", "large", "gemm")
    assert policy.conv_gate_regimes("sm90-hbm3", "sm_90a", "large") == ("small", "split", "large", "gemm")
    assert policy.conv_gate_regimes("sm90-hbm3", "sm_90a", "small") == ("small",)
    monkeypatch.setitem(policy.DEVICE_TABLES, "sm90-lowsmall", dataclasses.replace(
        policy.SM90_HBM3, conv_gate_small_heads_per_sm=1))
    assert policy.conv_gate_regimes("sm90-lowsmall", "sm_90a", "small") == ("small", "large")
    assert policy.conv_gate_regimes("sm90-lowsmall", "sm_90a", "large") == ("large", "gemm")
    facts = DeviceFacts("sm_90a", 132, "sm90-hbm3e")
    p = Problem(1, 1, 16, 32, 128, 128)
    # One StepSpec per conv/gate build (both kernels in one compiled function; in the gemm regime the
    # GEMM runs before it).
    # (An fp32 state with a 1 MiB w_ba: the split regime does not serve it.)
    for given, convs in (("large", ["small", "large", "gemm"]), ("small", ["small"])):
        specs = engine_specs.kernel_specs("fused-step", p, facts, io=torch.bfloat16, state=torch.float32,
                                          regime=given, hidden=8192)
        assert all(isinstance(s, StepSpec) for s in specs) and [s.conv.regime for s in specs] == convs
        assert len({s.decode for s in specs}) == 1 and specs[0].decode.regime == given and specs[0].decode.pdl_wait
    # With a bf16 state (and this 256 KiB w_ba) the split regime serves the step: it leaves partial
    # sums, which its decode adds up (gate_parts); the others' decode reads the bf16 projection.
    specs = engine_specs.kernel_specs("fused-step", p, facts, io=torch.bfloat16, state=torch.bfloat16, regime="large")
    assert [s.conv.regime for s in specs] == ["small", "split", "large", "gemm"]
    assert [(s.decode.gate_parts, s.decode.gate_dtype) for s in specs] == [
        (0, "bfloat16"), (8, "float32"), (0, "bfloat16"), (0, "bfloat16")]
    assert [policy.ConvGateConfig.for_spec(s.conv).partial_sums for s in specs] == [0, 8, 0, 0]
    assert policy.ConvGateConfig.for_spec(specs[-1].conv).gate_ctas == 0  # the gemm regime's conv runs alone


def test_conv_rows_reach_the_gemm_regime_only(monkeypatch):
    """conv_gate_gemm_threads and conv_gate_gemm_conv_rows build the gemm regime's conv-only kernel;
    the other regimes keep one batch row per conv thread, and a kernel with gate CTAs refuses more."""
    import dataclasses

    from flashgdn.kernels import policy
    from flashgdn.spec import ConvGateSpec

    spec = lambda regime: ConvGateSpec(H=16, HV=48, D=128, hidden=5120, width=4, has_bias=True,  # noqa: E731
                                       arch="sm_90a", device_class="sm90-hbm3e", regime=regime)
    monkeypatch.setitem(policy.DEVICE_TABLES, "sm90-hbm3e", dataclasses.replace(
        policy.SM90_HBM3E, conv_gate_gemm_threads=256, conv_gate_gemm_conv_rows=4))
    built = {r: policy.ConvGateConfig.for_spec(spec(r)) for r in ("small", "split", "large", "gemm")}
    assert {r: (c.threads, c.conv_rows) for r, c in built.items()} == {
        "small": (512, 1), "split": (512, 1), "large": (128, 1), "gemm": (256, 4)}
    assert built["gemm"].conv_ctas == 10240 // 256 and built["gemm"].gate_ctas == 0
    for rows in (0, 2):
        with pytest.raises(ValueError, match=r"conv_rows \(%d\) must be 1" % rows):
            dataclasses.replace(built["large"] if rows else built["gemm"], conv_rows=rows)
