"""The assignment engine and services, through the same library calls the routes use."""

from __future__ import annotations

import random
import threading
from datetime import timedelta

import pytest
from fb_helpers import answer, make_users, pair_items
from sqlalchemy import func, select, update

from alignflow.feedback import engine, services
from alignflow.feedback.models import Assignment, Item, JournalEntry, Response, User


def _project(s, name="p", n=4, gold=0, **kw):
    kw.setdefault("gold_rate", 0.0)
    kw.setdefault("qa_rate", 0.0)
    p = services.create_project(s, name, "# Guideline\nPrefer accurate answers.", **kw)
    services.import_items(s, p, pair_items(n, gold=gold), source="test")
    return p


def _annotate_all(s, user, project, choice="left") -> list[dict]:
    done = []
    while (task := services.next_task(s, user, project)) is not None:
        services.submit(s, user, task["assignment_id"], answer(task, choice), f"cid-{task['assignment_id']}")
        done.append(task)
    return done


def test_add_user_service(s):
    u = services.add_user(s, "quick", "a-long-password", "annotator", pod="p")
    assert u.id and u.password_hash.startswith("$argon2id$") and "a-long-password" not in u.password_hash
    with pytest.raises(services.Conflict):
        services.add_user(s, "quick", "a-long-password", "annotator")
    with pytest.raises(services.Invalid, match="password"):
        services.add_user(s, "other", "short", "annotator")


def test_overlap_and_never_twice(s):
    make_users(s, {f"u{k}": "annotator" for k in range(4)})
    p = _project(s, n=5, overlap=2)
    per_user = {f"u{k}": _annotate_all(s, f"u{k}", p) for k in range(4)}
    # 5 items x overlap 2 = 10 slots; the first two annotators take all of them.
    assert sum(len(v) for v in per_user.values()) == 10
    for tasks in per_user.values():
        ids = [t["prompt"] for t in tasks]
        assert len(ids) == len(set(ids))
    counts = s.execute(select(Response.item_id, func.count()).group_by(Response.item_id)).all()
    assert all(n == 2 for _, n in counts) and len(counts) == 5
    assert services.queue_state(s, p)["items_complete"] == 5


def test_display_order_is_stored_and_labels_are_canonical(s):
    make_users(s, {"ann": "annotator"})
    p = _project(s, n=30, overlap=1)
    rng = random.Random(0)
    while (task := services.next_task(s, "ann", p, rng=rng)) is not None:
        services.submit(s, "ann", task["assignment_id"], answer(task, "left"), f"c-{task['assignment_id']}")
    df = services.load_judgments(s, p)
    overall = df[df.dimension == "overall"]
    # "left" is canonical A exactly when the pair was not swapped.
    assert ((overall.label == "A") == ~overall.shown_swapped).all()
    assert 0 < overall.shown_swapped.sum() < len(overall)
    orders = [a.display_order for a in s.scalars(select(Assignment))]
    assert all(sorted(o) == [0, 1] for o in orders)


def test_expired_lease_returns_slot(s):
    make_users(s, {"a": "annotator", "b": "annotator"})
    p = _project(s, n=1, overlap=1, lease_seconds=60)
    t1 = services.next_task(s, "a", p)
    assert services.next_task(s, "b", p) is None  # the only slot is leased
    s.execute(update(Assignment).values(lease_expires_at=engine.now() - timedelta(seconds=1)))
    s.commit()
    t2 = services.next_task(s, "b", p)
    assert t2 is not None and t2["prompt"] == t1["prompt"]
    # a's late answer is refused: the slot now belongs to b.
    with pytest.raises(services.Conflict, match="expired"):
        services.submit(s, "a", t1["assignment_id"], answer(t1), "late-client-1")
    assert s.scalar(select(func.count()).select_from(Response)) == 0
    services.submit(s, "b", t2["assignment_id"], answer(t2), "b-client-1")
    assert s.scalar(select(Item.slots_taken)) == 1


def test_late_submission_refused_alike_for_gold_and_normal_items(s):
    """Issue 18: late answers used to be always accepted on gold items but only sometimes on normal ones, so
    letting a lease lapse told gold apart. Now an expired annotation lease refuses both, slot free or not."""
    make_users(s, {"a": "annotator"})
    p = _project(s, n=1, gold=1, overlap=1, gold_rate=0.5)
    tasks = []
    rng = random.Random(0)
    while len({t["prompt"] for t in tasks}) < 2:  # one gold and one normal task, in whichever order
        t = services.next_task(s, "a", p, rng=rng)
        s.execute(update(Assignment).values(lease_expires_at=engine.now() - timedelta(seconds=1)))
        s.commit()
        assert engine.expire_leases(s) == 1
        s.commit()
        tasks.append(t)
    assert s.scalar(select(Item.slots_taken).where(~Item.is_gold)) == 0  # the normal slot is free again
    gold_prompts = set(s.scalars(select(Item.prompt).where(Item.is_gold)))
    kinds = set()
    for k, t in enumerate(tasks):
        kinds.add(t["prompt"] in gold_prompts)
        with pytest.raises(services.Conflict, match="expired"):
            services.submit(s, "a", t["assignment_id"], answer(t), f"late-client-{k}")
    assert kinds == {True, False}
    assert s.scalar(select(func.count()).select_from(Response)) == 0


def test_submit_is_idempotent(s):
    make_users(s, {"a": "annotator"})
    p = _project(s, n=2)
    t = services.next_task(s, "a", p)
    r1 = services.submit(s, "a", t["assignment_id"], answer(t), "same-client-id")
    r2 = services.submit(s, "a", t["assignment_id"], answer(t), "same-client-id")
    assert r1.created and not r2.created and r1.response_id == r2.response_id
    with pytest.raises(services.Conflict, match="already submitted"):
        services.submit(s, "a", t["assignment_id"], answer(t), "another-client-id")
    assert s.scalar(select(func.count()).select_from(Response)) == 1
    actions = s.scalars(select(JournalEntry.action).order_by(JournalEntry.id)).all()
    assert actions.count("response.submit") == 1 and "assignment.lease" in actions


def test_skip_releases_and_records_reason(s):
    make_users(s, {"a": "annotator", "b": "annotator"})
    p = _project(s, n=1, overlap=1)
    t = services.next_task(s, "a", p)
    with pytest.raises(services.Invalid):
        services.skip(s, "a", t["assignment_id"], "  ")
    services.skip(s, "a", t["assignment_id"], "I do not read this language")
    assert services.next_task(s, "a", p) is None  # never the same item twice
    assert services.next_task(s, "b", p) is not None
    entry = s.scalar(select(JournalEntry).where(JournalEntry.action == "assignment.skip"))
    assert entry.data["reason"] == "I do not read this language"


def test_gold_mixed_in_and_indistinguishable(s):
    make_users(s, {"a": "annotator"})
    p = _project(s, n=3, gold=2, gold_rate=1.0, overlap=1)
    tasks = _annotate_all(s, "a", p)
    gold_flags = [s.get(Item, s.get(Assignment, t["assignment_id"]).item_id).is_gold for t in tasks]
    assert gold_flags[:2] == [True, True]  # rate 1.0: gold first while any is left
    # Same keys, and nothing in a gold task's view mentions gold.
    assert set(tasks[0]) == set(tasks[-1]) and "gold" not in str(tasks[0]).lower()
    df = services.load_judgments(s, p)
    overall = df[df.dimension == "overall"]
    assert overall.is_gold.sum() == 2 and (overall[overall.is_gold].gold_label == "A").all()
    assert (~overall.is_gold).sum() == 3


def test_qa_sample_goes_to_reviewer_who_corrects(s):
    make_users(s, {"a": "annotator", "rev": "reviewer"})
    p = _project(s, n=2, qa_rate=1.0, overlap=1)
    assert services.next_task(s, "rev", p) is None  # nothing to review yet
    t = services.next_task(s, "a", p)
    res = services.submit(s, "a", t["assignment_id"], answer(t, "left"), "a-client-1")
    assert res.qa_sampled
    rt = services.next_task(s, "rev", p)
    assert rt["kind"] == "review" and rt["original"]["answer"]["choice"] == "left"
    assert rt["candidates"] == t["candidates"]  # the reviewer sees the annotator's display order
    services.submit(
        s, "rev", rt["assignment_id"], {"review_action": "correct", **answer(rt, "right")}, "rev-client-1"
    )
    df = services.load_judgments(s, p)
    row = df[(df.dimension == "overall")].iloc[0]
    assert row.label != row.reviewer_label and {row.label, row.reviewer_label} == {"A", "B"}
    assert s.get(Response, res.response_id).qa_status == "done"


def test_reviewer_accepts(s):
    make_users(s, {"a": "annotator", "rev": "reviewer"})
    p = _project(s, n=1, qa_rate=1.0, overlap=1)
    t = services.next_task(s, "a", p)
    services.submit(s, "a", t["assignment_id"], answer(t, "tie"), "a-client-1")
    rt = services.next_task(s, "rev", p)
    services.submit(s, "rev", rt["assignment_id"], {"review_action": "accept"}, "rev-client-1")
    df = services.load_judgments(s, p)
    assert (df.label == df.reviewer_label).all()


def test_ambiguous_items_go_to_experts_only(s):
    ids = make_users(s, {"std": "annotator", "exp": "annotator", "admin": "admin"})
    s.get(User, ids["exp"]).tier = "expert"
    s.commit()
    p = _project(s, n=1, overlap=2)
    item_id = s.scalar(select(Item.id))
    services.mark_ambiguous(s, item_id, "admin")
    assert services.next_task(s, "std", p) is None
    assert services.next_task(s, "exp", p) is not None


def test_qc_actions_enforced_and_reversible(s):
    ids = make_users(s, {"a": "annotator", "lead": "lead"})
    p = _project(s, n=3, gold=1, overlap=3)
    s.execute(update(Item).where(Item.external_id == "i0").values(priority=5))
    s.commit()
    user = s.get(User, ids["a"])
    act = engine.apply_qc_action(s, user, "suspend", "gold accuracy 0.40", ids["lead"])
    s.commit()
    with pytest.raises(services.Forbidden, match="suspended"):
        services.next_task(s, "a", p)
    engine.apply_qc_action(s, user, "recertify", "retake gold", ids["lead"])
    s.commit()
    engine.revert_qc_action(s, act.id, ids["lead"])
    s.commit()
    assert s.get(User, ids["a"]).qc_state == "recertify"  # the later action still stands
    t = services.next_task(s, "a", p)
    assert s.get(Item, s.get(Assignment, t["assignment_id"]).item_id).is_gold
    services.submit(s, "a", t["assignment_id"], answer(t), "a-client-1")
    assert services.next_task(s, "a", p) is None  # gold exhausted: recertify gets nothing else
    latest = s.scalars(select(engine.QcAction).order_by(engine.QcAction.id.desc())).first()
    engine.revert_qc_action(s, latest.id, ids["lead"])
    engine.apply_qc_action(s, s.get(User, ids["a"]), "restrict", "low agreement", ids["lead"])
    s.commit()
    t = services.next_task(s, "a", p, rng=random.Random(1))
    # restricted: only low-impact (priority <= 0) work, never the priority-5 item
    item = s.get(Item, s.get(Assignment, t["assignment_id"]).item_id)
    assert item.priority <= engine.LOW_IMPACT_PRIORITY
    actions = s.scalars(select(JournalEntry.action)).all()
    assert {"qc.suspend", "qc.recertify", "qc.revert", "qc.restrict"} <= set(actions)


def test_concurrent_leasing_never_exceeds_overlap(sessions):
    with sessions() as s:
        make_users(s, {f"u{k}": "annotator" for k in range(8)})
        p = _project(s, n=6, overlap=3)
    errors: list[BaseException] = []

    def worker(name: str) -> None:
        try:
            with sessions() as ss:
                for _ in range(10):
                    task = services.next_task(ss, name, p.name)
                    if task is None:
                        return
                    services.submit(
                        ss, name, task["assignment_id"], answer(task), f"{name}-{task['assignment_id']}"
                    )
        except BaseException as exc:  # noqa: BLE001 - surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(f"u{k}",)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    with sessions() as s:
        counts = dict(s.execute(select(Response.item_id, func.count()).group_by(Response.item_id)).all())
        assert sorted(counts.values()) == [3] * 6
        pairs = s.execute(select(Response.item_id, Response.user_id)).all()
        assert len(pairs) == len(set(pairs)) == 18
        assert all(n == 3 for n in s.scalars(select(Item.slots_taken)))


def test_reviewer_skip_returns_the_qa_item_to_other_reviewers(s):
    make_users(s, {"a": "annotator", "rev1": "reviewer", "rev2": "reviewer"})
    p = _project(s, n=1, qa_rate=1.0, overlap=1)
    t = services.next_task(s, "a", p)
    res = services.submit(s, "a", t["assignment_id"], answer(t), "a-client-1")
    rt = services.next_task(s, "rev1", p)
    assert s.get(Response, res.response_id).qa_status == "leased"
    assert services.next_task(s, "rev2", p) is None  # leased to rev1
    services.skip(s, "rev1", rt["assignment_id"], "conflict of interest")
    assert s.get(Response, res.response_id).qa_status == "pending"
    assert services.next_task(s, "rev1", p) is None  # never the same item twice
    assert services.next_task(s, "rev2", p)["original"]["response_id"] == res.response_id
