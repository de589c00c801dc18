"""The AVX2 integer kernel for int8 layers on CPUs without int8 dot products (minimind.infer.avx2_int8).

Tolerances, and why: activations are carried as two 7-bit digits, ``x = a (hi + lo / 127)`` with
``a = max|x| / 63``, so each element errs by at most ``a / 254`` = 1/16002 of its row's maximum; a
product over K inputs then errs by well under 1e-3 of its size even with an outlier channel setting
the row maximum (asserted: relative L2 error < 1e-3 against float64, and below the error of the
bf16-activation GEMV the kernel replaces).  Engine logits are compared with the plain kernels (bf16
activations) within ``2^-6 max|logit|`` and greedy tokens equal on the chain model, whose argmax
margins are several logits wide.

Skips where the kernel is unavailable (not x86 with AVX2, or no C++ compiler); the fallback test runs
everywhere.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from minimind.infer import GenerationEngine, SamplingParams, avx2_int8, cpp_kernels, quant
from minimind.infer.quant import Int8Linear, use_avx2_kernel_
from minimind.model import MiniMindForCausalLM
from tests.test_quant import rel_err
from tests.test_quant_onednn import _decode_logits

pytestmark = pytest.mark.usefixtures("one_thread")

needs_kernel = pytest.mark.skipif(not avx2_int8.available(), reason="the AVX2 int8 kernel does not build here")


def _codes(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8),
            torch.rand(n, generator=gen) * 1e-2 + 1e-3)


@pytest.mark.skipif(not avx2_int8.available(), reason="the AVX2 int8 kernel does not build or run here")
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 9, 13])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_product_is_within_its_digit_bound(rows: int, dtype: torch.dtype) -> None:
    codes, scale = _codes(80, 96, seed=rows)
    x = torch.randn(rows, 96, generator=torch.Generator().manual_seed(10 + rows))
    x[:, 7] *= 40.0  # an outlier channel sets the row maximum
    x = x.to(dtype)
    w = codes.double() * scale.double().unsqueeze(1)
    want = x.double() @ w.t()
    got = avx2_int8.linear(x, avx2_int8.pack(codes), scale)
    assert got.dtype == torch.float32 and got.shape == (rows, 80)
    assert rel_err(got, want) < 1e-3
    # the bound per element: |x - a (hi + lo / 127)| <= max|x| / 16002, summed against |w|
    bound = (x.double().abs().amax(dim=1, keepdim=True) / 16002) * w.abs().sum(dim=1)
    assert bool(((got.double() - want).abs() <= bound * 1.01 + 1e-6).all())
    gemv = torch._weight_int8pack_mm(x.to(torch.bfloat16), codes, scale.to(torch.bfloat16))
    assert rel_err(got, want) < rel_err(gemv, want)  # closer than bf16 activations


@pytest.mark.skipif(not avx2_int8.vnni(), reason="this CPU has no AVX-512 VNNI (or the kernel does not build)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_vnni_tile_gives_the_avx2_tiles_results_bit_for_bit(dtype: torch.dtype) -> None:
    """vpdpbusd sums the same u8 x s8 products as vpmaddubsw + vpmaddwd, in int32 without saturation
    (the AVX2 pairs stay below 2^15), so every row count must give the same floats."""
    codes, scale = _codes(80, 2432, seed=5)
    packed = avx2_int8.pack(codes)
    x = torch.randn(19, 2432, generator=torch.Generator().manual_seed(6)).to(dtype)
    x[:, 3] *= 50.0
    try:
        for rows in (1, 3, 4, 7, 8, 9, 16, 19):
            assert avx2_int8.use_vnni(False) is False
            avx2 = avx2_int8.linear(x[:rows], packed, scale)
            assert avx2_int8.use_vnni(True) is True
            assert torch.equal(avx2_int8.linear(x[:rows], packed, scale), avx2)
    finally:
        avx2_int8.use_vnni(True)


@pytest.mark.skipif(not avx2_int8.available(), reason="the AVX2 int8 kernel does not build or run here")
def test_kernel_rejects_shapes_it_does_not_tile() -> None:
    codes, _ = _codes(12, 96, seed=0)
    assert not avx2_int8.supports(12, 96) and not avx2_int8.supports(16, 98) and avx2_int8.supports(16, 96)
    with pytest.raises(RuntimeError, match="multiple of 8"):
        avx2_int8.pack(codes)


@needs_kernel
def test_int8_linear_routes_one_and_two_rows_and_repacks() -> None:
    torch.manual_seed(3)
    lin = nn.Linear(96, 80, bias=False)
    plain = Int8Linear.from_linear(lin, out_dtype=torch.float32)
    fast = copy.deepcopy(plain)
    assert fast.use_avx2_kernel() and fast._tiled is not None
    # up to 8 rows where the CPU has no int8 dot products, 1-2 where it has (the native kernels win at 4),
    # 1-16 on the kernel's VNNI tile
    vnni_rows = quant.VNNI_MAX_ROWS if avx2_int8.vnni() else quant.AVX2_MAX_ROWS_VNNI
    assert fast._avx2_rows == (vnni_rows if quant.cpu_kernels()[0] else quant.AVX2_MAX_ROWS)
    for rows in (1, 2, 3, 8, 9, 16, 17):
        x = torch.randn(rows, 96)
        want = x.double() @ plain.dequantized().double().t()
        if rows <= fast._avx2_rows:
            assert torch.equal(fast(x), avx2_int8.linear(x, fast._tiled, fast._tiled_scale))
            # closer than the bf16-activation GEMV it replaces; the two-digit _int_mm of larger
            # products carries wider digits, so there the kernel's own bound
            assert rel_err(fast(x), want) < (rel_err(plain(x), want) if rows <= quant.GEMV_MAX_ROWS else 1e-3)
        else:  # more rows: the plain kernels, unchanged
            assert torch.equal(fast(x), plain(x))
    x = torch.randn(1, 96)
    copied = copy.deepcopy(fast)  # the tiled copy is rebuilt, not shared
    assert copied._tiled is not None and copied._tiled.data_ptr() != fast._tiled.data_ptr()
    fast.set_weight(lin.weight * 2)  # re-quantizing retiles
    assert rel_err(fast(x), 2 * x @ plain.dequantized().t()) < 1e-3
    assert rel_err(copied(x), x @ plain.dequantized().t()) < 1e-3  # the copy kept the old weight
    assert not fast.use_avx2_kernel(False) and fast._tiled is None


@needs_kernel
def test_engine_int8_logits_and_greedy_tokens_match_the_plain_kernels(
        chain: tuple[MiniMindForCausalLM, torch.Tensor]) -> None:
    model, perm = chain
    plain = GenerationEngine(model, num_slots=2, quantize="int8", onednn=False)
    fast = GenerationEngine(model, num_slots=2, quantize="int8")
    assert plain.avx2_layers == 0 and fast.avx2_layers > 0
    for prompts in ([[7, int(perm[7])]], [[7], [3, 4]]):  # one row and two rows
        got, want = _decode_logits(fast, prompts, 6), _decode_logits(plain, prompts, 6)
        assert float((got - want).abs().max()) <= 2 ** -6 * float(want.abs().max())
        assert rel_err(got, want) < 1e-2
    params = SamplingParams(max_new_tokens=32, temperature=0.0, stop_token_ids=())
    for batch in ([[7]], [[3, int(perm[3])], [50]]):
        a, b = fast.generate(batch, params), plain.generate(batch, params)
        assert [r.token_ids for r in a] == [r.token_ids for r in b]
        assert a[0].token_ids[:2] == [int(perm[batch[0][-1]]), int(perm[perm[batch[0][-1]]])]


def test_without_the_kernel_the_model_is_left_alone(monkeypatch: pytest.MonkeyPatch,
                                                    chain: tuple[MiniMindForCausalLM, torch.Tensor]) -> None:
    monkeypatch.setattr(avx2_int8, "available", lambda: False)
    engine = GenerationEngine(chain[0], quantize="int8")
    assert engine.avx2_layers == 0 and use_avx2_kernel_(engine.model) == 0
    assert all(m._tiled is None for m in engine.model.modules() if isinstance(m, Int8Linear))


@pytest.mark.skipif(not avx2_int8.available(), reason="the AVX2 int8 kernel does not build or run here")
def test_a_nan_or_inf_input_poisons_its_own_row_only() -> None:
    """A float product propagates a NaN; the digit conversion must not turn one into a finite
    answer (a max over AVX lanes drops NaNs), and the other rows stay exact."""
    codes, scale = _codes(16, 100, seed=1)  # K = 100: a scalar tail after the 32-wide blocks too
    x = torch.randn(4, 100, generator=torch.Generator().manual_seed(2))
    x[0, 5] = float("nan")  # in a vector block
    x[1, 98] = float("nan")  # in the tail
    x[2, 40] = float("inf")
    y = avx2_int8.linear(x, avx2_int8.pack(codes), scale)
    assert bool(y[:3].isnan().all())
    want = x[3:].double() @ (codes.double() * scale.double().unsqueeze(1)).t()
    assert rel_err(y[3:], want) < 1e-3


@pytest.mark.skipif(not avx2_int8.available(), reason="the AVX2 int8 kernel does not build or run here")
def test_kernel_splits_its_rows_over_torch_threads_with_the_same_result() -> None:
    """The kernel's at::parallel_for must really run on torch's threads (built without -fopenmp it
    ran every product on one thread), and a split product equals the one-thread product bit for bit:
    each output belongs to one thread."""
    codes, scale = _codes(256, 96, seed=3)
    packed = avx2_int8.pack(codes)
    x = torch.randn(3, 96, generator=torch.Generator().manual_seed(4))
    one = avx2_int8.linear(x, packed, scale)
    torch.set_num_threads(2)  # the one_thread fixture restores the count
    assert avx2_int8.parallel_threads() == 2
    assert torch.equal(avx2_int8.linear(x, packed, scale), one)
    torch.set_num_threads(1)
    assert avx2_int8.parallel_threads() == 1


def test_a_compiler_without_openmp_gets_the_one_thread_build(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel is built with -fopenmp where torch has OpenMP; if that build fails, the plain build
    is tried instead of giving up the kernel, and a plain build's failure is still reported."""
    calls: list[list[str]] = []

    def fake_load(**kwargs):
        calls.append(kwargs["extra_cflags"])
        if "-fopenmp" in kwargs["extra_cflags"]:
            raise RuntimeError("error: unsupported option '-fopenmp'")

    monkeypatch.setattr(torch.backends.openmp, "is_available", lambda: True)
    cpp_kernels.load_extension(fake_load, "k", "int8_avx2.cpp")
    assert calls == [["-O3", "-mavx2", "-mfma", "-fopenmp"], ["-O3", "-mavx2", "-mfma"]]

    def failing_load(**kwargs):
        raise RuntimeError("no compiler")

    with pytest.raises(RuntimeError, match="no compiler"):
        cpp_kernels.load_extension(failing_load, "k", "int8_avx2.cpp")
