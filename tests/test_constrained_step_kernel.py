"""Constrained beam-search step: reference vs hand-worked math and a brute-force oracle, Triton (interpreter) vs
reference, select_beams, dispatcher choice and input validation.

TRITON_INTERPRET=1 comes from tests/conftest.py, so the Triton kernel runs on CPU tensors here.
"""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import onerec_kernels.constrained_step as cs
from onerec_kernels.constrained_step import dispatch
from onerec_kernels.constrained_step.reference import constrained_step_reference, select_beams

NEG_INF = float("-inf")
LN2, LN3, LN6 = math.log(2), math.log(3), math.log(6)


def _triton(*args, **kwargs):
    from onerec_kernels.constrained_step.triton_kernel import constrained_step_triton

    return constrained_step_triton(*args, **kwargs)


IMPLS = {"reference": constrained_step_reference, "triton": _triton}


def make_case(rows, codes, k, dtype=torch.float32, with_norm=False, seed=0):
    """Random step inputs with ties (logits on a 0.5 grid) and, when there are rows to spare, the edge cases:
    row 0 all masked, row 1 a single valid code, row 2 fewer than k valid codes, row 3 allowed codes with logit
    -inf after a masked code 0, last row a dead beam (beam score -inf)."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.round(torch.randn(rows, codes, generator=gen) * 2) / 2  # [R, C]
    allowed = torch.rand(rows, codes, generator=gen) < 0.6  # [R, C]
    if rows >= 3:
        allowed[0] = False
        allowed[1] = False
        allowed[1, codes - 1] = True
        allowed[2] = False
        allowed[2, torch.randperm(codes, generator=gen)[: k - 1]] = True
    if rows >= 4:  # allowed -inf logits after a masked code: the masked one must still rank last
        allowed[3, 0] = False
        logits[3, 1:3] = NEG_INF
        allowed[3, 1:3] = True
    beam_scores = -5 * torch.rand(rows, generator=gen)  # [R] cumulative log-probs
    if rows >= 2:
        beam_scores[-1] = NEG_INF
    # A full-vocabulary normaliser is at least the level's unmasked log-sum-exp.
    norm = torch.logsumexp(logits, dim=-1) + torch.rand(rows, generator=gen) if with_norm else None
    return logits.to(dtype), allowed, beam_scores, norm


def assert_same(out, ref):
    assert torch.equal(out.topk_codes, ref.topk_codes), (out.topk_codes, ref.topk_codes)
    torch.testing.assert_close(out.topk_scores, ref.topk_scores, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.row_lse, ref.row_lse, rtol=1e-5, atol=1e-5)


def brute_force(logits, allowed, beam_scores, k, norm_lse=None):
    """Per-row Python oracle written from the contract, independent of the tensor code."""
    scores, codes, lses = [], [], []
    for r in range(logits.shape[0]):
        valid = [(float(logits[r, c]), c) for c in range(logits.shape[1]) if allowed[r, c]]
        finite = [v for v, _ in valid if v != NEG_INF]
        top = max(finite, default=NEG_INF)
        lse = top + math.log(sum(math.exp(v - top) for v in finite)) if finite else NEG_INF
        norm = lse if norm_lse is None else float(norm_lse[r])
        ranked = sorted(valid, key=lambda vc: (-vc[0], vc[1]))[:k]
        row = [float(beam_scores[r]) + (v - norm) if v != NEG_INF else NEG_INF for v, _ in ranked]
        scores.append(row + [NEG_INF] * (k - len(ranked)))
        codes.append([c for _, c in ranked] + [-1] * (k - len(ranked)))
        lses.append(lse)
    return torch.tensor(scores), torch.tensor(codes), torch.tensor(lses)


# --- hand-worked math -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_hand_worked_renormalised_over_allowed(impl):
    # Row 0: logits [0, ln 2, ln 3], all allowed -> probs 1:2:3, lse = ln(1 + 2 + 3) = ln 6,
    #   log-probs ln(1/6), ln(2/6), ln(3/6); beam score -1 is added; best first -> codes [2, 1, 0].
    # Row 1: same logits, code 2 masked -> lse = ln 3, log-probs ln(1/3), ln(2/3); beam 0; k = 3 > 2 valid codes
    #   -> third slot is (-inf, -1).
    # Row 2: dead beam (-inf) with one valid code 0 -> score -inf, code 0 still reported; lse = ln 1 = 0.
    logits = torch.tensor([[0.0, LN2, LN3]] * 3)
    allowed = torch.tensor([[True, True, True], [True, True, False], [True, False, False]])
    beam_scores = torch.tensor([-1.0, 0.0, NEG_INF])
    out = IMPLS[impl](logits, allowed, beam_scores, 3)
    expected = torch.tensor(
        [
            [-1 + math.log(3 / 6), -1 + math.log(2 / 6), -1 + math.log(1 / 6)],
            [math.log(2 / 3), math.log(1 / 3), NEG_INF],
            [NEG_INF, NEG_INF, NEG_INF],
        ]
    )
    torch.testing.assert_close(out.topk_scores, expected)
    assert out.topk_codes.tolist() == [[2, 1, 0], [1, 0, -1], [0, -1, -1]]
    torch.testing.assert_close(out.row_lse, torch.tensor([LN6, LN3, 0.0]))


@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_hand_worked_full_vocab_normaliser_and_ties(impl):
    # norm_lse = ln 10 (full vocabulary mass 10): log-probs are logit - ln 10 even though code 2 is masked:
    #   ln(2/10), ln(1/10). row_lse is still over allowed codes: ln(1 + 2) = ln 3.
    # Row 1: logits [1, 1, 1, 1] (all tied), codes 0 and 2 allowed, k = 2 -> ties go to the lower code: [0, 2],
    #   each ln(e / 10) = 1 - ln 10; row_lse = ln(2e) = 1 + ln 2.
    logits = torch.tensor([[0.0, LN2, LN3, 0.0], [1.0, 1.0, 1.0, 1.0]])
    allowed = torch.tensor([[True, True, False, False], [True, False, True, False]])
    out = IMPLS[impl](logits, allowed, torch.zeros(2), 2, norm_lse=torch.full((2,), math.log(10)))
    torch.testing.assert_close(
        out.topk_scores, torch.tensor([[math.log(0.2), math.log(0.1)], [1 - math.log(10), 1 - math.log(10)]])
    )
    assert out.topk_codes.tolist() == [[1, 0], [0, 2]]
    torch.testing.assert_close(out.row_lse, torch.tensor([LN3, 1 + LN2]))


@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_signed_zero_ties_and_allowed_minus_inf(impl):
    # -0.0 == 0.0, so codes 1 and 3 tie and the lower index goes first; code 2 is allowed with logit -inf
    # (probability 0) and still ranks above the masked code 0 (logit 5): scores ln(1/2), ln(1/2), -inf.
    logits = torch.tensor([[5.0, -0.0, NEG_INF, 0.0], [5.0, 0.0, NEG_INF, -0.0]])
    allowed = torch.tensor([[False, True, True, True]] * 2)
    out = IMPLS[impl](logits, allowed, torch.zeros(2), 4)
    assert out.topk_codes.tolist() == [[1, 3, 2, -1]] * 2
    torch.testing.assert_close(out.topk_scores, torch.tensor([[-LN2, -LN2, NEG_INF, NEG_INF]] * 2))


def test_reference_matches_hf_full_vocab_log_softmax():
    # With norm_lse = logsumexp over the full vocabulary the scores are exactly HF's log_softmax(full)[slice].
    full = torch.randn(4, 50, generator=torch.Generator().manual_seed(1))  # [R, V]
    level = full[:, 10:30]  # [R, C] code slice of this level
    allowed = torch.rand(4, 20, generator=torch.Generator().manual_seed(2)) < 0.5
    allowed[:, 0] = True
    out = constrained_step_reference(level, allowed, torch.zeros(4), 20, norm_lse=torch.logsumexp(full, -1))
    hf = torch.log_softmax(full, -1)[:, 10:30]
    valid = out.topk_codes >= 0
    torch.testing.assert_close(out.topk_scores[valid], hf.gather(-1, out.topk_codes.clamp(min=0))[valid])


def test_renormalised_probabilities_sum_to_one():
    logits, allowed, _, _ = make_case(5, 37, 37, seed=3)
    allowed[:, 5] = True  # every row has a valid code
    out = constrained_step_reference(logits, allowed, torch.zeros(5), 37)
    # sum over allowed codes of exp(logit - lse) = 1, i.e. logsumexp of the valid slots is 0.
    torch.testing.assert_close(torch.logsumexp(out.topk_scores, -1), torch.zeros(5), atol=1e-6, rtol=0)


# --- reference vs brute-force oracle ----------------------------------------------------------------------------


@pytest.mark.parametrize("with_norm", [False, True])
@pytest.mark.parametrize("rows,codes,k", [(7, 37, 5), (5, 6, 6), (4, 1, 1), (6, 257, 9)])
def test_reference_matches_brute_force(rows, codes, k, with_norm):
    logits, allowed, beam_scores, norm = make_case(rows, codes, k, with_norm=with_norm, seed=rows + codes)
    out = constrained_step_reference(logits, allowed, beam_scores, k, norm)
    scores, codes_bf, lse = brute_force(logits, allowed, beam_scores, k, norm)
    assert torch.equal(out.topk_codes, codes_bf)
    torch.testing.assert_close(out.topk_scores, scores, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.row_lse, lse, rtol=1e-5, atol=1e-5)


# --- Triton (interpreter) vs reference --------------------------------------------------------------------------

SHAPES = [
    (rows, codes, k)
    for rows in (1, 3, 7)
    for codes in (1, 5, 37, 257)
    for k in sorted({1, 2, 5, codes})
    if k <= codes and not (codes == 257 and k == codes and rows != 7)  # k = C = 257 is 257 interpreter rounds
]


@pytest.mark.parametrize("with_norm", [False, True], ids=["renorm", "norm_lse"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("rows,codes,k", SHAPES)
def test_triton_matches_reference(rows, codes, k, dtype, with_norm):
    logits, allowed, beam_scores, norm = make_case(rows, codes, k, dtype, with_norm, seed=rows * 1000 + codes + k)
    ref = constrained_step_reference(logits, allowed, beam_scores, k, norm)
    assert_same(_triton(logits, allowed, beam_scores, k, norm), ref)
    if rows >= 3:  # the edge rows really are what the comments say
        assert ref.topk_codes[0].tolist() == [-1] * k and ref.row_lse[0] == NEG_INF
        assert ref.topk_codes[1, 0] == codes - 1 and (ref.topk_codes[1, 1:] == -1).all()
        assert (ref.topk_codes[2] >= 0).sum() == k - 1
        assert (ref.topk_scores[-1] == NEG_INF).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("rows,codes,k,max_block_c", [(7, 257, 5, 64), (3, 37, 37, 16), (5, 100, 2, 32)])
def test_triton_chunked_path_matches_reference(rows, codes, k, max_block_c, dtype):
    # Wider-than-block levels loop over chunks (online log-sum-exp, per-slot re-scan); force it with a small block.
    for with_norm in (False, True):
        logits, allowed, beam_scores, norm = make_case(rows, codes, k, dtype, with_norm, seed=codes)
        ref = constrained_step_reference(logits, allowed, beam_scores, k, norm)
        assert_same(_triton(logits, allowed, beam_scores, k, norm, max_block_c=max_block_c), ref)


def test_triton_reads_strided_code_slice():
    # logits as a view of the level's columns inside full-vocab logits (row stride V, not C).
    full = torch.randn(6, 300, generator=torch.Generator().manual_seed(4))
    level = full[:, 100:137]
    _, allowed, beam_scores, norm = make_case(6, 37, 4, with_norm=True, seed=5)
    ref = constrained_step_reference(level.contiguous(), allowed, beam_scores, 4, norm)
    assert_same(_triton(level, allowed, beam_scores, 4, norm), ref)


@settings(max_examples=25, deadline=None)
@given(
    rows=st.integers(1, 6),
    codes=st.integers(1, 40),
    data=st.data(),
    bf16=st.booleans(),
    with_norm=st.booleans(),
    density=st.sampled_from([0.0, 0.1, 0.5, 1.0]),
    seed=st.integers(0, 2**16),
)
def test_triton_matches_reference_property(rows, codes, data, bf16, with_norm, density, seed):
    k = data.draw(st.integers(1, min(codes, 8)))
    logits, _, beam_scores, norm = make_case(rows, codes, k, torch.bfloat16 if bf16 else torch.float32, with_norm, seed)
    allowed = torch.rand(rows, codes, generator=torch.Generator().manual_seed(seed)) < density
    ref = constrained_step_reference(logits, allowed, beam_scores, k, norm)
    assert_same(_triton(logits, allowed, beam_scores, k, norm), ref)
    # Contract: valid slots first, scores descending, codes allowed and distinct, as many as min(k, #allowed).
    valid = ref.topk_codes >= 0
    n_valid = torch.minimum(allowed.sum(-1), torch.tensor(k))
    assert torch.equal(valid.sum(-1), n_valid)
    assert torch.equal(valid, torch.arange(k) < n_valid[:, None])
    assert (ref.topk_scores[:, :-1] >= ref.topk_scores[:, 1:]).all()
    assert allowed.gather(-1, ref.topk_codes.clamp(min=0))[valid].all()


# --- select_beams -----------------------------------------------------------------------------------------------


def test_select_beams_hand_worked():
    # B = 1, beams = 2, k = 2; candidates (flat index: score) 0: -1, 1: -3, 2: -1, 3: -2.
    # W = 3 -> scores [-1, -1, -2]; the tie at -1 goes to flat index 0 (beam 0) before 2 (beam 1).
    scores = torch.tensor([[[-1.0, -3.0], [-1.0, -2.0]]])
    codes = torch.tensor([[[4, 7], [5, 6]]])
    best, parent, chosen = select_beams(scores, codes, 3)
    assert best.tolist() == [[-1.0, -1.0, -2.0]]
    assert parent.tolist() == [[0, 1, 1]]
    assert chosen.tolist() == [[4, 5, 6]]


def test_select_beams_matches_brute_force_with_ties_and_dead_beams():
    batch, beams, k, width = 3, 4, 3, 5
    logits, allowed, beam_scores, _ = make_case(batch * beams, 9, k, seed=7)
    step = constrained_step_reference(logits, allowed, beam_scores, k)
    scores3, codes3 = step.topk_scores.view(batch, beams, k), step.topk_codes.view(batch, beams, k)
    best, parent, chosen = select_beams(scores3, codes3, width)
    for b in range(batch):
        flat = [(float(scores3[b, i, j]), i * k + j) for i in range(beams) for j in range(k)]
        cands = sorted(flat, key=lambda sf: (-sf[0], sf[1]))[:width]
        assert best[b].tolist() == [s for s, _ in cands]
        assert parent[b].tolist() == [f // k for _, f in cands]
        assert chosen[b].tolist() == [int(codes3[b, f // k, f % k]) for _, f in cands]


def test_select_beams_rejects_bad_input():
    scores, codes = torch.zeros(1, 2, 2), torch.zeros(1, 2, 2, dtype=torch.int64)
    with pytest.raises(ValueError, match="beam_width"):
        select_beams(scores, codes, 5)
    with pytest.raises(ValueError, match="topk_codes"):
        select_beams(scores, codes.int(), 2)
    with pytest.raises(ValueError, match="topk_scores"):
        select_beams(scores.view(2, 2), codes, 2)


# --- dispatcher -------------------------------------------------------------------------------------------------


@pytest.fixture
def spies(monkeypatch):
    """Count which implementation the dispatcher runs."""
    from onerec_kernels.constrained_step import triton_kernel

    calls = []
    real_ref, real_triton = dispatch.constrained_step_reference, triton_kernel.constrained_step_triton
    monkeypatch.setattr(dispatch, "constrained_step_reference", lambda *a: calls.append("reference") or real_ref(*a))
    monkeypatch.setattr(triton_kernel, "constrained_step_triton", lambda *a: calls.append("triton") or real_triton(*a))
    monkeypatch.delenv(cs.ENV_VAR, raising=False)
    return calls


def test_dispatch_auto_env_and_forcing(spies, monkeypatch):
    args = make_case(7, 37, 5, seed=9)[:3]
    ref = constrained_step_reference(*args, 5)
    assert_same(cs.constrained_step(*args, 5), ref)  # auto on CPU -> reference
    assert_same(cs.constrained_step(*args, 5, impl="triton"), ref)  # forced; allowed because TRITON_INTERPRET=1
    monkeypatch.setenv(cs.ENV_VAR, "triton")  # the variable replaces "auto" ...
    assert_same(cs.constrained_step(*args, 5), ref)
    assert_same(cs.constrained_step(*args, 5, impl="reference"), ref)  # ... but not an explicit argument
    assert spies == ["reference", "triton", "triton", "reference"]


def test_resolve_impl_rules(monkeypatch):
    monkeypatch.delenv(cs.ENV_VAR, raising=False)
    assert cs.resolve_impl("auto", torch.device("cpu")) == "reference"
    assert cs.resolve_impl("auto", torch.device("cuda")) == "triton"  # no GPU needed to resolve
    monkeypatch.setenv(cs.ENV_VAR, "reference")
    assert cs.resolve_impl("auto", torch.device("cuda")) == "reference"
    monkeypatch.setenv(cs.ENV_VAR, "fastest")
    with pytest.raises(ValueError, match=cs.ENV_VAR):
        cs.resolve_impl("auto", torch.device("cpu"))
    with pytest.raises(ValueError, match="impl must be one of"):
        cs.resolve_impl("cuda", torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        cs.resolve_impl("triton", torch.device("cpu"))


def test_import_does_not_import_triton():
    code = "import sys, onerec_kernels.constrained_step; assert 'triton' not in sys.modules, 'triton imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# --- invalid input ----------------------------------------------------------------------------------------------

GOOD = dict(logits=torch.zeros(3, 5), allowed=torch.ones(3, 5, dtype=torch.bool), beam_scores=torch.zeros(3), k=2)
BAD = [
    (dict(k=6), "1 <= k <= C"),
    (dict(k=0), "1 <= k <= C"),
    (dict(k=2.0), "k must be an int"),
    (dict(allowed=torch.ones(3, 4, dtype=torch.bool)), "allowed shape"),
    (dict(allowed=torch.ones(3, 5, dtype=torch.uint8)), "allowed must be a torch.bool"),
    (dict(logits=torch.zeros(3, 5, dtype=torch.int32)), "logits dtype"),
    (dict(logits=torch.zeros(15)), "logits must be a 2-D"),
    (dict(beam_scores=torch.zeros(4)), "beam_scores shape"),
    (dict(beam_scores=torch.zeros(3, dtype=torch.float64)), "beam_scores must be a float32"),
    (dict(norm_lse=torch.zeros(2)), "norm_lse shape"),
]


@pytest.mark.parametrize("impl", ["reference", "triton"])
@pytest.mark.parametrize("override,message", BAD, ids=[m for _, m in BAD])
def test_invalid_input_raises(override, message, impl):
    with pytest.raises(ValueError, match=message):
        cs.constrained_step(**{**GOOD, **override}, impl=impl)


# --- benchmark script -------------------------------------------------------------------------------------------


def test_benchmark_quick_writes_json(tmp_path):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_constrained_step.py"
    spec = importlib.util.spec_from_file_location("bench_constrained_step", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--quick", "--device", "cpu", "--dtypes", "fp32", "--reps", "5", "--warmup", "0", "--allow-dirty",
                "--out-dir", str(tmp_path)])
    report = json.loads((tmp_path / "constrained_step_cpu.json").read_text())
    assert report["device"] == "cpu" and len(report["results"]) == len(bench.QUICK_SHAPES)
    for row in report["results"]:
        assert row["reference_speedup_vs_naive"] == pytest.approx(row["naive_ms"] / row["reference_ms"])
