"""Shared harness of the alignflow-vs-TRL benchmarks: one tiny Llama, one dataset, one timing rule.

Both systems load the same saved model directories through ``from_pretrained`` and see the same token ids:
the examples are encoded once by alignflow's encoder, and only examples that TRL's own tokenisation turns
into exactly the same ids (and that need no truncation on either side) are kept, so neither system pays
for, or profits from, a different tokenisation or truncation rule.

Timing rule (both systems): the wall time of an optimizer step is the interval between the end of the
previous step and the end of this one (alignflow: the recipe's ``StepTimer`` laps in ``metrics.jsonl``;
TRL: a ``TrainerCallback`` at ``on_step_end``), so it includes batch collation and per-step logging. The
first step of every run is a warm-up and is not timed; model loading, tokenisation, reference-log-prob
precomputation and the final export are setup and are not timed. Runs of the two systems alternate,
so load from other processes on the shared machine falls on both.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")

# transformers 5 renames TrainingArguments.gradient_checkpointing; TRL's configs still use the old name.
warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*deprecated", category=FutureWarning)

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
OUT = Path(os.environ.get("ALIGNFLOW_BENCH_OUT", Path(tempfile.gettempdir()) / "alignflow-bench"))
HH = Path(os.environ.get("ALIGNFLOW_DATA", "/work/shared/data")) / "hh-harmless" / "train.jsonl"


@dataclass(frozen=True)
class ModelSize:
    """The benchmark model: a Llama built from a config (random init), untied embeddings, fp32."""

    vocab: int = 4096
    hidden: int = 256
    layers: int = 8
    heads: int = 4
    intermediate: int = 1024
    max_positions: int = 512

    def num_params(self) -> int:
        """Parameters of the causal LM (embeddings + blocks + final norm + LM head)."""
        h, i = self.hidden, self.intermediate
        block = 4 * h * h + 3 * h * i + 2 * h
        return 2 * self.vocab * h + self.layers * block + h


TINY_TEST = ModelSize(vocab=400, hidden=64, layers=2, heads=4, intermediate=128, max_positions=256)


@dataclass
class Assets:
    """Everything a benchmark needs, on disk: model dirs, data files, and the encoded examples."""

    root: Path
    size: ModelSize
    policy_dir: Path
    rm_dir: Path  # LlamaForSequenceClassification (num_labels=1) with the policy's trunk and a seeded head
    rm_ckpt_dir: Path  # the same reward model in alignflow's reward-recipe checkpoint layout
    pairs: list[dict[str, Any]]  # {"id", "prompt", "chosen", "rejected"} texts, all fitting max_length
    sft: list[dict[str, Any]]  # {"id", "prompt", "completion"}
    prompts: list[str]  # RL prompts (HH transcripts up to the first assistant turn)
    max_length: int
    n_params: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def write_jsonl(self, name: str, rows: Sequence[dict[str, Any]]) -> Path:
        path = self.root / "data" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        return path


def quiet() -> None:
    """No weight-loading progress bars or per-step log dicts in the benchmark output."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _hh_rows(limit: int) -> list[tuple[str, str, str]]:
    from alignflow.data.formats import split_hh

    out = []
    with HH.open(encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            try:
                p, c, r = split_hh(rec["chosen"], rec["rejected"])
            except Exception:  # noqa: BLE001 - HH has a few malformed transcripts; skip them
                continue
            if c and r and c != r:
                out.append((p, c, r))
            if len(out) >= limit:
                break
    return out


def build_assets(
    root: Path, size: ModelSize = ModelSize(), max_length: int = 256, n_rows: int = 1900
) -> Assets:
    """Train the tokenizer on HH text, save the policy and reward model, select the examples both sides agree on.

    Kept pairs satisfy, for chosen and rejected: ``[bos] + ids(prompt) + ids(reply) + [eos]`` (alignflow's
    encoding) equals TRL's ``ids(bos_text + prompt + reply + eos_text)`` and fits ``max_length``.
    """
    import torch
    from transformers import LlamaForSequenceClassification

    from alignflow.models.tiny import tiny_llama, train_bpe_tokenizer

    quiet()
    root.mkdir(parents=True, exist_ok=True)
    rows = _hh_rows(n_rows)
    corpus = [t for p, c, r in rows for t in (p, c, r)]
    tok = train_bpe_tokenizer(corpus, size.vocab)
    policy_dir, rm_dir, rm_ckpt = root / "policy", root / "rm", root / "rm-ckpt"
    model = tiny_llama(
        vocab_size=len(tok),
        hidden_size=size.hidden,
        num_layers=size.layers,
        num_heads=size.heads,
        intermediate_size=size.intermediate,
        max_position_embeddings=size.max_positions,
        seed=0,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    n_params = sum(p.numel() for p in model.parameters())
    tok.save_pretrained(str(policy_dir))
    model.save_pretrained(str(policy_dir))
    # The reward model: same trunk, a seeded score head, saved so both systems load identical weights.
    config = model.config
    config.num_labels = 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        rm = LlamaForSequenceClassification(config)
    rm.model.load_state_dict(model.model.state_dict())
    for d in (rm_dir, rm_ckpt / "member-0"):
        tok.save_pretrained(str(d))
        rm.save_pretrained(str(d))
    (rm_ckpt / "ensemble.json").write_text(
        json.dumps(
            {
                "format_version": 1,
                "members": ["member-0"],
                "backbone": "causal",
                "max_length": max_length,
                "max_prompt_length": None,
                "eval": {},
            }
        )
    )

    def own(prompt: str, reply: str) -> list[int]:
        return [
            tok.bos_token_id,
            *tok(prompt, add_special_tokens=False)["input_ids"],
            *tok(reply, add_special_tokens=False)["input_ids"],
            tok.eos_token_id,
        ]

    def trl(prompt: str, reply: str) -> list[int]:
        return list(tok(tok.bos_token + prompt + reply + tok.eos_token)["input_ids"])

    pairs, sft, prompts = [], [], []
    for i, (p, c, r) in enumerate(rows):
        ic, ir = own(p, c), own(p, r)
        if max(len(ic), len(ir)) > max_length or ic != trl(p, c) or ir != trl(p, r):
            continue
        pairs.append({"id": f"hh-{i}", "prompt": p, "chosen": c, "rejected": r})
        sft.append({"id": f"hh-{i}", "prompt": p, "completion": c})
        first = p.find("\n\nAssistant:")
        prompts.append(p[: first + len("\n\nAssistant:")])
    return Assets(
        root=root,
        size=size,
        policy_dir=policy_dir,
        rm_dir=rm_dir,
        rm_ckpt_dir=rm_ckpt,
        pairs=pairs,
        sft=sft,
        prompts=list(dict.fromkeys(prompts)),
        max_length=max_length,
        n_params=n_params,
        extra={"tokenizer_vocab": len(tok)},
    )


def encode_pairs(assets: Assets, rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """alignflow's ids of each pair (``[bos] prompt reply [eos]``) plus its prompt length, for TRL's inputs."""
    from alignflow.data.encode import SequenceEncoder
    from alignflow.data.packing import shared_prefix_length
    from alignflow.models import load_tokenizer

    enc = SequenceEncoder(load_tokenizer(str(assets.policy_dir)), assets.max_length)
    out = []
    for r in rows:
        c, rj = enc.encode(r["prompt"], r["chosen"]), enc.encode(r["prompt"], r["rejected"])
        n_prompt = next(i for i, label in enumerate(c.labels) if label != -100)
        shared = shared_prefix_length(c.input_ids, c.labels, rj.input_ids, rj.labels)
        out.append(
            {
                "chosen_ids": c.input_ids,
                "rejected_ids": rj.input_ids,
                "prompt_len": n_prompt,
                # what alignflow's packed prefix tree runs through the model: the shared prompt once
                "tree_tokens": len(c.input_ids) + len(rj.input_ids) - shared,
            }
        )
    return out


# ---------------------------------------------------------------------------------------------------------------------
# alignflow side


def alignflow_store(root: Path) -> Any:
    from alignflow.store import Store
    from alignflow.workspace import Workspace

    home = root / "workspace"
    return Store.open(Workspace(home=home, db_url=f"sqlite:///{home / 'alignflow.db'}"))


def run_alignflow(
    stage: str, cfg: dict[str, Any], store: Any
) -> tuple[dict[str, Any], list[dict[str, float]]]:
    """Run a recipe through its public API; returns its result and the per-step metrics it logged."""
    import importlib

    from alignflow.config import validate_config

    names = {
        "sft": ("sft", "SFTConfig"),
        "rm": ("reward", "RewardConfig"),
        "dpo": ("dpo", "DPOConfig"),
        "ppo": ("ppo", "PPOConfig"),
    }
    mod_name, cls_name = names[stage]
    mod = importlib.import_module(f"alignflow.recipes.{mod_name}")
    config = validate_config(cfg, getattr(mod, cls_name))
    out = mod.run(config, store)
    run_dir = Path(out.get("run_dir") or cfg["output_dir"])  # the PPO recipe's result has no run_dir
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(x) for x in lines]
    return out, [s for s in steps if s["step"] >= 1 and not any(k.startswith("eval") for k in s)]


# ---------------------------------------------------------------------------------------------------------------------
# TRL side


def trl_common_args(steps: int, batch_size: int, lr: float, out: Path, seed: int = 0) -> dict[str, Any]:
    """Training arguments both TRL trainers get: fp32 on CPU, no checkpointing, AdamW like alignflow's."""
    return {
        "output_dir": str(out),
        "max_steps": steps,
        "per_device_train_batch_size": batch_size,
        "gradient_accumulation_steps": 1,
        "learning_rate": lr,
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
        "weight_decay": 0.0,
        "adam_beta1": 0.9,
        "adam_beta2": 0.999,
        "adam_epsilon": 1e-8,
        "max_grad_norm": 1.0,
        "bf16": False,
        "fp16": False,
        "use_cpu": True,
        "report_to": [],
        "logging_steps": 1,
        "save_strategy": "no",
        "eval_strategy": "no",
        "gradient_checkpointing": False,
        "dataloader_num_workers": 0,
        "seed": seed,
        "disable_tqdm": True,
    }


def step_clock() -> Any:
    """A TrainerCallback recording ``time.perf_counter()`` at train begin and at every optimizer step's end."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self) -> None:
            self.t0 = 0.0
            self.ends: list[float] = []

        def on_train_begin(self, args, state, control, **kw):  # noqa: ANN001, ANN201
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):  # noqa: ANN001, ANN201
            self.ends.append(time.perf_counter())

        def durations(self) -> list[float]:
            marks = [self.t0, *self.ends]
            return [b - a for a, b in zip(marks, marks[1:], strict=False)]

    return StepClock()


def silence(trainer: Any) -> Any:
    """Drop the callback that prints every step's log dict (alignflow's progress bar is off too)."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    return trainer


class CountingCollator:
    """Wraps a data collator and records ``count(batch)`` for every batch, in the order they are built.

    The k-th batch built is the k-th batch trained on (one micro-batch per step), whatever prefetching the
    dataloader does, so ``counts[k]`` is the work of step ``k``.
    """

    def __init__(self, inner: Callable[[list[Any]], Any], count: Callable[[Any], int]) -> None:
        self.inner, self.count, self.counts = inner, count, []

    def __call__(self, examples: list[Any]) -> Any:
        batch = self.inner(examples)
        self.counts.append(self.count(batch))
        return batch


def recording(trainer_cls: type) -> type:
    """``trainer_cls`` that also records every training loss it computes, unrounded (HF rounds logged losses)."""

    class Recording(trainer_cls):  # type: ignore[misc, valid-type]
        recorded: list[float]

        def compute_loss(self, *args: Any, **kwargs: Any) -> Any:
            out = super().compute_loss(*args, **kwargs)
            loss = out[0] if isinstance(out, tuple) else out
            if self.model.training:
                self.__dict__.setdefault("recorded", []).append(float(loss.detach()))
            return out

    Recording.__name__ = f"Recording{trainer_cls.__name__}"
    return Recording


# ---------------------------------------------------------------------------------------------------------------------
# measurement


@dataclass
class Measured:
    """Per-run throughputs (units/s over the timed steps of each run) of one system."""

    system: str
    unit: str
    runs: list[float] = field(default_factory=list)
    per_step: list[list[tuple[float, float]]] = field(default_factory=list)  # (seconds, units) per timed step
    notes: dict[str, Any] = field(default_factory=dict)

    def add(self, steps: Iterable[tuple[float, float]], warmup: int = 1) -> float:
        timed = list(steps)[warmup:]
        if not timed:
            raise ValueError(f"{self.system}: no timed steps after {warmup} warm-up step(s)")
        rate = sum(u for _, u in timed) / sum(s for s, _ in timed)
        self.runs.append(rate)
        self.per_step.append(timed)
        return rate

    @property
    def median(self) -> float:
        return statistics.median(self.runs)

    def summary(self) -> str:
        return f"{fmt(self.median)} ({fmt(min(self.runs))}–{fmt(max(self.runs))})"


def fmt(x: float) -> str:
    if x >= 100:
        return f"{x:,.0f}"
    if x >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"


def mfu(n_params: int, tokens_per_s: float, peak_flops: float, factor: float = 6.0) -> float:
    """Model FLOP utilisation: ``factor * N * tokens/s / peak`` (6N per trained token, Kaplan et al. 2020)."""
    return factor * n_params * tokens_per_s / peak_flops


def alternate(n_runs: int, *fns: Callable[[int], None]) -> None:
    """Call ``fn_a(0), fn_b(0), fn_a(1), fn_b(1), ...``: each run of every system, interleaved."""
    for i in range(n_runs):
        for fn in fns:
            fn(i)


def load_ceiling() -> float | None:
    """The peak fp32 matmul FLOP/s that ``bench_ceiling.py`` measured in this ``make bench`` (or earlier)."""
    path = OUT / "ceiling.json"
    if not path.is_file():
        return None
    return float(json.loads(path.read_text())["peak_flops"])


def save_json(name: str, payload: dict[str, Any]) -> Path:
    """Raw results of a benchmark for run_all's combined table (``$TMPDIR/alignflow-bench/<name>.json``)."""
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{name}.json"
    import torch

    extra = {"load": load_average(), "threads": torch.get_num_threads()}
    path.write_text(json.dumps({**payload, **extra}, indent=1))
    return path


def load_average() -> float:
    return os.getloadavg()[0]


def compare(
    args: Any,
    *,
    name: str,
    title: str,
    unit: str,
    trl_label: str,
    alignflow_run: Callable[[str], Iterable[tuple[float, float]]],
    trl_run: Callable[[str], Iterable[tuple[float, float]]],
    assets: Assets,
    check: dict[str, Any],
    tokens_per_unit: float,
    examples: int,
    alignflow_tokens_per_unit: float | None = None,
) -> dict[str, Any]:
    """The measured part every supervised comparison shares: alternate alignflow and TRL runs, then the
    result record `run_all.py` tabulates.

    `alignflow_run(tag)` / `trl_run(tag)` train once and return the per-step (seconds, units) list.
    """
    af, tr = Measured("alignflow", unit), Measured(trl_label, unit)

    def run_af(i: int) -> None:
        print(f"  alignflow run {i}: {fmt(af.add(alignflow_run(f'run{i}')))} {unit}")

    def run_trl(i: int) -> None:
        print(f"  TRL       run {i}: {fmt(tr.add(trl_run(f'run{i}')))} {unit}")

    alternate(args.runs, run_af, run_trl)
    return {
        "name": name,
        "title": title,
        "unit": unit,
        "alignflow": af.runs,
        "trl": tr.runs,
        "tokens_per_unit": tokens_per_unit,
        "alignflow_tokens_per_unit": alignflow_tokens_per_unit or tokens_per_unit,
        "loss_check": check,
        "n_params": assets.n_params,
        "size": assets.size.__dict__,
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "steps": args.steps,
        "examples": examples,
    }
