"""Data-parallel training under ``torchrun``: the process group, DDP or FSDP2 wrapping, and the collectives
the recipes need (sums of metrics, agreement on a stop, broadcasts of what rank 0 wrote to the store).

One process is the default and costs nothing: :func:`init_distributed` returns a context whose world size
is 1 and whose every method is the identity. Under ``torchrun --nproc-per-node N`` (``WORLD_SIZE`` > 1 in the
environment) it joins the process group: gloo on CPU, NCCL on CUDA.

How a step is split so results do not depend on N. The global batch is defined per optimizer step:
``train.grad_accum`` micro-batches, drawn by the same seeded sampler on every rank (its state is therefore
identical everywhere, and a checkpoint's sampler position resumes at any world size). Rank ``r`` runs the
micro-batches ``r, r + N, r + 2N, ...`` (:meth:`DistContext.shard`), so ``grad_accum`` must be a multiple of N.
Every loss is already normalised by the step's global count (tokens or pairs, see
:mod:`alignflow.train.accum`), so the step's gradient is the SUM of the ranks' gradients. DDP and FSDP2
average across ranks, so :meth:`DistContext.backward` scales each loss by N first; gradients then equal the
one-process ones up to float summation order.

Only rank 0 writes to the store, the trackers and the console; the others receive what they need
(artifact ids, the run id) through :meth:`DistContext.broadcast`.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar

import torch
from torch import nn

from alignflow.errors import ConfigError

# Re-exported: recipes and tests import them from here.
from alignflow.train.torchrun_env import EXIT_REQUEUE as EXIT_REQUEUE
from alignflow.train.torchrun_env import env_world_size
from alignflow.train.torchrun_env import under_torchrun as under_torchrun

T = TypeVar("T")


@dataclass
class DistContext:
    """The process's place in the job; with ``world_size == 1`` every method is a no-op."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    strategy: str = "ddp"
    mixed_precision: str = "no"
    backend: str | None = None
    _owns_group: bool = field(default=False, repr=False)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- devices ---------------------------------------------------------------------------------------

    def device(self, requested: torch.device) -> torch.device:
        """One CUDA device per local rank; the CPU stays the CPU."""
        if self.enabled and requested.type == "cuda":
            torch.cuda.set_device(self.local_rank)
            return torch.device("cuda", self.local_rank)
        return requested

    # -- splitting the step ----------------------------------------------------------------------------

    def shard(self, items: Sequence[T], what: str = "train.grad_accum") -> list[T]:
        """This rank's share of a step's micro-batches: items ``rank, rank + N, ...``."""
        if not self.enabled:
            return list(items)
        if len(items) % self.world_size:
            raise ConfigError(
                f"{what} = {len(items)} is not a multiple of the world size {self.world_size}: the global "
                f"batch of an optimizer step is {what} micro-batches, split evenly across the processes "
                f"(set {what} to a multiple of {self.world_size})"
            )
        return list(items[self.rank :: self.world_size])

    def check_split(self, n: int, what: str = "train.grad_accum") -> None:
        """Fail before any work when ``n`` items per step cannot be split evenly across the ranks."""
        self.shard(range(n), what)

    def backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()`` with the scale that turns DDP's/FSDP's average over ranks into a sum."""
        (loss * self.world_size if self.enabled else loss).backward()

    @contextlib.contextmanager
    def grad_sync(self, model: nn.Module, sync: bool) -> Iterator[None]:
        """Reduce gradients only on a step's last micro-batch (DDP ``no_sync`` / FSDP2 requires-sync)."""
        if not self.enabled or sync:
            if self.enabled and self.strategy == "fsdp":
                model.set_requires_gradient_sync(True)
            yield
            return
        if self.strategy == "ddp":
            with model.no_sync():
                yield
        else:
            model.set_requires_gradient_sync(False)
            yield

    # -- collectives -----------------------------------------------------------------------------------

    def sum(self, value: float | int | torch.Tensor) -> float:
        """The sum over ranks of a scalar (a float on every rank)."""
        if not self.enabled:
            return float(value)
        t = torch.tensor([float(value)], dtype=torch.float64)
        torch.distributed.all_reduce(t)
        return float(t.item())

    def sum_tensor(self, t: torch.Tensor) -> torch.Tensor:
        """Element-wise sum over ranks (float64 on the CPU for gloo, returned in ``t``'s dtype/device)."""
        if not self.enabled:
            return t
        buf = t.detach().to("cpu", torch.float64).clone()
        torch.distributed.all_reduce(buf)
        return buf.to(t.device, t.dtype)

    def max(self, value: float) -> float:
        if not self.enabled:
            return float(value)
        t = torch.tensor([float(value)], dtype=torch.float64)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return float(t.item())

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on any (how the ranks agree on a stop)."""
        return self.max(1.0 if flag else 0.0) > 0.5

    def broadcast(self, obj: T, src: int = 0) -> T:
        """Rank ``src``'s picklable ``obj`` on every rank."""
        if not self.enabled:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=src)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    # -- models ----------------------------------------------------------------------------------------

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        """DDP, or FSDP2 (``fully_shard`` on each decoder layer, then on the whole model)."""
        if not self.enabled:
            return model
        if self.strategy == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            with warnings.catch_warnings():  # the replacement flag still syncs at init; we want no syncs
                warnings.simplefilter("ignore", FutureWarning)
                return DistributedDataParallel(
                    model,
                    device_ids=[device.index] if device.type == "cuda" else None,
                    broadcast_buffers=False,  # rotary caches are recomputed per rank; no per-forward collective
                    find_unused_parameters=False,
                )
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(device.type, (self.world_size,))
        kwargs: dict[str, Any] = {"mesh": mesh}
        dtype = self.autocast_dtype(device)
        if dtype is not None:
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        for layer in decoder_layers(model):
            fully_shard(layer, **kwargs)
        fully_shard(model, **kwargs)
        return model

    def autocast_dtype(self, device: torch.device) -> torch.dtype | None:
        """The mixed-precision dtype, where the device supports it (CUDA); None means full precision."""
        if self.mixed_precision == "no":
            return None
        if device.type != "cuda":
            return None  # CPU autocast is slower than fp32 here and changes results; said once at init
        dtype = torch.bfloat16 if self.mixed_precision == "bf16" else torch.float16
        if dtype is torch.bfloat16 and not torch.cuda.is_bf16_supported():
            return torch.float16
        return dtype

    @contextlib.contextmanager
    def autocast(self, device: torch.device) -> Iterator[None]:
        """DDP's mixed precision (FSDP2 casts through its policy instead)."""
        dtype = self.autocast_dtype(device)
        if dtype is None or self.strategy == "fsdp":
            yield
            return
        with torch.autocast(device.type, dtype=dtype):
            yield

    def full_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor] | None:
        """The full, unsharded state dict on rank 0 (CPU tensors); None on the others. Collective."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        if not self.enabled:
            return None
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return full if self.is_main else None

    def close(self) -> None:
        if self._owns_group and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
            self._owns_group = False


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP (FSDP2 shards the module in place, so it is its own module)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks FSDP2 shards one by one (HF decoders keep them in a ModuleList named `layers`/`h`)."""
    found: list[nn.Module] = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and name.split(".")[-1] in ("layers", "h", "blocks") and len(mod):
            found.extend(mod)
            break
    return found


def _attempt_store(timeout: timedelta) -> dict[str, Any]:
    """The env:// store under a prefix of this torchrun attempt (TORCHELASTIC_RESTART_COUNT).

    torchrun's agent keeps one TCPStore across restarts, and the process group's keys (each rank's address)
    are not namespaced by attempt: after a rank was killed and the job restarted, a new rank could read the
    dead rank's address and wait forever in ``init_process_group`` (seen in about one run in three of
    tests/train/test_distributed.py's SIGKILL test). A prefix per attempt gives each attempt fresh keys.
    """
    if "MASTER_ADDR" not in os.environ or "RANK" not in os.environ:
        return {}
    from torch.distributed import PrefixStore
    from torch.distributed.rendezvous import rendezvous

    store, rank, world = next(rendezvous("env://", timeout=timeout))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store = PrefixStore(f"alignflow/attempt-{attempt}", store)
    return {"store": store, "rank": rank, "world_size": world}


def init_distributed(section: Any = None) -> DistContext:
    """Join the torchrun job described by the environment, or return the one-process context.

    ``section`` is a config's ``train.distributed`` (strategy, mixed precision, timeout). The process group
    is created once per process; a second call (PPO builds several models) reuses it.
    """
    world = env_world_size()
    strategy = getattr(section, "strategy", "ddp")
    mixed = getattr(section, "mixed_precision", "no")
    if world <= 1:
        return DistContext(strategy=strategy, mixed_precision=mixed)
    import torch.distributed as dist

    owns = False
    if not dist.is_initialized():
        backend = (
            "nccl"
            if torch.cuda.is_available() and os.environ.get("ALIGNFLOW_DIST_BACKEND") != "gloo"
            else "gloo"
        )
        timeout = timedelta(minutes=float(getattr(section, "timeout_minutes", 30.0)))
        dist.init_process_group(backend=backend, timeout=timeout, **_attempt_store(timeout))
        owns = True
    ctx = DistContext(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        strategy=strategy,
        mixed_precision=mixed,
        backend=dist.get_backend(),
        _owns_group=owns,
    )
    return ctx


def export_hf(
    ctx: DistContext, model: nn.Module, tokenizer: Any, out_dir: Any, merge_lora: bool = False
) -> Any:
    """:func:`alignflow.models.export.export_hf` for a possibly wrapped model: rank 0 writes one normal
    ``save_pretrained`` folder (FSDP2 shards gathered first, a collective); every rank returns its path."""
    from alignflow.models.export import export_hf as export_one

    if not ctx.enabled:
        return export_one(model, tokenizer, out_dir, merge_lora=merge_lora)
    inner = unwrap(model)
    if ctx.strategy == "ddp":  # every rank holds the same weights
        if ctx.is_main:
            export_one(inner, tokenizer, out_dir, merge_lora=merge_lora)
        ctx.barrier()
        return out_dir
    from peft import PeftModel

    if merge_lora and isinstance(inner, PeftModel):
        raise ConfigError(
            "merging a LoRA adapter into FSDP-sharded weights is not supported: train LoRA policies with "
            "train.distributed.strategy=ddp (the adapter is small; sharding buys nothing)"
        )
    full = ctx.full_state_dict(model)
    if ctx.is_main:
        from alignflow.models.loading import quiet_transformers_progress

        out_dir.mkdir(parents=True, exist_ok=True)
        with quiet_transformers_progress():
            inner.save_pretrained(str(out_dir), state_dict=full)
        tokenizer.save_pretrained(str(out_dir))
    ctx.barrier()
    return out_dir
