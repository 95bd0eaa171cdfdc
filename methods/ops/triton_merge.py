"""Triton kernels of the dense merges (`methods.ops.merge_ops`): the trim threshold and the fused merge tail.

**Threshold** (`kth_largest_magnitude`): per row, the k-th largest |x|, by radix select instead of sorting.
For non-negative IEEE floats the bit pattern, read as an integer, orders like the value, and |x| is the
pattern with its sign bit cleared. The k-th largest is found digit by digit from the top:

    pass p: histogram digit p (≤ 5 bits) of the elements whose higher digits equal the prefix found so far;
            then, on the device, the bin b holding the k-th largest, the count of elements in higher bins
            (skipped: k -= that count) and prefix = prefix · 2^bits + b.

One kernel per pass; each program keeps its histogram on chip (`tl.histogram`) and adds it to the row's
counts once. Elements outside the prefix (and past the row's end) are counted in bin 0 and subtracted
there, which needs no extra bin. 16-bit floats take 3 passes (5 + 5 + 5 bits), float32 takes 7. Each pass
reads the rows once and writes rows × 32 counts; nothing synchronizes with the host. Settings measured on an
H100 (results/perf/NOTES.md): 5-bit digits beat 3, 4 and 8 bits; per-thread one-hot counts and spreading
neighbours over copies of each bin were slower.
Exact: equal, bit for bit, to ``x.abs().topk(k, dim=1).values.amin(1)`` (rows without NaN).

**Tail** (`merge_tail`): trim (|x| ≥ τ_i) / drop (DARE mask), elect and disjoint-merge (TIES) or weighted
sum, for every entry of the stacked deltas in one pass: each program loads all N experts' values of a block
of entries once (plus the mask bytes) and writes the merged block, in float32 arithmetic. The eager ops of
`merge_ops.merge_stacked` compute the same (peft's functions, step by step) and are the reference.

Both run where Triton does: on CUDA tensors; on CPU tensors only when `RUN_ON_CPU` is set and Triton's
interpreter was chosen (``TRITON_INTERPRET=1`` before Triton's import): how the tests check them without a GPU.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # no Triton: `available` says so and merge_ops keeps its torch path
    triton = None

KEY_BITS = {torch.bfloat16: 15, torch.float16: 15, torch.float32: 31}  # magnitude bits (sign bit cleared)
INT_VIEW = {15: torch.int16, 31: torch.int32}
DIGIT_BITS = 5
SELECT_BLOCK = 16384
SELECT_WARPS = 16
SELECT_PROGRAMS = 4096  # programs per pass, over all rows: several per SM, each adding its counts once
TAIL_BLOCK = 1024  # entries per tail program (halved above 8 experts: the unrolled loops' registers)
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # kernels built for Triton's CPU interpreter
RUN_ON_CPU = False  # with INTERPRETED: take CPU tensors too (tests); otherwise CUDA only


def available(t: torch.Tensor) -> bool:
    """Whether `t` can go through these kernels: Triton installed, a supported dtype, and a device Triton
    runs on (CUDA; CPU when interpreted and asked for)."""
    if triton is None or t.dtype not in KEY_BITS:
        return False
    if INTERPRETED:
        return t.device.type == "cpu" and RUN_ON_CPU
    return t.is_cuda


def _require(t: torch.Tensor, what: str) -> None:
    if not available(t):
        raise RuntimeError(f"{what} needs Triton and a {list(KEY_BITS)} tensor on CUDA; got {t.dtype} on {t.device}"
                           + (" (Triton is installed)" if triton is not None else " (Triton is not installed)"))


def digit_widths(key_bits: int) -> list[int]:
    """Digit widths from the most significant, at most `DIGIT_BITS` each, as even as possible:
    15 -> [5, 5, 5], 31 -> [5, 5, 5, 4, 4, 4, 4]."""
    passes = -(-key_bits // DIGIT_BITS)
    width, wider = divmod(key_bits, passes)
    return [width + 1] * wider + [width] * (passes - wider)


if triton is not None:

    @triton.jit
    def _digit_histogram(x_ptr, prefix_ptr, hist_ptr, n_cols, chunk,
                         KEY_MASK: tl.constexpr, SHIFT: tl.constexpr, BINS: tl.constexpr,
                         PREFIX_SHIFT: tl.constexpr, HAS_PREFIX: tl.constexpr, BLOCK: tl.constexpr):
        """hist[row, d] += #{j in this program's chunk: digit(|x[row, j]|) = d, higher digits = prefix[row]},
        plus, in bin 0, every other position of the chunk (the caller subtracts them)."""
        row = tl.program_id(0)
        start = tl.program_id(1) * chunk
        base = x_ptr + row.to(tl.int64) * n_cols
        prefix = tl.load(prefix_ptr + row) if HAS_PREFIX else 0
        counts = tl.zeros((BINS,), dtype=tl.int32)
        for offset in range(start, start + chunk, BLOCK):
            cols = offset + tl.arange(0, BLOCK)
            key = tl.load(base + cols, mask=cols < n_cols, other=0).to(tl.int32) & KEY_MASK
            digit = (key >> SHIFT) & (BINS - 1)
            if HAS_PREFIX:
                digit = tl.where((key >> PREFIX_SHIFT) == prefix, digit, 0)
            counts += tl.histogram(digit, BINS)
        tl.atomic_add(hist_ptr + row * BINS + tl.arange(0, BINS), counts)

    @triton.jit
    def _kept(x_ptr, tau_ptr, mask_ptr, i, cols, inside, n_cols, HAS_TAU: tl.constexpr, HAS_MASK: tl.constexpr):
        """Expert i's entries at `cols`, in float32, zeroed where trimmed (|x| < tau_i) or dropped (mask false)."""
        offsets = i * n_cols + cols
        x = tl.load(x_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
        if HAS_TAU:
            x = tl.where(tl.abs(x) >= tl.load(tau_ptr + i).to(tl.float32), x, 0.0)
        if HAS_MASK:
            x = tl.where(tl.load(mask_ptr + offsets, mask=inside, other=0) != 0, x, 0.0)
        return x

    @triton.jit
    def _merge_tail(x_ptr, w_ptr, tau_ptr, mask_ptr, out_ptr, n_cols, N: tl.constexpr, HAS_TAU: tl.constexpr,
                    HAS_MASK: tl.constexpr, DISJOINT: tl.constexpr, TOTAL: tl.constexpr, BLOCK: tl.constexpr):
        """out[j] = merge over experts i of x[i, j] (see `merge_tail`); experts unrolled, one row block each."""
        cols = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inside = cols < n_cols
        majority = tl.zeros((BLOCK,), dtype=tl.float32)
        if DISJOINT:  # elect: the sign of the sum, or of the summed signs (re-reads below hit the cache)
            for i in tl.static_range(N):
                x = _kept(x_ptr, tau_ptr, mask_ptr, i, cols, inside, n_cols, HAS_TAU, HAS_MASK)
                majority += x if TOTAL else tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, 0.0))
            majority = tl.where(majority >= 0, 1.0, -1.0)
        total = tl.zeros((BLOCK,), dtype=tl.float32)
        count = tl.zeros((BLOCK,), dtype=tl.float32)
        for i in tl.static_range(N):
            x = _kept(x_ptr, tau_ptr, mask_ptr, i, cols, inside, n_cols, HAS_TAU, HAS_MASK)
            w = tl.load(w_ptr + i)
            if DISJOINT:
                agree = x * majority > 0
                total += tl.where(agree, x * w, 0.0)
                count += agree.to(tl.float32)
            else:
                total += x * w
        if DISJOINT:
            total = total / tl.maximum(count, 1.0)
        tl.store(out_ptr + cols, total.to(out_ptr.dtype.element_ty), mask=inside)


def kth_largest_magnitude(rows: torch.Tensor, k: int) -> torch.Tensor:
    """Per row of `rows` (R, M), the k-th largest |x| (1 ≤ k ≤ M), as an (R,) tensor of `rows`' dtype."""
    _require(rows, "radix select")
    n_rows, n_cols = rows.shape
    if not 1 <= k <= n_cols:
        raise ValueError(f"k={k} outside [1, {n_cols}]")
    if n_cols >= 2**31:
        raise ValueError(f"rows of {n_cols} entries: counts are int32")
    key_bits = KEY_BITS[rows.dtype]
    keys = rows.contiguous().view(INT_VIEW[key_bits])
    chunk = SELECT_BLOCK * triton.cdiv(n_cols, SELECT_BLOCK * max(1, SELECT_PROGRAMS // n_rows))
    grid = (n_rows, triton.cdiv(n_cols, chunk))
    positions = grid[1] * chunk  # every position a row's programs visit, counted once each
    remaining = torch.full((n_rows,), k, dtype=torch.int64, device=rows.device)
    in_prefix = torch.full((n_rows,), n_cols, dtype=torch.int64, device=rows.device)
    prefix = torch.zeros(n_rows, dtype=torch.int32, device=rows.device)
    shift = key_bits
    for width in digit_widths(key_bits):
        shift -= width
        hist = torch.zeros(n_rows, 1 << width, dtype=torch.int32, device=rows.device)
        _digit_histogram[grid](keys, prefix, hist, n_cols, chunk, KEY_MASK=(1 << key_bits) - 1, SHIFT=shift,
                               BINS=1 << width, PREFIX_SHIFT=shift + width, HAS_PREFIX=shift + width < key_bits,
                               BLOCK=SELECT_BLOCK, num_warps=SELECT_WARPS)
        hist = hist.long()
        hist[:, 0] -= positions - in_prefix  # positions outside the prefix or the row landed in bin 0
        at_or_above = hist.flip(1).cumsum(1).flip(1)  # [r, b]: the prefix's elements in bins ≥ b
        chosen = (at_or_above >= remaining[:, None]).sum(1, keepdim=True) - 1  # the bin of the k-th largest
        in_prefix = hist.gather(1, chosen).squeeze(1)
        remaining -= at_or_above.gather(1, chosen).squeeze(1) - in_prefix
        prefix = (prefix << width) | chosen.squeeze(1).to(torch.int32)
    return prefix.to(INT_VIEW[key_bits]).view(rows.dtype)


def merge_tail(stacked: torch.Tensor, weights: torch.Tensor, tau: torch.Tensor | None, mask: torch.Tensor | None,
               disjoint: bool, total: bool) -> torch.Tensor:
    """The merged entries (M,) of stacked deltas (N, M): each expert's entries kept where ``|x| ≥ tau_i``
    (`tau` (N,) or None) and where `mask` (N, M) is true (or None), then either ``Σ_i w_i x_i`` or, with
    `disjoint`, TIES's elect (sign of the sum if `total`, else of the summed signs) and disjoint mean
    ``Σ_{i agrees} w_i x_i / #agreeing``. One pass over the deltas; float32 arithmetic; `stacked`'s dtype out."""
    _require(stacked, "merge tail")
    n, n_cols = stacked.shape
    x = stacked.contiguous()
    out = torch.empty(n_cols, dtype=x.dtype, device=x.device)
    w = weights.to(device=x.device, dtype=torch.float32).contiguous()
    tau_arg = tau.reshape(n).contiguous() if tau is not None else w
    mask_arg = mask.reshape(n, n_cols).contiguous().view(torch.uint8) if mask is not None else x
    block = TAIL_BLOCK if n <= 8 else TAIL_BLOCK // 2
    _merge_tail[(triton.cdiv(n_cols, block),)](x, w, tau_arg, mask_arg, out, n_cols, N=n, HAS_TAU=tau is not None,
                                               HAS_MASK=mask is not None, DISJOINT=disjoint, TOTAL=total, BLOCK=block)
    return out
