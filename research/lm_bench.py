"""The causal-LM benchmark: SmolLM2-135M + LoRA on every linear layer of its blocks, fine-tuned on
the 2012 convention speeches through the Hugging Face ``Trainer``, exactly as the README tells users.

Each run: ``Trainer(..., optimizers=(opt, None))`` with the method's optimizer
(:mod:`research.peers`), the Trainer's linear warm-up (10 % of the steps) + linear decay,
``max_grad_norm=1`` (its default), bf16 autocast, batch 4 × 128 tokens, 300 steps. The metric
is the mean token loss on 96 fixed blocks of held-out speeches (:mod:`research.corpus`). The
record keeps the training-loss curve (every 10 steps) and the median step time.

    python -m research.lm_bench --stage selection --shard 0/2 &   # two workers, one per core
    python -m research.lm_bench --stage selection --shard 1/2 &
    python -m research.lm_bench --report                          # tables from the results file

``--model minilm`` runs the sweep's review-sentiment task, ``--model debates`` a second
classification task and ``--model party`` a third (:mod:`research.tasks`); ``--model tiny``
runs a 2-layer random Llama with a byte tokenizer (the smoke test).
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

from .peers import LR_FREE, build_peer, lora_alpha, uses_rslora
from .provenance import environment
from .runner import add_runner_arguments, ints, run_pending
from .tasks import TASKS, collator, fresh_model, task_data

__all__ = ["LMRun", "execute", "grid", "main"]

RESULTS = Path("benchmarks/results/lm_bench.jsonl")


@dataclass(frozen=True)
class TaskDefaults:
    """What a task's runs use unless the command line says otherwise."""

    results: Path
    ranks: tuple[int, ...]
    steps: int
    batch_size: int
    block: int
    schedule: str


TASK_DEFAULTS = {
    "smollm2": TaskDefaults(RESULTS, (8, 32), 300, 4, 128, "linear"),
    "minilm": TaskDefaults(Path("benchmarks/results/minilm_bench.jsonl"), (4, 16, 64), 600, 8, 64, "cosine"),
    "debates": TaskDefaults(Path("benchmarks/results/debates_bench.jsonl"), (8, 32), 150, 8, 64, "linear"),
    "party": TaskDefaults(Path("benchmarks/results/party_bench.jsonl"), (8, 32), 150, 8, 64, "linear"),
    "tiny": TaskDefaults(Path("benchmarks/results/tiny_bench.jsonl"), (4,), 20, 4, 128, "linear"),
}
LRS = (1e-5, 1e-4, 1e-3)
RANKS = (8, 32, 128)
SELECTION_SEEDS = (0, 1)
HELD_OUT_SEEDS = (100, 101, 102, 103)
PEERS = ("rslora", "loraplus", "schedulefree")


def oracle_alphas(rank: int) -> list[float]:
    """The α of the oracle grid at this rank: 16, 2r, 8r and 32r (PEFT's s = α/r from 16/r to 32)."""
    return sorted({16.0, 2.0 * rank, 8.0 * rank, 32.0 * rank})


@dataclass(frozen=True)
class LMRun:
    """One fine-tune. ``lr`` is the base LR (1.0 for the LR-free methods); ``alpha=None``: 2r."""

    method: str
    rank: int
    lr: float
    seed: int
    alpha: float | None = None
    steps: int = 300
    batch_size: int = 4
    block: int = 128
    schedule: str = "linear"
    warmup: float = 0.1
    model: str = "smollm2"
    precision: str = "bf16"
    tag: str = ""
    train_size: int | None = None

    def key(self) -> str:
        """The resume key: every field that changes the run."""
        alpha = "recipe" if self.alpha is None else f"{self.alpha:.6g}"
        return (
            f"{self.model}|{self.method}|r={self.rank}|alpha={alpha}|lr={self.lr:.6g}|seed={self.seed}"
            f"|steps={self.steps}|bs={self.batch_size}x{self.block}|{self.schedule}+warmup{self.warmup:g}"
            f"|{self.precision}"
            + (f"|{self.tag}" if self.tag else "")
            + ("" if self.train_size is None else f"|train={self.train_size}")
        )


def _step_timer() -> Any:
    """A Trainer callback that keeps the wall time of every optimizer step (``.median()``)."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.start = 0.0

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.start = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.times.append(time.perf_counter() - self.start)

        def median(self) -> float:
            steady = self.times[5:] or self.times  # the first steps pay one-time start-up
            return statistics.median(steady) if steady else math.nan

    return StepTimer()


def training_subset(dataset: Any, size: int) -> torch.utils.data.Subset:
    """``size`` examples of ``dataset``, the same for every run (a permutation drawn from seed 0).

    Raises:
        ValueError: If ``size`` is not between 1 and the dataset's length.
    """
    if not 1 <= size <= len(dataset):
        raise ValueError(f"--train-size must be between 1 and the training set's {len(dataset)}, got {size}")
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))
    return torch.utils.data.Subset(dataset, sorted(order[:size].tolist()))


def execute(run: LMRun, *, watch: Callable[[Any, Any], Sequence[Any]] | None = None) -> dict[str, Any]:
    """Fine-tune one configuration through the Trainer and return its record.

    Args:
        run: The configuration.
        watch: Called with the method's tuner (``None`` for a peer) and the PEFT model before
            training; the Trainer callbacks it returns run beside the step timer (probes read
            the run through them, :mod:`research.probes.adam_caution`).
    """
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments

    task = TASKS[run.model]
    train_ds, eval_ds = task_data(run.model, run.block)
    if run.train_size is not None:
        train_ds = training_subset(train_ds, run.train_size)
    base = fresh_model(run.model, run.seed)
    targets = task.target_modules if isinstance(task.target_modules, str) else list(task.target_modules)
    torch.manual_seed(run.seed)  # LoRA's A initialisation
    model = get_peft_model(
        base,
        LoraConfig(
            r=run.rank, lora_alpha=lora_alpha(run.method, run.rank, run.alpha), lora_dropout=0.0,  # type: ignore[arg-type]
            use_rslora=uses_rslora(run.method), target_modules=targets, task_type=task.task_type,
            modules_to_save=list(task.modules_to_save) or None,
        ),
    )  # fmt: skip
    warmup_steps = round(run.warmup * run.steps)
    peer = build_peer(
        run.method, model, lr=run.lr, schedule=run.schedule, warmup_steps=warmup_steps,
        tuner_options=_tuner_options(run),
    )  # fmt: skip
    alpha_start = _mean_alpha(peer.tuner)
    timer = _step_timer()
    watchers = list(watch(peer.tuner, model)) if watch else []
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp, max_steps=run.steps, per_device_train_batch_size=run.batch_size,
            per_device_eval_batch_size=16, learning_rate=run.lr, lr_scheduler_type=peer.scheduler,
            warmup_steps=warmup_steps, weight_decay=0.0, logging_steps=10, save_strategy="no",
            eval_strategy="no", report_to=[], seed=run.seed, data_seed=run.seed, bf16=run.precision == "bf16",
            use_cpu=True, disable_tqdm=True, dataloader_num_workers=0,
        )  # fmt: skip
        trainer = Trainer(
            model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
            optimizers=(peer.optimizer, None), callbacks=[timer, *watchers],
            data_collator=collator(run.model),
        )  # fmt: skip
        start = time.perf_counter()
        trainer.train()
        train_s = time.perf_counter() - start
        eval_loss = float(trainer.evaluate()["eval_loss"])
    curve = [[e["step"], e["loss"]] for e in trainer.state.log_history if "loss" in e]
    moved = sum(float(p.detach().float().norm()) for n, p in model.named_parameters() if "lora_B" in n)
    return {
        "key": run.key(),
        "config": asdict(run),
        "eval_loss": eval_loss,
        "diverged": not math.isfinite(eval_loss) or any(not math.isfinite(v) for _, v in curve),
        "train_curve": curve,
        "step_s": timer.median(),
        "train_s": train_s,
        "lora_b_norm": moved,
        "alpha_start": alpha_start,
        "alpha_end": _mean_alpha(peer.tuner),
        **_law_readout(peer.tuner),
        **environment(),
    }


def _tuner_options(run: LMRun) -> dict[str, Any] | None:
    """Options from a ``steps*`` run's tag, comma-separated ``key=value`` fields, each optional.

    The step law's fields: ``a`` (``a_step``), ``u`` (``update``), ``m`` (``max_change``),
    ``rms`` (``step_rms``), ``af`` (``adam_floor``), ``ac`` (``adam_collapse``; both ``none``
    for off), ``ref`` (``a_reference``: ``current`` or ``initial``) and ``pool`` (0 or 1); the
    wrapper's: ``h`` (``head_lr``), ``e`` (``measure_every``), ``p`` (``measure_phases``), ``c``
    (``control_every``) and ``f`` (``fast_start``, 0 or 1). A field left out keeps its default.
    Raises ``ValueError`` naming an unknown field.
    """
    if not run.method.startswith("steps") or not run.tag:
        return None
    from alpha_tuner import StepLaw

    fields = dict(item.split("=") for item in run.tag.split(","))
    law_names = {
        "a": "a_step",
        "u": "update",
        "m": "max_change",
        "rms": "step_rms",
        "af": "adam_floor",
        "ac": "adam_collapse",
    }
    wrapper_names = {"e": "measure_every", "p": "measure_phases", "c": "control_every"}
    unknown = sorted(set(fields) - {*law_names, *wrapper_names, "h", "ref", "f", "pool"})
    if unknown:
        raise ValueError(
            f"--tag: unknown field(s) {unknown}; use a=<a_step>, u=<update>, m=<max_change>, "
            "rms=<step_rms>, af=<adam_floor or none>, ac=<adam_collapse or none>, ref=<a_reference>, "
            "pool=<0 or 1>, h=<head_lr>, e=<measure_every>, p=<measure_phases>, c=<control_every>, "
            "f=<fast_start: 0 or 1>."
        )
    law: dict[str, Any] = {
        law_names[key]: None if (key in ("af", "ac") and value == "none") else float(value)
        for key, value in fields.items()
        if key in law_names
    }
    if "ref" in fields:
        law["a_reference"] = fields["ref"]
    if "pool" in fields:
        if fields["pool"] not in ("0", "1"):
            raise ValueError(f"--tag: pool must be 0 or 1, got {fields['pool']!r}.")
        law["pool"] = fields["pool"] == "1"
    options: dict[str, Any] = {"steps": StepLaw(**law)}
    if "h" in fields:
        options["head_lr"] = float(fields["h"])
    options |= {wrapper_names[key]: int(value) for key, value in fields.items() if key in wrapper_names}
    if "f" in fields:
        if fields["f"] not in ("0", "1"):
            raise ValueError(f"--tag: f (fast_start) must be 0 or 1, got {fields['f']!r}.")
        options["fast_start"] = fields["f"] == "1"
    return options


def _law_readout(tuner: Any) -> dict[str, float]:
    """Geometric means over the measured layers of the step law's a and u, its balance, skips."""
    law = None if tuner is None else tuner.engine.state.law
    if law is None:
        return {}
    seen = law.n_measured > 0
    if not bool(seen.any()):
        return {"law_skipped": float(law.n_skipped.sum())}
    return {
        "a_step_end": float(law.log_a_step[seen].mean().exp()),
        "update_end": float(law.log_update[seen].mean().exp()),
        "balance_end": float(law.log_balance.mean().exp()),
        "law_unmeasured": float((~seen).sum()),
        "law_skipped": float(law.n_skipped.sum()),
        "law_collapsed": float(law.n_collapsed.sum()),
        "schedule_mean": math.nan
        if tuner.engine.law_schedule.shape is None
        else tuner.engine.law_schedule.shape.mean,
        # The drift ratio's mean over the layers at their last measurement (the paper's claim 2).
        "rho_end": _finite_mean(tuner.drift_ratios().values()),
    }


def _finite_mean(values: Any) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def _mean_alpha(tuner: Any) -> float | None:
    if tuner is None:
        return None
    values = list(tuner.alphas().values())
    return sum(values) / len(values)


def grid(
    seeds: Iterable[int],
    ranks: Sequence[int],
    *,
    methods: Sequence[str] | None = None,
    recipe_alphas: Sequence[str] = ("2r",),
    lrs: Sequence[float] = LRS,
    tag: str = "",
    **fields: Any,
) -> list[LMRun]:
    """The oracle grid and the peers, seed by seed and rank by rank (the order of the work).

    ``methods=None``: the oracle grid (``lora`` at every α of :func:`oracle_alphas` and LR),
    the peers of :data:`PEERS` at every LR and the LR-free methods once per rank.
    ``recipe_alphas``: the recipe's ``lora_alpha`` for every method but the oracle grid
    (``"2r"`` or a number; ``lora`` runs the oracle grid only when ``methods`` is ``None``).
    """
    runs: list[LMRun] = []
    for seed in seeds:
        for rank in ranks:
            for method in methods or ("lora", *PEERS, *sorted(LR_FREE)):
                # A tag sets the law's options: it names only runs of the law, so one command can
                # list the law (tagged) beside the peers (whose keys, and results, stay the same).
                run_tag = tag if method.startswith("steps") else ""
                if method in LR_FREE:
                    runs.append(LMRun(method, rank, 1.0, seed, tag=run_tag, **fields))
                    continue
                recipe = [None if a == "2r" else float(a) for a in recipe_alphas]
                oracle = method == "lora" and methods is None
                alphas: list[float | None] = oracle_alphas(rank) if oracle else recipe  # type: ignore[assignment]
                runs += [
                    LMRun(method, rank, lr, seed, alpha, tag=run_tag, **fields)
                    for lr in lrs
                    for alpha in alphas
                ]
    return runs


class Setting(NamedTuple):
    """The records of one setting of a results file, and its oracle cells."""

    records: list[dict[str, Any]]
    oracle: dict[int, tuple[float, float]]  # rank → (α, LR), borrowed cells included
    borrowed: dict[int, tuple[float, float]]  # those chosen at the task's own setting
    main: bool  # the file's main setting: it holds the most of the task's records (ties: the task's own)


def setting_records(
    out: Path,
    *,
    model: str,
    selection_seeds: Sequence[int],
    steps: int | None = None,
    schedule: str | None = None,
) -> Setting | None:
    """The records of one setting of ``out`` and its oracle cells; ``None`` where it has none.

    ``steps`` and ``schedule`` default to the task's. The oracle cell of a rank is its best
    plain-LoRA (α, LR) on ``selection_seeds`` at this setting, or, where the grid did not run
    here, at the task's own setting (returned apart as the borrowed cells: the same cell, run
    at another horizon).
    """
    from .bench_report import oracle_cells
    from .runner import read_records

    d = TASK_DEFAULTS[model]
    schedule, steps = schedule or d.schedule, steps or d.steps
    configs = ((r, r["config"]) for r in read_records(out))  # part of the training set: another setting
    every = [r for r, c in configs if c["model"] == model and c.get("train_size") is None]

    def at(n: int, sched: str) -> list[dict[str, Any]]:  # schedule-free runs carry the task's schedule
        return [r for r in every if r["config"]["steps"] == n and r["config"]["schedule"] == sched]

    records, own = at(steps, schedule), at(d.steps, d.schedule)
    if not records:
        return None
    counts = Counter((r["config"]["steps"], r["config"]["schedule"]) for r in every)
    main = max(counts, key=lambda k: (counts[k], k == (d.steps, d.schedule)))
    oracle = oracle_cells(records, selection_seeds)
    borrowed = {
        rank: cell
        for rank, cell in oracle_cells(own, selection_seeds).items()
        if rank not in oracle and any(r["config"]["rank"] == rank for r in records)
    }
    return Setting(records, oracle | borrowed, borrowed, main == (steps, schedule))


def report(
    out: Path,
    *,
    seeds: Sequence[int],
    model: str = "smollm2",
    selection_seeds: Sequence[int] = SELECTION_SEEDS,
    schedule: str | None = None,
    steps: int | None = None,
    claim_seeds: Sequence[int] | None = None,
) -> int:
    """Write the tables (``.md``) and loss curves (``_curves.png``) of one setting of ``out``.

    Only the runs of one setting enter the tables: ``schedule`` and ``steps`` (default: the
    task's), so probes at another horizon or schedule in the same file are not mixed in. The report
    is written beside ``out`` under its stem for the file's main setting (the one with the most of
    the task's records), and for any other under the stem plus ``_<steps>steps`` (and
    ``_<schedule>`` if it is not the task's), so that it does not overwrite the main report. A rank
    whose α × LR grid did not run at this setting on the selection seeds takes the oracle cell
    chosen at the task's own setting (its horizon probe: the same cell, run longer), and the report
    says so. Where the later selection seeds ran on part of the grid only, the oracle is chosen
    among the cells that ran on all of them, and the report names them. The paper's claims are read
    off the grid on ``claim_seeds`` (default: the selection seeds; cells complete on them).
    """
    from .bench_report import format_report, gap_report, method_label, plot_curves, pruned_grid_note, table
    from .claims import format_claims

    d = TASK_DEFAULTS[model]
    schedule, steps = schedule or d.schedule, steps or d.steps
    setting = setting_records(
        out, model=model, steps=steps, schedule=schedule, selection_seeds=selection_seeds
    )
    if setting is None:
        print(f"lm_bench: no {model} records at {steps} steps, schedule {schedule}, in {out} yet")
        return 1
    records, oracle, borrowed, main = setting
    result = table(records, seeds=seeds, selection_seeds=selection_seeds, oracle=oracle)
    titles = {
        "smollm2": "Causal LM: SmolLM2-135M on the 2012 convention speeches",
        "minilm": "MiniLM review sentiment through the Trainer",
        "debates": "MiniLM: the speaker's side in the 2016 presidential debates",
        "party": "MiniLM: the convention's party of a passage of a 2012 speech",
    }
    title = titles.get(model, model)
    own = (steps, schedule) == (d.steps, d.schedule)
    if not own:
        title += f", {steps} steps, {schedule} schedule"
    text = format_report(result, seeds=seeds, title=title)
    if borrowed:
        text += (
            f"\nOracle cells chosen at the task's own setting ({d.steps} steps, {d.schedule}) on the "
            f"selection seeds, for lack of a grid at this one: "
            + ", ".join(f"r = {rank}: α = {a:g}, lr {lr:g}" for rank, (a, lr) in sorted(borrowed.items()))
            + ".\n"
        )
    if note := pruned_grid_note(records, selection_seeds):
        text += "\n" + note
    if any(method_label(r["config"]) == "steps" for r in records):
        text += "\n" + gap_report(
            records, method="steps", seeds=seeds, selection_seeds=selection_seeds, oracle=oracle
        )
    text += "\n" + format_claims(records, selection_seeds if claim_seeds is None else claim_seeds)
    stem = out.stem
    if not main:
        stem += f"_{steps}steps" + ("" if schedule == d.schedule else f"_{schedule}")
    out.with_name(stem + ".md").write_text(text, encoding="utf-8")
    plot_curves(records, out.with_name(stem + "_curves.png"), seed=seeds[0], lr=1e-4)
    print(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run (or list, with ``--dry-run``) the pending runs of a stage."""
    parser = argparse.ArgumentParser(prog="python -m research.lm_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage", choices=("selection", "heldout"), default="selection")
    parser.add_argument("--seeds", type=ints, help="override the stage's seeds")
    parser.add_argument("--ranks", type=ints, help="default 8,32 (smollm2, debates, party), 4,16,64 (minilm)")
    parser.add_argument("--methods", type=lambda s: s.split(","), help="default: oracle grid + peers")
    parser.add_argument(
        "--model", default="smollm2", choices=sorted(TASK_DEFAULTS),
        help="smollm2: causal LM; minilm: the sweep's task at 600 steps, warm-up + cosine; debates: a "
        "second classification task, 150 steps, warm-up + linear; party: a third, the same set-up; "
        "tiny: smoke test",
    )  # fmt: skip
    parser.add_argument("--steps", type=int, help="default 300 (smollm2), 600 (minilm), 150 (debates, party)")
    parser.add_argument(
        "--schedule", choices=("constant", "linear", "cosine"),
        help="the Trainer's schedule after warm-up; default cosine (minilm), else linear",
    )  # fmt: skip
    parser.add_argument("--warmup", type=float, help="warm-up fraction of the steps (default 0.1)")
    parser.add_argument(
        "--lrs", type=lambda s: [float(x) for x in s.split(",")], help="base LRs (default 1e-5,1e-4,1e-3)"
    )
    parser.add_argument(
        "--tag",
        default="",
        help="steps* methods: a=<a_step>,u=<update>,m=<max_change>,rms=<step_rms>,af=<adam_floor or none>,"
        "ac=<adam_collapse or none>,"
        "ref=<current or initial>,pool=<0/1>,h=<head_lr>,e=<measure_every>,p=<measure_phases>,"
        "c=<control_every>,f=<fast_start 0/1> (optional)",
    )
    parser.add_argument(
        "--recipe-alphas", type=lambda s: s.split(","), default=["2r"],
        help="the recipe's lora_alpha for the listed methods: 2r and/or numbers (default 2r)",
    )  # fmt: skip
    parser.add_argument(
        "--precision", choices=("bf16", "fp32"), default="bf16", help="bf16 autocast or float32"
    )
    parser.add_argument(
        "--train-size", type=int, help="train on this many examples of the task's training set (default: all)"
    )
    parser.add_argument("--report", action="store_true", help="write the tables and the figure, run nothing")
    parser.add_argument(
        "--selection-seeds", type=ints, help="--report: seeds that choose the oracle (default 0,1)"
    )
    parser.add_argument(
        "--claim-seeds",
        type=ints,
        help="--report: seeds of the grid the paper's claims are read on (default: the selection seeds)",
    )
    add_runner_arguments(parser, out=None)
    args = parser.parse_args(argv)
    d = TASK_DEFAULTS[args.model]
    out = args.out or d.results
    if args.report:
        selection = args.selection_seeds or list(SELECTION_SEEDS)
        return report(
            out, seeds=args.seeds or selection, model=args.model, selection_seeds=selection,
            schedule=args.schedule, steps=args.steps, claim_seeds=args.claim_seeds,
        )  # fmt: skip
    torch.set_num_threads(args.threads)
    seeds = args.seeds or (SELECTION_SEEDS if args.stage == "selection" else HELD_OUT_SEEDS)
    runs = grid(
        seeds, args.ranks or d.ranks, methods=args.methods, steps=args.steps or d.steps, model=args.model,
        precision=args.precision, batch_size=d.batch_size, block=d.block,
        schedule=args.schedule or d.schedule, recipe_alphas=args.recipe_alphas, tag=args.tag,
        lrs=args.lrs or LRS, train_size=args.train_size,
        **({} if args.warmup is None else {"warmup": args.warmup}),
    )  # fmt: skip
    if args.dry_run:
        from .runner import pending

        todo = pending(runs, out, args.shard)
        print("\n".join(r.key() for r in todo) + f"\n{len(todo)} pending of {len(runs)}")
        return 0
    run_pending(runs, out, execute, shard=args.shard)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
