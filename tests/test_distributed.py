"""Multi-process training: two real CPU ranks (gloo) under DDP and FSDP2, against one process.

The two ranks are spawned once per module; each runs every scenario and saves what the tests
compare. Scenarios train ``STEPS`` steps of a tiny Llama with a control law that backs α off at
every control step once warm, on a global batch of 4 sequences split 2 + 2 across the ranks; the
single-process reference trains on the whole global batch.
"""

from __future__ import annotations

import math
import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import lm_batch, tiny_llama
from torch import nn

from alpha_tuner import AlphaTunedOptimizer, ControlConfig, StepLaw
from alpha_tuner.distributed import (
    broadcast_state,
    gather_full,
    is_distributed,
    pack_tensors,
    unpack_tensors,
    unwrap_model,
)
from alpha_tuner.measure import DriftMeter

WORLD = 2
STEPS = 6
LR = 1e-3
TUNER: dict[str, Any] = {
    "measure_every": 1,
    "measure_phases": 2,
    "control_every": 2,
    "control": ControlConfig(rho_max=1e-9, min_factor=1e-3),
}
_COLLECTIVES = (
    "broadcast",
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "reduce_scatter_tensor",
    "all_gather_object",
    "broadcast_object_list",
    "reduce",
    "gather",
    "scatter",
    "barrier",
)


def _global_batch(step: int) -> dict[str, torch.Tensor]:
    return lm_batch(seed=100 + step, n=2 * WORLD)


def _local_batch(step: int, rank: int) -> dict[str, torch.Tensor]:
    return {k: v[2 * rank : 2 * rank + 2] for k, v in _global_batch(step).items()}


def _lora_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}


@contextmanager
def _count_collectives() -> Iterator[list[int]]:
    """Count calls of torch.distributed's collectives while the block runs."""
    calls = [0]
    saved = {name: getattr(dist, name) for name in _COLLECTIVES}

    def counting(fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            calls[0] += 1
            return fn(*args, **kwargs)

        return wrapper

    for name, fn in saved.items():
        setattr(dist, name, counting(fn))
    try:
        yield calls
    finally:
        for name, fn in saved.items():
            setattr(dist, name, fn)


def _summary(opt: AlphaTunedOptimizer, model: Any) -> dict[str, Any]:
    return {
        "alphas": opt.alphas(),
        "rho": opt.drift_ratios(),
        "control": {k: v.clone() for k, v in opt._control._asdict().items()},
        "alpha_pattern": dict(model.peft_config["default"].alpha_pattern),
        "meter": type(opt._meter).__name__,
        "sharded_chunks": sum(c.sharded for c in opt._meter._chunks),  # type: ignore[union-attr]
    }


def _run_ddp(rank: int, *, perturb: bool) -> dict[str, Any]:
    model = tiny_llama(seed=0)
    ddp = nn.parallel.DistributedDataParallel(model)
    # The DDP wrapper itself is passed: the tuner must unwrap it.
    opt = AlphaTunedOptimizer(torch.optim.AdamW(ddp.parameters(), lr=LR), ddp, **TUNER)
    counts = []
    for step in range(STEPS):
        ddp(**_local_batch(step, rank)).loss.backward()
        if perturb and rank == 1 and step == 1:  # just before the first control step
            c = opt._control
            opt._control = c._replace(log_alpha=c.log_alpha - math.log(1.5), rho_slow=c.rho_slow * 3)
        with _count_collectives() as calls:
            opt.step()
        counts.append(calls[0])
        opt.zero_grad()
    return {**_summary(opt, model), "lora": _lora_state(model), "collectives": counts}


def _run_ddp_law(rank: int) -> dict[str, Any]:
    """The step law under DDP; rank 1's law state is perturbed before the first control step."""
    model = tiny_llama(seed=0)
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = AlphaTunedOptimizer(torch.optim.AdamW(ddp.parameters(), lr=LR), ddp, steps=StepLaw(), **TUNER)
    for step in range(STEPS):
        ddp(**_local_batch(step, rank)).loss.backward()
        law = opt.engine.state.law
        if rank == 1 and step == 1 and law is not None:
            opt.engine.state = opt.engine.state._replace(law=law._replace(log_update=law.log_update + 3.0))
        opt.step()
        opt.zero_grad()
    law = opt.engine.state.law
    assert law is not None
    return {
        "alphas": opt.alphas(),
        "lora": _lora_state(model),
        "law": {k: v.clone() for k, v in law._asdict().items()},
    }


def _fsdp_trained(
    rank: int, **options: Any
) -> tuple[Any, AlphaTunedOptimizer, dict[str, Any], dict[str, Any]]:
    """A sharded tiny Llama trained STEPS steps: (model, opt, full state dict, its LoRA tensors)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard

    model = tiny_llama(seed=0)
    for layer in model.base_model.model.model.layers:  # type: ignore[union-attr]
        fully_shard(layer)
    fully_shard(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = AlphaTunedOptimizer(torch.optim.AdamW(params, lr=LR), model, **options, **TUNER)
    for step in range(STEPS):
        model(**_local_batch(step, rank)).loss.backward()
        opt.step()
        opt.zero_grad()
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    lora = {k: v.detach().clone() for k, v in full.items() if "lora_" in k and isinstance(v, torch.Tensor)}
    return model, opt, full, lora


def _run_fsdp(rank: int, adapter_dir: Path) -> dict[str, Any]:

    model, opt, full, lora = _fsdp_trained(rank)
    if rank == 0:
        model.save_pretrained(adapter_dir, state_dict=full)  # type: ignore[operator]
    tuner = opt.state_dict()["alpha_tuner"]
    summary = {**_summary(opt, model), "lora": lora, "tuner_alpha": tuner["alpha"], "keys": tuner["keys"]}
    return {**summary, **_fsdp_resume(model, opt)}


def _run_fsdp_law(rank: int) -> dict[str, Any]:
    """The step law on FSDP2-sharded factors (moments rescaled, no gradient hooks)."""
    _, opt, _, lora = _fsdp_trained(rank, steps=StepLaw())
    law = opt.engine.state.law
    assert law is not None
    hooked = 0 if opt.engine._units is None else len(opt.engine._units)
    return {
        "alphas": opt.alphas(),
        "lora": lora,
        "law": {k: v.clone() for k, v in law._asdict().items()},
        "hooked": hooked,
    }


def _fsdp_resume(model: Any, opt: AlphaTunedOptimizer) -> dict[str, Any]:
    """Checkpoint the sharded model and optimizer, go on, and go on again from the checkpoint."""
    import copy

    from torch.distributed.fsdp import fully_shard

    model_sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    opt_sd = copy.deepcopy(opt.state_dict())
    extra = range(STEPS, STEPS + 4)

    def go_on(m: Any, o: AlphaTunedOptimizer) -> dict[str, torch.Tensor]:
        for step in extra:
            m(**_local_batch(step, dist.get_rank())).loss.backward()
            o.step()
            o.zero_grad()
        return {k: v.full_tensor().clone() for k, v in m.state_dict().items() if "lora_" in k}

    straight = go_on(model, opt)
    fresh = tiny_llama(seed=1)  # other LoRA init: factors and alpha must come from the checkpoint
    for layer in fresh.base_model.model.model.layers:  # type: ignore[union-attr]
        fully_shard(layer)
    fully_shard(fresh)
    fresh_opt = AlphaTunedOptimizer(
        torch.optim.AdamW([p for p in fresh.parameters() if p.requires_grad], lr=LR), fresh, **TUNER
    )
    fresh.load_state_dict(model_sd)
    fresh_opt.load_state_dict(opt_sd)
    resumed_alphas = fresh_opt.alphas()
    resumed = go_on(fresh, fresh_opt)
    return {
        "resume_alpha_at_checkpoint": (resumed_alphas, opt_sd["alpha_tuner"]["alpha"]),
        "resume": (straight, resumed, opt.alphas(), fresh_opt.alphas()),
    }


def _worker(rank: int, port: int, out: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60))
    try:
        results = {
            "ddp": _run_ddp(rank, perturb=False),
            "perturbed": _run_ddp(rank, perturb=True),
            "law": _run_ddp_law(rank),
            "fsdp_law": _run_fsdp_law(rank),
            "fsdp": _run_fsdp(rank, Path(out) / "adapter"),
        }
        torch.save(results, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def ranks_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ranks")


@pytest.fixture(scope="module")
def ranks(ranks_dir: Path) -> tuple[dict[str, Any], ...]:
    out = ranks_dir
    ctx = mp.start_processes(
        _worker, args=(_free_port(), str(out)), nprocs=WORLD, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + 180
    while not ctx.join(timeout=2):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the spawned ranks did not finish within 180 s")
    return tuple(torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD))


@pytest.fixture(scope="module")
def reference() -> tuple[nn.Module, dict[str, Any]]:
    model = tiny_llama(seed=0)
    opt = AlphaTunedOptimizer(torch.optim.AdamW(model.parameters(), lr=LR), model, **TUNER)
    for step in range(STEPS):
        model(**_global_batch(step)).loss.backward()
        opt.step()
        opt.zero_grad()
    return model, {**_summary(opt, model), "lora": _lora_state(model)}


def _assert_same_state(r0: dict[str, Any], r1: dict[str, Any]) -> None:
    assert r0["alphas"] == r1["alphas"]
    assert r0["alpha_pattern"] == r1["alpha_pattern"]
    for name, value in r0["control"].items():
        assert torch.equal(value, r1["control"][name]), name


def _assert_matches_reference(run: dict[str, Any], ref: dict[str, Any]) -> None:
    assert run["alphas"].keys() == ref["alphas"].keys()
    for name, alpha in ref["alphas"].items():
        assert run["alphas"][name] == pytest.approx(alpha, rel=1e-6), name
    assert run["lora"].keys() == ref["lora"].keys()
    for name, value in ref["lora"].items():
        torch.testing.assert_close(run["lora"][name], value, rtol=1e-4, atol=1e-6, msg=name)


# --------------------------------------------------------------------------- DDP, 2 ranks
def test_ddp_alpha_changes_and_is_identical_on_every_rank(ranks: tuple[dict[str, Any], ...]) -> None:
    r0, r1 = (r["ddp"] for r in ranks)
    _assert_same_state(r0, r1)
    for name, value in r0["lora"].items():
        torch.testing.assert_close(r1["lora"][name], value, rtol=0, atol=1e-7, msg=name)
    n_control = r0["control"]["n_backoffs"]
    assert int(n_control.min()) >= 1  # α really moved during the run


def test_ddp_matches_single_process_on_the_global_batch(
    ranks: tuple[dict[str, Any], ...], reference: tuple[nn.Module, dict[str, Any]]
) -> None:
    _, ref = reference
    for r in ranks:
        _assert_matches_reference(r["ddp"], ref)
    for name, rho in ref["rho"].items():
        assert ranks[0]["ddp"]["rho"][name] == pytest.approx(rho, rel=1e-3), name


def test_ddp_one_collective_per_control_step_and_none_otherwise(ranks: tuple[dict[str, Any], ...]) -> None:
    for r in ranks:
        expected = [int((i + 1) % TUNER["control_every"] == 0) for i in range(STEPS)]
        assert r["ddp"]["collectives"] == expected


def test_rank_with_perturbed_controller_state_ends_identical(ranks: tuple[dict[str, Any], ...]) -> None:
    r0, r1 = (r["perturbed"] for r in ranks)
    _assert_same_state(r0, r1)
    for name, value in r0["lora"].items():
        torch.testing.assert_close(r1["lora"][name], value, rtol=0, atol=1e-7, msg=name)
    # Rank 0's (unperturbed) state won: the run is the unperturbed one.
    assert r0["alphas"] == ranks[0]["ddp"]["alphas"]


def test_ddp_step_law_state_and_factors_are_identical_on_every_rank(
    ranks: tuple[dict[str, Any], ...],
) -> None:
    """The broadcast carries the step law's state (balance, EMAs): a perturbed rank ends identical."""
    r0, r1 = (r["law"] for r in ranks)
    assert r0["alphas"] == r1["alphas"]
    for name, value in r0["law"].items():
        assert torch.equal(r1["law"][name], value), name
    for name, value in r0["lora"].items():
        torch.testing.assert_close(r1["lora"][name], value, rtol=0, atol=1e-7, msg=name)
    assert float(r0["law"]["log_balance"].abs().max()) > 0  # the law acted


# -------------------------------------------------------------------------- FSDP2, 2 ranks
def test_fsdp2_step_law_runs_on_sharded_factors_and_ranks_agree(ranks: tuple[dict[str, Any], ...]) -> None:
    r0, r1 = (r["fsdp_law"] for r in ranks)
    assert r0["hooked"] == 0  # DTensor factors: moments are rescaled instead of gradients hooked
    assert r0["alphas"] == r1["alphas"]
    for name, value in r0["law"].items():
        assert torch.equal(r1["law"][name], value), name
    for name, value in r0["lora"].items():
        torch.testing.assert_close(r1["lora"][name], value, rtol=0, atol=1e-7, msg=name)
    assert float((r0["law"]["log_balance"] - r0["law"]["log_balance0"]).abs().max()) > 0


def test_fsdp2_measures_sharded_factors_and_matches_single_process(
    ranks: tuple[dict[str, Any], ...], reference: tuple[nn.Module, dict[str, Any]]
) -> None:
    _, ref = reference
    r0, r1 = (r["fsdp"] for r in ranks)
    assert r0["meter"] == "DriftMeter"  # one meter: the sharded factors go through its gather hook
    assert r0["sharded_chunks"] > 0 and ref["sharded_chunks"] == 0
    _assert_same_state(r0, r1)
    assert r0["tuner_alpha"] == r1["tuner_alpha"]
    for r in (r0, r1):
        _assert_matches_reference(r, ref)
        for name, rho in ref["rho"].items():
            assert r["rho"][name] == pytest.approx(rho, rel=1e-3), name
    assert r0["alpha_pattern"] == ref["alpha_pattern"]


def test_fsdp2_saved_adapter_reproduces_the_single_process_model(
    ranks: tuple[dict[str, Any], ...], ranks_dir: Path, reference: tuple[nn.Module, dict[str, Any]]
) -> None:
    from peft import PeftModel

    ref_model: Any = reference[0]
    base = tiny_llama(seed=0).unload()  # type: ignore[operator]
    loaded = PeftModel.from_pretrained(base, ranks_dir / "adapter").eval()
    batch = lm_batch(seed=7)
    with torch.no_grad():
        expected = ref_model.eval()(**batch).logits
        torch.testing.assert_close(loaded(**batch).logits, expected, rtol=1e-4, atol=1e-5)


def test_fsdp2_optimizer_state_dict_resumes_the_identical_trajectory(
    ranks: tuple[dict[str, Any], ...],
) -> None:
    for r in (ranks[0]["fsdp"], ranks[1]["fsdp"]):
        resumed_alphas, saved = r["resume_alpha_at_checkpoint"]
        assert list(resumed_alphas.values()) == saved
        straight, resumed, alphas, resumed_final = r["resume"]
        assert straight.keys() == resumed.keys() and straight
        for name in straight:
            assert torch.equal(straight[name], resumed[name]), name
        assert alphas == resumed_final


# ------------------------------------------------------------------- single-process helpers
def test_pack_unpack_round_trip_keeps_dtypes_and_bits() -> None:
    tensors = [
        torch.randn(3),
        torch.arange(3),
        torch.tensor([True, False, True]),
        torch.randn(2, 2, dtype=torch.float64),
        torch.zeros(0),
    ]
    out = unpack_tensors(pack_tensors(tensors), tensors)
    for a, b in zip(tensors, out, strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)
    with pytest.raises(ValueError, match="bytes"):
        unpack_tensors(torch.zeros(5, dtype=torch.uint8), tensors)


def test_without_process_group_nothing_is_communicated() -> None:
    assert not is_distributed()
    model = tiny_llama()
    opt = AlphaTunedOptimizer(torch.optim.AdamW(model.parameters(), lr=LR), model)
    assert broadcast_state(opt._control) is opt._control


def test_wrapped_model_is_tuned_like_the_peft_model() -> None:
    model: Any = tiny_llama()
    plain = AlphaTunedOptimizer(torch.optim.AdamW(model.parameters(), lr=LR), model)
    other: Any = tiny_llama()
    wrapped = AlphaTunedOptimizer(torch.optim.AdamW(other.parameters(), lr=LR), nn.DataParallel(other))
    assert unwrap_model(nn.DataParallel(other)) is other
    assert wrapped.model is other
    assert wrapped.alphas() == plain.alphas()
    assert [t.key for t in wrapped.targets] == [t.key for t in plain.targets]
    assert other.peft_config["default"].alpha_pattern == model.peft_config["default"].alpha_pattern


def test_plain_factors_take_no_gather() -> None:
    """Without DTensors the meter has no sharded chunk and the gather hook is the identity."""
    model = tiny_llama()
    tuned = AlphaTunedOptimizer(torch.optim.AdamW(model.parameters(), lr=LR), model, adapt=False)
    meter = DriftMeter(tuned.targets, tuned.device)
    assert not any(c.sharded for c in meter._chunks)
    x = torch.randn(2, 3, 4)
    assert gather_full(x, tuned.targets[0].weight_a) is x
