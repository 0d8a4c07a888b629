"""Checkpoints: full-state round trip, atomic layout, damage detection with fallback, async saving, retention."""

from __future__ import annotations

import json
import math
import random
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import alignflow.train.checkpoint as ckpt_mod
from alignflow.models import LoraSpec, load_policy, make_tiny_model_dir, tiny_llama
from alignflow.train.checkpoint import (
    CheckpointError,
    CheckpointInfo,
    CheckpointManager,
    CheckpointWarning,
    RetentionPolicy,
    load_latest,
    verify_checkpoint,
)


class FakeClock:
    def __init__(self, t: float = 1_700_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def _setup(seed: int = 0):
    model = tiny_llama(vocab_size=50, hidden_size=16, num_layers=1, num_heads=2, seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    return model, opt, sched


def _train_step(model, opt, sched) -> None:
    ids = torch.randint(0, 50, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    sched.step()
    opt.zero_grad()


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(
        torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )


def test_round_trip_restores_everything(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model, opt, sched = _setup()
    for _ in range(3):
        _train_step(model, opt, sched)
    mgr = CheckpointManager(tmp_path / "run")
    mgr.save(
        3,
        model,
        opt,
        sched,
        data_state={"epoch": 1, "position": 4},
        config={"lr": 0.01},
        metrics={"loss": 1.5},
    )
    sched_at_save = sched.state_dict()
    opt_groups_at_save = opt.state_dict()["param_groups"]
    # What training would draw next, from each RNG stream.
    expected = (torch.rand(3), np.random.rand(3), random.random())
    _train_step(model, opt, sched)
    after_one_more = [p.detach().clone() for p in model.parameters()]

    fresh, fresh_opt, fresh_sched = _setup(seed=99)
    torch.manual_seed(12345)
    loaded = load_latest(tmp_path / "run")
    assert loaded is not None and loaded.step == 3
    assert loaded.config == {"lr": 0.01} and loaded.metrics == {"loss": 1.5}
    assert loaded.restore(fresh, fresh_opt, fresh_sched) == {"epoch": 1, "position": 4}
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2] == expected[2]
    assert fresh_sched.state_dict() == sched_at_save
    assert fresh_opt.state_dict()["param_groups"] == opt_groups_at_save
    # Continuing from the restored state reproduces the original trajectory bit for bit.
    torch.manual_seed(7)
    model2, opt2, sched2 = _setup(seed=99)
    load_latest(tmp_path / "run").restore(model2, opt2, sched2)
    torch.rand(3), np.random.rand(3), random.random()  # the same draws the original run made
    _train_step(model2, opt2, sched2)
    assert all(torch.equal(a, b) for a, b in zip(after_one_more, model2.parameters(), strict=True))


def test_layout_manifest_and_hf_format(tmp_path: Path) -> None:
    src = make_tiny_model_dir(tmp_path / "tiny", vocab_size=300, hidden_size=16, num_layers=1, num_heads=2)
    model = load_policy(src, dtype="float32")
    run = tmp_path / "run"
    CheckpointManager(run).save(12, model)
    assert (run / "latest").read_text().strip() == "step-000012"
    assert not [p for p in run.iterdir() if p.name.startswith(".")]  # no temp dirs left
    d = run / "step-000012"
    manifest = json.loads((d / "manifest.json").read_text())["files"]
    on_disk = {p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file()} - {"manifest.json"}
    assert set(manifest) == on_disk
    assert {"model/model.safetensors", "model/config.json", "trainer_state.json", "rng.pt"} <= on_disk
    assert verify_checkpoint(d) is None
    # The model folder is a normal HF directory.
    again = load_policy(d / "model", dtype="float32")
    assert _same_state(model, again)


def _three_checkpoints(run: Path) -> tuple[torch.nn.Module, list[list[torch.Tensor]]]:
    model, opt, sched = _setup()
    mgr = CheckpointManager(run)
    snaps = []
    for step in (1, 2, 3):
        _train_step(model, opt, sched)
        mgr.save(step, model, opt, sched, data_state={"step": step})
        snaps.append([p.detach().clone() for p in model.parameters()])
    return model, snaps


def test_truncated_checkpoint_falls_back_with_warning(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _, snaps = _three_checkpoints(run)
    bad = run / "step-000003" / "model" / "model.safetensors"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    with pytest.warns(CheckpointWarning, match=rf"{bad}.*truncated"):
        loaded = load_latest(run)
    assert loaded is not None and loaded.step == 2
    model, _, _ = _setup(seed=5)
    loaded.load_model(model)
    assert all(torch.equal(a, b) for a, b in zip(snaps[1], model.parameters(), strict=True))


def test_tampered_checkpoint_falls_back_with_warning(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _three_checkpoints(run)
    bad3 = run / "step-000003" / "optimizer.pt"
    raw = bytearray(bad3.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # same size, one byte flipped
    bad3.write_bytes(bytes(raw))
    bad2 = run / "step-000002" / "trainer_state.json"
    bad2.write_text(bad2.read_text().replace('"step": 2', '"step": 9'))
    with pytest.warns(CheckpointWarning) as rec:
        loaded = load_latest(run)
    messages = [str(w.message) for w in rec]
    assert any(str(bad3) in m and "sha256" in m for m in messages)
    assert any(str(bad2) in m for m in messages)
    assert loaded is not None and loaded.step == 1


def test_crash_leftovers_are_ignored(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _three_checkpoints(run)
    # A save killed before its rename, and a renamed one whose `latest` update never happened.
    (run / ".tmp-step-000004-dead").mkdir()
    (run / ".tmp-step-000004-dead" / "optimizer.pt").write_bytes(b"partial")
    import shutil

    shutil.copytree(run / "step-000003", run / "step-000005")
    (run / "step-000005" / "manifest.json").unlink()
    loaded = load_latest(run)
    assert loaded is not None and loaded.step == 3  # `latest` is the commit point
    CheckpointManager(run)  # a new writer cleans the temp dir
    assert not (run / ".tmp-step-000004-dead").exists()
    # A pointer to a checkpoint that vanished falls back to the newest older intact one.
    shutil.rmtree(run / "step-000003")
    with pytest.warns(CheckpointWarning, match="step-000003 does not exist"):
        assert load_latest(run).step == 2
    assert load_latest(tmp_path / "empty") is None


def test_async_save_snapshots_state_before_training_continues(tmp_path: Path) -> None:
    model, opt, sched = _setup()
    snapshots = {}
    with CheckpointManager(tmp_path / "run", retention=None) as mgr:
        for step in (1, 2):  # the second save reuses the first one's CPU buffers
            _train_step(model, opt, sched)
            snapshots[step] = [p.detach().clone() for p in model.parameters()]
            mgr.save(step, model, opt, sched, blocking=False)
            # Training keeps mutating the live tensors while the writer runs.
            for _ in range(3):
                _train_step(model, opt, sched)
        mgr.wait()
    for step, expected in snapshots.items():
        fresh, fresh_opt, _ = _setup(seed=3)
        loaded = ckpt_mod.LoadedCheckpoint(
            path=tmp_path / "run" / f"step-{step:06d}",
            step=step,
            saved_at=0.0,
            adapter_only=False,
            data_state=None,
            config=None,
        )
        assert verify_checkpoint(loaded.path) is None
        loaded.restore(fresh, fresh_opt, rng=False)
        assert all(torch.equal(a, b) for a, b in zip(expected, fresh.parameters(), strict=True))
        assert fresh_opt.state_dict()["state"][0]["step"] == 1 + 4 * (step - 1)


def test_second_save_waits_for_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log: list[tuple[str, int]] = []
    real = ckpt_mod._commit

    def slow_commit(run_dir, snap):
        log.append(("start", snap.step))
        time.sleep(0.1)  # widen the window in which an overlapping write would show up
        out = real(run_dir, snap)
        log.append(("end", snap.step))
        return out

    monkeypatch.setattr(ckpt_mod, "_commit", slow_commit)
    model, _, _ = _setup()
    mgr = CheckpointManager(tmp_path / "run")
    mgr.save(1, model, blocking=False)
    mgr.save(2, model, blocking=False)
    mgr.close()
    assert log == [("start", 1), ("end", 1), ("start", 2), ("end", 2)]
    assert load_latest(tmp_path / "run").step == 2
    with pytest.raises(CheckpointError, match="closed"):
        mgr.save(3, model)


def test_background_error_is_reraised(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, _, _ = _setup()
    mgr = CheckpointManager(tmp_path / "run")
    started = threading.Event()

    def failing_commit(run_dir, snap):
        started.set()
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt_mod, "_commit", failing_commit)
    mgr.save(1, model, blocking=False)
    assert started.wait(10)
    with pytest.raises(CheckpointError, match="No space left on device"):
        mgr.save(2, model, blocking=False)
    monkeypatch.undo()
    mgr.save(3, model)  # the error was reported once; the manager keeps working
    mgr.close()
    assert load_latest(tmp_path / "run").step == 3


def test_non_json_fields_fail_fast(tmp_path: Path) -> None:
    model, _, _ = _setup()
    with pytest.raises(CheckpointError, match="'data_state' must be JSON-serialisable"):
        CheckpointManager(tmp_path / "run").save(1, model, data_state={"x": object()})


def test_lora_adapter_only(tmp_path: Path) -> None:
    src = make_tiny_model_dir(tmp_path / "tiny", vocab_size=300, hidden_size=16, num_layers=1, num_heads=2)
    policy = load_policy(src, dtype="float32", lora=LoraSpec(r=2, alpha=4))
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_" in name:
                p.normal_()
    CheckpointManager(tmp_path / "run").save(5, policy)
    files = {p.name for p in (tmp_path / "run" / "step-000005" / "model").iterdir()}
    assert files == {"adapter_model.safetensors", "adapter_config.json"}
    fresh = load_policy(src, dtype="float32", lora=LoraSpec(r=2, alpha=4))
    loaded = load_latest(tmp_path / "run")
    assert loaded.adapter_only
    loaded.load_model(fresh)
    lora = {n: p for n, p in policy.named_parameters() if "lora_" in n}
    got = {n: p for n, p in fresh.named_parameters() if "lora_" in n}
    assert lora.keys() == got.keys() and all(torch.equal(lora[n], got[n]) for n in lora)


# ------------------------------------------------------------------------------------------------------------------
# retention


def _simulate(
    policy: RetentionPolicy, minutes: int, every: int, start: float
) -> tuple[list[CheckpointInfo], set[int]]:
    """Save every ``every`` minutes for ``minutes``, pruning after each save as the manager does."""
    rng = random.Random(0)
    all_infos: list[CheckpointInfo] = []
    alive: list[CheckpointInfo] = []
    for k in range(minutes // every):
        info = CheckpointInfo(
            step=k, saved_at=start + 60.0 * every * k, metrics={"eval_loss": rng.uniform(1, 2)}
        )
        all_infos.append(info)
        alive.append(info)
        keep = policy.select(alive, now=info.saved_at)
        alive = [c for c in alive if c.step in keep]
    return all_infos, {c.step for c in alive}


def test_retention_policy_with_fake_clock() -> None:
    policy = RetentionPolicy(
        keep_recent_minutes=60, hourly_for_hours=24, best_metric="eval_loss", best_mode="min"
    )
    start = 1_700_000_000.0
    infos, kept = _simulate(policy, minutes=4 * 24 * 60, every=10, start=start)
    now = infos[-1].saved_at
    by_step = {c.step: c for c in infos}
    # Everything from the last hour.
    assert {c.step for c in infos if now - c.saved_at <= 3600} <= kept
    # Exactly one per clock hour whose saves all lie in (1 h, 24 h] ago: the hour's first save.
    hours: dict[int, list[CheckpointInfo]] = {}
    days: dict[int, list[CheckpointInfo]] = {}
    for c in infos:
        hours.setdefault(math.floor(c.saved_at / 3600), []).append(c)
        days.setdefault(math.floor(c.saved_at / 86400), []).append(c)
    best = min(infos, key=lambda c: c.metrics["eval_loss"]).step
    for cs in hours.values():
        if all(3600 < now - c.saved_at <= 24 * 3600 for c in cs):
            assert {c.step for c in cs} & kept - {best} == {cs[0].step}
    # Exactly one per day whose saves are all older than a day.
    full_old_days = [cs for cs in days.values() if all(now - c.saved_at > 24 * 3600 for c in cs)]
    assert len(full_old_days) >= 2
    for cs in full_old_days:
        assert {c.step for c in cs} & kept - {best} == {cs[0].step}
    # Always the best by the metric.
    assert best in kept
    assert len(kept) <= 6 + 24 + 5 + 1
    assert all(c in by_step for c in kept)


def test_retention_max_mode_and_validation() -> None:
    infos = [
        CheckpointInfo(step=i, saved_at=float(i), metrics={"acc": a}) for i, a in enumerate([0.1, 0.9, 0.5])
    ]
    pol = RetentionPolicy(
        keep_recent_minutes=0, hourly_for_hours=0, keep_daily=False, best_metric="acc", best_mode="max"
    )
    assert pol.select(infos, now=1e6) == {1, 2}  # best (max acc) + the newest
    with pytest.raises(ValueError, match="best_mode"):
        RetentionPolicy(best_mode="median")  # type: ignore[arg-type]


def test_manager_prunes_on_disk_with_fake_clock(tmp_path: Path) -> None:
    clock = FakeClock(86400.0 * 20_000)  # midnight UTC, so hour buckets are aligned
    pol = RetentionPolicy(keep_recent_minutes=30, hourly_for_hours=3, keep_daily=True, best_metric="loss")
    mgr = CheckpointManager(tmp_path / "run", retention=pol, clock=clock)
    model = torch.nn.Linear(2, 2)
    losses = {}
    for step in range(1, 21):  # one save every 20 minutes for 6h40m
        losses[step] = 1.0 if step == 2 else 2.0 + step
        mgr.save(step, model, metrics={"loss": losses[step]})
        clock.t += 20 * 60
    mgr.close()
    kept = sorted(int(p.name.split("-")[1]) for p in mgr.checkpoints())
    # Step s is saved at t0 + 20 (s - 1) min; the last prune runs at 380 min. Recent (<= 30 min old): 19, 20.
    # Hourly (30 min .. 3 h old): first of hour 4 (240-299 min) is step 13, of hour 5 step 16; hour 3
    # straddles the 3 h edge, and its first save (step 10) has aged into the daily rule. Daily: the first
    # save of day 0 is step 1. Best loss: step 2.
    assert kept == [1, 2, 13, 16, 19, 20]
    assert load_latest(tmp_path / "run").step == 20
