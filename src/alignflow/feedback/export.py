"""Export a project's annotations as a preference dataset artifact with lineage to every judgment.

Artifacts written (all content-addressed, so re-exporting unchanged data returns the same ids):
    annotation_project  the project settings and every schema version (JSON)
    guideline           one per guideline version answered (JSON with the Markdown body)
    annotations         every individual judgment: annotator, item, vote, ratings, tags, rationale, guideline and
                        schema versions, display order, timestamps, reviews (Parquet)
    preferences         one row per regular (non-gold) item: prompt, chosen, rejected, the aggregated label with
                        p_a and margin, and every annotator's vote (Parquet; TRL's prompt/chosen/rejected columns).
                        A "tie" consensus keeps candidate A as `chosen`: filter on `label` (or weight by `margin`)
                        before training. Ranking projects: chosen/rejected = Borda top/bottom, `label` the ranking.
Edges: preferences <- annotations ("annotations"), <- annotation_project ("project"), <- guideline ("guideline"),
<- each item source artifact ("items"); annotations <- the same project and guideline artifacts.

`export_as(..., as_="pairs"|"rankings"|"judgments")` (``alignflow annotate export --as``) also writes
    pairs / rankings    the trainable kinds `alignflow rm` and `alignflow dpo` take as ``data.train``, with edges to
                        the preferences, annotations, guideline versions, every annotator (an ``annotator`` JSON
                        artifact each) and the aggregation method (an ``aggregation`` JSON artifact)
    judgments           the quality contract's table, what ``alignflow quality report`` reads

`preferences_to_pairs(rows)` turns preference rows into rows of the trainable `pairs` kind (what `alignflow rm`
and `alignflow dpo` read), with the aggregated soft label as the pair's weight and a stated rule for ties.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any, Literal

from sqlalchemy import select
from sqlalchemy.orm import Session

from alignflow.feedback import engine, services
from alignflow.feedback.auth import aware
from alignflow.feedback.journal import record
from alignflow.feedback.models import Assignment, Guideline, Item, QuestionSchema, Response, User
from alignflow.store import Store


def _annotation_rows(s: Session, project_id: int) -> list[dict[str, Any]]:
    q = (
        select(
            Response,
            Item.external_id,
            Item.is_gold,
            Item.gold_label,
            User.username,
            User.pod,
            Assignment.display_order,
        )
        .join(Item, Item.id == Response.item_id)
        .join(User, User.id == Response.user_id)
        .join(Assignment, Assignment.id == Response.assignment_id)
        .where(Response.project_id == project_id)
        .order_by(Response.id)
    )
    rows = []
    for r, ext, is_gold, gold_label, username, pod, order in s.execute(q).all():
        payload = r.payload or {}
        rows.append(
            {
                "response_id": r.id,
                "item_id": ext,
                "annotator_id": username,
                "pod": pod,
                "kind": r.kind,
                "review_of": r.review_of,
                "review_action": r.review_action,
                "is_gold": bool(is_gold),
                "gold_label": json.dumps(gold_label) if is_gold else None,
                "label": json.dumps(r.label),
                "strength": payload.get("strength"),
                "dimension_labels": json.dumps(r.dimension_labels or {}, sort_keys=True),
                "failure_tags": json.dumps(payload.get("failure_tags_by_candidate") or {}, sort_keys=True),
                "rationale": payload.get("rationale", ""),
                "shown_swapped": bool(r.shown_swapped),
                "display_order": [int(x) for x in order],
                "guideline_version": r.guideline_version,
                "schema_version": r.schema_version,
                "duration_s": r.duration_s,
                "created_at": aware(r.created_at).isoformat(),
            }
        )
    return rows


def _borda(rankings: list[list[str]]) -> list[str]:
    """Consensus ranking by Borda count (Borda 1781): a candidate at position i of a k-way ranking scores k-1-i;
    candidates sort by total score, ties broken by id so the result is deterministic."""
    score: dict[str, float] = {}
    for rk in rankings:
        for pos, cid in enumerate(rk):
            score[cid] = score.get(cid, 0.0) + (len(rk) - 1 - pos)
    return sorted(score, key=lambda c: (-score[c], c))


def _preference_rows(s: Session, p: Any, method: str) -> list[dict[str, Any]]:
    from alignflow.quality import aggregate

    df = services.load_judgments(s, p)
    df = df[~df["is_gold"]]
    if df.empty:
        return []
    items = {
        it.external_id: it for it in s.scalars(select(Item).where(Item.project_id == p.id, ~Item.is_gold))
    }
    overall = df[df["dimension"] == "overall"]
    pairwise = overall["label"].map(lambda v: isinstance(v, str)).all()
    consensus: dict[str, dict[str, Any]] = {}
    dim_consensus: dict[str, dict[str, str]] = {}
    dim_p_a: dict[str, dict[str, float]] = {}
    if pairwise:
        from alignflow.quality.schema import validate_judgments

        agg = aggregate.aggregate_all(validate_judgments(df.reset_index(drop=True)), method)
        for row in agg.to_dict(orient="records"):
            if row["dimension"] == "overall":
                consensus[row["item_id"]] = row
            else:
                dim_consensus.setdefault(row["item_id"], {})[row["dimension"]] = row["label"]
                if row.get("p_a") is not None and row["p_a"] == row["p_a"]:  # NaN: not a pairwise dimension
                    dim_p_a.setdefault(row["item_id"], {})[row["dimension"]] = float(row["p_a"])
    out = []
    for item_id, votes in overall.groupby("item_id", sort=True):
        item = items[item_id]
        cands = item.candidates
        dims = df[(df["item_id"] == item_id) & (df["dimension"] != "overall")]
        vote_rows = [
            {
                "annotator_id": v.annotator_id,
                "label": json.dumps(v.label),
                "shown_swapped": bool(v.shown_swapped),
                "reviewer_label": None if v.reviewer_label is None else json.dumps(v.reviewer_label),
            }
            for v in votes.itertuples()
        ]
        if pairwise:
            c = consensus[item_id]
            label, p_a, margin = c["label"], c["p_a"], c["margin"]
            chosen, rejected = (cands[1], cands[0]) if label == "B" else (cands[0], cands[1])
        else:
            order = _borda([list(v) for v in votes["label"]])
            by_id = {cd["id"]: cd for cd in cands}
            chosen, rejected = by_id[order[0]], by_id[order[-1]]
            label, p_a, margin = json.dumps(order), None, None
        out.append(
            {
                "item_id": item_id,
                "prompt": item.prompt,
                "chosen": chosen["text"],
                "rejected": rejected["text"],
                "chosen_id": chosen["id"],
                "rejected_id": rejected["id"],
                "chosen_model": chosen.get("model"),
                "rejected_model": rejected.get("model"),
                "label": label,
                "p_a": None if p_a is None else float(p_a),
                "margin": None if margin is None else float(margin),
                "n_votes": len(votes),
                "method": method if pairwise else "borda",
                "votes": vote_rows,
                "dimension_labels": json.dumps(dim_consensus.get(item_id, {}), sort_keys=True),
                "dimension_p_a": json.dumps(dim_p_a.get(item_id, {}), sort_keys=True),
                "dimension_votes": json.dumps(
                    [
                        {"annotator_id": d.annotator_id, "dimension": d.dimension, "label": d.label}
                        for d in dims.itertuples()
                    ]
                ),
                "guideline_versions": sorted({int(x) for x in votes["guideline_version"]}),
                "item_meta": json.dumps(item.meta or {}, sort_keys=True),
            }
        )
    return out


TieRule = Literal["drop", "both-half", "both"]
TIE_RULES: tuple[str, ...] = ("drop", "both-half", "both")  # "both" is the older name of "both-half"


def _dimension_p_chosen(row: Mapping[str, Any], tie_rule: str) -> dict[str, float]:
    """Per dimension, P(chosen better on it) in canonical A/B terms flipped to the pair's chosen side.

    The aggregation's own soft label ``p_a`` per dimension (Dawid-Skene per dimension by default) where the
    export has it, else the consensus label (A 1, B 0, tie 0.5). A dimension whose consensus is a tie follows
    the tie rule: left out under ``drop``, 0.5 under ``both-half``.
    """
    labels = json.loads(row.get("dimension_labels") or "{}")
    p_a = json.loads(row.get("dimension_p_a") or "{}")
    chosen_is_a = row["label"] != "B"
    out = {}
    for dim, label in sorted(labels.items()):
        if label == "tie" and tie_rule == "drop":
            continue
        if dim in p_a:
            pa = float(p_a[dim])
        elif label in ("A", "B", "tie"):
            pa = {"A": 1.0, "B": 0.0, "tie": 0.5}[label]
        else:
            continue  # not a pairwise verdict (a rating dimension): no pair label
        out[dim] = round(pa if chosen_is_a else 1.0 - pa, 6)
    return out


def _pair(pair_id: str, prompt: str, chosen: str, rejected: str, weight: float, meta: str) -> dict[str, Any]:
    return {
        "id": pair_id,
        "prompt": prompt,
        "chosen": chosen,
        "rejected": rejected,
        "weight": weight,
        "meta": meta,
    }


def preferences_to_pairs(
    rows: Iterable[Mapping[str, Any]], tie_rule: TieRule = "drop"
) -> list[dict[str, Any]]:
    """Rows of the `pairs` dataset kind from `preferences` rows (the artifact `export_project` writes).

    Weight: the aggregated probability that `chosen` is the better reply, i.e. ``p_a`` when the consensus
    label is "A" and ``1 - p_a`` when it is "B" (the soft label of the aggregation method, in [0.5, 1] for a
    decisive consensus). Ranking rows (no ``p_a``; chosen/rejected are the Borda top and bottom) get weight 1.

    Ties (consensus label "tie"), by `tie_rule`:
        drop: left out; a tie says neither reply is better, and training on it as a win teaches noise.
        both-half (or "both"): kept as two pairs, A over B and B over A, each with weight 0.5: the pair then adds no net
            preference, only pressure toward equal scores (ids ``<item>/ab`` and ``<item>/ba``).

    Texts are copied as stored; `meta` is a JSON object with the item's ``n_votes``, aggregation ``method`` and,
    when annotators rated dimensions, ``labels``: {dimension: P(chosen better on it)} (see
    :func:`_dimension_p_chosen`; the `pairs` format in :mod:`alignflow.data.formats` documents it). For a tie kept
    as two pairs the ``ba`` pair's labels are flipped.
    """
    if tie_rule not in TIE_RULES:
        raise ValueError(f"tie_rule must be one of {TIE_RULES}, got {tie_rule!r}")
    out = []
    for r in rows:
        base = {"n_votes": r["n_votes"], "method": r["method"]}
        labels = _dimension_p_chosen(r, tie_rule) if r.get("p_a") is not None else {}
        meta = json.dumps({**base, "labels": labels} if labels else base)
        if r["label"] == "tie":
            if tie_rule in ("both", "both-half"):
                a, b = r["chosen"], r["rejected"]  # a tie keeps candidate A as `chosen`
                flipped = {d: round(1.0 - v, 6) for d, v in labels.items()}
                meta_ba = json.dumps({**base, "labels": flipped} if labels else base)
                out.append(_pair(f"{r['item_id']}/ab", r["prompt"], a, b, 0.5, meta))
                out.append(_pair(f"{r['item_id']}/ba", r["prompt"], b, a, 0.5, meta_ba))
            continue
        p_a = r.get("p_a")
        if p_a is None:
            weight = 1.0
        else:
            weight = float(p_a) if r["label"] == "A" else 1.0 - float(p_a)
        out.append(_pair(r["item_id"], r["prompt"], r["chosen"], r["rejected"], weight, meta))
    return out


def export_project(
    s: Session, store: Store, project: Any, method: str = "dawid_skene", actor: User | int | str | None = None
) -> dict[str, Any]:
    """Write the annotations and preference artifacts with lineage; returns their ids and row counts.

    `method` is an `alignflow.quality.aggregate` method for the consensus label of pairwise projects.
    """
    p = services.get_project(s, project)
    ann_rows = _annotation_rows(s, p.id)
    if not ann_rows:
        raise services.Conflict(f"project {p.name!r} has no annotations to export")
    schemas = {
        str(q.version): q.spec
        for q in s.scalars(select(QuestionSchema).where(QuestionSchema.project_id == p.id))
    }
    project_doc = {
        "name": p.name,
        "overlap": p.overlap,
        "gold_rate": p.gold_rate,
        "qa_rate": p.qa_rate,
        "schemas": schemas,
        "created_at": aware(p.created_at).isoformat(),
    }
    project_id = store.put_json(project_doc, kind="annotation_project", name=p.name)
    used = sorted({r["guideline_version"] for r in ann_rows})
    guideline_ids = []
    for v in used:
        g = s.get(Guideline, (p.id, v))
        guideline_ids.append(
            store.put_json(
                {"project": p.name, "version": v, "body_md": g.body_md},
                kind="guideline",
                name=f"{p.name}@v{v}",
            )
        )
    context = [(project_id, "project")] + [(gid, "guideline") for gid in guideline_ids]
    annotators = sorted({r["annotator_id"] for r in ann_rows})
    annotations_id = store.put_dataset(
        ann_rows,
        kind="annotations",
        name=f"{p.name}-annotations",
        meta={"project": p.name, "annotators": annotators, "guideline_versions": used},
        parents=context,
    )
    pref_rows = _preference_rows(s, p, method)
    if not pref_rows:
        raise services.Conflict(f"project {p.name!r} has no annotated regular (non-gold) items to export")
    sources = sorted({src for (src,) in s.execute(select(Item.source).where(Item.project_id == p.id)) if src})
    source_edges = []
    for src in sources:
        try:
            source_edges.append((store.resolve(src), "items"))
        except Exception:  # noqa: BLE001 - a file name, not an artifact: nothing to link
            continue
    pref_id = store.put_dataset(
        pref_rows,
        kind="preferences",
        name=f"{p.name}-preferences",
        meta={"project": p.name, "method": method, "annotators": annotators, "n_judgments": len(ann_rows)},
        parents=[(annotations_id, "annotations"), *context, *source_edges],
    )
    engine.begin_write(s)
    actor_id = services._user(s, actor).id if actor is not None else None
    record(
        s,
        actor_id,
        "project.export",
        "project",
        p.id,
        {"preferences": pref_id, "annotations": annotations_id},
    )
    s.commit()
    return {
        "preferences": pref_id,
        "annotations": annotations_id,
        "project": project_id,
        "guidelines": guideline_ids,
        "n_pairs": len(pref_rows),
        "n_judgments": len(ann_rows),
    }


ExportAs = Literal["preferences", "pairs", "rankings", "judgments"]
EXPORT_AS: tuple[str, ...] = ("preferences", "pairs", "rankings", "judgments")


def _ranking_rows(s: Session, p: Any, pref_rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows of the `rankings` kind: every candidate of the item, the Borda consensus as indices best first, and
    each candidate's mean Borda score per annotator (position i of a k-way ranking scores k-1-i)."""
    items = {it.external_id: it for it in s.scalars(select(Item).where(Item.project_id == p.id))}
    out = []
    for r in pref_rows:
        cands = items[r["item_id"]].candidates
        index = {c["id"]: i for i, c in enumerate(cands)}
        order = json.loads(r["label"])
        votes = [json.loads(v["label"]) for v in r["votes"]]
        score = [0.0] * len(cands)
        for rk in votes:
            for pos, cid in enumerate(rk):
                score[index[cid]] += (len(rk) - 1 - pos) / len(votes)
        meta = json.dumps({"n_votes": r["n_votes"], "method": r["method"], "item_id": r["item_id"]})
        out.append(
            {
                "id": r["item_id"],
                "prompt": r["prompt"],
                "completions": [c["text"] for c in cands],
                "ranking": [index[c] for c in order],
                "scores": score,
                "meta": meta,
            }
        )
    return out


def judgments_table(s: Session, project: Any) -> Any:
    """The project's judgments in the quality contract (:mod:`alignflow.quality.schema`), ready for
    ``alignflow quality report``: one row per annotation and dimension, labels in the item's canonical order,
    an explicit ``kind`` (pairwise or ranking), gold answers on gold items, reviewers' labels."""
    p = services.get_project(s, project)
    df = services.load_judgments(s, p)
    if df.empty:
        raise services.Conflict(f"project {p.name!r} has no annotations to export")
    df["kind"] = ["ranking" if isinstance(v, list) else "pairwise" for v in df["label"]]
    df["created_at"] = [ts.isoformat() for ts in df["created_at"]]
    # Parquet columns need one type: pandas fills a missing value of a text column (a label no reviewer
    # gave) with NaN, which must be a null instead.
    return df.astype(object).where(df.notna(), None)


def _context_artifacts(s: Session, store: Store, p: Any, method: str, tie_rule: str | None) -> list[tuple]:
    """The annotators (one `annotator` JSON each: name, role, pod) and the aggregation method (an
    `aggregation` JSON) as artifacts, so a trained model's lineage names who labelled and how votes were
    combined."""
    names = sorted(set(services.load_judgments(s, p)["annotator_id"]))
    edges = []
    for name in names:
        u = services.get_user(s, name)
        doc = {"username": u.username, "role": u.role, "pod": u.pod}
        edges.append((store.put_json(doc, kind="annotator", name=f"annotator:{u.username}"), "annotator"))
    agg = {"method": method, "tie_rule": tie_rule, "project": p.name}
    edges.append(
        (store.put_json(agg, kind="aggregation", name=f"{p.name}-aggregation-{method}"), "aggregation")
    )
    return edges


def export_as(
    s: Session,
    store: Store,
    project: Any,
    as_: ExportAs = "pairs",
    method: str = "dawid_skene",
    tie_rule: TieRule = "drop",
    actor: User | int | str | None = None,
) -> dict[str, Any]:
    """Export a project as a dataset a later stage reads directly; returns ``{"artifact", "kind", "n_rows",
    ...}`` plus the ids `export_project` returns (every export writes the annotations and preferences too).

    as_:
        preferences  `export_project`'s table (every vote and the consensus).
        pairs        the `pairs` kind `alignflow rm` and `alignflow dpo` take as ``data.train``:
                     :func:`preferences_to_pairs` with `tie_rule`, the weight the aggregation's soft label
                     P(chosen better) (a probability, so ``loss.soft_labels: true`` reads it as the target).
        rankings     the `rankings` kind, for ranking projects: every candidate, the Borda consensus, mean
                     Borda scores. A pairwise project is refused (its soft labels fit `pairs` only).
        judgments    the table ``alignflow quality report`` reads (:func:`judgments_table`).
    Edges of pairs/rankings: <- preferences ("preferences"), <- annotations ("annotations"), <- each guideline
    version ("guideline"), <- each annotator ("annotator"), <- the aggregation ("aggregation"), <- the items'
    source artifacts ("items"). Judgments: <- annotations, guidelines, annotators.
    """
    from alignflow.data.formats import SCHEMAS

    if as_ not in EXPORT_AS:
        raise services.Invalid(f"export as must be one of {EXPORT_AS}, got {as_!r}")
    if tie_rule not in TIE_RULES:
        raise services.Invalid(f"tie rule must be one of {TIE_RULES}, got {tie_rule!r}")
    p = services.get_project(s, project)
    kind = services.schema_spec(s, p).kind
    if as_ == "rankings" and kind == "pairwise":
        raise services.Invalid(
            f"project {p.name!r} is pairwise: export it --as pairs (a ranking of two keeps no soft label)"
        )
    base = export_project(s, store, p, method, actor=actor)
    out = {**base, "kind": as_}
    if as_ == "preferences":
        return {**out, "artifact": base["preferences"], "n_rows": base["n_pairs"]}
    context = [(g, "guideline") for g in base["guidelines"]]
    context += _context_artifacts(s, store, p, method if kind == "pairwise" else "borda", tie_rule)
    info = store.get(base["preferences"])
    sources = [
        (pid, "items") for pid, _c, role in store.lineage(info.id, "up", max_depth=1).edges if role == "items"
    ]
    if as_ == "judgments":
        df = judgments_table(s, p)
        aid = store.put_dataset(
            df.to_dict(orient="records"),
            kind="judgments",
            name=f"{p.name}-judgments",
            meta={"project": p.name},
            parents=[(base["annotations"], "annotations"), *context],
        )
        return {**out, "artifact": aid, "n_rows": len(df)}
    pref_rows = store.read_dataset(info.id).to_pylist()
    import pyarrow as pa

    if as_ == "pairs":
        rows = preferences_to_pairs(pref_rows, tie_rule)
        if not rows:
            raise services.Conflict(
                f"project {p.name!r}: every consensus is a tie; nothing to export as pairs"
            )
    else:
        rows = _ranking_rows(s, p, pref_rows)
    parents = [(base["preferences"], "preferences"), (base["annotations"], "annotations"), *context, *sources]
    aid = store.put_dataset(
        pa.Table.from_pylist(rows, schema=SCHEMAS[as_]),
        kind=as_,
        name=f"{p.name}-{as_}",
        meta={"project": p.name, "method": method, "tie_rule": tie_rule, "source": "annotate export"},
        parents=parents,
    )
    return {**out, "artifact": aid, "n_rows": len(rows)}
