"""The Triton kernels of the dense merges (`methods.ops.triton_merge`), on a GPU where there is one and on CPU under
Triton's interpreter otherwise (tests/conftest.py chooses it): the radix select equals `torch.topk`'s k-th
largest magnitude bit for bit, and the fused tail equals the eager ops (themselves checked against peft in
test_merges.py) and peft, for every merge kind."""

from __future__ import annotations

import pytest
import torch
from peft.utils import merge_utils

from methods.ops import triton_merge
from methods.ops.merge_ops import KINDS, merge_stacked, trim_thresholds

pytest.importorskip("triton")

INT = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}


@pytest.fixture
def device(monkeypatch) -> str:
    """Where the kernels run here: the GPU, or CPU tensors through Triton's interpreter."""
    if triton_merge.INTERPRETED:
        monkeypatch.setattr(triton_merge, "RUN_ON_CPU", True)
        return "cpu"
    if not torch.cuda.is_available():
        pytest.skip("no GPU and Triton not interpreted")
    return "cuda"


def test_digit_widths_cover_the_key():
    assert triton_merge.digit_widths(15) == [5, 5, 5]
    assert triton_merge.digit_widths(31) == [5, 5, 5, 4, 4, 4, 4]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_radix_select_equals_topk_bit_for_bit(device, dtype):
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(3, 5000, generator=g).to(device, dtype)
    rows[0, :300] = 0.0  # zeros and ties at many ranks
    rows[1, 100:400] = rows[1, 7]
    rows[2, :50] = -rows[2, 50:100]  # equal magnitudes of both signs
    rows[2, 4999] = float("inf")
    for k in (1, 2, 299, 2500, 4700, 4999, 5000):
        got = triton_merge.kth_largest_magnitude(rows, k)
        want = rows.abs().topk(k, dim=1).values.amin(1)
        assert torch.equal(got.view(INT[dtype]), want.view(INT[dtype])), (k, got, want)


def test_radix_select_rejects_k_outside_the_row(device):
    with pytest.raises(ValueError, match="k=0"):
        triton_merge.kth_largest_magnitude(torch.ones(2, 10, device=device), 0)


def test_trim_thresholds_take_the_kernel_and_agree_with_topk(device, monkeypatch):
    stacked = torch.randn(4, 30, 20, generator=torch.Generator().manual_seed(1)).to(device)
    monkeypatch.setattr(torch.Tensor, "topk", None)  # the kernel, not topk, must answer
    tau = trim_thresholds(stacked, 0.3)
    monkeypatch.undo()
    a = stacked.abs().reshape(4, -1)
    assert torch.equal(tau.flatten(), a.topk(int(0.3 * a.shape[1]), dim=1).values.amin(1))


@pytest.mark.filterwarnings("ignore:The density")
@pytest.mark.parametrize("kind, sign", [(k, "total") for k in KINDS] + [(k, "frequency") for k in ("ties", "dare_ties")])
@pytest.mark.parametrize("n", [3, 8])
def test_fused_tail_equals_eager_ops_and_peft(device, kind, sign, n):
    g = torch.Generator().manual_seed(n)
    stacked = torch.randn(n, 33, 70, generator=g).to(device)
    weights = torch.rand(n, generator=g).add_(0.2).tolist()
    density = 0.5 if kind.startswith("dare") else 0.3
    seeded = lambda: torch.Generator(device).manual_seed(5)  # noqa: E731
    fused = merge_stacked(stacked.clone(), weights, kind, density, sign, seeded(), fused=True)
    eager = merge_stacked(stacked.clone(), weights, kind, density, sign, seeded(), fused=False)
    torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-6)
    torch.manual_seed(5)
    deltas, w = list(stacked), torch.tensor(weights, device=device)
    peft = {"ties": lambda: merge_utils.ties(deltas, w, density, sign),
            "dare_ties": lambda: merge_utils.dare_ties(deltas, w, density, sign),
            "dare_linear": lambda: merge_utils.dare_linear(deltas, w, density),
            "magnitude_prune": lambda: merge_utils.magnitude_prune(deltas, w, density)}[kind]()
    torch.testing.assert_close(fused, peft, rtol=1e-5, atol=1e-6)


def test_fused_is_the_default_only_where_triton_runs(device, monkeypatch):
    stacked = torch.randn(3, 8, 6, generator=torch.Generator().manual_seed(2)).to(device)
    calls = []
    monkeypatch.setattr(triton_merge, "merge_tail", lambda *a: calls.append(a) or a[0].sum(0))
    merge_stacked(stacked.clone(), [1.0] * 3, "ties", 0.5)
    assert len(calls) == 1
    merge_stacked(stacked.clone().double(), [1.0] * 3, "ties", 0.5)  # float64: no kernel, eager ops
    assert len(calls) == 1


def test_where_triton_does_not_run_the_kernels_refuse_clearly():
    """CPU tensors without the interpreter asked for (RUN_ON_CPU unset): a clear error, not a crash."""
    with pytest.raises(RuntimeError, match="needs Triton"):
        triton_merge.kth_largest_magnitude(torch.ones(2, 4), 1)
    with pytest.raises(RuntimeError, match="needs Triton"):
        triton_merge.merge_tail(torch.ones(2, 4), torch.ones(2), None, None, False, True)
