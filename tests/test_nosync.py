"""step() never synchronises with the host, except for one batched transfer per control step.

On CPU there is no device to wait for, so the test makes every way of reading a tensor value
on the host (``item``, ``bool``, ``float``, ``int``, ``index``, ``tolist``, ``cpu``, ``numpy``)
raise while ``step()`` runs. torch's own AdamW reads its CPU step counters with ``.item()``
in the for-loop and foreach paths (``torch.optim.optimizer._get_value``; on CUDA those counters
stay on the CPU when ``capturable=False``, so this is no device sync there). For those
configurations the inner ``step`` is exempted, and what is checked is the wrapper's own work
around it: snapshot, measurement, observation, control. Fused AdamW reads nothing on the host,
so with it the whole ``step()`` is checked, inner step included.

A control step also copies nothing from the host to the device: ``torch.tensor`` (how the
wrapper would build a tensor from host values) is counted while the guard is armed.

On CUDA, ``torch.cuda.set_sync_debug_mode("error")`` turns any synchronising CUDA call into an
error; the CUDA test runs wrapped steps under it and skips cleanly without a GPU.
"""

from __future__ import annotations

import contextlib
import functools
import operator
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from conftest import lm_batch, tiny_llama
from torch import nn

import alpha_tuner.measure
import alpha_tuner.optimizer
from alpha_tuner import AlphaTunedOptimizer, ControlConfig, StepLaw

SYNC_METHODS = ("item", "__bool__", "__float__", "__int__", "__index__", "tolist", "cpu", "numpy")

#: Inner AdamW configurations: (kwargs, whether its own step reads values on the host on CPU).
INNER: dict[str, tuple[dict[str, Any], bool]] = {
    "for-loop": ({"foreach": False}, True),
    "foreach": ({"foreach": True}, True),
    "fused": ({"fused": True}, False),
}


class HostSync(RuntimeError):
    """Raised by a guarded tensor method."""


class SyncGuard:
    """While armed, the host-sync methods of ``torch.Tensor`` raise (or, if allowed, are counted)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.armed = False
        self.allowed: frozenset[str] = frozenset()
        self.calls: Counter[str] = Counter()
        self.host_to_device: Counter[str] = Counter()
        for name in SYNC_METHODS:
            monkeypatch.setattr(torch.Tensor, name, self._guarded(name, getattr(torch.Tensor, name)))
        monkeypatch.setattr(torch, "tensor", self._counted(torch.tensor))

    def _counted(self, original: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(original)
        def make(*args: Any, **kwargs: Any) -> Any:
            if self.armed:
                self.host_to_device["tensor"] += 1
            return original(*args, **kwargs)

        return make

    def _guarded(self, name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(original)
        def method(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if self.armed:
                if name not in self.allowed:
                    raise HostSync(f"Tensor.{name} called inside step()")
                self.calls[name] += 1
            return original(tensor, *args, **kwargs)

        return method

    @contextlib.contextmanager
    def armed_for(self, allowed: tuple[str, ...] = ()) -> Iterator[Counter[str]]:
        """Arm the guard; yields the counter of allowed calls made while armed."""
        self.armed, self.allowed, self.calls = True, frozenset(allowed), Counter()
        self.host_to_device = Counter()
        try:
            yield self.calls
        finally:
            self.armed = False

    def exempt(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` with the guard disarmed while it runs (for the inner optimizer's step)."""

        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> Any:
            armed, self.armed = self.armed, False
            try:
                return fn(*args, **kwargs)
            finally:
                self.armed = armed

        return call


@pytest.fixture
def guard(monkeypatch: pytest.MonkeyPatch) -> SyncGuard:
    return SyncGuard(monkeypatch)


def _random_grads(model: nn.Module, seed: int) -> None:
    """Gradients without a forward/backward pass (the step is what is under test)."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype) * 1e-2


def _wrapped(
    guard: SyncGuard, inner: str, control: ControlConfig | None = None, **kw: Any
) -> tuple[nn.Module, AlphaTunedOptimizer]:
    model = tiny_llama(seed=7)
    kwargs, inner_reads_host = INNER[inner]
    base = torch.optim.AdamW(model.parameters(), lr=1e-3, **kwargs)
    if inner_reads_host:
        base.step = guard.exempt(base.step)  # type: ignore[method-assign]
    return model, AlphaTunedOptimizer(base, model, control=control, **kw)


def test_guard_catches_every_host_read(guard: SyncGuard) -> None:
    """The guard itself can fail: each method raises while armed, on tensors and parameters."""
    reads: dict[str, Callable[[torch.Tensor], Any]] = {
        "item": lambda t: t.item(),
        "__bool__": bool,
        "__float__": float,
        "__int__": int,
        "__index__": operator.index,
        "tolist": lambda t: t.tolist(),
        "cpu": lambda t: t.cpu(),
        "numpy": lambda t: t.numpy(),
    }
    assert set(reads) == set(SYNC_METHODS)
    for t in (torch.ones((), dtype=torch.long), nn.Parameter(torch.ones(()), requires_grad=False)):
        for name, read in reads.items():
            if name == "__index__" and t.is_floating_point():
                continue
            with guard.armed_for(), pytest.raises(HostSync, match=name):
                read(t)
            with guard.armed_for((name,)) as calls:
                read(t)
            assert calls[name] == 1
    with guard.armed_for(), pytest.raises(HostSync):  # Python-side branching on a tensor too
        if torch.ones(()) > 0:
            pass


def test_guard_catches_a_sync_in_the_wrapper(guard: SyncGuard, monkeypatch: pytest.MonkeyPatch) -> None:
    """A host read slipped into the measurement is caught even with the inner step exempted."""
    real_ratio = alpha_tuner.measure.drift_ratio

    def syncing_ratio(norms: Any) -> torch.Tensor:
        rho = real_ratio(norms)
        if rho.max() > 1e9:  # the kind of innocent-looking line this test exists for
            pass
        return rho

    monkeypatch.setattr(alpha_tuner.measure, "drift_ratio", syncing_ratio)
    model, opt = _wrapped(guard, "foreach", measure_every=1, control_every=1000)
    _random_grads(model, 0)
    with guard.armed_for(), pytest.raises(HostSync, match="__bool__"):
        opt.step()


@pytest.mark.parametrize("inner", list(INNER))
def test_measurement_and_plain_steps_do_not_sync(guard: SyncGuard, inner: str) -> None:
    # The rotation's steady state: with control_every 1000 the fast start would decide after
    # every measurement of its first interval.
    model, opt = _wrapped(guard, inner, measure_every=1, control_every=1000, fast_start=False)
    for i in range(8):  # every step measures; none controls
        _random_grads(model, i)
        with guard.armed_for():
            opt.step()
        opt.zero_grad()
    # Four phases: each step measures a quarter of the layers, each layer every fourth step.
    assert opt.diagnostics()["measurements"] == 2 * len(opt.targets)


@pytest.mark.parametrize("inner", list(INNER))
@pytest.mark.parametrize("backing_off", [False, True], ids=["alpha-kept", "alpha-moved"])
def test_default_cadence_syncs_once_per_control_step(guard: SyncGuard, inner: str, backing_off: bool) -> None:
    """Default cadence: 40 steps of which 4 measure; only the 40th syncs, with one ``tolist``.

    The control step builds no tensor from host values (no host-to-device copy), even when α moves.
    """
    # rho_max tiny: every control step backs α off, so the rescale path runs under the guard too.
    control = ControlConfig(rho_max=1e-12) if backing_off else None
    model, opt = _wrapped(guard, inner, control=control, steps=None)  # the back-off law
    assert (opt.measure_every, opt.measure_phases, opt.control_every) == (10, 4, 40)
    assert opt._meter is not None and opt._meter.num_phases == 4
    alphas0 = opt.alphas()
    # Four control intervals: each layer has 4 measurements, past the controller's warm-up of 3.
    for i in range(4 * opt.control_every):
        _random_grads(model, i)
        control_step = (i + 1) % opt.control_every == 0
        with guard.armed_for(("tolist",) if control_step else ()) as calls:
            opt.step()
        assert calls == (Counter(tolist=1) if control_step else Counter()), f"step {i}"
        if control_step or inner != "fused":  # fused AdamW makes its step counters at step 1
            assert guard.host_to_device == Counter(), f"step {i}"
    # 16 measurements, rotating through the four phases: 4 of every layer.
    assert opt.diagnostics()["measurements"] == 4 * len(opt.targets)
    assert (opt.alphas() != alphas0) == backing_off


@pytest.mark.parametrize("inner", list(INNER))
def test_step_law_syncs_once_per_control_step(guard: SyncGuard, inner: str) -> None:
    """The step law at the default cadence without the fast start: one ``tolist`` per control
    step (steps 40 and 80), nothing else.

    Its placement reads the factor norms once, at construction (outside the guard); each
    control step moves α and the balance of every layer with no host-to-device copy.
    """
    model, opt = _wrapped(guard, inner, steps=StepLaw(), fast_start=False)
    law0 = opt.engine.state.law
    assert law0 is not None
    for i in range(2 * opt.control_every):
        _random_grads(model, i)
        control_step = (i + 1) % opt.control_every == 0
        with guard.armed_for(("tolist",) if control_step else ()) as calls:
            opt.step()
        assert calls == (Counter(tolist=1) if control_step else Counter()), f"step {i}"
        if control_step or inner != "fused":
            assert guard.host_to_device == Counter(), f"step {i}"
    law = opt.engine.state.law
    assert law is not None and not torch.equal(law.log_balance, law0.log_balance)  # the law acted


def test_a_tensor_learning_rate_is_not_read_on_the_host(guard: SyncGuard) -> None:
    """A tensor LR (fused AdamW accepts one) under a warm-up scheduler: the law's schedule factor
    ``lr / initial_lr`` stays on the device, so measuring steps still read nothing on the host."""
    model = tiny_llama(seed=7)
    base = torch.optim.AdamW(model.parameters(), lr=torch.tensor(1e-3), fused=True)
    law = StepLaw(schedule_mean=1.0)
    opt = AlphaTunedOptimizer(base, model, steps=law, fast_start=False, measure_every=2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: min(1.0, (t + 1) / 10))
    assert isinstance(base.param_groups[0]["lr"], torch.Tensor)
    law0 = opt.engine.state.law
    assert law0 is not None
    for i in range(opt.control_every):
        _random_grads(model, i)
        control_step = (i + 1) % opt.control_every == 0
        with guard.armed_for(("tolist",) if control_step else ()) as calls:
            opt.step()
        assert calls == (Counter(tolist=1) if control_step else Counter()), f"step {i}"
        sched.step()
    law = opt.engine.state.law
    assert law is not None
    # every layer was measured at the warm-up's factors and folded in (none skipped)
    assert bool((law.n_measured > 0).all()) and int(law.n_skipped.sum()) == 0
    assert not torch.equal(law.log_balance, law0.log_balance)  # and the law acted


@pytest.mark.parametrize("inner", list(INNER))
def test_the_fast_start_syncs_only_on_its_control_steps(guard: SyncGuard, inner: str) -> None:
    """The default ``fast_start``: in the first interval every measurement (steps 10, 20, 30, 40)
    is a control step with one ``tolist``; its one-phase meter was made at construction, so no
    step copies index tensors to the device; after it, the default cadence (step 80 only)."""
    model, opt = _wrapped(guard, inner)  # AdamW: the adaptive step law, fast start on by default
    assert opt.fast_start and opt.engine.step_law is not None
    for i in range(2 * opt.control_every):
        _random_grads(model, i)
        step = i + 1
        control_step = (
            step <= opt.control_every and step % opt.measure_every == 0
        ) or step % opt.control_every == 0
        with guard.armed_for(("tolist",) if control_step else ()) as calls:
            opt.step()
        assert calls == (Counter(tolist=1) if control_step else Counter()), f"step {step}"
        if inner != "fused":
            assert guard.host_to_device == Counter(), f"step {step}"
    assert opt.engine._full_meter is None  # the fast start's snapshot is freed after it


@pytest.mark.parametrize("inner", list(INNER))
def test_frequent_control_steps_sync_once_each(guard: SyncGuard, inner: str) -> None:
    model, opt = _wrapped(
        guard, inner, control=ControlConfig(rho_max=1e-12), measure_every=2, measure_phases=2, control_every=4
    )
    for i in range(12):
        _random_grads(model, i)
        control_step = (i + 1) % 4 == 0
        with guard.armed_for(("tolist",) if control_step else ()) as calls:
            opt.step()
        assert calls["tolist"] == int(control_step), f"step {i}"


def _exempt_from_sync_debug(optimizer: torch.optim.Optimizer) -> None:
    """Run the inner optimizer's own step with CUDA's sync debug mode off (it is not under test)."""
    inner_step = optimizer.step

    def exempt_step(*args: Any, **kw: Any) -> Any:
        mode = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode(0)
        try:
            return inner_step(*args, **kw)
        finally:
            torch.cuda.set_sync_debug_mode(mode)

    optimizer.step = exempt_step  # type: ignore[method-assign]


def _cuda_steps(
    model: nn.Module, opt: AlphaTunedOptimizer, steps: int, after: Callable[[], object] | None = None
) -> int:
    """Train ``steps`` steps on CUDA with the sync debug mode at "error" around every step that is
    not a control step (those transfer α by design); ``after`` runs after each step, unchecked.
    Returns the number of steps checked."""
    device = torch.device("cuda")
    checked = 0
    for i in range(steps):
        batch = {k: v.to(device) for k, v in lm_batch(seed=i).items()}
        model(**batch).loss.backward()
        control_step = (i + 1) % opt.control_every == 0
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode(0 if control_step else "error")
        try:
            opt.step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
        checked += not control_step
        if after is not None:
            after()
        opt.zero_grad()
    return checked


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("inner", ["foreach", "fused"])
def test_cuda_steps_do_not_sync(inner: str) -> None:
    """Under ``set_sync_debug_mode("error")`` no measurement or plain step synchronises.

    The inner step is exempted (debug mode off while it runs), so this checks the wrapper's
    own kernels; control steps, which transfer α to the host by design, are not checked.
    """
    device = torch.device("cuda")
    model = tiny_llama(seed=7).to(device)
    kwargs, _ = INNER[inner]
    base = torch.optim.AdamW(model.parameters(), lr=1e-3, **kwargs)
    _exempt_from_sync_debug(base)
    opt = AlphaTunedOptimizer(
        base,
        model,
        control=ControlConfig(rho_max=1e-12),
        measure_every=2,
        measure_phases=1,
        control_every=6,
    )
    assert _cuda_steps(model, opt, 13) == 11
    assert opt.diagnostics()["measurements"] >= 6 * len(opt.targets)  # every other step measured


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("lr_device", ["cpu", "cuda"])
def test_cuda_step_law_with_a_tensor_lr_does_not_sync(lr_device: str) -> None:
    """The step law under fused AdamW with a tensor LR (on the host or on the device) and a
    warm-up scheduler: no measuring or plain step synchronises (the schedule factor is divided on
    the device; a host LR goes over without waiting). The inner step and the scheduler run with
    the debug mode off; control steps transfer α by design and are not checked."""
    device = torch.device("cuda")
    model = tiny_llama(seed=7).to(device)
    base = torch.optim.AdamW(model.parameters(), lr=torch.tensor(1e-3, device=lr_device), fused=True)
    _exempt_from_sync_debug(base)
    law0 = StepLaw(schedule_mean=1.0)
    opt = AlphaTunedOptimizer(base, model, steps=law0, fast_start=False, measure_every=2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: min(1.0, (t + 1) / 10))
    assert _cuda_steps(model, opt, opt.control_every, after=sched.step) == opt.control_every - 1
    law = opt.engine.state.law
    assert law is not None and int(law.n_skipped.sum()) == 0 and bool((law.n_measured > 0).all())
