"""A scaled-down quickstart through the real CLI: the loop closes, lineage reaches the annotations,
PPO beats SFT on gold utility, and the report renders in Chromium without errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from alignflow.domains import support
from alignflow.store import Store
from alignflow.workspace import Workspace

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts"

# Fewer prompts and steps than `make demo`; the same stages and code paths. Measured with these (1 thread, on
# this CI's 2-core machine): PPO beats SFT on gold utility by 0.083, the 95% CI's low end 0.064. 800
# demonstrations left it at 0.036 (low end 0.020), too close to zero for a test.
PPO_STEPS = 16
SMALL = [
    "data.params.n_demonstrations=1000",
    "data.params.n_feedback_prompts=200",
    "data.params.n_rl_prompts=160",
    "data.params.n_eval_prompts=100",
    "sft.config.train.epochs=2",
    f"ppo.config.train.steps={PPO_STEPS}",
    "rm.config.train.epochs=2",
    "dpo.config.train.epochs=1",
    "evaluate.params.samples_per_prompt=2",
]


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    home = tmp_path_factory.mktemp("qs") / "ws"
    env = {k: v for k, v in os.environ.items() if k != "ALIGNFLOW_DB_URL"}
    env["ALIGNFLOW_HOME"] = str(home)
    cmd = [
        sys.executable,
        "-m",
        "alignflow.cli.main",
        "run",
        str(REPO / "examples" / "quickstart.yaml"),
        *SMALL,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    state = json.loads((home / "pipelines" / "quickstart" / "state.json").read_text())
    return {
        "home": home,
        "env": env,
        "cmd": cmd,
        "state": state,
        "stdout": proc.stdout,
        "stderr": proc.stderr,
    }


@pytest.mark.slow
def test_loop_closes_and_ppo_beats_sft(quickstart_run: dict) -> None:
    state = quickstart_run["state"]
    report = Path(state["report"]["outputs"]["report_path"])
    assert report.is_file() and "Lineage of the final policy" in report.read_text()
    ev = state["evaluate"]["outputs"]
    diff = ev["diff_vs_sft"]["ppo"]
    assert diff["lo"] > 0, f"PPO does not beat SFT on gold utility: {diff}"

    # The final policy's lineage reaches the individual annotations and the annotators' project.
    store = Store.open(
        Workspace.from_env(quickstart_run["home"], f"sqlite:///{quickstart_run['home'] / 'alignflow.db'}")
    )
    final = state["ppo"]["outputs"]["checkpoint"]
    graph = store.lineage(final, "up")
    kinds = {n.kind for n in graph.nodes.values()}
    assert {
        "annotations",
        "preferences",
        "pairs",
        "sft",
        "annotation_project",
        "guideline",
        "config",
    } <= kinds
    ann = next(n for n in graph.nodes.values() if n.kind == "annotations")
    rows = store.read_dataset(ann.id).to_pylist()
    assert len(rows) >= state["feedback"]["outputs"]["n_judgments"]
    assert {"annotator_id", "item_id"} <= set(rows[0])


@pytest.mark.slow
def test_report_has_greedy_beside_sampled_and_the_dimension_table(quickstart_run: dict) -> None:
    ev = quickstart_run["state"]["evaluate"]["outputs"]
    for section in (ev, ev["greedy"]):
        assert set(section["policies"]) == {"sft", "ppo", "dpo"}
        assert {"mean", "lo", "hi"} <= set(section["diff_vs_sft"]["ppo"]) and "dpo" in section["diff_vs_sft"]
    for decoding in ("sampled", "greedy"):
        for policy in ("sft", "ppo", "dpo"):
            assert {"utility", *support.DIMENSIONS} <= set(ev["dimensions"][decoding][policy])
    assert set(ev["reward_model"]["per_dimension"]) == set(support.DIMENSIONS)
    page = Path(quickstart_run["state"]["report"]["outputs"]["report_path"]).read_text()
    assert 'id="dimensions"' in page
    for col in ("Δ vs sft, sampled", "Δ vs sft, greedy", *support.DIMENSIONS):
        assert f">{col}</th>" in page, col


@pytest.mark.slow
def test_model_loads_print_no_progress_bars(quickstart_run: dict) -> None:
    console = quickstart_run["stdout"] + quickstart_run["stderr"]
    assert "Loading weights" not in console
    # The reward model's and critic's fresh score heads are expected; transformers' table about them is noise.
    assert "LOAD REPORT" not in console


@pytest.mark.slow
def test_rerun_skips_everything(quickstart_run: dict) -> None:
    proc = subprocess.run(
        quickstart_run["cmd"], env=quickstart_run["env"], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    for stage in quickstart_run["state"]:
        assert f"[skip] {stage}: unchanged" in proc.stdout


@pytest.mark.slow
def test_changed_ppo_setting_reruns_only_ppo_and_dependents_and_resumes_after_kill(
    quickstart_run: dict,
) -> None:
    import signal
    import time

    cmd = [*quickstart_run["cmd"], "ppo.config.kl.coef=0.07"]
    home = quickstart_run["home"]
    proc = subprocess.Popen(
        cmd, env=quickstart_run["env"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    # Kill the whole pipeline once PPO has committed a checkpoint.
    deadline = time.time() + 600
    latest = None
    while time.time() < deadline and proc.poll() is None:
        found = list((home / "pipelines" / "quickstart").glob("ppo-*/checkpoints/latest"))
        fresh = [
            f for f in found if f.parent.parent.name != Path(quickstart_run["state"]["ppo"]["work_dir"]).name
        ]
        if fresh:
            latest = fresh[0]
            break
        time.sleep(0.5)
    assert latest is not None, "PPO never checkpointed"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    out = subprocess.run(cmd, env=quickstart_run["env"], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    for stage in ("base", "data", "sft", "feedback", "rm", "dpo"):
        assert f"[skip] {stage}: unchanged" in out.stdout
    assert "[run]  ppo (resuming)" in out.stdout
    assert "[run]  evaluate" in out.stdout and "[run]  report" in out.stdout
    run_json = json.loads((latest.parent.parent / "run.json").read_text())
    store = Store.open(Workspace.from_env(home, f"sqlite:///{home / 'alignflow.db'}"))
    steps = [s for s, _, _ in store.metrics(run_json["run_id"], "loss/policy")] or [
        s for s, _, _ in store.metrics(run_json["run_id"])
    ]
    # One run id across the kill: its metrics continue rather than start a second run.
    assert store.get_run(run_json["run_id"]).status == "finished"
    assert max(steps) >= PPO_STEPS - 1


@pytest.mark.slow
@pytest.mark.browser
def test_report_renders_in_chromium(quickstart_run: dict) -> None:
    if not Path("/usr/bin/chromium").exists():
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true but /usr/bin/chromium is missing")
        pytest.skip("/usr/bin/chromium is not installed")
    from playwright.sync_api import sync_playwright

    report = Path(quickstart_run["state"]["report"]["outputs"]["report_path"])
    errors: list[str] = []
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path="/usr/bin/chromium",
            headless=True,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                "--disable-quic",
            ],
        )
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(report.as_uri())
        page.wait_for_load_state("load")
        broken = page.evaluate(
            "Array.from(document.images).filter(i => !i.complete || i.naturalWidth === 0).length"
        )
        page.screenshot(path=str(ARTIFACTS / "quickstart-report.png"), full_page=True)
        browser.close()
    assert errors == []
    assert broken == 0


# The only artifacts that differ between the local and the Ray run, and between any two runs of the quickstart
# whatever the engine: the data these stages write is not deterministic; the pipeline's execution is.
RAY_EXEMPT = {
    ("feedback", "annotations"): "rows carry annotator_id, usernames prefixed by the project name "
    "collect_feedback draws with uuid4 (quickstart-<8 hex>), and created_at, each response's wall-clock time",
    ("feedback", "preferences"): "rows embed the same annotator_ids in votes and dimension_votes",
    ("report", "report"): "the HTML page stamps its creation time (created_at) and the stages' wall times",
}


def _content_hashes(node: object, prefix: str = "") -> dict[str, str]:
    """Every 64-hex output (an artifact id: a content hash) of a stage, by its dotted path."""
    import re

    if isinstance(node, dict):
        return {k: v for key, val in node.items() for k, v in _content_hashes(val, f"{prefix}{key}.").items()}
    if isinstance(node, list):
        return {k: v for i, val in enumerate(node) for k, v in _content_hashes(val, f"{prefix}{i}.").items()}
    if isinstance(node, str) and re.fullmatch(r"[0-9a-f]{64}", node):
        return {prefix.rstrip("."): node}
    return {}


@pytest.mark.slow
@pytest.mark.timeout(3600)  # a few minutes on an idle 2-core machine, far more when it is shared
def test_ray_engine_gives_the_local_runners_artifacts(
    quickstart_run: dict, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The small quickstart with --engine ray on a local Ray instance, in a fresh workspace: every stage's
    artifact ids (content hashes) equal the local runner's (the module fixture's run), except RAY_EXEMPT, and
    the gold-scored evaluation is the same to the last digit."""
    import time

    pytest.importorskip("ray")
    home = tmp_path_factory.mktemp("qs-ray") / "ws"
    env = {**quickstart_run["env"], "ALIGNFLOW_HOME": str(home)}
    t0 = time.perf_counter()
    proc = subprocess.run(
        [*quickstart_run["cmd"], "--engine", "ray"], env=env, capture_output=True, text=True, timeout=3000
    )
    seconds = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[ray]  started a local Ray instance" in proc.stdout
    local = quickstart_run["state"]
    ray = json.loads((home / "pipelines" / "quickstart" / "state.json").read_text())
    assert ray.keys() == local.keys()
    local_s = sum(e["seconds"] for e in local.values())
    print(f"quickstart (small): ray run {seconds:.0f} s; local stage seconds {local_s:.0f} s")
    compared = 0
    for stage in local:
        want, got = _content_hashes(local[stage]["outputs"]), _content_hashes(ray[stage]["outputs"])
        assert got.keys() == want.keys(), stage
        differ = sorted(k for k in want if want[k] != got[k] and (stage, k) not in RAY_EXEMPT)
        assert not differ, f"stage {stage}: artifact ids differ: " + ", ".join(
            f"{k}: {want[k][:12]} vs {got[k][:12]}" for k in differ
        )
        compared += sum((stage, k) not in RAY_EXEMPT for k in want)
    assert compared >= 10  # base's model, data's 4 datasets, feedback's pairs, the sft/rm/ppo/dpo checkpoints
    assert ray["evaluate"]["outputs"] == local["evaluate"]["outputs"]
