"""Every backend a user can get from a fast-path optimizer, for the float64 reference tests.

``fused=None`` (the default) picks the native kernels for models of 2^20+ elements, so the
reference checks run on each backend, not on the for-loop alone:

- ``for-loop``: ``fused=False``, float64 params;
- ``native``: ``fused=True`` on float32 params (the hand-written kernels take float32 only;
  float32 rounding over ~120 steps stays near 1e-5 of the float64 reference);
- ``compiled``: ``fused=True`` on float64 params with the native library switched off, i.e. the
  ``torch.compile``'d kernels (AdamMini has none: its fallback is the for-loop); a fallback
  warning (compile failed) fails the test;
- ``foreach``: ``fused=True`` on float64 params with only the foreach tier
  (``lowmem.optim._dispatch.only()``), what a device without ``torch.compile`` or a machine
  without a compiler gets.
"""

from __future__ import annotations

import warnings

import pytest
import torch

# name -> (param dtype, fused, relative tolerance against the float64 reference)
BACKENDS = {
    "for-loop": (torch.float64, False, 1e-6),
    "native": (torch.float32, True, 1e-4),
    "compiled": (torch.float64, True, 1e-6),
    "foreach": (torch.float64, True, 1e-6),
}


def use_backend(name: str, request: pytest.FixtureRequest) -> tuple[torch.dtype, bool, float]:
    """``(dtype, fused, tolerance)`` of backend ``name``; for ``compiled`` the native library is
    made unavailable for the test (the ``no_native`` fixture), for ``foreach`` both the native
    and the compiled tiers (the ``foreach_only`` fixture)."""
    if name == "compiled":
        import torch._dynamo

        request.getfixturevalue("no_native")
        torch._dynamo.reset()  # other tests' compiles count towards dynamo's recompile limit
        # A compile failure falls back to the eager kernel with a warning: here that is a failure.
        # (pytest restores the warning filters after each test.)
        warnings.filterwarnings("error", message="lowmem fast path", category=RuntimeWarning)
    if name == "foreach":
        request.getfixturevalue("foreach_only")
        _require_foreach_calls(request)
    return BACKENDS[name]


def _require_foreach_calls(request: pytest.FixtureRequest) -> None:
    """Fail the test (at teardown) if the foreach tier never ran: a silent fall-through to the
    for-loop would otherwise pass as "foreach"."""
    from lowmem.optim import _fast

    calls, real = [], _fast.run_foreach

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch = request.getfixturevalue("monkeypatch")
    monkeypatch.setattr(_fast, "run_foreach", counting)
    request.addfinalizer(lambda: _assert_ran(calls))


def _assert_ran(calls: list) -> None:
    assert calls, "the foreach tier never ran"
