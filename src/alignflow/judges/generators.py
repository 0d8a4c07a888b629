"""Text generators for AI feedback: ``generate(prompts, *, max_new_tokens, temperature, seed) -> texts``.

A generator writes free text (a critique, a revision, a new instruction) where a judge only compares. Specs
name the backend by prefix, like judge specs (options after ``#``, :func:`alignflow.judges.base.split_spec`):

- ``hf:MODEL_DIR_OR_ARTIFACT`` — a local causal LM through the rollout sampler. Prompts are given to it as
  ``alignflow generate`` gives a dataset's ``prompt`` rows: plain text after the tokenizer's BOS. With
  ``#chat=true`` each prompt becomes one user turn rendered by the tokenizer's chat template (how
  ``generate`` renders ``messages`` rows), which is what an instruction-tuned critic expects.
  Options: ``chat``, ``batch_size``, ``top_p``.
- ``openai:MODEL@BASE_URL`` — chat completions from an OpenAI-compatible server
  (:class:`alignflow.judges.openai.Endpoint`); every prompt is one user message. Options go to the endpoint.
- ``fn:MODULE:FN`` — a Python function ``FN(prompts: list[str]) -> list[str]``, for tests and rule-based
  rewriters.

Every generator also has ``record``: what lineage links to (the model artifact id for ``hf:``, otherwise the
spec, which :func:`generator_artifact` stores as a small JSON artifact).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from alignflow.errors import AlignflowError

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


class GeneratorError(AlignflowError):
    """A generator spec cannot be loaded, or a generator returned something other than one text per prompt
    (the message names the spec and the item)."""


@runtime_checkable
class Generator(Protocol):
    """What every generator backend provides. ``spec`` is the string it was built from (no secrets)."""

    spec: str
    artifact_id: str | None  # the model artifact behind it, when there is one (hf:)

    def generate(
        self, prompts: Sequence[str], *, max_new_tokens: int, temperature: float, seed: int
    ) -> list[str]: ...


def _flag(spec: str, key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE | _FALSE:
        return text in _TRUE
    raise GeneratorError(f"generator {spec!r}: option {key}={value!r} must be true or false")


def _int(spec: str, key: str, value: Any, minimum: int = 1) -> int:
    try:
        out = int(value)
    except (TypeError, ValueError):
        out = minimum - 1
    if out < minimum:
        raise GeneratorError(f"generator {spec!r}: option {key}={value!r} must be an integer >= {minimum}")
    return out


def _checked(spec: str, out: Any, n: int) -> list[str]:
    if isinstance(out, str) or not isinstance(out, Sequence):
        raise GeneratorError(
            f"generator {spec!r}: returned {type(out).__name__}; expected a list of {n} strings"
        )
    if len(out) != n:
        raise GeneratorError(f"generator {spec!r}: returned {len(out)} texts for {n} prompts")
    for i, text in enumerate(out):
        if not isinstance(text, str):
            raise GeneratorError(
                f"generator {spec!r}: item {i}: returned {type(text).__name__}; expected a string"
            )
    return list(out)


class HFGenerator:
    """A local causal LM (loaded on first use) sampled through :func:`generate_candidates`."""

    def __init__(
        self,
        spec: str,
        path: Path,
        artifact_id: str | None,
        device: str = "cpu",
        chat: bool = False,
        batch_size: int = 16,
        top_p: float = 1.0,
    ) -> None:
        self.spec, self.path, self.artifact_id, self.device = spec, path, artifact_id, device
        self.chat, self.batch_size, self.top_p = chat, batch_size, top_p
        self._model: Any = None
        self._tok: Any = None

    def _load(self) -> tuple[Any, Any]:
        if self._model is None:
            from alignflow.models import load_policy, load_tokenizer

            self._tok = load_tokenizer(self.path, padding_side="left")
            if self.chat and self._tok.chat_template is None:
                raise GeneratorError(f"generator {self.spec!r}: chat=true needs a tokenizer chat_template")
            self._model = load_policy(self.path, dtype="float32").to(self.device)
        return self._model, self._tok

    def _prompt(self, tok: Any, text: str) -> Any:
        from alignflow.data.prompts import Prompt

        if not self.chat:
            return Prompt(text)
        msgs = [{"role": "user", "content": text}]
        return Prompt(
            tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True), templated=True
        )

    def generate(
        self, prompts: Sequence[str], *, max_new_tokens: int, temperature: float, seed: int
    ) -> list[str]:
        from alignflow.rollout.candidates import generate_candidates

        if not prompts:
            return []
        model, tok = self._load()
        # Critique and revision requests quote a whole exchange and can outgrow a small model's context;
        # the end of a request (the instruction, next to where the answer starts) is what is kept.
        limit = getattr(model.config, "max_position_embeddings", None)
        keep = max(8, limit - max_new_tokens) if limit else None
        out = generate_candidates(
            model,
            tok,
            [self._prompt(tok, p) for p in prompts],
            n=1,
            temperature=temperature,
            top_p=self.top_p,
            max_new_tokens=max_new_tokens,
            seed=seed,
            batch_size=self.batch_size,
            max_prompt_length=keep,
        )
        return [c[0] for c in out]


class FunctionGenerator:
    """``fn:MODULE:FN``: ``FN(prompts) -> texts``."""

    artifact_id: str | None = None

    def __init__(self, spec: str, fn: Callable[[list[str]], Sequence[str]]) -> None:
        self.spec, self.fn = spec, fn

    def generate(
        self, prompts: Sequence[str], *, max_new_tokens: int, temperature: float, seed: int
    ) -> list[str]:
        return _checked(self.spec, self.fn(list(prompts)), len(prompts))


class OpenAIGenerator:
    """``openai:MODEL@BASE_URL``: one chat completion per prompt, the prompt as the only user message.

    Each request carries ``seed + i``, so a re-run asks the same requests and is answered from the reply
    cache (servers that honour ``seed`` also sample the same text)."""

    artifact_id: str | None = None

    def __init__(self, spec: str, endpoint: Any) -> None:
        self.spec, self.endpoint = spec, endpoint

    def generate(
        self, prompts: Sequence[str], *, max_new_tokens: int, temperature: float, seed: int
    ) -> list[str]:
        requests = [
            {
                "messages": [{"role": "user", "content": p}],
                "max_tokens": max_new_tokens,
                "temperature": temperature,
                "seed": seed + i,
            }
            for i, p in enumerate(prompts)
        ]
        replies = self.endpoint.chat_many(requests, what="prompt")
        return _checked(self.spec, [r.content for r in replies], len(prompts))


def _build_hf(rest: str, store: Any, device: str, options: dict[str, Any]) -> HFGenerator:
    spec = f"hf:{rest}"
    if not rest:
        raise GeneratorError("generator 'hf:': expected hf:MODEL_DIR or hf:ARTIFACT")
    unknown = sorted(set(options) - {"chat", "batch_size", "top_p"})
    if unknown:
        raise GeneratorError(f"generator {spec!r}: unknown options {unknown}; known: batch_size, chat, top_p")
    chat = _flag(spec, "chat", options.get("chat", False))
    batch_size = _int(spec, "batch_size", options.get("batch_size", 16))
    try:
        top_p = float(options.get("top_p", 1.0))
    except ValueError:
        top_p = -1.0
    if not 0.0 < top_p <= 1.0:
        raise GeneratorError(f"generator {spec!r}: option top_p={options['top_p']!r} must be in (0, 1]")
    if store is not None:
        from alignflow.rollout.generations import resolve_policy

        policy = resolve_policy(store, rest, arg=f"generator {spec!r}")
        path, aid = policy.path, policy.artifact_id
    else:
        path, aid = Path(rest), None
        if not path.is_dir():
            raise GeneratorError(
                f"generator {spec!r}: {rest} is not a model folder (and no store to look in)"
            )
    return HFGenerator(spec, path, aid, device, chat=chat, batch_size=batch_size, top_p=top_p)


def _build_fn(rest: str, store: Any, device: str, options: dict[str, Any]) -> FunctionGenerator:
    from alignflow.rollout.rewards import import_callable

    spec = f"fn:{rest}"
    if options:
        raise GeneratorError(f"generator {spec!r}: unknown options {sorted(options)}; a function takes none")
    if ":" not in rest:
        raise GeneratorError(f"generator {spec!r}: expected fn:MODULE:FN")
    return FunctionGenerator(spec, import_callable(rest, f"generator {spec!r}"))


_OPENAI_OPTIONS = ("api_key", "timeout", "max_retries", "concurrency", "budget", "cache_dir")


def _build_openai(rest: str, store: Any, device: str, options: dict[str, Any]) -> OpenAIGenerator:
    from alignflow.judges.openai import DEFAULT_KEY_REF, Endpoint, default_cache_dir

    spec = f"openai:{rest}"
    unknown = sorted(set(options) - set(_OPENAI_OPTIONS))
    if unknown:
        raise GeneratorError(
            f"generator {spec!r}: unknown options {unknown}; known: {sorted(_OPENAI_OPTIONS)}"
        )
    model, at, base_url = rest.partition("@")
    if not model or not at or not base_url.startswith(("http://", "https://")):
        raise GeneratorError(
            f"generator {spec!r}: expected openai:MODEL@BASE_URL, e.g. openai:llama@http://host:8000/v1"
        )
    try:
        timeout = float(options.get("timeout", 60.0))
    except ValueError:
        raise GeneratorError(
            f"generator {spec!r}: option timeout={options['timeout']!r} must be a number"
        ) from None
    budget = options.get("budget")
    cache_dir = options.get("cache_dir")
    if cache_dir is None:
        cache_dir = default_cache_dir(store)
    elif str(cache_dir).lower() == "none":
        cache_dir = None
    endpoint = Endpoint(
        model,
        base_url,
        api_key=str(options.get("api_key", DEFAULT_KEY_REF)),
        timeout=timeout,
        max_retries=_int(spec, "max_retries", options.get("max_retries", 3), minimum=0),
        concurrency=_int(spec, "concurrency", options.get("concurrency", 4)),
        budget=None if budget is None else _int(spec, "budget", budget),
        cache_dir=cache_dir,
    )
    return OpenAIGenerator(spec, endpoint)


_BACKENDS = {"hf": _build_hf, "fn": _build_fn, "openai": _build_openai}


def load_generator(spec: str, store: Any = None, device: str = "cpu", **options: Any) -> Generator:
    """Build the generator a spec names; options from the spec's ``#key=value`` tail and ``options`` (which
    win). With a ``store``, ``hf:`` takes an artifact id or name as well as a folder, and records its id."""
    from alignflow.judges.base import JudgeError, split_spec

    try:
        base, from_spec = split_spec(spec)
    except JudgeError as exc:
        raise GeneratorError(str(exc).replace("judge ", "generator ", 1)) from None
    prefix, sep, rest = base.partition(":")
    if not sep or prefix not in _BACKENDS:
        raise GeneratorError(
            f"generator {spec!r}: expected one of {', '.join(p + ':...' for p in sorted(_BACKENDS))}"
        )
    return _BACKENDS[prefix](rest, store, device, from_spec | options)


def generator_artifact(store: Any, generator: Generator, role: str = "generator") -> str:
    """The artifact a generator's outputs link to: its model artifact, or a ``generator-spec`` JSON record
    of its spec (the same spec always gives the same record)."""
    if generator.artifact_id is not None:
        return generator.artifact_id
    return store.put_json(
        {"spec": generator.spec}, kind="generator-spec", name=generator.spec[:120], meta={"role": role}
    )


__all__ = [
    "FunctionGenerator",
    "Generator",
    "GeneratorError",
    "HFGenerator",
    "OpenAIGenerator",
    "generator_artifact",
    "load_generator",
]
