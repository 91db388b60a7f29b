"""The fast path's tiers (lowmem.optim._dispatch: compiled, foreach) and HMAdamW's use of them,
held against the for-loop.

A compile costs 5-30 s on a 2-core machine (less once Inductor's on-disk cache is warm), so the
default suite compiles one dtype (fp32: both size classes of ``FusedForeach``); the float64 and
bf16 variants are marked slow.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch._dynamo
from torch import nn

import lowmem.optim._dispatch as dispatch
import lowmem.optim._foreach as foreach
import lowmem.optim.hmadam as hmadam_module
from lowmem.optim import AdamS, HMAdam, HMAdamW, SlimAdamW
from lowmem.optim._fast import FusedForeach, flat_views

pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.script_method.*:DeprecationWarning")


def _toy_kernel(p, g, v, *, lr, beta, double):  # element-wise, writes in place like a step
    g2 = g.to(lr.dtype)
    v.copy_(beta * v + g2 * g2)
    p.copy_(p - lr * g2 / (v.sqrt() + 1e-8) * (2 if double else 1))
    g.copy_(beta * g2)


def _toy_lists(seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(37, 19), (53,), (1,), (40, 30)]
    p = [torch.randn(s, generator=gen) for s in shapes]
    p[-1] = p[-1].t().contiguous().t()  # layout differs from its g and v: no flat view, row chunks
    return [p, [torch.randn(s, generator=gen) for s in shapes], [torch.rand(s, generator=gen) for s in shapes]]


# ------------------------------------------------------------------------ generic machinery
def test_flat_views_follow_memory_order():
    conv = torch.randn(5, 3, 3, 3).contiguous(memory_format=torch.channels_last)
    views = flat_views([conv, torch.zeros_like(conv)])  # zeros_like preserves channels_last
    assert views is not None and views[0].dim() == 1 and views[0].data_ptr() == conv.data_ptr()
    assert views[0]._base is None  # detached alias: dynamo must not trace it through its base
    views[1].add_(1.0)
    torch.testing.assert_close(views[0], conv.permute(0, 2, 3, 1).reshape(-1))
    w = torch.randn(4, 6).t()  # transposed: dense, not contiguous
    assert flat_views([w, w.clone(memory_format=torch.preserve_format)]) is not None
    assert flat_views([w, w.contiguous()]) is None  # different layouts: no common flat order
    assert flat_views([torch.randn(8)[::2], torch.randn(4)]) is None


def _assert_eager_results(lists, expected, *, double: bool) -> None:
    """``lists`` equal, bit for bit, ``expected`` after the eager kernel's two steps (lr 0.1, 0.2)."""
    for lr in (0.1, 0.2):
        for p, g, v in zip(*expected):
            _toy_kernel(p, g, v, lr=torch.tensor(lr), beta=torch.tensor(0.9), double=double)
    for got, want in zip(lists, expected):
        for a, b in zip(got, want):
            assert torch.equal(a, b)


def test_foreach_tier_chunks_and_matches_the_eager_kernel_bit_for_bit(monkeypatch):
    """Without the compiled tier the kernel runs as foreach ops, silently (nothing failed), over
    chunks of a few elements (tensors cut along dim 0, one of them in another layout), with the
    eager kernel's results exactly."""
    monkeypatch.setattr(foreach, "CHUNK_NUMEL", 7)  # many chunks, most tensors cut
    runner = FusedForeach(_toy_kernel)
    lists, expected = _toy_lists(), _toy_lists()
    with dispatch.only("native"), warnings.catch_warnings():
        warnings.simplefilter("error")
        for lr in (0.1, 0.2):
            runner(lists, {"lr": lr, "beta": 0.9}, {"double": True})
    _assert_eager_results(lists, expected, double=True)


def test_foreach_tier_broadcasts_and_runs_other_ops_index_by_index():
    """A denominator that broadcasts (AdaPM-mini's block means: (n, 1) and (1, m)) is passed whole
    into every chunk of a cut tensor; ``torch.clamp`` (no foreach form) runs index by index."""

    def kernel(p, v, *, lr):
        p.copy_(p - lr * torch.clamp(p / v, -1.0, 1.0))

    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(40, 30, generator=gen), torch.randn(40, 30, generator=gen), torch.randn(6, generator=gen)]
    dens = [torch.rand(40, 1, generator=gen) + 0.5, torch.rand(1, 30, generator=gen) + 0.5, torch.rand(6, generator=gen)]
    want = [p.clone() for p in params]
    for p, v in zip(want, dens):
        kernel(p, v, lr=torch.tensor(0.1))
    old = foreach.CHUNK_NUMEL
    foreach.CHUNK_NUMEL = 100
    try:
        foreach.run_foreach(kernel, list(zip(params, dens)), {"lr": torch.tensor(0.1)}, {})
    finally:
        foreach.CHUNK_NUMEL = old
    for a, b in zip(params, want):
        assert torch.equal(a, b)


def test_compile_failure_warns_once_then_takes_the_foreach_tier():
    runner = FusedForeach(_toy_kernel)
    runner._compiled = {False: _raise, True: _raise}  # as if Inductor failed on this machine
    lists, expected = _toy_lists(), _toy_lists()
    with dispatch.only("compiled"):
        with pytest.warns(RuntimeWarning, match="torch.compile failed.*foreach.*LOWMEM_BACKENDS"):
            runner(lists, {"lr": 0.1, "beta": 0.9}, {"double": False})
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # warned once only
            runner(lists, {"lr": 0.2, "beta": 0.9}, {"double": False})
    _assert_eager_results(lists, expected, double=False)


def _raise(*args, **kwargs):
    raise RuntimeError("inductor exploded")


def test_cpu_without_a_cxx_compiler_skips_the_compiled_tier(monkeypatch):
    """Inductor needs a C++ compiler on CPU; without one the compiled tier is not tried (a compile
    would fail only after ~20 s of tracing), on CPU only."""
    import torch._inductor.cpp_builder as cpp_builder

    dispatch._inductor_cpu_compiler.cache_clear()
    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", _raise)
    try:
        assert not dispatch.compiled_available(torch.device("cpu"))
        assert dispatch.compiled_available(torch.device("meta")) == dispatch.compiled_available(torch.device("cuda"))
    finally:
        monkeypatch.undo()
        dispatch._inductor_cpu_compiler.cache_clear()
    assert dispatch.compiled_available(torch.device("cpu"))  # this machine has one


def test_backends_from_the_environment_and_only():
    assert dispatch.enabled("native") and dispatch.enabled("compiled")
    with dispatch.only("native"):
        assert dispatch.enabled("native") and dispatch.enabled("foreach") and not dispatch.enabled("compiled")
        assert dispatch.native_library() is not None
    with dispatch.only():
        assert dispatch.native_library() is None
    assert dispatch.enabled("compiled")


def test_lowmem_backends_variable_is_checked_at_import(tmp_path):
    import subprocess
    import sys

    code = "import lowmem.optim._dispatch as d; print(sorted(d._enabled))"
    env = {**__import__("os").environ, "LOWMEM_BACKENDS": "native"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[<Backend.FOREACH: 'foreach'>, <Backend.NATIVE: 'native'>]"
    env["LOWMEM_BACKENDS"] = "native,gpu"
    bad = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "invalid LOWMEM_BACKENDS='native,gpu': unknown ['gpu']" in bad.stderr


def test_fused_none_picks_the_fast_path_for_large_models(monkeypatch):
    calls = []
    monkeypatch.setattr(hmadam_module, "hmadam", lambda *a, **kw: calls.append(kw["fused"]))
    small, large = nn.Parameter(torch.zeros(10)), nn.Parameter(torch.zeros(dispatch.FAST_PATH_MIN_NUMEL))
    for p in (small, large):
        p.grad = torch.zeros_like(p)
    HMAdamW([small]).step()
    HMAdamW([large]).step()
    HMAdamW([large], fused=False).step()
    HMAdamW([small], fused=True).step()
    with dispatch.only():  # no native, no compiled: the foreach tier is still the fast path
        HMAdamW([large]).step()
    assert calls == [False, True, False, True, True]


# ------------------------------------------------------------------ HMAdamW fast vs loop
def _pair(dtype, opt_cls, **kwargs):
    gen = torch.Generator().manual_seed(0)
    shapes = [(37, 19), (53,), (5, 3, 3, 3), (1,), (520, 512), (300, 7), (7,)]  # 520x512: large class
    init = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in shapes]
    init[2] = init[2].contiguous(memory_format=torch.channels_last)
    runs = []
    for fused in (True, False):
        params = [nn.Parameter(x.clone(memory_format=torch.preserve_format)) for x in init]
        groups = [{"params": params[:3]}, {"params": params[3:], "weight_decay": 0.0}]
        runs.append((params, opt_cls(groups, lr=1e-2, fused=fused, weight_decay=0.1, **kwargs)))
    return runs


def _drive(runs, steps, dtype, seed=1):
    gen = torch.Generator().manual_seed(seed)
    for t in range(steps):
        grads = [torch.randn(p.shape, generator=gen, dtype=torch.float64).to(dtype) for p in runs[0][0]]
        for params, opt in runs:
            for group in opt.param_groups:
                group["lr"] = 1e-2 / (1 + t)  # a schedule must not recompile
            opt.zero_grad()
            loss = sum((p * g).sum() for p, g in zip(params, grads))
            loss.backward()
            opt.step()


def _compare(runs, rtol, atol):
    (fast_params, fast_opt), (loop_params, loop_opt) = runs
    for a, b in zip(fast_params, loop_params):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)
        torch.testing.assert_close(a.grad, b.grad, rtol=rtol, atol=atol)
        sa, sb = fast_opt.state[a], loop_opt.state[b]
        torch.testing.assert_close(sa["exp_avg_sq"], sb["exp_avg_sq"], rtol=rtol, atol=atol * 1e-2)
        assert sa["exp_avg_sq"].dtype == sb["exp_avg_sq"].dtype and sa["step"].item() == sb["step"].item()
        assert a.stride() == b.stride() and sa["exp_avg_sq"].stride() == a.stride()


def test_fused_hmadamw_matches_for_loop_fp32(no_native):
    """The Inductor kernels (what other dtypes, layouts and devices get)."""
    runs = _pair(torch.float32, HMAdamW, max_momentum_norm=5.0)
    _drive(runs, 2, torch.float32)  # compiles here
    with torch._dynamo.config.patch(error_on_recompile=True):  # new lr, clip coefficient, step count
        _drive(runs, 4, torch.float32, seed=2)
    _compare(runs, rtol=1e-5, atol=1e-6)
    sizes = {key[0] for key in hmadam_module._HMADAM_FAST._keys}
    assert sizes == {True, False}  # both the single-threaded (small) and parallel kernels ran


@pytest.mark.parametrize("threads", [1, 3])
def test_native_hmadamw_matches_for_loop_fp32(threads, native_calls):
    """Contiguous float32 CPU tensors in one native call (3 threads: shares that start and end
    inside tensors); the channels_last one is left to the compiled kernel."""
    torch.set_num_threads(threads)  # conftest restores it
    runs = _pair(torch.float32, HMAdamW, max_momentum_norm=5.0)
    _drive(runs, 6, torch.float32)
    _compare(runs, rtol=1e-5, atol=1e-6)
    # two param groups, one call each per step: the channels_last tensor is in the first
    assert set(native_calls) == {("lowmem_hmadam_f32", 3, 1), ("lowmem_hmadam_f32", 4, 0)}
    assert runs[0][0][0]._version == 6  # autograd saw each step's in-place write


@pytest.mark.slow
def test_fused_hmadam_float64_is_exact():
    runs = _pair(torch.float64, HMAdam, variance_correction="stationary")
    _drive(runs, 6, torch.float64)
    _compare(runs, rtol=1e-12, atol=1e-14)


@pytest.mark.slow
def test_fused_hmadamw_bf16():
    runs = _pair(torch.bfloat16, HMAdamW)
    _drive(runs, 6, torch.bfloat16)
    # The for-loop rounds W to bf16 after the decay and again after the update; the kernel once.
    _compare(runs, rtol=2e-2, atol=2e-2)
    assert runs[0][1].state[runs[0][0][0]]["exp_avg_sq"].dtype == torch.float32


@pytest.mark.parametrize("opt_cls", [HMAdamW, AdamS, SlimAdamW])
def test_fused_step_with_a_group_without_gradients(opt_cls):
    """A frozen group (every .grad None) is skipped by the fast path, as by the for-loop."""
    frozen, trained = nn.Parameter(torch.ones(4, 3)), nn.Parameter(torch.ones(4, 3))
    trained.grad = torch.ones(4, 3)
    opt = opt_cls([{"params": [frozen]}, {"params": [trained]}], lr=0.1, fused=True)
    opt.step()
    assert torch.equal(frozen, torch.ones(4, 3)) and frozen not in opt.state
    assert not torch.equal(trained, torch.ones(4, 3))


@pytest.mark.parametrize("opt_name", ["HMAdamW", "AdamS", "SlimAdamW"])
def test_native_step_allocates_no_parameter_sized_temporary(opt_name):
    """Peak of torch tensor allocations during a step on a 16 MiB parameter whose state exists
    (torch.profiler's allocation events, as lowmem fit's memory summary measures: tensor bytes,
    not the process RSS, which other processes on the machine disturb): the native fast path
    allocates no tensor of the parameter's size; the for-loop (the control) allocates at least one."""
    from torch.profiler import ProfilerActivity, profile

    from lowmem.cli.memory import _allocation_peak

    cls = {"HMAdamW": HMAdamW, "AdamS": AdamS, "SlimAdamW": SlimAdamW}[opt_name]
    group = {"compress_dims": (0,)} if cls is SlimAdamW else {}
    p = nn.Parameter(torch.randn(1024, 4096))  # 16 MiB
    p.grad = torch.randn_like(p)
    opt = cls([{"params": [p], **group}], fused=True)
    opt.step()  # the state exists from here

    def step_peak(fused: bool) -> int:
        opt.param_groups[0]["fused"] = fused
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            opt.step()
        return _allocation_peak(prof)[0]

    size = p.numel() * p.element_size()
    assert step_peak(True) < size // 64  # scalars and small bookkeeping only
    assert step_peak(False) >= size  # the control: the measurement sees parameter-sized temporaries
