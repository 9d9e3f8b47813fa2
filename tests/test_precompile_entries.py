"""CPU tests of `flashgdn-precompile --entry` (flashgdn.precompile, flashgdn.engine_specs): the
variants it lists for each serving engine's entry point and for the fused step are exactly those
the real call looks up (CPU tensors, the kernel lookups stubbed), for a batch in the small and one
in the large regime; --list; argument errors; one real build of the fused step's two variants.
The FlashInfer-style functions' variants (the default entry) are tested in test_disk_cache.py, but for
which MTP variant --output-allocated builds (here)."""
from __future__ import annotations

import pytest
import torch

import flashgdn
from flashgdn import engines, fastpath, fused_step, precompile, validation
from flashgdn.device import DeviceFacts
from flashgdn.kernels import policy
from flashgdn.spec import KernelSpec, StepSpec

from helpers import make_fused_inputs, make_inputs, make_state, stub_kernel_lookups
from test_engines import packed_kwargs, sigmoid_kwargs

DTYPES = {name: getattr(torch, torch_name) for name, torch_name in precompile.DTYPES.items()}
H, HV, K, V = 2, 4, 64, 128  # K != V: a swapped state layout has the wrong shape
MODEL = ["-H", str(H), "-HV", str(HV), "--head-k", str(K), "--head-v", str(V), "--arch", "sm_90a"]
KNOWN = next(d for d in policy.KNOWN_DEVICES if d.arch == "sm_90a")
FACTS = DeviceFacts("sm_90a", KNOWN.sm_count, KNOWN.table)  # the device precompile builds sm_90a for
BATCHES = {"small": 3, "large": 70}


def _slots(B, P, dtype):
    """B distinct pool slots of P in a shuffled order, the first one padding (-1)."""
    slots = torch.randperm(P, generator=torch.Generator().manual_seed(B))[:B]
    slots[0] = -1
    return slots.to(dtype)


def _packed(vllm):
    def call(B, o):
        kw = packed_kwargs(n=B, io=DTYPES[o.io_dtype])
        gate, P = DTYPES[o.gate_dtype or o.io_dtype], 2 * B + 1
        kw.update(a=kw["a"].to(gate), b=kw["b"].to(gate), dt_bias=kw["dt_bias"].to(DTYPES[o.dt_bias_dtype]),
                  initial_state=make_state(P, HV, V, K, DTYPES[o.state_dtype[0]], pad=16, seed=B),
                  scale=o.scale, use_qk_l2norm_in_kernel=not o.no_l2norm,
                  ssm_state_indices=_slots(B, P, DTYPES[o.index_dtype[0]]).clamp_min(0 if vllm else -1))
        fn = engines.fused_recurrent_gated_delta_rule_packed_decode_vllm if vllm else \
            engines.fused_recurrent_gated_delta_rule_packed_decode
        fn(**kw)

    return call


def _sglang(tree: bool):
    def call(B, o):
        """SGLang's own layout: q, k [1, B*T, H, K], v [1, B*T, HV, V] with cu_seqlens, a and b [B*T, HV]:
        its decode (T = 1), then for each T > 1 its target verify (the pool frozen, the states into its
        speculative buffer at an int32 row table; with `tree` an EAGLE tree in the index dtype)."""
        _sglang_calls(B, o, tree)

    return call


def _sglang_calls(B, o, tree):
    gen = torch.Generator().manual_seed(B)
    io, gate, state = DTYPES[o.io_dtype], DTYPES[o.gate_dtype or o.io_dtype], DTYPES[o.state_dtype[0]]
    index = DTYPES[o.index_dtype[0]]
    rnd = lambda *s, dt=io: torch.randn(*s, generator=gen).to(dt)  # noqa: E731
    P = 2 * B + 1
    for T in o.seq_len:
        verify = dict(disable_state_update=True, intermediate_states_buffer=torch.zeros(B + 2, T, HV, V, K, dtype=state),
                      intermediate_state_indices=torch.arange(B + 2, dtype=torch.int32), cache_steps=T) if T > 1 else {}
        if T > 1 and tree:
            verify["retrieve_parent_token"] = (torch.arange(T) - 1).clamp(min=-1).repeat(B, 1).to(index)
        engines.fused_sigmoid_gating_delta_rule_update(
            A_log=torch.log(torch.rand(HV, generator=gen) * 15 + 1), a=rnd(B * T, HV, dt=gate),
            dt_bias=rnd(HV, dt=DTYPES[o.dt_bias_dtype]), softplus_beta=1.0, softplus_threshold=20.0,
            q=rnd(1, B * T, H, K), k=rnd(1, B * T, H, K), v=rnd(1, B * T, HV, V), b=rnd(B * T, HV, dt=gate),
            initial_state_source=make_state(P, HV, V, K, state, pad=16, seed=B),
            initial_state_indices=_slots(B, P, index), scale=o.scale, use_qk_l2norm_in_kernel=not o.no_l2norm,
            cu_seqlens=torch.arange(0, B * T + 1, T, dtype=index), **verify)


def _vllm_recurrent(raw_gates: bool):
    def call(B, o):
        """vLLM's calls of its recurrent op (precomputed gates) or its sigmoid-gating op (raw gates a,
        b [tokens, HV]), varlen (q [1, B*T, ...], cu_seqlens): the T = 1 decode (slots [B]), then for
        each T > 1 the verify (slots [B, T], accepted counts), all indices of one dtype."""
        gen = torch.Generator().manual_seed(B)
        io, index = DTYPES[o.io_dtype], DTYPES[o.index_dtype[0]]
        rnd = lambda *s, dt=io: torch.randn(*s, generator=gen).to(dt)  # noqa: E731
        for T in o.seq_len:
            lead = (1, B * T)
            pool = make_state(B * T + 1, HV, V, K, DTYPES[o.state_dtype[0]], pad=16, seed=B)
            slots = torch.arange(1, B * T + 1).view(B, T).to(index)
            rest = (o.scale, pool, True, torch.arange(0, B * T + 1, T).to(index), slots if T > 1 else slots[:, 0],
                    torch.randint(1, T + 1, (B,), generator=gen).to(index) if T > 1 else None, not o.no_l2norm)
            q, k, v = rnd(*lead, H, K), rnd(*lead, H, K), rnd(*lead, HV, V)
            if raw_gates:
                gate = DTYPES[o.gate_dtype or o.io_dtype]
                engines.fused_sigmoid_gating_delta_rule_update_vllm(
                    torch.rand(HV), rnd(B * T, HV, dt=gate), rnd(B * T, HV, dt=gate),
                    rnd(HV, dt=DTYPES[o.dt_bias_dtype]), q, k, v, 1.0, 20.0, *rest)
            else:
                engines.fused_recurrent_gated_delta_rule(
                    q, k, v, -rnd(*lead, HV, dt=torch.float32).abs(), rnd(*lead, HV).sigmoid(), *rest)

    return call


def _fused_step(B, o):
    kw = make_fused_inputs(B, H, HV, K, o.hidden, width=o.conv_width, state_dtype=DTYPES[o.state_dtype[0]],
                           bias=o.conv_bias, slot_pad=16, seed=B)
    kw.update(dt_bias=kw["dt_bias"].to(DTYPES[o.dt_bias_dtype]), scale=o.scale)
    fused_step.gdn_fused_decode_step(**kw, use_qk_l2norm=not o.no_l2norm)


CASES = {  # entry: (the flags besides MODEL, the call)
    "packed": (["--io-dtype", "fp16", "--gate-dtype", "fp32", "--state-dtype", "bf16", "--index-dtype", "int64",
                "--dt-bias-dtype", "bf16"], _packed(vllm=False)),
    "packed-vllm": ([], _packed(vllm=True)),
    "sglang": (["--index-dtype", "int64", "--no-l2norm", "--scale", "0.1", "--seq-len", "1", "3"], _sglang(False)),
    "sglang-tree": (["--state-dtype", "bf16", "--seq-len", "4"], _sglang(True)),
    "recurrent": (["--seq-len", "1", "3", "--state-dtype", "bf16"], _vllm_recurrent(raw_gates=False)),
    "sigmoid-vllm": (["--seq-len", "1", "4", "--gate-dtype", "fp32", "--dt-bias-dtype", "bf16", "--index-dtype",
                      "int64"], _vllm_recurrent(raw_gates=True)),
    "fused-step": (["--head-v", str(K), "--hidden", "128", "--conv-width", "3", "--no-conv-bias",
                    "--dt-bias-dtype", "bf16"], _fused_step),
}


@pytest.fixture
def looked_up(monkeypatch):
    """The variants the calls look up: the device check, facts, memos, workspace stream and kernel
    cache stubbed (helpers.stub_kernel_lookups), no fast path kept from other tests."""
    specs = stub_kernel_lookups(monkeypatch, FACTS)
    monkeypatch.setattr(fastpath, "FAST", {})
    monkeypatch.setattr(validation, "_CHECKED", {})
    monkeypatch.setattr(fused_step, "facts_of", lambda device: FACTS)
    monkeypatch.setattr(fused_step, "_VALIDATED", {})
    monkeypatch.setattr(fused_step, "_WORKSPACES", {})
    monkeypatch.setattr(fused_step, "_current_stream", lambda device: 7)
    return specs


@pytest.mark.parametrize("regime", list(BATCHES))
@pytest.mark.parametrize("entry", list(CASES))
def test_entry_variants_are_what_the_call_looks_up(entry, regime, looked_up):
    flags, call = CASES[entry]
    B = BATCHES[regime]
    assert policy.regime(B, HV, FACTS.sm_count, FACTS.device_class) == regime
    args = precompile.parse_args(MODEL + flags + ["--entry", entry, "--regime", regime])
    expected = precompile.model_specs(args)
    call(B, args)
    if entry == "fused-step":
        # A precompile of the decode's large regime builds every conv/gate build a call in it can
        # meet (policy.conv_gate_regimes: small, up to 8 heads per SM, large and, from 20, gemm in
        # this table; the split regime does not serve this fp32 state and small w_ba), each with the
        # decode behind it in one compiled function (StepSpec).
        assert set(looked_up) <= set(expected) and all(isinstance(s, StepSpec) for s in expected)
    else:
        assert looked_up == expected
    assert all(s.regime == regime for s in expected if isinstance(s, KernelSpec))
    assert all(s.decode.regime == regime for s in expected if isinstance(s, StepSpec))
    fused = 1 if regime == "small" else 3
    assert len(expected) == {"recurrent": 2, "sigmoid-vllm": 2, "fused-step": fused, "sglang": 2}.get(entry, 1)
    assert entry != "sglang-tree" or all(s.tree_parents == "int32" for s in expected)


@pytest.mark.parametrize("gates_3d", [False, True], ids=["gates-2d", "gates-3d"])
def test_sglang_batched_layout_takes_the_flashinfer_pool_variant(gates_3d, looked_up):
    """SGLang's decode with q [N, 1, ...] goes as row views: the pretranspose pool variant."""
    engines.fused_sigmoid_gating_delta_rule_update(**sigmoid_kwargs(varlen=False, gates_3d=gates_3d))
    args = precompile.parse_args(MODEL + ["--regime", "small"])
    assert looked_up == precompile.model_specs(args)


def test_list_of_entries(capsys):
    """--list: one line per variant, entry after entry, each variant once; the flashinfer entry's
    list is today's."""
    argv = MODEL + ["--list", "--entry", "packed-vllm", "sglang", "--state-dtype", "fp32", "bf16"]
    assert precompile.main(argv) == 0
    names = capsys.readouterr().out.split()
    assert names == [s.short_name() for s in precompile.model_specs(precompile.parse_args(argv))]
    assert len(names) == len(set(names)) == 2 * 2 * 2  # state dtypes x entries x regimes
    assert sum(n.endswith("/tokslots/vllm/packed") for n in names) == sum(n.endswith("/flat") for n in names) == 4
    assert precompile.main(MODEL + ["--list"]) == 0
    default = capsys.readouterr().out.split()
    assert precompile.main(MODEL + ["--list", "--entry", "flashinfer", "recurrent", "fused-step",
                                    "--head-v", str(K), "--seq-len", "1", "2"]) == 0
    both = capsys.readouterr().out.split()
    assert precompile.main(MODEL + ["--list", "--head-v", str(K), "--seq-len", "1", "2"]) == 0
    flashinfer = capsys.readouterr().out.split()
    # flashinfer: T = 1 and T = 2 per regime; recurrent: the same T; fused-step: per regime of the
    # decode, one compiled function with each conv/gate build it meets (small; small, large and gemm).
    assert len(default) == 2 and both[:4] == flashinfer and len(both) == 4 + 4 + 4
    assert sum(n.startswith("step[convgate/") and n.endswith("/pdl]") for n in both) == 4


@pytest.mark.parametrize("argv,message", [
    (["--entry", "fused-step", "--head-v", "64", "--hidden", "100"], "--hidden must be a multiple of 64"),
    (["--entry", "fused-step", "--head-v", "64", "--io-dtype", "fp16"], "fused-step entry is bf16 with K = V"),
    (["--entry", "fused-step"], "fused-step entry is bf16 with K = V"),
    (["--entry", "sglang", "--gate-dtype", "fp16"], "--gate-dtype must be the --io-dtype"),
    (["--entry", "vllm"], "argument --entry: invalid choice"),
    (["--entry", "fused-step", "--head-v", "64", "--conv-width", "5"], "argument --conv-width: invalid choice"),
    (["--hidden", "0"], "argument --hidden: expected a positive integer"),
], ids=["hidden", "fused-fp16", "fused-k-ne-v", "gate-dtype", "entry", "conv-width", "hidden-0"])
def test_argument_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        precompile.parse_args(MODEL + argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_precompile_fused_step_then_load(tmp_path, capsys):
    """The fused step's compiled function (its conv/gate and decode kernels; small: H = HV = 1,
    D = 64, hidden 64) is built, stored and loaded back from the disk cache."""
    argv = ["-H", "1", "-HV", "1", "--head-k", "64", "--head-v", "64", "--entry", "fused-step", "--hidden", "64",
            "--regime", "small", "--cache-dir", str(tmp_path)]
    assert precompile.main(argv) == 0
    out = capsys.readouterr().out
    assert "step[convgate/H1/HV1/D64/hidden64/w4/small/sm_90a+klast/" in out and "1 compiled, 0 loaded" in out
    assert precompile.main(argv) == 0
    assert "0 compiled, 1 loaded from disk, 0 failed" in capsys.readouterr().out


@pytest.mark.parametrize("allocated", [False, True], ids=["output-given", "output-allocated"])
@pytest.mark.parametrize("regime", list(BATCHES))
def test_mtp_variants_follow_who_allocates_the_output(allocated, regime, looked_up):
    """gated_delta_rule_mtp with its output given leaves padding rows' output as it is; with output
    None the variant writes them (zeros): --output-allocated builds the one the call looks up."""
    B, T = BATCHES[regime], 3
    q, k, v, a, b, A_log, dt_bias = make_inputs(B, T, H, HV, K, V, seed=B)
    pool = make_state(2 * B + 1, HV, V, K, torch.float32, seed=B)
    out = None if allocated else torch.empty(B, T, HV, V, dtype=q.dtype)
    flashgdn.gated_delta_rule_mtp(q, k, v, pool, _slots(B, 2 * B + 1, torch.int32), A_log, a, dt_bias, b,
                                  output=out, disable_state_update=False)
    flags = ["--seq-len", str(T), "--regime", regime] + (["--output-allocated"] if allocated else [])
    assert looked_up == precompile.model_specs(precompile.parse_args(MODEL + flags))
    assert looked_up[0].zero_padding_output == allocated
