"""The DAG runner behind `alignflow run PIPELINE.yaml`.

A pipeline file names stages; each stage is either a training recipe or a Python function:

    name: quickstart
    stages:
      data:
        call: alignflow.domains.support:make_datasets   # function(params, ctx) -> dict of outputs
        params: {n_prompts: 400, seed: 0}
      sft:
        recipe: sft                                      # alignflow.recipes.sft.run(cfg, store)
        config:                                          # the recipe's config, minus output_dir
          model: {path: "${base.model_dir}"}
          data: {train: "${data.sft_dataset}"}

`${stage.key}` refers to an output of another stage; those references define the DAG.
A stage's key is the hash of its resolved parameters, which include the artifact ids its
inputs produced. A stage whose key matches its last successful run is skipped. Each stage runs
in a folder named by its key, so a pipeline killed mid-stage resumes that stage from its own
checkpoints when run again.

Rounds. A `rounds` block repeats its stages `count` times (iterative RLHF: new preferences on the
current policy's outputs, the reward model retrained, RL continued):

    rounds:
      count: 3
      carry:                                  # ${round.NAME}: `init` in round 1, then the previous
        policy_dir:                           # round's output named by `from` (stage.output)
          init: "${sft.checkpoint_dir}"
          from: ppo.checkpoint_dir
      stages:
        feedback:
          call: alignflow.domains.iterative:collect_feedback
          params: {policy_dir: "${round.policy_dir}", seed: "${round.index}"}
        ppo:
          recipe: ppo
          config:
            model: {path: "${round.policy_dir}"}
            reference: {path: "${sft.checkpoint_dir}"}

Before anything runs the block is expanded into one stage per round, named `STAGE@R` (`feedback@1`,
`ppo@3`; R from 1), and the pipeline is one DAG again. Inside round R: `${ppo.x}` names the same round's
`ppo@R` when `ppo` is a round stage (top-level stages are referred to as usual); `${round.index}` is R,
`${round.count}` the number of rounds; `${round.prev.ppo.x}` is round R-1's `ppo@R-1` output (an error in
round 1); `${round.NAME}` is a `carry` entry. Top-level stages refer to a round's output as
`${ppo@2.x}` or `${ppo@last.x}`, so an evaluation after the rounds can compare them. Each round's stages
have their own keys, state entries and work folders, so caching, skipping and resume work per round: a
crash in round 2 resumes round 2 without touching round 1, an unchanged re-run skips every round, and
raising `rounds.count` runs only the new rounds. Overrides: `rounds.count=2`; `ppo.config.x=v` on a round
stage changes every round, `ppo@2.config.x=v` only round 2; `force=["ppo"]` re-runs every round's `ppo`.
A stage function sees its round as `ctx.round` (None outside a block).

Tracking. A top-level `tracking:` block (the recipes' `tracking` section: `backends`, `mlflow_uri`,
`mlflow_experiment`) mirrors each invocation of the pipeline to its own MLflow run / TensorBoard folder
(`<workspace>/pipelines/NAME/runs/<id>/tensorboard`), apart from the stages' own runs (a recipe stage is
tracked by its `config.tracking`, so turning pipeline tracking on changes no stage key). Params: the
pipeline file's stages and the overrides. Metrics: every numeric output of every stage, run or skipped, as
`STAGE/OUTPUT` (nested outputs joined by '/'); a top-level stage at step 0, a round stage `S@R` as `S/...` at
step R, so a block's outputs plot against the round. A table `stages` (stage, status, seconds, key, outputs)
ends the run, also in that folder as `stages.json`.

Engines. `run_pipeline(..., engine="local")` (the default) runs each stage in this process; `engine="ray"`
runs each stage as a Ray task (`alignflow.pipeline.ray_engine`), on a local Ray instance or, with `address`,
an existing cluster. This module stays the scheduler either way: keys, skipping, state.json, resume and
lineage do not depend on the engine, so a pipeline run locally is skipped entirely under Ray and the
reverse. A stage may ask the Ray engine for resources, which are not part of its key:

    sft:
      recipe: sft
      resources: {num_cpus: 2, num_gpus: 0, nproc: 1}   # nproc: the recipe runs under torchrun

The local engine ignores `resources`.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
import os
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from alignflow.config import TrackingSection, apply_overrides
from alignflow.errors import AlignflowError, ConfigError
from alignflow.store import Store
from alignflow.workspace import Workspace

_REF = re.compile(r"\$\{([A-Za-z_][\w-]*(?:@(?:\d+|last))?)\.([A-Za-z_][\w.-]*)\}")
_STAGE_KEYS = {"call", "recipe", "params", "config", "after", "resources"}
_RESOURCE_KEYS = ("num_cpus", "num_gpus", "nproc")
NPROC_RECIPES = ("sft", "rm", "reward", "dpo")  # recipes whose CLI command takes --result-json
ENGINES = ("local", "ray")
ROUND = "round"  # the reserved name of the `${round.…}` references
RECIPES = {
    "sft": "alignflow.recipes.sft",
    "rm": "alignflow.recipes.reward",
    "reward": "alignflow.recipes.reward",
    "dpo": "alignflow.recipes.dpo",
    "ppo": "alignflow.recipes.ppo",
}


class PipelineError(AlignflowError):
    """A pipeline file is invalid, or a stage failed."""


class PipelineStopped(PipelineError):
    """A recipe stage stopped before its end (a signal or a `stop` alert) after a checkpoint: the pipeline
    stops there, and running it again resumes that stage."""

    def __init__(self, message: str, signal: str | None = None) -> None:
        super().__init__(message)
        self.signal = signal


@dataclass
class StageSpec:
    name: str
    call: str | None = None
    recipe: str | None = None
    params: dict[str, Any] = field(default_factory=dict)  # for `call` stages
    config: dict[str, Any] = field(default_factory=dict)  # for `recipe` stages
    after: list[str] = field(default_factory=list)  # ordering without a data reference
    round: int | None = None  # R of a `STAGE@R` instance of the rounds block
    resources: dict[str, Any] = field(default_factory=dict)  # for the Ray engine; not part of the key

    def refs(self) -> set[str]:
        found = {m.group(1) for m in _REF.finditer(json.dumps([self.params, self.config]))}
        return found | set(self.after)


@dataclass
class Pipeline:
    name: str
    stages: dict[str, StageSpec]
    source: Path
    rounds: int = 0  # rounds.count, 0 without a rounds block
    tracking: TrackingSection | None = None  # the top-level `tracking:` block
    overrides: list[str] = field(default_factory=list)

    def order(self) -> list[str]:
        """Stages in dependency order (Kahn's algorithm; file order breaks ties)."""
        deps = {n: s.refs() for n, s in self.stages.items()}
        for n, ds in deps.items():
            for d in ds:
                if d not in self.stages:
                    raise PipelineError(f"{self.source}: stage '{n}' refers to unknown stage '{d}'")
        done: list[str] = []
        pending = list(self.stages)
        while pending:
            ready = [n for n in pending if deps[n] <= set(done)]
            if not ready:
                raise PipelineError(f"{self.source}: stages form a cycle: {', '.join(pending)}")
            done.append(ready[0])
            pending.remove(ready[0])
        return done


@dataclass
class StageContext:
    """What a `call` stage function receives besides its params."""

    store: Store
    stage: str
    work_dir: Path  # a folder of its own, stable across re-runs of the same key
    outputs: dict[str, dict[str, Any]]  # outputs of every stage run so far
    log: Callable[[str], None] = print
    round: int | None = None  # the round (from 1) of a stage in the rounds block, None outside it


def load_pipeline(path: str | os.PathLike[str], overrides: list[str] | tuple[str, ...] = ()) -> Pipeline:
    """Read a pipeline YAML and expand its `rounds` block (see the module docstring).

    Overrides are `stage.config.key=value` or `stage.params.key=value`; for a round stage they apply to every
    round, `stage@R.config.key=value` to round R only, and `rounds.count=N` (or any `rounds.…` key) to the block.
    """
    p = Path(path)
    if not p.is_file():
        raise PipelineError(f"{p}: pipeline file not found")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise PipelineError(f"{p}: not valid YAML: {exc}") from None
    unknown = set(data) - {"name", "stages", "rounds", "tracking"}
    if unknown:
        raise PipelineError(f"{p}: unknown top-level key(s): {', '.join(sorted(unknown))}")
    stages_raw = data.get("stages") or {}
    rounds_raw = data.get("rounds")
    if not isinstance(stages_raw, dict) or not (stages_raw or rounds_raw):
        raise PipelineError(f"{p}: 'stages' must be a non-empty mapping of stage name -> stage")
    if rounds_raw is not None and not isinstance(rounds_raw, dict):
        raise PipelineError(f"{p}: 'rounds' must be a mapping with count, stages and optional carry")
    round_names = set((rounds_raw or {}).get("stages") or {})
    # Overrides go to the part of the file they name: the rounds block, a round stage, one round's instance.
    top, block, instance = [], [], []
    for text in overrides:
        head = text.split("=", 1)[0].split(".", 1)[0].strip()
        if head == "rounds":
            block.append(text.split(".", 1)[1] if "." in text.split("=", 1)[0] else text)
        elif head in round_names:
            block.append(f"stages.{text}")
        elif "@" in head:
            instance.append(text)
        else:
            top.append(text)
    try:
        stages_raw = apply_overrides(stages_raw, top)
        rounds_raw = apply_overrides(rounds_raw, block) if rounds_raw is not None else None
    except ConfigError as exc:
        raise PipelineError(f"{p}: {exc}") from None
    if block and rounds_raw is None:
        raise PipelineError(f"{p}: override {block[0]!r} names the rounds but the pipeline has no 'rounds'")
    if instance and rounds_raw is None:
        raise PipelineError(f"{p}: override {instance[0]!r} names a round but the pipeline has no 'rounds'")
    if ROUND in stages_raw or ROUND in round_names:
        raise PipelineError(f"{p}: '{ROUND}' is reserved for ${{round.…}} references; rename that stage")
    named = [n for n in [*stages_raw, *round_names] if not re.fullmatch(r"[A-Za-z_][\w-]*", str(n))]
    if named:
        raise PipelineError(
            f"{p}: stage name {named[0]!r}: use letters, digits, '_' and '-' ('@R' names rounds)"
        )
    clash = set(stages_raw) & round_names
    if clash:
        raise PipelineError(f"{p}: stage name(s) both top-level and in rounds: {', '.join(sorted(clash))}")
    expanded = dict(stages_raw)
    rounds = 0
    if rounds_raw is not None:
        rounds, per_round = _expand_rounds(p, rounds_raw)
        expanded.update(per_round)
    for text in instance:
        if text.split("=", 1)[0].split(".", 1)[0].strip() not in expanded:
            raise PipelineError(f"{p}: override {text!r}: no such stage (rounds.count is {rounds})")
    try:
        expanded = apply_overrides(expanded, instance)
    except ConfigError as exc:
        raise PipelineError(f"{p}: {exc}") from None
    # `@last` in a top-level stage means the final round.
    expanded = {
        n: _rewrite(raw, lambda v: v.replace("@last.", f"@{rounds}.")) if n in stages_raw else raw
        for n, raw in expanded.items()
    }
    stages: dict[str, StageSpec] = {}
    for name, raw in expanded.items():
        where = f"rounds.stages.{name.split('@')[0]}" if "@" in name else f"stages.{name}"
        if not isinstance(raw, dict):
            raise PipelineError(f"{p}: {where}: expected a mapping")
        bad = set(raw) - _STAGE_KEYS
        if bad:
            raise PipelineError(f"{p}: {where}: unknown key(s) {', '.join(sorted(bad))}")
        if bool(raw.get("call")) == bool(raw.get("recipe")):
            raise PipelineError(f"{p}: {where}: give exactly one of 'call' or 'recipe'")
        if raw.get("recipe") and raw["recipe"] not in RECIPES:
            raise PipelineError(f"{p}: {where}.recipe: expected one of {', '.join(sorted(RECIPES))}")
        stages[name] = StageSpec(
            name=name,
            call=raw.get("call"),
            recipe=raw.get("recipe"),
            params=dict(raw.get("params") or {}),
            config=dict(raw.get("config") or {}),
            after=list(raw.get("after") or []),
            round=int(name.rsplit("@", 1)[1]) if "@" in name else None,
            resources=_resources(p, where, raw),
        )
    return Pipeline(
        name=str(data.get("name") or p.stem),
        stages=stages,
        source=p,
        rounds=rounds,
        tracking=_tracking(p, data.get("tracking")),
        overrides=list(overrides),
    )


def _resources(p: Path, where: str, raw: Mapping[str, Any]) -> dict[str, Any]:
    """A stage's `resources:` (num_cpus, num_gpus, nproc), checked; {} when absent."""
    res = raw.get("resources")
    if res is None:
        return {}
    if not isinstance(res, dict):
        raise PipelineError(
            f"{p}: {where}.resources: expected a mapping with {', '.join(_RESOURCE_KEYS)}, got {res!r}"
        )
    bad = set(res) - set(_RESOURCE_KEYS)
    if bad:
        raise PipelineError(
            f"{p}: {where}.resources: unknown key(s) {', '.join(sorted(map(str, bad)))} "
            f"(expected {', '.join(_RESOURCE_KEYS)})"
        )
    for key in ("num_cpus", "num_gpus"):
        v = res.get(key)
        if v is not None and (
            isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v < 0
        ):
            raise PipelineError(f"{p}: {where}.resources.{key}: expected a number >= 0, got {v!r}")
    if res.get("num_cpus") == 0:
        raise PipelineError(f"{p}: {where}.resources.num_cpus: expected a number > 0, got 0")
    if "nproc" in res:
        n = res["nproc"]
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise PipelineError(f"{p}: {where}.resources.nproc: expected an integer >= 1, got {n!r}")
        if raw.get("recipe") not in NPROC_RECIPES:
            what = f"recipe {raw['recipe']!r}" if raw.get("recipe") else "a 'call' stage"
            raise PipelineError(
                f"{p}: {where}.resources.nproc: torchrun runs only the recipes {', '.join(NPROC_RECIPES)}, "
                f"not {what}"
            )
    return dict(res)


def _tracking(p: Path, raw: Any) -> TrackingSection | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise PipelineError(f"{p}: tracking: expected a mapping (backends, mlflow_uri, mlflow_experiment)")
    from pydantic import ValidationError

    try:
        return TrackingSection.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(x) for x in err["loc"])
        raise PipelineError(f"{p}: tracking.{where}: {err['msg']} (got {err.get('input')!r})") from None


def _rewrite(value: Any, fn: Callable[[str], Any]) -> Any:
    """Apply `fn` to every string inside a nested YAML value."""
    if isinstance(value, dict):
        return {k: _rewrite(v, fn) for k, v in value.items()}
    if isinstance(value, list):
        return [_rewrite(v, fn) for v in value]
    return fn(value) if isinstance(value, str) else value


def _expand_rounds(p: Path, raw: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """`{count, stages, carry}` -> (count, {"STAGE@R": stage}) with the block's references made explicit."""
    bad = set(raw) - {"count", "stages", "carry"}
    if bad:
        raise PipelineError(f"{p}: rounds: unknown key(s) {', '.join(sorted(bad))}")
    count = raw.get("count")
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise PipelineError(f"{p}: rounds.count: expected an integer >= 1, got {count!r}")
    block = raw.get("stages")
    if not isinstance(block, dict) or not block:
        raise PipelineError(f"{p}: rounds.stages: expected a non-empty mapping of stage name -> stage")
    carry = raw.get("carry") or {}
    if not isinstance(carry, dict):
        raise PipelineError(f"{p}: rounds.carry: expected a mapping of name -> {{init, from}}")
    for name, c in carry.items():
        if not isinstance(c, dict) or set(c) != {"init", "from"}:
            raise PipelineError(f"{p}: rounds.carry.{name}: expected exactly the keys 'init' and 'from'")
        if not isinstance(c["from"], str) or c["from"].split(".", 1)[0] not in block or "." not in c["from"]:
            raise PipelineError(
                f"{p}: rounds.carry.{name}.from: expected 'stage.output' with a stage of the round, "
                f"got {c['from']!r}"
            )
        if name in ("index", "count", "prev"):
            raise PipelineError(f"{p}: rounds.carry.{name}: 'index', 'count' and 'prev' are reserved")

    def in_round(r: int) -> Callable[[str], Any]:
        def ref(m: re.Match[str]) -> Any:
            stage, key = m.group(1), m.group(2)
            if stage in block:
                return f"${{{stage}@{r}.{key}}}"
            if stage != ROUND:
                return m.group(0)
            head, _, rest = key.partition(".")
            if head == "index":
                return r
            if head == "count":
                return count
            if head == "prev":
                prev_stage, _, prev_key = rest.partition(".")
                if prev_stage not in block or not prev_key:
                    raise PipelineError(
                        f"{p}: ${{round.{key}}}: expected round.prev.STAGE.OUTPUT with a stage of the round"
                    )
                if r == 1:
                    raise PipelineError(
                        f"{p}: ${{round.{key}}} in round 1, which has no previous round; use rounds.carry "
                        "with an 'init' value for round 1"
                    )
                return f"${{{prev_stage}@{r - 1}.{prev_key}}}"
            if head in carry:
                if rest:
                    raise PipelineError(f"{p}: ${{round.{key}}}: a carry value has no sub-keys")
                if r == 1:
                    return carry[head]["init"]
                src_stage, _, src_key = carry[head]["from"].partition(".")
                return f"${{{src_stage}@{r - 1}.{src_key}}}"
            raise PipelineError(
                f"{p}: ${{round.{key}}}: expected round.index, round.count, round.prev.STAGE.OUTPUT or a "
                f"rounds.carry name ({', '.join(sorted(carry)) or 'none defined'})"
            )

        def fn(text: str) -> Any:
            whole = _REF.fullmatch(text)
            if whole:  # a whole-string reference keeps the value's type (an int index, a list init)
                return ref(whole)
            return _REF.sub(lambda m: str(ref(m)), text)

        return fn

    out: dict[str, Any] = {}
    for r in range(1, count + 1):
        fn = in_round(r)
        for name, stage in block.items():
            if not isinstance(stage, dict):
                raise PipelineError(f"{p}: rounds.stages.{name}: expected a mapping")
            stage = _rewrite(stage, fn)
            if "after" in stage:
                stage["after"] = [f"{a}@{r}" if a in block else a for a in stage["after"] or []]
            out[f"{name}@{r}"] = stage
    return count, out


def _resolve(value: Any, outputs: Mapping[str, Mapping[str, Any]], where: str) -> Any:
    if isinstance(value, dict):
        return {k: _resolve(v, outputs, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve(v, outputs, f"{where}.{i}") for i, v in enumerate(value)]
    if isinstance(value, str) and "${" in value:

        def lookup(stage: str, key: str) -> Any:
            node: Any = outputs.get(stage)
            if node is None:
                raise PipelineError(f"{where}: stage '{stage}' has not produced outputs")
            for part in key.split("."):
                if not isinstance(node, dict) or part not in node:
                    raise PipelineError(f"{where}: stage '{stage}' has no output '{key}'")
                node = node[part]
            return node

        whole = _REF.fullmatch(value)
        if whole:  # a whole-string reference keeps the output's type
            return lookup(whole.group(1), whole.group(2))
        return _REF.sub(lambda m: str(lookup(m.group(1), m.group(2))), value)
    return value


def stage_key(spec: StageSpec, resolved: Mapping[str, Any]) -> str:
    body = json.dumps(
        {"call": spec.call, "recipe": spec.recipe, "resolved": resolved}, sort_keys=True, default=str
    ).encode()
    return hashlib.sha256(body).hexdigest()


def _import(path: str) -> Callable[..., Any]:
    if ":" not in path:
        raise PipelineError(f"call {path!r}: expected 'package.module:function'")
    mod, _, fn = path.partition(":")
    try:
        return getattr(importlib.import_module(mod), fn)
    except (ImportError, AttributeError) as exc:
        raise PipelineError(f"call {path!r}: cannot import: {exc}") from None


def _recipe_schema(module: Any) -> Any:
    return next(
        obj
        for obj in vars(module).values()
        if isinstance(obj, type)
        and obj.__name__.endswith("Config")
        and obj.__module__ == module.__name__
        and "stage" in getattr(obj, "model_fields", {})
    )


def recipe_config(spec: StageSpec, config: dict[str, Any], work_dir: Path) -> tuple[Any, dict[str, Any], Any]:
    """(module, config data, validated config) of a recipe stage, with `output_dir` its work folder."""
    from alignflow.config import validate_config

    module = importlib.import_module(RECIPES[spec.recipe])  # type: ignore[index]
    schema = _recipe_schema(module)
    data = {"stage": schema.model_fields["stage"].default or spec.recipe, **config}
    data["output_dir"] = str(work_dir)
    cfg = validate_config(data, schema, source=f"stage '{spec.name}'")
    return module, data, cfg


def _run_recipe(spec: StageSpec, config: dict[str, Any], work_dir: Path, store: Store) -> dict[str, Any]:
    module, _, cfg = recipe_config(spec, config, work_dir)
    return module.run(cfg, store=store)


def run_call(spec: StageSpec, resolved: dict[str, Any], ctx: StageContext) -> Any:
    return _import(spec.call)(resolved, ctx)  # type: ignore[arg-type]


def check_result(name: str, result: Any) -> None:
    if not isinstance(result, dict):
        raise PipelineError(f"stage '{name}' returned {type(result).__name__}, expected a dict of outputs")


class LocalEngine:
    """Runs each stage in this process (the default engine); `resources` are ignored."""

    name = "local"

    def __init__(self, store: Store, log: Callable[[str], None]) -> None:
        self.store = store
        self.log = log

    def run(
        self, spec: StageSpec, resolved: dict[str, Any], work_dir: Path, outputs: dict[str, dict[str, Any]]
    ) -> Any:
        if spec.recipe:
            return _run_recipe(spec, resolved, work_dir, self.store)
        ctx = StageContext(
            store=self.store,
            stage=spec.name,
            work_dir=work_dir,
            outputs=outputs,
            log=self.log,
            round=spec.round,
        )
        return run_call(spec, resolved, ctx)

    def prepare(self) -> None:
        pass

    def close(self) -> None:
        pass


def make_engine(engine: str, store: Store, log: Callable[[str], None], address: str | None = None) -> Any:
    """The executor for `engine` ("local" or "ray"); the Ray one imports ray, and only then."""
    if engine not in ENGINES:
        raise PipelineError(f"engine {engine!r}: expected one of {', '.join(ENGINES)}")
    if engine == "local":
        if address:
            raise PipelineError(f"address {address!r} is for the Ray engine: add --engine ray")
        return LocalEngine(store, log)
    from alignflow.pipeline.ray_engine import RayEngine

    return RayEngine(store, log, address=address)


def _state_path(store: Store, name: str) -> Path:
    return store.workspace.home / "pipelines" / name / "state.json"


def _load_state(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _save_state(path: Path, state: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=1, default=str))
    os.replace(tmp, path)


def _outputs_exist(store: Store, outputs: Mapping[str, Any]) -> bool:
    """A cached stage counts only if the artifacts it produced are still in the store."""
    for v in outputs.values():
        if isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v):
            try:
                store.get(v)
            except AlignflowError:
                return False
    return True


def run_pipeline(
    path: str | os.PathLike[str],
    overrides: list[str] | tuple[str, ...] = (),
    store: Store | None = None,
    force: list[str] | None = None,
    log: Callable[[str], None] = print,
    engine: str = "local",
    address: str | None = None,
) -> dict[str, Any]:
    """Run the stages whose key changed; return {"outputs": ..., "ran": [...], "skipped": [...], "times": ...}.

    `engine`: "local" runs each stage in this process, "ray" each stage as a Ray task, on the cluster at
    `address` or (None) on a local Ray instance started when the first stage runs and shut down at the end.
    """
    pipe = load_pipeline(path, overrides)
    store = store or Store.open(Workspace.from_env())
    executor = make_engine(engine, store, log, address)
    try:
        tracked = _PipelineTracking.start(pipe, store, log)  # None unless `tracking:` names a tracker
        try:
            result = _run_stages(pipe, store, force, log, tracked, executor)
        except BaseException as exc:
            if tracked is not None:
                tracked.close("failed", exc)
            raise
        if tracked is not None:
            tracked.close("finished")
    finally:
        executor.close()
    return result


def _run_stages(
    pipe: Pipeline,
    store: Store,
    force: list[str] | None,
    log: Callable[[str], None],
    tracked: _PipelineTracking | None,
    executor: Any = None,
) -> dict[str, Any]:
    executor = executor or LocalEngine(store, log)
    state_file = _state_path(store, pipe.name)
    state = _load_state(state_file)
    outputs: dict[str, dict[str, Any]] = {}
    ran: list[str] = []
    skipped: list[str] = []
    times: dict[str, float] = {}
    for name in pipe.order():
        spec = pipe.stages[name]
        resolved = _resolve(spec.config if spec.recipe else spec.params, outputs, f"stages.{name}")
        key = stage_key(spec, resolved)
        prev = state.get(name, {})
        # Every key that ever finished is remembered, so switching a setting back is a cache hit too.
        done_before = prev.get("done", {}).get(key)
        forced = bool(force) and (name in force or name.split("@")[0] in force)
        if done_before is not None and not forced and _outputs_exist(store, done_before):
            outputs[name] = done_before
            skipped.append(name)
            log(f"[skip] {name}: unchanged (key {key[:12]})")
            if prev.get("key") != key:
                state[name] = {**prev, "key": key, "status": "done", "outputs": done_before}
                _save_state(state_file, state)
            if tracked is not None:
                tracked.stage(spec, "skipped", key, done_before, None)
            continue
        executor.prepare()  # the Ray engine starts or joins its cluster before the first stage that runs
        work_dir = store.workspace.home / "pipelines" / pipe.name / f"{name}-{key[:12]}"
        work_dir.mkdir(parents=True, exist_ok=True)
        resuming = prev.get("key") == key and prev.get("status") in ("running", "failed", "stopped")
        log(f"[run]  {name}{' (resuming)' if resuming else ''} -> {work_dir}")
        history = prev.get("done", {})
        state[name] = {
            "key": key,
            "status": "running",
            "work_dir": str(work_dir),
            "started": time.time(),
            "done": history,
        }
        _save_state(state_file, state)
        t0 = time.perf_counter()
        try:
            result = executor.run(spec, resolved, work_dir, outputs)
        except BaseException:
            # Same key -> same work_dir next time, so a recipe resumes from its own checkpoints.
            state[name]["status"] = "failed"
            _save_state(state_file, state)
            raise
        check_result(name, result)
        if result.get("stopped"):  # checkpointed, not finished: its outputs do not exist yet
            state[name]["status"] = "stopped"
            _save_state(state_file, state)
            raise PipelineStopped(
                f"stage '{name}' stopped at step {result.get('step')} "
                f"({result.get('signal') or result.get('stopped_by') or 'stop requested'}); run the same "
                "command again to resume it from its checkpoint",
                signal=result.get("signal"),
            )
        times[name] = time.perf_counter() - t0
        result = json.loads(json.dumps(result, default=str))
        outputs[name] = result
        state[name] = {
            "key": key,
            "status": "done",
            "work_dir": str(work_dir),
            "outputs": result,
            "seconds": times[name],
            "done": {**history, key: result},
        }
        _save_state(state_file, state)
        ran.append(name)
        log(f"[done] {name} in {times[name]:.1f} s")
        if tracked is not None:
            tracked.stage(spec, "ran", key, result, times[name])
    return {"outputs": outputs, "ran": ran, "skipped": skipped, "times": times, "state_file": str(state_file)}


class _PipelineTracking:
    """One invocation of a pipeline mirrored to the trackers its `tracking:` block names (module docstring)."""

    def __init__(self, trackers: list[Any], run_dir: Path, log: Callable[[str], None]) -> None:
        self.trackers = trackers
        self.run_dir = run_dir
        self.log = log
        self.rows: list[dict[str, Any]] = []

    @classmethod
    def start(cls, pipe: Pipeline, store: Store, log: Callable[[str], None]) -> _PipelineTracking | None:
        if pipe.tracking is None or not set(pipe.tracking.backends) - {"store"}:
            return None
        from alignflow.monitor.trackers import build_trackers

        run_id = f"pipeline-{pipe.name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.urandom(3).hex()}"
        run_dir = store.workspace.home / "pipelines" / pipe.name / "runs" / run_id
        run_dir.mkdir(parents=True, exist_ok=True)
        record = {
            "pipeline": pipe.name,
            "source": str(pipe.source.resolve()),
            "overrides": list(pipe.overrides),
            "rounds": pipe.rounds,
            "stages": {
                n: {"call": s.call, "recipe": s.recipe, "params": s.params, "config": s.config}
                for n, s in pipe.stages.items()
            },
        }
        trackers = build_trackers(
            pipe.tracking,
            run_dir,
            run_id,
            record,
            workspace=store.workspace,
            run_name=pipe.name,
            tags={"alignflow.stage": "pipeline", "alignflow.pipeline": pipe.name},
        )
        return cls(trackers, run_dir, log)

    def _each(self, method: str, *args: Any) -> None:
        # as in the recipes' run helper: a tracker that fails is turned off; the pipeline goes on
        for t in list(self.trackers):
            try:
                getattr(t, method)(*args)
            except Exception as exc:  # noqa: BLE001 - any backend error
                self.trackers.remove(t)
                self.log(f"[warn] tracker {t.name} failed ({type(exc).__name__}: {exc}); turned off")

    def stage(
        self, spec: StageSpec, status: str, key: str, outputs: Mapping[str, Any], seconds: float | None
    ) -> None:
        base = spec.name.split("@")[0]
        step = spec.round or 0
        metrics = {f"{base}/{k}": v for k, v in _numeric_leaves(outputs).items()}
        if seconds is not None:
            metrics[f"{base}/seconds"] = seconds
        self._each("log_metrics", step, metrics)
        strings = {k: v for k, v in outputs.items() if isinstance(v, str)}
        self.rows.append(
            {
                "stage": spec.name,
                "status": status,
                "seconds": seconds,
                "key": key[:12],
                "outputs": json.dumps(strings)[:2000],
            }
        )

    def close(self, status: str, exc: BaseException | None = None) -> None:
        path = self.run_dir / "stages.json"
        path.write_text(json.dumps({"status": status, "stages": self.rows}, indent=1, default=str))
        self._each("log_table", len(self.rows), "stages", self.rows)
        if exc is not None:
            self._each("log_text", len(self.rows), "error", f"{type(exc).__name__}: {str(exc)[:2000]}")
        self._each("log_artifact", path)
        self._each("close", status)


def _numeric_leaves(node: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    for k, v in node.items():
        if isinstance(v, Mapping):
            out.update(_numeric_leaves(v, f"{prefix}{k}/"))
        elif isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
            out[f"{prefix}{k}"] = float(v)
    return out
