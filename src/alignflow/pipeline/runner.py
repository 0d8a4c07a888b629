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
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from alignflow.errors import AlignflowError, ConfigError
from alignflow.store import Store
from alignflow.workspace import Workspace

_REF = re.compile(r"\$\{([A-Za-z_][\w-]*)\.([A-Za-z_][\w.-]*)\}")
RECIPES = {
    "sft": "alignflow.recipes.sft",
    "rm": "alignflow.recipes.reward",
    "reward": "alignflow.recipes.reward",
    "dpo": "alignflow.recipes.dpo",
    "ppo": "alignflow.recipes.ppo",
}


class PipelineError(AlignflowError):
    """A pipeline file is invalid, or a stage failed."""


@dataclass
class StageSpec:
    name: str
    call: str | None = None
    recipe: str | None = None
    params: dict[str, Any] = field(default_factory=dict)  # for `call` stages
    config: dict[str, Any] = field(default_factory=dict)  # for `recipe` stages
    after: list[str] = field(default_factory=list)  # ordering without a data reference

    def refs(self) -> set[str]:
        found = {m.group(1) for m in _REF.finditer(json.dumps([self.params, self.config]))}
        return found | set(self.after)


@dataclass
class Pipeline:
    name: str
    stages: dict[str, StageSpec]
    source: Path

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


def load_pipeline(path: str | os.PathLike[str], overrides: list[str] | tuple[str, ...] = ()) -> Pipeline:
    """Read a pipeline YAML; overrides are `stage.config.key=value` or `stage.params.key=value`."""
    from alignflow.config import apply_overrides

    p = Path(path)
    if not p.is_file():
        raise PipelineError(f"{p}: pipeline file not found")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise PipelineError(f"{p}: not valid YAML: {exc}") from None
    unknown = set(data) - {"name", "stages"}
    if unknown:
        raise PipelineError(f"{p}: unknown top-level key(s): {', '.join(sorted(unknown))}")
    stages_raw = data.get("stages")
    if not isinstance(stages_raw, dict) or not stages_raw:
        raise PipelineError(f"{p}: 'stages' must be a non-empty mapping of stage name -> stage")
    try:
        stages_raw = apply_overrides(stages_raw, overrides)
    except ConfigError as exc:
        raise PipelineError(f"{p}: {exc}") from None
    stages: dict[str, StageSpec] = {}
    for name, raw in stages_raw.items():
        if not isinstance(raw, dict):
            raise PipelineError(f"{p}: stages.{name}: expected a mapping")
        bad = set(raw) - {"call", "recipe", "params", "config", "after"}
        if bad:
            raise PipelineError(f"{p}: stages.{name}: unknown key(s) {', '.join(sorted(bad))}")
        if bool(raw.get("call")) == bool(raw.get("recipe")):
            raise PipelineError(f"{p}: stages.{name}: give exactly one of 'call' or 'recipe'")
        if raw.get("recipe") and raw["recipe"] not in RECIPES:
            raise PipelineError(f"{p}: stages.{name}.recipe: expected one of {', '.join(sorted(RECIPES))}")
        stages[name] = StageSpec(
            name=name,
            call=raw.get("call"),
            recipe=raw.get("recipe"),
            params=dict(raw.get("params") or {}),
            config=dict(raw.get("config") or {}),
            after=list(raw.get("after") or []),
        )
    return Pipeline(name=str(data.get("name") or p.stem), stages=stages, source=p)


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


def _run_recipe(spec: StageSpec, config: dict[str, Any], work_dir: Path, store: Store) -> dict[str, Any]:
    from alignflow.config import validate_config

    module = importlib.import_module(RECIPES[spec.recipe])  # type: ignore[index]
    schema = next(
        obj
        for obj in vars(module).values()
        if isinstance(obj, type)
        and obj.__name__.endswith("Config")
        and obj.__module__ == module.__name__
        and "stage" in getattr(obj, "model_fields", {})
    )
    data = {"stage": schema.model_fields["stage"].default or spec.recipe, **config}
    data["output_dir"] = str(work_dir)
    cfg = validate_config(data, schema, source=f"stage '{spec.name}'")
    return module.run(cfg, store=store)


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
) -> dict[str, Any]:
    """Run the stages whose key changed; return {"outputs": ..., "ran": [...], "skipped": [...], "times": ...}."""
    pipe = load_pipeline(path, overrides)
    store = store or Store.open(Workspace.from_env())
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
        if done_before is not None and not (force and name in force) and _outputs_exist(store, done_before):
            outputs[name] = done_before
            skipped.append(name)
            log(f"[skip] {name}: unchanged (key {key[:12]})")
            if prev.get("key") != key:
                state[name] = {**prev, "key": key, "status": "done", "outputs": done_before}
                _save_state(state_file, state)
            continue
        work_dir = store.workspace.home / "pipelines" / pipe.name / f"{name}-{key[:12]}"
        work_dir.mkdir(parents=True, exist_ok=True)
        resuming = prev.get("key") == key and prev.get("status") in ("running", "failed")
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
            if spec.recipe:
                result = _run_recipe(spec, resolved, work_dir, store)
            else:
                ctx = StageContext(store=store, stage=name, work_dir=work_dir, outputs=outputs, log=log)
                result = _import(spec.call)(resolved, ctx)  # type: ignore[arg-type]
        except BaseException:
            # Same key -> same work_dir next time, so a recipe resumes from its own checkpoints.
            state[name]["status"] = "failed"
            _save_state(state_file, state)
            raise
        if not isinstance(result, dict):
            raise PipelineError(
                f"stage '{name}' returned {type(result).__name__}, expected a dict of outputs"
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
    return {"outputs": outputs, "ran": ran, "skipped": skipped, "times": times, "state_file": str(state_file)}
