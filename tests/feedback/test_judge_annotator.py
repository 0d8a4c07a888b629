"""AI judges as platform annotators (issue 13): `alignflow annotate judge`, the position-bias rule on a judge,
judge-human agreement in the quality report and on the project page, hybrid routing, the ai account.

Items carry a known truth: the better candidate is the longer one, so `rule:alignflow.judges.rubrics:longer`
is an honest judge and the simulated people (three annotators answering the truth with probability 0.9) form
a consensus it agrees with. The rubrics below (`scripted`, `hedging`) are loaded by spec from this module.
"""

from __future__ import annotations

import random
import re
import uuid
from datetime import UTC, datetime

import pytest
from fastapi.testclient import TestClient
from fb_helpers import PASSWORD, answer, make_users
from sqlalchemy import func, select, text

from alignflow.feedback import auth, qc, services
from alignflow.feedback.app import create_app
from alignflow.feedback.models import Item, JournalEntry, Response, User
from alignflow.judges import Verdict
from alignflow.store import db

LONGER = "rule:alignflow.judges.rubrics:longer"
FIRST = "rule:alignflow.judges.rubrics:first"

# prompt -> the text this judge prefers (None: a tie); set by a test before it runs the judge.
SCRIPT: dict[str, str | None] = {}
# prompt -> confidence of the `hedging` judge; prompts missing here get a position-biased answer.
CONFIDENCE: dict[str, float] = {}


def scripted(prompt: str, candidates: list[str]) -> int | None:
    want = SCRIPT[prompt]
    return None if want is None else candidates.index(want)


def hedging(prompt: str, candidates: list[str]) -> Verdict:
    """Prefers the longer response with a per-prompt confidence; without one, always the first shown."""
    if prompt not in CONFIDENCE:
        return Verdict(winner=0, ranking=(0, 1), confidence=0.9)
    best = max(range(2), key=lambda i: len(candidates[i]))
    return Verdict(winner=best, ranking=(best, 1 - best), confidence=CONFIDENCE[prompt])


def truth_items(n: int, seed: int = 0, prefix: str = "t", gold: int = 0) -> tuple[list[dict], dict[str, str]]:
    """`n` pairwise items whose better candidate (the longer) is A or B at random; returns (rows, prompt ->
    better text). `gold` extra items carry their truth as gold label."""
    rng = random.Random(seed)
    rows, better = [], {}
    for k in range(n + gold):
        long, short = f"answer {k} with several more helpful words", f"answer {k}"
        truth = rng.choice("AB")
        a, b = (long, short) if truth == "A" else (short, long)
        row = {"id": f"{prefix}{k}", "prompt": f"{prefix} prompt {k}", "candidates": [a, b]}
        if k >= n:
            row["gold_label"] = truth
        rows.append(row)
        better[row["prompt"]] = long
    return rows, better


def people_annotate(s, names, project, better: dict[str, str], reliability=0.9, seed=1) -> int:
    """Each person answers every task they are given: the better text with probability `reliability`.
    Median durations differ by person (20, 30, 45 s, ...), as people's do."""
    rng = random.Random(seed)
    n = 0
    for i, name in enumerate(names):
        while (task := services.next_task(s, name, project, rng)) is not None:
            texts = [c["text"] for c in task["candidates"]]
            pos = texts.index(better[task["prompt"]])
            if rng.random() >= reliability:
                pos = 1 - pos
            body = answer(task, ("left", "right")[pos], duration_s=(20.0 + 12.5 * i) * rng.uniform(0.8, 1.25))
            services.submit(s, name, task["assignment_id"], body, client_id=uuid.uuid4().hex)
            n += 1
    return n


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    from alignflow.cli import common

    monkeypatch.setattr(common.console, "width", 200)  # tables fitted to 80 columns would wrap their cells


def summary(output: str) -> dict[str, str]:
    """The judge command's summary table as {row label: value}."""
    rows = {}
    for line in output.splitlines():
        cells = [c.strip() for c in re.split(r"[│┃|]", line) if c.strip()]
        if len(cells) == 2:
            rows[cells[0]] = cells[1]
    return rows


def judge_row(s, project: str, name: str) -> dict:
    return next(j for j in qc.quality_report(s, project)["judges"] if j["judge"] == name)


def test_position_biased_judge_is_flagged_and_an_honest_one_is_not(s, cli):
    """Acceptance of issue 13: the existing QC position-bias rule flags `rubrics:first` run on the displayed
    order; the honest judge, which agrees with the people's consensus, gets no QC action at all (not even the
    speed rule's coaching, which does not apply to a judge). With both orders the biased judge's verdicts all
    disagree: ties (or drops), counted in the summary and in the report's order-consistency column."""
    make_users(s, {"h0": "annotator", "h1": "annotator", "h2": "annotator"})
    services.create_project(s, "pb", "# Guide", overlap=7, gold_rate=0.0, qa_rate=0.0)
    rows, better = truth_items(40)
    services.import_items(s, "pb", rows)
    people_annotate(s, ["h0", "h1", "h2"], "pb", better)

    r = cli("annotate", "judge", "pb", "--judge", FIRST, "--name", "biased", "--orders", "given")
    assert summary(r.output)["submitted"] == "40"
    cli("annotate", "judge", "pb", "--judge", LONGER, "--name", "honest")

    df = qc.validated_overall(s, "pb")
    from alignflow.quality.policy import evaluate_policy

    flags = [a for a in evaluate_policy(df) if a.rule == "position_bias"]
    assert {a.annotator_id for a in flags} == {"biased"}
    metrics = flags[0].metrics
    assert metrics["left_rate"] == 1.0 and metrics["n_decisive"] == 40 and metrics["p_value"] < 1e-10
    print(f"biased judge: left rate {metrics['left_rate']}, p={metrics['p_value']:.3g}")

    # The speed rule would coach the honest judge (milliseconds against people's 20-45 s); it is not applied
    # to ai accounts, which is why no action on "honest" appears below.
    assert "honest" in {a.annotator_id for a in evaluate_policy(df) if a.rule == "speed"}
    out = cli("annotate", "qc", "pb").output
    assert re.search(r"restrict\s+biased: position_bias: chose the displayed-left response 100% of 40", out)
    assert "honest" not in out
    biased = s.scalar(select(User).where(User.username == "biased"))
    s.refresh(biased)
    assert biased.qc_state in ("restrict", "suspend") and biased.kind == "ai"

    r = cli("annotate", "judge", "pb", "--judge", FIRST, "--name", "biased-both")
    assert summary(r.output)["submitted"] == "40"
    assert summary(r.output)["ties from inconsistent orders"] == "40"
    r = cli("annotate", "judge", "pb", "--judge", FIRST, "--name", "biased-drop", "--on-inconsistent", "drop")
    assert (
        summary(r.output)["submitted"] == "0" and summary(r.output)["dropped (inconsistent orders)"] == "40"
    )
    judges = {j["judge"]: j for j in qc.quality_report(s, "pb")["judges"]}
    both, drop, honest = judges["biased-both"], judges["biased-drop"], judges["honest"]
    assert (both["order_consistency"], both["n_inconsistent_ties"], both["n_dropped"]) == (0.0, 40, 0)
    assert (drop["order_consistency"], drop["n_inconsistent_ties"], drop["n_dropped"]) == (0.0, 0, 40)
    assert (
        both["accuracy"] == 0.5 and both["tie_rate"] == 1.0
    )  # all ties (one half each) vs a decisive consensus
    assert drop["n_items"] == 0 and drop["kappa"] is None  # no labels at all
    assert honest["order_consistency"] == 1.0 and honest["n_both_orders"] == 40 and honest["n_dropped"] == 0
    assert honest["kappa"] > 0.6 and honest["accuracy"] > 0.8
    print(f"honest judge: kappa {honest['kappa']:.3f} ({honest['kappa_ci_low']:.3f}-{honest['kappa_ci_high']:.3f}), "
          f"accuracy {honest['accuracy']:.3f} on {honest['n_items']} items")  # fmt: skip

    # Ties are not decisive, so the position-bias rule has nothing to judge on the both-order runs.
    pos = {
        a.annotator_id for a in evaluate_policy(qc.validated_overall(s, "pb")) if a.rule == "position_bias"
    }
    assert pos == {"biased"}
    status = cli("annotate", "status", "pb").output
    assert "AI judges" in status and re.search(r"biased-both .*0\.00 of 40", status)


def test_judge_agreement_matches_hand_computed_kappa_and_sklearn(s, workspace, cli):
    """Ten items with a human consensus and one with a split vote (excluded). Judge J vs consensus C:

        C: A A A A A B B B B tie      J: A A A A B B B B A tie
    Confusion (rows J, columns C; A, B, tie): [[4, 1, 0], [1, 3, 0], [0, 0, 1]]; p_o = 8/10;
    p_e = (5*5 + 4*4 + 1*1) / 100 = 0.42; kappa = (0.8 - 0.42) / 0.58 = 0.6551724. Accuracy counts the judge's
    tie as one half: (4 + 3 + 0.5) / 10 = 0.75, Wilson interval for 7.5 of 10:
    centre (0.75 + 1.9208/10) / 1.38415 = 0.6806, half-width 1.96 sqrt(0.75 * 0.25 / 10 + 0.9604/100) / 1.38415
    = 0.2384, so (0.4422, 0.9191).
    """
    from sklearn.metrics import cohen_kappa_score

    make_users(s, {"h0": "annotator", "h1": "annotator", "h2": "annotator"})
    services.create_project(s, "ka", "# Guide", overlap=4, gold_rate=0.0, qa_rate=0.0)
    consensus = ["A"] * 5 + ["B"] * 4 + ["tie"]
    judged = ["A"] * 4 + ["B"] * 4 + ["A", "tie"]
    rows = [{"id": f"k{i}", "prompt": f"kp{i}", "candidates": [f"alpha {i}", f"beta {i}"]} for i in range(11)]
    services.import_items(s, "ka", rows)
    text_of = {"A": 0, "B": 1}
    # Votes per item: two people give the consensus, the third dissents; item 10 is split three ways.
    votes = {f"kp{i}": [c, c, "B" if c != "B" else "A"] for i, c in enumerate(consensus)}
    votes["kp10"] = ["A", "B", "tie"]
    rng = random.Random(3)
    for h, name in enumerate(("h0", "h1", "h2")):
        while (task := services.next_task(s, name, "ka", rng)) is not None:
            want = votes[task["prompt"]][h]
            if want == "tie":
                choice = "tie"
            else:
                target = rows[int(task["prompt"][2:])]["candidates"][text_of[want]]
                choice = ("left", "right")[[c["text"] for c in task["candidates"]].index(target)]
            services.submit(s, name, task["assignment_id"], answer(task, choice), client_id=uuid.uuid4().hex)
    SCRIPT.clear()
    for i, j in enumerate(judged + ["A"]):
        SCRIPT[f"kp{i}"] = None if j == "tie" else rows[i]["candidates"][text_of[j]]
    r = cli("annotate", "judge", "ka", "--judge", f"rule:{__name__}:scripted", "--name", "scripted")
    assert summary(r.output)["submitted"] == "11"

    row = judge_row(s, "ka", "scripted")
    assert row["n_items"] == 10
    assert row["kappa"] == pytest.approx(0.38 / 0.58, abs=1e-12)
    assert row["kappa"] == pytest.approx(cohen_kappa_score(judged, consensus), abs=1e-12)
    assert row["accuracy"] == pytest.approx(0.75)
    assert (row["accuracy_ci_low"], row["accuracy_ci_high"]) == pytest.approx((0.4422, 0.9191), abs=1e-4)
    assert row["kappa_ci_low"] < row["kappa"] < row["kappa_ci_high"] <= 1.0
    assert row["order_consistency"] == 1.0  # a text-based choice does not depend on the order shown
    print(f"controlled kappa {row['kappa']:.6f} CI ({row['kappa_ci_low']:.3f}, {row['kappa_ci_high']:.3f})")

    app = create_app(workspace)
    make_users(s, {"boss": "admin"})
    page = logged_in(app, "boss").get("/admin/projects/ka")
    assert page.status_code == 200
    table = re.search(r'<table id="judges">(.*?)</table>', page.text, re.S).group(1)
    assert "scripted" in table and f"rule:{__name__}:scripted" in table
    assert "0.655 (" in table and "0.750 (0.442–0.919)" in table and "1.00 of 11" in table
    assert "(AI judge)" in page.text  # marked in the per-annotator table too


def logged_in(app, name: str) -> TestClient:
    c = TestClient(app, follow_redirects=False)
    token = re.search(r'name="login_csrf" value="([^"]+)"', c.get("/login").text).group(1)
    r = c.post("/login", data={"username": name, "password": PASSWORD, "login_csrf": token})
    assert r.status_code == 303, r.text
    return c


def test_hybrid_routing_sends_the_most_uncertain_to_people_within_the_budget(s, cli):
    """Twelve items: 0-5 confident (0.9), 6-8 unsure (0.6, 0.65, 0.7), 9-11 order-inconsistent (the judge
    picks the first shown). Budget 4: the three inconsistent items and the least confident one (6) go to
    people at the top of the queue; 7 and 8 keep the judge's label (over the budget). A re-run adds nothing."""
    make_users(s, {"h0": "annotator"})
    services.create_project(s, "hy", "# Guide", overlap=2, gold_rate=0.0, qa_rate=0.0)
    rows, better = truth_items(12, prefix="h")
    services.import_items(s, "hy", rows)
    CONFIDENCE.clear()
    CONFIDENCE.update({f"h prompt {k}": 0.9 for k in range(6)})
    CONFIDENCE.update({"h prompt 6": 0.6, "h prompt 7": 0.65, "h prompt 8": 0.7})
    args = ["annotate", "judge", "hy", "--judge", f"rule:{__name__}:hedging", "--name", "hedge"]
    r = cli(*args, "--route-uncertain-to-humans", "--human-budget", "4")
    out = summary(r.output)
    assert out["routed to humans"] == "4" and out["human budget left"] == "0"
    assert (
        out["labeled: confident and consistent"] == "6" and out["labeled: uncertain, over the budget"] == "2"
    )
    assert out["submitted"] == "8"

    ai = s.scalar(select(User).where(User.username == "hedge"))
    labeled = {
        s.get(Item, r.item_id).external_id
        for r in s.scalars(select(Response).where(Response.user_id == ai.id))
    }
    assert labeled == {f"h{k}" for k in range(9)} - {"h6"}
    # A person's queue starts with the routed items, most uncertain first (inconsistent ones by id, then h6).
    seen = []
    for _ in range(4):
        task = services.next_task(s, "h0", "hy")
        seen.append(task["prompt"])
        services.submit(s, "h0", task["assignment_id"], answer(task), client_id=uuid.uuid4().hex)
    assert seen == ["h prompt 9", "h prompt 10", "h prompt 11", "h prompt 6"]
    routes = [j.data for j in s.scalars(select(JournalEntry).where(JournalEntry.action == "judge.route"))]
    assert sorted(d["route"] for d in routes) == ["human"] * 4 + ["judge"] * 8
    assert {d["external_id"] for d in routes if d["route"] == "human"} == {"h9", "h10", "h11", "h6"}

    before = s.scalar(select(func.count()).select_from(Response))
    out = summary(cli(*args, "--route-uncertain-to-humans", "--human-budget", "4").output)
    assert out["submitted"] == "0" and out["routed to humans"] == "0" and out["human budget left"] == "0"
    assert s.scalar(select(func.count()).select_from(Response)) == before
    # Routing needs both orders; the error names the option.
    bad = cli(*args, "--route-uncertain-to-humans", "--orders", "given", ok=False)
    assert isinstance(bad.exception, services.Invalid) and "orders='both'" in str(bad.exception)


def test_ai_account_cannot_log_in_and_its_spec_is_stored_without_secrets(s, workspace, cli):
    services.create_project(s, "ac", "# Guide", overlap=1, gold_rate=0.0, qa_rate=0.0)
    services.import_items(s, "ac", truth_items(2, prefix="a")[0])
    cli("annotate", "judge", "ac", "--judge", LONGER)
    name = services.judge_username(LONGER)
    u = s.scalar(select(User).where(User.username == name))
    assert (u.kind, u.role, u.judge_spec) == ("ai", "annotator", LONGER)
    c = TestClient(create_app(workspace), follow_redirects=False)
    token = re.search(r'name="login_csrf" value="([^"]+)"', c.get("/login").text).group(1)
    for pw in (PASSWORD, auth.NO_PASSWORD, ""):
        r = c.post("/login", data={"username": name, "password": pw, "login_csrf": token})
        assert r.status_code == 401 and "invalid username or password" in r.text
    r = c.post("/api/v1/auth/login", json={"username": name, "password": PASSWORD})
    assert r.status_code in (401, 404, 422)
    with pytest.raises(services.Invalid, match="no credentials"):
        services.create_token(s, None, name, "t", ["annotate"])
    # A person's name, or another judge under the same name, is refused.
    make_users(s, {"alice": "annotator"})
    with pytest.raises(services.Conflict, match="person"):
        services.add_ai_user(s, "alice", LONGER)
    with pytest.raises(services.Conflict, match="another --name"):
        services.add_ai_user(s, name, FIRST)
    spec = "openai:gpt-x@https://user:pw@example.org/v1#api_key=sk-123,timeout=5,auth_token=${ENV:TOK}"
    stored = services.add_ai_user(s, "remote", spec).judge_spec
    assert stored == "openai:gpt-x@https://***@example.org/v1#api_key=***,timeout=5,auth_token=${ENV:TOK}"
    assert "sk-123" not in str(services.journal(s, 10))


@pytest.mark.parametrize("db_url", ["sqlite", "postgresql"], indirect=True)
def test_migration_0005_makes_existing_users_human(db_url):
    from alembic import command

    eng = db.make_engine(db_url)
    cfg = db.alembic_config(db_url)
    with eng.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0004")
    with eng.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO fb_users (username, password_hash, role, tier, qc_state, disabled, created_at) "
                "VALUES ('old', 'x', 'annotator', 'standard', 'active', false, :at)"
            ),
            {"at": datetime.now(UTC)},
        )
    db.upgrade(eng)
    assert db.current_revision(eng) == db.head_revision()
    with eng.connect() as conn:
        assert conn.execute(text("SELECT kind, judge_spec FROM fb_users")).all() == [("human", None)]
    eng.dispose()


def test_judge_on_gold_items_gets_gold_accuracy_like_people(s, cli):
    """Ten gold items (gold rate 1: every lease is gold while any is left). The honest judge answers all ten
    right; a scripted judge that flips three gets 0.7, exactly as the report computes it for a person."""
    services.create_project(s, "gd", "# Guide", overlap=3, gold_rate=1.0, qa_rate=0.0)
    rows, better = truth_items(0, prefix="g", gold=10)
    services.import_items(s, "gd", rows)
    r = cli("annotate", "judge", "gd", "--judge", LONGER, "--name", "goldie")
    assert summary(r.output)["of which gold"] == "10"
    SCRIPT.clear()
    for k, row in enumerate(rows):
        a, b = row["candidates"]
        good = better[row["prompt"]]
        SCRIPT[row["prompt"]] = good if k >= 3 else (b if good == a else a)
    cli("annotate", "judge", "gd", "--judge", f"rule:{__name__}:scripted", "--name", "flipper")
    report = {a["annotator_id"]: a for a in qc.quality_report(s, "gd")["annotators"]}
    assert (report["goldie"]["n_gold"], report["goldie"]["gold_accuracy"]) == (10, 1.0)
    assert (report["flipper"]["n_gold"], report["flipper"]["gold_accuracy"]) == (10, 0.7)
    assert report["goldie"]["kind"] == "ai"


def test_fraction_is_a_deterministic_share_and_routing_can_go_to_experts(s, cli):
    """--fraction 0.5 judges exactly the items `in_fraction` picks (the same on a re-run; the rest are given
    back); --route-to-experts puts the routed items in the expert tier, out of a standard annotator's queue."""
    make_users(s, {"std": "annotator"})
    auth.create_user(s, "pro", PASSWORD, "annotator", pod="pod1", tier="expert")
    s.commit()
    services.create_project(s, "fr", "# Guide", overlap=2, gold_rate=0.0, qa_rate=0.0)
    rows, _ = truth_items(30, prefix="f")
    services.import_items(s, "fr", rows)
    picked = {r["id"] for r in rows if services.in_fraction("fr", r["id"], 0.5)}
    assert 5 < len(picked) < 25
    CONFIDENCE.clear()
    CONFIDENCE.update({r["prompt"]: 0.9 for r in rows})
    CONFIDENCE[rows[0]["prompt"]] = CONFIDENCE[rows[1]["prompt"]] = 0.55  # the two unsure items
    r = cli("annotate", "judge", "fr", "--judge", f"rule:{__name__}:hedging", "--name", "half", "--fraction", "0.5",
            "--route-uncertain-to-humans", "--route-to-experts")  # fmt: skip
    out = summary(r.output)
    unsure = {"f0", "f1"} & picked
    assert out["outside --fraction"] == str(30 - len(picked))
    assert out["submitted"] == str(len(picked - unsure)) and out["routed to humans"] == str(len(unsure))
    ai = s.scalar(select(User).where(User.username == "half"))
    labeled = {
        s.get(Item, x.item_id).external_id
        for x in s.scalars(select(Response).where(Response.user_id == ai.id))
    }
    assert labeled == picked - unsure
    tiers = {
        it.external_id: it.tier for it in s.scalars(select(Item).where(Item.external_id.in_(["f0", "f1"])))
    }
    assert {k for k, v in tiers.items() if v == "expert"} == unsure
    assert unsure == {"f0"}  # the hash puts f0 in the half, f1 out
    routed_prompts = {r["prompt"] for r in rows if r["id"] in unsure}
    assert services.next_task(s, "pro", "fr")["prompt"] in routed_prompts
    std_seen = []
    while (task := services.next_task(s, "std", "fr")) is not None:
        std_seen.append(task["prompt"])
        services.skip(s, "std", task["assignment_id"], "test")
    assert std_seen and not routed_prompts & set(std_seen)
    again = summary(cli("annotate", "judge", "fr", "--judge", f"rule:{__name__}:hedging", "--name", "half",
                        "--fraction", "0.5").output)  # fmt: skip
    assert again["submitted"] == "0" and again["tasks leased"] == "0"


def test_a_lead_sees_the_judges_table_on_the_project_page(s, workspace, cli):
    make_users(s, {"h0": "annotator", "h1": "annotator", "lead": "lead"})
    services.create_project(s, "lp", "# Guide", overlap=3, gold_rate=0.0, qa_rate=0.0)
    rows, better = truth_items(10, prefix="l")
    services.import_items(s, "lp", rows)
    people_annotate(s, ["h0", "h1"], "lp", better, reliability=1.0)
    cli("annotate", "judge", "lp", "--judge", LONGER, "--name", "judge-l")
    page = logged_in(create_app(workspace), "lead").get("/admin/projects/lp")
    table = re.search(r'<table id="judges">(.*?)</table>', page.text, re.S).group(1)
    # Two people who always answer the truth and an honest judge: full agreement on all ten items.
    assert "judge-l" in table and "1.000 (" in table and "<td>10</td>" in table and "1.00 of 10" in table
