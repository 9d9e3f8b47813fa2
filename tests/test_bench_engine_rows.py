"""CPU tests of the benchmark's engine rows (flashgdn.bench.engine_rows): `--api packed | recurrent |
sigmoid_vllm | sglang | fused_step | engines` flags and rows, their FLOP/byte counts, inputs and
--verify plumbing on the reference, the compiled variants against the API's own lookups, the
baselines' routing (FLA and FlashInfer stand-ins, the composed path), the table, and real
`--compile-only` runs."""
from __future__ import annotations

import json
import sys
import types

import pytest
import torch

from flashgdn import engines, fused_step, validation
from flashgdn import reference as ref
from flashgdn.bench import cli, engine_rows
from flashgdn.bench.metrics import fused_step_bytes, gdn_bytes
from flashgdn.bench.rows import (
    BASELINES, FLASHGDN, REFERENCE, Impl, Row, Unavailable, decode_twin, make_inputs, row_specs, verify,
)
from flashgdn.device import DeviceFacts
from helpers import stub_kernel_lookups

FLA, FLASHINFER, COMPOSED = BASELINES


def row(version, B=3, T=1, state="fp32", **kw):
    hidden = 128 if version == "fused_step" else 0
    return Row(version, B, T, 1, 2, 64, 64, "bf16", state, pool=True, hidden=hidden, **kw)


ROWS = [
    row("packed"),
    row("packed", state="bf16", pool_padding=8, pool_slots="contiguous"),
    row("recurrent"),
    row("recurrent", T=4, state="bf16", pool_padding=8),
    row("recurrent", T=2, pool_slots="contiguous"),
    row("sigmoid_vllm"),
    row("sigmoid_vllm", T=4, state="bf16", pool_padding=8),
    row("sglang"),
    row("sglang", T=3, state="bf16", pool_padding=8),
    row("sglang", T=2, pool_slots="contiguous"),
    row("fused_step"),
    row("fused_step", state="bf16", pool_slots="contiguous", pool_padding=8),
]
IDS = [r.label().replace(" ", "_") for r in ROWS]


# ----------------------------------------------------------------------------- flags and rows


def test_engine_rows_of_the_flags():
    a = cli.parse_args(["--api", "engines", "--batch-size", "1", "8", "--state-dtype", "fp32", "bf16"])
    rows = cli.sweep_rows(a)
    assert [r.version for r in rows].count("packed") == 4 and [r.version for r in rows].count("fused_step") == 4
    assert sorted({r.T for r in rows if r.version == "recurrent"}) == [1, 2, 4, 8]
    assert sorted({r.T for r in rows if r.version == "sigmoid_vllm"}) == [1, 2, 4, 8]
    assert [r.version for r in rows].count("sigmoid_vllm") == 16
    assert sorted({r.T for r in rows if r.version == "sglang"}) == [1, 2, 4, 8]
    assert [r.version for r in rows].count("sglang") == 16
    assert all(r.pool and not r.intermediate and not r.token_slots for r in rows)
    assert {r.hidden for r in rows} == {0, cli.DEFAULT_HIDDEN} and all(
        (r.hidden > 0) == (r.version == "fused_step") for r in rows)
    rec = cli.sweep_rows(cli.parse_args(["--api", "recurrent", "--seq-len", "3"]))
    assert {(r.version, r.T) for r in rec} == {("recurrent", 3)}
    sig = cli.sweep_rows(cli.parse_args(["--api", "sigmoid_vllm", "--seq-len", "1", "3"]))
    assert {(r.version, r.T) for r in sig} == {("sigmoid_vllm", 1), ("sigmoid_vllm", 3)}
    sgl = cli.sweep_rows(cli.parse_args(["--api", "sglang", "--seq-len", "1", "3"]))
    assert {(r.version, r.T) for r in sgl} == {("sglang", 1), ("sglang", 3)}
    fused = cli.sweep_rows(cli.parse_args(["--api", "fused_step", "--hidden-size", "5120", "--batch-size", "2"]))
    assert [(r.version, r.hidden, r.T) for r in fused] == [("fused_step", 5120, 1)]
    # --api all stays the three API functions.
    assert {r.version for r in cli.sweep_rows(cli.parse_args([]))} == {"pretranspose", "nontranspose", "mtp"}


@pytest.mark.parametrize("argv, phrase", [
    (["--api", "packed", "--hidden-size", "2048"], "fused_step rows"),
    (["--api", "fused_step", "--hidden-size", "100"], "multiple of 64"),
    (["--api", "fused_step", "--dtype", "fp16"], "bf16"),
    (["--api", "engines", "--dtype", "fp16"], "bf16"),
    (["--api", "engines", "--cache-intermediate"], "--cache-intermediate"),
    (["--api", "recurrent", "--token-slots"], "mtp rows"),
    (["--api", "recurrent", "--seq-len", "17"], "--seq-len"),
    (["--api", "sigmoid_vllm", "--token-slots"], "mtp rows"),
    (["--api", "sigmoid_vllm", "--cache-intermediate"], "--cache-intermediate"),
    (["--api", "sglang", "--cache-intermediate"], "--cache-intermediate"),
    (["--api", "sglang", "--token-slots"], "mtp rows"),
    (["--host", "--hidden-size", "2048"], "--hidden-size"),
])
def test_bad_engine_flags_exit_2_with_one_line(argv, phrase, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.parse_args(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "error:" in err and phrase in err, err


def test_rows_refuse_impossible_engine_modes():
    with pytest.raises(ValueError, match="T = 1"):
        row("packed", T=2)
    with pytest.raises(ValueError, match="pool"):
        Row("recurrent", 2, 1, 1, 2, 64, 64, "bf16", "fp32", pool=False)
    with pytest.raises(ValueError, match="bf16"):
        Row("fused_step", 2, 1, 1, 2, 64, 64, "fp16", "fp32", pool=True, hidden=128)
    with pytest.raises(ValueError, match="hidden"):
        Row("fused_step", 2, 1, 1, 2, 64, 64, "bf16", "fp32", pool=True)
    with pytest.raises(ValueError, match="hidden"):
        Row("pretranspose", 2, 1, 1, 2, 64, 64, "bf16", "fp32", pool=True, hidden=128)
    with pytest.raises(ValueError, match="intermediate"):
        row("recurrent", T=2, intermediate=True)


# ----------------------------------------------------------------------------- FLOPs and bytes


def test_engine_row_bytes_hand_computed():
    geometry = dict(B=3, H=1, HV=2, K=64, V=64)
    state = 3 * 2 * 64 * 64 * 4  # B*HV*K*V fp32
    # packed: the pretranspose pool row's bytes.
    assert row("packed").bytes() == decode_twin(row("packed")).bytes() == gdn_bytes(
        **geometry, T=1, index_bytes=4)
    # recurrent T = 4: state read once, written 4 times; q, k, v, o per token; g fp32 + beta bf16;
    # no A_log/dt_bias; slots B*T int32, accepted B int32, cu_seqlens B + 1 int32.
    qkvo = 4 * (2 * 3 * 1 * 64 * 2 + 2 * 3 * 2 * 64 * 2)
    gates = 4 * 3 * 2 * (4 + 2)
    assert row("recurrent", T=4).bytes() == 5 * state + qkvo + gates + 3 * 4 * 4 + 3 * 4 + 4 * 4
    # sigmoid_vllm T = 4: the same, with raw a and b bf16 and A_log + dt_bias fp32 for g and beta.
    raw = 4 * 3 * 2 * (2 + 2) + 2 * 4 + 2 * 4
    assert row("sigmoid_vllm", T=4).bytes() == 5 * state + qkvo + raw + 3 * 4 * 4 + 3 * 4 + 4 * 4
    assert row("sigmoid_vllm", T=4).flops() == row("recurrent", T=4).flops()
    # sglang T = 1 (its decode): the state read and written back at its slot [B]; raw gates, A_log +
    # dt_bias; cu_seqlens B + 1 int32.
    raw1 = 3 * 2 * (2 + 2) + 2 * 4 + 2 * 4
    assert row("sglang").bytes() == 2 * state + qkvo // 4 + raw1 + 3 * 4 + 4 * 4
    # sglang T = 4 (its target verify): the state read once, the 4 per-token states written to the
    # buffer, the pool not written; the slot [B], the buffer's row table [B], cu_seqlens B + 1.
    assert row("sglang", T=4).bytes() == 5 * state + qkvo + raw + 3 * 4 + 3 * 4 + 4 * 4
    assert row("sglang", T=4).flops() == row("recurrent", T=4).flops()
    # fused_step, hidden 128, width 4: qkv_dim = (2 + 2) * 64 = 256.
    C = 256
    # decode: the state read and written, mixed_qkv, out, A_log + dt_bias (bf16), the indices; then
    # hidden_states, w_ba, conv weight and bias, the conv state read and written.
    expected = (2 * state + 3 * C * 2 + 3 * 2 * 64 * 2 + 2 * 4 + 2 * 2 + 3 * 4
                + 3 * 128 * 2 + 128 * 4 * 2 + C * 4 * 2 + C * 2 + 2 * 3 * C * 3 * 2)
    assert fused_step_bytes(B=3, H=1, HV=2, D=64, hidden=128, width=4, state_bytes=4, dt_bias_bytes=2) == expected
    assert row("fused_step").bytes() == expected
    assert row("fused_step").flops() == 7 * 3 * 2 * 64 * 64 + 2 * 3 * 128 * 4 + 2 * 3 * C * 4


# ----------------------------------------------------------------------------- inputs and verify


@pytest.mark.parametrize("r", ROWS, ids=IDS)
def test_verify_engine_rows_on_cpu(r):
    assert verify(REFERENCE, r, "cpu", seed=2) is None


def test_recurrent_inputs_follow_vllm():
    r = row("recurrent", B=4, T=3)
    inp = make_inputs(r, "cpu", seed=1)
    assert inp["q"].shape == (1, 12, 1, 64) and inp["g"].dtype == torch.float32 and inp["beta"].dtype == torch.bfloat16
    assert bool((inp["g"] < 0).all()) and inp["cu_seqlens"].tolist() == [0, 3, 6, 9, 12]
    slots = inp["slots"]
    assert slots.shape == (4, 3) and slots.dtype == torch.int32 and int(slots.min()) >= 1  # slot 0: vLLM's null block
    assert len(set(slots.flatten().tolist())) == 12 and inp["state"].shape[0] == 2 * 12 + 1
    assert bool(((inp["accepted"] >= 1) & (inp["accepted"] <= 3)).all())
    one = make_inputs(row("recurrent", B=4), "cpu", seed=1)
    assert one["slots"].shape == (4,) and one["cu_seqlens"].tolist() == [0, 1, 2, 3, 4] and one["accepted"] is None
    assert one["q"].shape == (1, 4, 1, 64)  # vLLM's decode: varlen too


@pytest.mark.parametrize("T", [1, 3])
def test_sigmoid_inputs_are_the_recurrent_rows_with_vllms_raw_gates(T):
    """a and b: [B*T, HV] bf16 column views of one [B*T, 2HV] projection, b first (vLLM's
    `b, a = ba.chunk(2, -1)`); everything else is the recurrent row's, and its g and beta are the
    raw gates' (up to their rounding to bf16)."""
    r = row("sigmoid_vllm", B=4, T=T)
    inp, rec = make_inputs(r, "cpu", seed=1), make_inputs(row("recurrent", B=4, T=T), "cpu", seed=1)
    a, b = inp["a"], inp["b"]
    assert a.shape == b.shape == (4 * T, 2) and a.dtype == b.dtype == torch.bfloat16
    assert a.stride() == b.stride() == (4, 1) and a.data_ptr() == b.data_ptr() + 2 * a.element_size()
    assert inp["A_log"].dtype == inp["dt_bias"].dtype == torch.float32 and inp["A_log"].shape == (2,)
    assert "g" not in inp and "beta" not in inp and "g" not in engine_rows.recurrent_inputs(r, "cpu", 1)
    for name in ("q", "k", "v", "state", "slots", "accepted", "cu_seqlens"):
        assert (inp[name] is None and rec[name] is None) or torch.equal(inp[name], rec[name]), name
    g, beta = engine_rows.precomputed_gates(r, inp)
    assert g.shape == beta.shape == (1, 4 * T, 2) and g.dtype == beta.dtype == torch.float32
    assert torch.allclose(g, rec["g"], rtol=0.1, atol=0.05) and torch.allclose(beta, rec["beta"].float(), atol=0.01)
    rec_g, rec_beta = engine_rows.precomputed_gates(row("recurrent", B=4, T=T), rec)
    assert rec_g is rec["g"] and rec_beta is rec["beta"]


@pytest.mark.parametrize("T", [1, 3])
def test_sglang_inputs_follow_sglang(T):
    """SGLang's varlen layout: q, k, v and the raw gates of the sigmoid_vllm row; one slot per
    sequence (initial_state_indices [B], slot 0 a slot); T > 1: the buffer [B, T, HV, V, K] in the
    state dtype, NaN until written, and its row table arange(B)."""
    r = row("sglang", B=4, T=T, state="bf16")
    inp, sig = make_inputs(r, "cpu", seed=1), make_inputs(row("sigmoid_vllm", B=4, T=T, state="bf16"), "cpu", seed=1)
    for name in ("q", "k", "v", "a", "b", "A_log", "dt_bias", "cu_seqlens"):
        assert torch.equal(inp[name], sig[name]), name
    assert inp["q"].shape == (1, 4 * T, 1, 64) and inp["cu_seqlens"].tolist() == list(range(0, 4 * T + 1, T))
    slots = inp["slots"]
    assert slots.shape == (4,) and slots.dtype == torch.int32 and inp["accepted"] is None
    assert len(set(slots.tolist())) == 4 and 0 <= int(slots.min()) and inp["state"].shape[0] == 8
    if T == 1:
        assert inp["inter"] is None and inp["rows"] is None
    else:
        assert inp["inter"].shape == (4, T, 2, 64, 64) and inp["inter"].dtype == torch.bfloat16
        assert bool(inp["inter"].isnan().all()) and inp["rows"].tolist() == [0, 1, 2, 3]
        assert inp["rows"].dtype == torch.int32
    contiguous = make_inputs(row("sglang", B=4, T=T, pool_slots="contiguous"), "cpu", seed=1)
    assert contiguous["slots"].tolist() == [0, 1, 2, 3] and contiguous["state"].shape[0] == 4


def test_sglang_verify_freezes_the_pool_and_fills_the_buffer():
    """The reference of a T > 1 sglang row (SGLang's target verify) writes no pool slot and the
    per-token states of every sequence; its last is the final state; T = 1 writes the slot back."""
    r = row("sglang", T=3)
    inp = make_inputs(r, "cpu", seed=4)
    pool = inp["state"].clone()
    call, collect = REFERENCE.prepare(r, inp)
    o, final, per_token = collect(call())
    assert torch.equal(inp["state"], pool) and not bool(per_token.isnan().any()) and not bool(o.isnan().any())
    assert per_token.shape == (3, 3, 2, 64, 64) and torch.equal(final, per_token[:, -1])
    one = row("sglang")
    inp = make_inputs(one, "cpu", seed=4)
    pool = inp["state"].clone()
    call, collect = REFERENCE.prepare(one, inp)
    o, final, per_token = collect(call())
    slots = inp["slots"].long()
    assert per_token is None and torch.equal(inp["state"][slots], final) and not torch.equal(pool[slots], final)
    untouched = torch.ones(pool.shape[0], dtype=torch.bool)
    untouched[slots] = False
    assert torch.equal(inp["state"][untouched], pool[untouched])


def test_packed_inputs_are_the_twin_packed():
    r = row("packed")
    inp, twin = make_inputs(r, "cpu", seed=3), make_inputs(decode_twin(r), "cpu", seed=3)
    mixed = inp["mixed_qkv"]
    assert mixed.shape == (3, 64 + 64 + 128) and mixed.is_contiguous()
    assert torch.equal(mixed[:, :64].view(3, 1, 1, 64), twin["q"]) and torch.equal(mixed[:, 128:].view(3, 1, 2, 64),
                                                                                     twin["v"])


@pytest.mark.parametrize("version", ["recurrent", "sglang"])
def test_verify_catches_a_wrong_per_token_state(version):
    r = row(version, T=3)

    def last_slot_only(rw, inp):  # per-token states all equal to the final one
        call, collect = REFERENCE.prepare(rw, inp)

        def broken(ret):
            o, final, per_token = collect(ret)
            return o, final, final[:, None].expand_as(per_token)

        return call, broken

    problem = verify(Impl("broken", last_slot_only), r, "cpu", seed=1)
    assert problem is not None and problem.startswith("per-token states:")


# ----------------------------------------------------------------------------- compiled variants


@pytest.mark.parametrize("r", ROWS, ids=IDS)
def test_row_specs_are_what_flashgdn_looks_up(r, monkeypatch):
    """The variants --compile-only builds for an engine row are those flashgdn's call looks up, in
    launch order (CPU tensors; the device check, facts, workspace stream and kernel cache stubbed)."""
    facts = DeviceFacts("sm_90a", 132, "sm90-hbm3")
    looked_up = stub_kernel_lookups(monkeypatch, facts)
    monkeypatch.setattr(fused_step, "facts_of", lambda device: facts)
    monkeypatch.setattr(validation, "_CHECKED", {})
    monkeypatch.setattr(fused_step, "_VALIDATED", {})
    monkeypatch.setattr(fused_step, "_WORKSPACES", {})
    monkeypatch.setattr(fused_step, "_current_stream", lambda device: 7)
    FLASHGDN.prepare(r, make_inputs(r, "cpu", seed=0))[0]()
    assert looked_up == list(row_specs(r, *facts))


# ----------------------------------------------------------------------------- baselines


def _fake_fla(monkeypatch, calls):
    """An `fla` package whose fused_recurrent_gated_delta_rule keeps FLA 0.6's contract (a dense
    initial state [N, HV, V, K] with state_v_first, the final state returned in fp32) on the
    reference: recurrent rows only (precomputed gates)."""
    def fused_recurrent_gated_delta_rule(q, k, v, g=None, beta=None, scale=None, initial_state=None,
                                         output_final_state=False, use_qk_l2norm_in_kernel=False,
                                         use_gate_in_kernel=False, A_log=None, dt_bias=None,
                                         use_beta_sigmoid_in_kernel=False, state_v_first=False, cu_seqlens=None):
        calls.append(dict(initial_state=initial_state, cu_seqlens=cu_seqlens, q=q, state_v_first=state_v_first,
                          use_gate_in_kernel=use_gate_in_kernel))
        assert state_v_first and output_final_state and initial_state.is_contiguous()
        if use_gate_in_kernel:  # a packed row's twin: the decode rows' path
            return ref.gated_delta_rule_decode_pretranspose(
                q, k, v, initial_state.clone(), A_log, g, dt_bias, beta, use_qk_l2norm=use_qk_l2norm_in_kernel)
        assert cu_seqlens is None or cu_seqlens.dtype == torch.int64
        N = initial_state.shape[0]
        T = q.shape[1] // N if cu_seqlens is not None else q.shape[1]
        pool = torch.cat([torch.zeros_like(initial_state[:1]), initial_state]).float()
        slots = torch.arange(1, N + 1)[:, None].expand(N, T).contiguous()  # every token rewrites its row
        o = ref.fused_recurrent_gated_delta_rule_vllm(q, k, v, g, beta, scale, pool, cu_seqlens, slots, None,
                                                      use_qk_l2norm_in_kernel)
        return o, pool[1:]

    gdr = types.ModuleType("fla.ops.gated_delta_rule")
    gdr.fused_recurrent_gated_delta_rule = fused_recurrent_gated_delta_rule
    for name, mod in (("fla", types.ModuleType("fla")), ("fla.ops", types.ModuleType("fla.ops")),
                      ("fla.ops.gated_delta_rule", gdr)):
        monkeypatch.setitem(sys.modules, name, mod)


@pytest.mark.parametrize("r", [row("recurrent"), row("recurrent", T=4, state="bf16", pool_padding=8), row("packed"),
                               row("sigmoid_vllm", T=4, state="bf16", pool_padding=8), row("sglang"),
                               row("sglang", T=3, state="bf16", pool_padding=8)],
                         ids=["T1", "T4-bf16-padded", "packed", "sigmoid-T4-bf16-padded", "sglang-T1",
                              "sglang-T3-bf16-padded"])
def test_fla_runs_on_gathered_read_states(r, monkeypatch):
    """FLA gets the read slots (ssm_state_indices[i, num_accepted_tokens[i] - 1]; SGLang's
    initial_state_indices) gathered densely and, varlen, cu_seqlens as int64; its output and final
    state agree with the reference's (for sglang rows: the reference's other path, SGLang's)."""
    calls = []
    _fake_fla(monkeypatch, calls)
    assert verify(FLA, r, "cpu", seed=5) is None
    assert calls and calls[0]["use_gate_in_kernel"] == (r.version == "packed")
    if r.version == "packed":  # the unpacked twin's q (contiguous), not a view of mixed_qkv
        assert calls[0]["q"].is_contiguous() and calls[0]["q"].shape == (3, 1, 1, 64)
    assert "gathered" in FLA.note(r) if r.version != "packed" else "unpacked" in FLA.note(r)
    assert ("raw gates" in FLA.note(r)) == (r.version in ("sigmoid_vllm", "sglang"))
    assert ("intermediate_states_buffer" in FLA.note(r)) == (r.version == "sglang")
    assert FLA.applies(r) and not FLA.applies(row("fused_step"))


def test_flashinfer_routing_of_engine_rows(monkeypatch):
    calls = []

    def step(**kw):
        calls.append(kw)
        return ref.gdn_fused_decode_step(**kw)

    monkeypatch.setitem(sys.modules, "flashinfer", types.SimpleNamespace(gdn_fused_decode_step=step))
    r = row("fused_step")
    assert verify(FLASHINFER, r, "cpu", seed=1) is None and calls[0]["out"] is not None
    with pytest.raises(Unavailable, match="fp32 ssm_state"):
        FLASHINFER.prepare(row("fused_step", state="bf16"), {})
    with pytest.raises(Unavailable, match="precomputed gates"):
        FLASHINFER.prepare(row("recurrent"), {})
    with pytest.raises(Unavailable, match="accepted counts"):
        FLASHINFER.prepare(row("sigmoid_vllm"), {})
    with pytest.raises(Unavailable, match="SGLang's layout"):
        FLASHINFER.prepare(row("sglang", T=3), {})
    assert FLASHINFER.note(row("packed")) and FLASHINFER.note(r) is None


def test_flashinfer_fused_step_from_its_module(monkeypatch):
    """A FlashInfer whose __init__ does not export gdn_fused_decode_step: the function from its
    module; neither importable: Unavailable naming both."""
    calls = []

    def step(**kw):
        calls.append(kw)
        return ref.gdn_fused_decode_step(**kw)

    monkeypatch.setitem(sys.modules, "flashinfer", types.SimpleNamespace())
    monkeypatch.setitem(sys.modules, "flashinfer.gdn_kernels.experimental.gdn_fused_decode",
                        types.SimpleNamespace(gdn_fused_decode_step=step))
    r = row("fused_step")
    assert verify(FLASHINFER, r, "cpu", seed=2) is None and calls
    monkeypatch.setitem(sys.modules, "flashinfer.gdn_kernels.experimental.gdn_fused_decode", None)
    with pytest.raises(Unavailable, match="flashinfer: .*gdn_fused_decode: "):
        FLASHINFER.prepare(r, {})


def test_flashinfer_packed_is_the_pretranspose_call_on_unpacked_inputs(monkeypatch):
    module = types.SimpleNamespace(calls=[])
    module.gated_delta_rule_decode_pretranspose = lambda *a, **kw: module.calls.append((a, kw))
    monkeypatch.setitem(sys.modules, "flashinfer.gdn_decode", module)
    r = row("packed")
    inp = make_inputs(r, "cpu", seed=0)
    FLASHINFER.prepare(r, inp)[0]()
    [(args, kw)] = module.calls
    assert args[0] is inp["q"] and kw["initial_state"] is inp["state"] and kw["initial_state_indices"] is inp["indices"]


def test_composed_torch_conv_is_the_reference_conv():
    r = row("fused_step", B=4)
    inp = make_inputs(r, "cpu", seed=3)
    expect = {n: t.clone() if isinstance(t, torch.Tensor) else t for n, t in inp.items()}
    y = engine_rows._torch_conv_update(inp)
    y_ref = ref.conv_update(expect["mixed_qkv"], expect["conv_weight"], expect["conv_bias"], expect["conv_state"],
                            expect["state_indices"])
    assert torch.equal(y, y_ref) and torch.equal(inp["conv_state"], expect["conv_state"])


def _reference_packed_decode(mixed_qkv, a, b, A_log, dt_bias, scale, initial_state, out, idx, l2norm):
    """The packed decode on the reference (a stand-in for flashgdn.engines')."""
    B, HV, D = mixed_qkv.shape[0], a.shape[1], initial_state.shape[-1]
    H = (mixed_qkv.shape[1] - HV * D) // (2 * D)
    q, k, v = (mixed_qkv[:, :H * D].view(B, 1, H, D), mixed_qkv[:, H * D:2 * H * D].view(B, 1, H, D),
               mixed_qkv[:, 2 * H * D:].view(B, 1, HV, D))
    return ref.gated_delta_rule_decode_pretranspose(q, k, v, None, A_log, a[:, None], dt_bias, b[:, None], scale,
                                                    out, l2norm, initial_state, idx)


def test_composed_path_verifies_and_applies_to_fused_step_only(monkeypatch):
    """The composed path with the packed decode on the reference: b = ba[:, :HV], a = ba[:, HV:]."""
    monkeypatch.setattr(engines, "fused_recurrent_gated_delta_rule_packed_decode", _reference_packed_decode)
    monkeypatch.setitem(sys.modules, "causal_conv1d", None)  # not importable: the torch-ops conv
    monkeypatch.setitem(sys.modules, "fla.modules.causal_conv1d", None)
    r = row("fused_step")
    assert verify(COMPOSED, r, "cpu", seed=4) is None
    assert "torch ops" in COMPOSED.note(r)
    assert COMPOSED.applies(r) and not any(COMPOSED.applies(x) for x in ROWS if x.version != "fused_step")


def _fla_conv_update(x, cache, residual=None, weight=None, bias=None, activation=None):
    """FLA's causal_conv1d_update on a dense cache [N, D, W], in torch: the window is the cache's
    last W - 1 columns and x; the whole row is rewritten, shifted by one."""
    window = torch.cat([cache[..., 1:], x.unsqueeze(-1)], -1)
    y = (window.float() * weight.float()).sum(-1) + bias.float()
    cache.copy_(window)
    return torch.nn.functional.silu(y).to(x.dtype), cache


def test_composed_path_with_flas_dense_conv_verifies(monkeypatch):
    """With FLA's conv (its dense per-row cache, seeded from the pool rows), the composed path's
    output and conv states still match the reference step."""
    fla_conv = types.ModuleType("fla.modules.causal_conv1d")
    fla_conv.causal_conv1d_update = _fla_conv_update
    monkeypatch.setitem(sys.modules, "causal_conv1d", None)
    monkeypatch.setitem(sys.modules, "fla.modules.causal_conv1d", fla_conv)
    monkeypatch.setattr(engines, "fused_recurrent_gated_delta_rule_packed_decode", _reference_packed_decode)
    r = row("fused_step")
    assert verify(COMPOSED, r, "cpu", seed=5) is None
    assert "FLA" in COMPOSED.note(r)


def test_flas_conv_is_tuned_for_each_batch_size(monkeypatch):
    """FLA's conv autotuner keys on (D, W) and dtypes, not the batch: the composed path points it at
    configs tuned for the row's batch size (tuned once per size and process) and turns Triton's disk
    cache of autotuning results off, so no earlier batch's pick serves a row."""
    tuner = types.SimpleNamespace(configs=["BD8", "BD64"], cache={("D", "W"): "picked by an earlier batch"},
                                  cache_results=True)
    tunings = []

    def update(x, cache, residual=None, weight=None, bias=None, activation=None):
        if ("D", "W") not in tuner.cache:  # the autotuner's run: tune on the first call of a key
            tunings.append(x.shape[0])
            tuner.cache[("D", "W")] = f"tuned at B = {x.shape[0]}"
        return _fla_conv_update(x, cache, residual, weight, bias, activation)

    ops = types.ModuleType("fla.modules.causal_conv1d.ops")
    ops.causal_conv1d_update_kernel = types.SimpleNamespace(fn=tuner)  # the heuristics wrapper
    fla_conv = types.ModuleType("fla.modules.causal_conv1d")
    fla_conv.causal_conv1d_update, fla_conv.ops = update, ops
    monkeypatch.setitem(sys.modules, "causal_conv1d", None)
    monkeypatch.setitem(sys.modules, "fla.modules.causal_conv1d", fla_conv)
    monkeypatch.setitem(sys.modules, "fla.modules.causal_conv1d.ops", ops)
    monkeypatch.setattr(engine_rows, "_FLA_CONV_TUNED", {})
    monkeypatch.setattr(engines, "fused_recurrent_gated_delta_rule_packed_decode", _reference_packed_decode)
    assert engine_rows.fla_conv_autotuner() is tuner
    for B in (2, 5, 2):
        r = row("fused_step", B=B)
        call, _ = COMPOSED.prepare(r, make_inputs(r, "cpu", seed=B))
        call()
        assert tuner.cache == {("D", "W"): f"tuned at B = {B}"} and tuner.cache_results is False
    assert tunings == [2, 5]


# ----------------------------------------------------------------------------- table


def test_table_shows_the_baselines_a_sweep_ran():
    rec = dict.fromkeys(cli.result_fields())
    rec.update(version="fused_step", B=4, T=1, H=16, HV=32, K=128, V=128, hidden=2048, dtype="bf16",
               state_dtype="fp32", pool=True, pool_slots="scattered", median_us=5.0, p10_us=4.0, p90_us=6.0,
               verify="ok", error="", composed_us=10.0, composed_speedup=2.0, composed_note="torch ops conv",
               flashinfer_note="baseline unavailable: cannot import flashinfer.gdn_fused_decode_step: nope")
    text = cli.results_table([rec], compare=True)
    header = text.splitlines()[2]
    assert "composed µs" in header and "flashinfer µs" in header and "fla µs" not in header
    assert "2.00x" in text and "composed: torch ops conv" in text and "hidden=2048" in text.splitlines()[0]
    decode = dict(rec, version="mtp", composed_us=None, composed_speedup=None, composed_note=None, hidden=None)
    assert "composed" not in cli.results_table([decode], compare=True)


# ----------------------------------------------------------------------------- compile-only


def test_compile_only_engine_rows(capsys, tmp_path):
    """The fused step's one variant (conv/gate and decode in one compiled function) for sm_90a;
    vLLM's varlen verify variant for sm_100a; vLLM's sigmoid-gating decode (raw gates) for sm_90a;
    SGLang's target verify (its buffer row table) for sm_100a (K = V = 64: small builds)."""
    out_json = tmp_path / "c.json"
    small = ["--compile-only", "--batch-size", "1", "--head-size", "64", "--num-q-heads", "1", "--num-v-heads", "2"]
    rc = cli.main(small + ["--api", "fused_step", "--hidden-size", "128", "--json", str(out_json)])
    assert rc == 0, capsys.readouterr()
    recs = json.loads(out_json.read_text())["rows"]
    assert [r["kernel"] for r in recs] == ["step[convgate/H1/HV2/D64/hidden128/w4/small/sm_90a+"
                                           "klast/T1/H1/HV2/K64/V64/bfloat16/state-float32/small/sm_90a/pool/pdl]"]
    assert recs[0]["kernel_class"] == "ConvGate + KLastDecode" and not any(r.get("error") for r in recs)
    assert recs[0]["registers"] == "n/a" or len(recs[0]["registers"].split("/")) == 2  # one count per kernel
    rc = cli.main(small + ["--api", "recurrent", "--seq-len", "2", "--arch", "sm_100a", "--json", str(out_json)])
    assert rc == 0, capsys.readouterr()
    [rec] = json.loads(out_json.read_text())["rows"]
    assert rec["kernel"].endswith("sm_100a/pool/accepted/tokslots/gates/vllm/varlen") and not rec.get("error")
    rc = cli.main(small + ["--api", "sigmoid_vllm", "--seq-len", "1", "--json", str(out_json)])
    assert rc == 0, capsys.readouterr()
    [rec] = json.loads(out_json.read_text())["rows"]
    assert rec["kernel"].endswith("sm_90a/pool/tokslots/vllm/varlen/gaterows/slotcol") and not rec.get("error")
    rc = cli.main(small + ["--api", "sglang", "--seq-len", "3", "--arch", "sm_100a", "--json", str(out_json)])
    assert rc == 0, capsys.readouterr()
    [rec] = json.loads(out_json.read_text())["rows"]
    assert rec["kernel"].endswith("sm_100a/pool/inter/noupdate/flat/interrows") and not rec.get("error")

