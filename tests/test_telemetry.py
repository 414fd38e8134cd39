"""Tests of alpha_tuner.telemetry: the logging summary and its single host transfer."""

from __future__ import annotations

import math

import pytest
import torch

from alpha_tuner.control import ControlConfig, init_control, observe
from alpha_tuner.telemetry import summarize

NAMES = ["q", "k", "v"]


def _state():
    state = init_control(torch.tensor([8.0, 16.0, 32.0]))
    config = ControlConfig()
    state = observe(state, torch.tensor([0.1, 0.2, math.nan]), config)
    return observe(state, torch.tensor([0.1, math.inf, 0.3]), config)


def test_summary_counts_and_rho_statistics() -> None:
    rho = torch.tensor([0.1, math.nan, 0.3])
    stats = summarize(alphas=[8.0, 16.0, 32.0], steps=20, control=_state(), rho=rho, names=NAMES)
    assert stats["alpha_mean"] == pytest.approx(56 / 3)
    assert (stats["alpha_min"], stats["alpha_max"]) == (8, 32)
    assert stats["steps"] == 20
    assert (stats["measurements"], stats["skipped"], stats["backoffs"]) == (4, 2, 0)
    assert stats["rho_mean"] == pytest.approx(0.2) and stats["rho_min"] == pytest.approx(0.1)
    assert stats["rho_max"] == pytest.approx(0.3)
    assert not any(k.startswith("rho[") for k in stats)


def test_per_layer_rho_keeps_nan_for_unmeasured_layers() -> None:
    rho = torch.tensor([0.1, math.nan, 0.3])
    stats = summarize(alphas=[1.0] * 3, steps=1, control=_state(), rho=rho, names=NAMES, per_layer=True)
    assert stats["rho[q]"] == pytest.approx(0.1) and math.isnan(stats["rho[k]"])


def test_no_rho_keys_before_a_finite_measurement() -> None:
    control = init_control(torch.ones(3))
    before = summarize(alphas=[1.0] * 3, steps=0, control=control, rho=None, names=NAMES, per_layer=True)
    assert before["measurements"] == 0 and not any(k.startswith("rho") for k in before)
    nan = torch.full((3,), math.nan)
    after = summarize(alphas=[1.0] * 3, steps=9, control=control, rho=nan, names=NAMES)
    assert "rho_mean" not in after


def test_summary_reads_the_device_once(monkeypatch) -> None:
    calls = []
    real = torch.Tensor.tolist

    def counting(self):
        calls.append(self.shape)
        return real(self)

    monkeypatch.setattr(torch.Tensor, "tolist", counting)
    summarize(alphas=[1.0] * 3, steps=1, control=_state(), rho=torch.zeros(3), names=NAMES, per_layer=True)
    assert calls == [torch.Size([6])]
