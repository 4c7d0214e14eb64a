"""Distributed training through ``torchrun``: process group, rank helpers, DDP / FSDP2 wrapping, data split.

One code path serves one process and many: without torchrun's environment (``WORLD_SIZE`` unset or 1)
``setup`` returns a single-process context and every collective below is a no-op.

The split keeps the global batch independent of the number of processes: step ``s`` draws the same
global batch of ``batch_size`` data indices (``data.buckets.batch_indices``) on every rank, and rank ``r`` of
``W`` trains on positions ``[r * B / W, (r + 1) * B / W)`` of it. Each position has its own random
stream (``sample_generators``), so the noise a sample gets does not depend on which rank or micro-batch
draws it. DDP averages the ranks' gradients, so W processes compute the same update as one.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor, nn

from latentdiff.config import COUNT, bounds, one_of
from latentdiff.data.buckets import batch_indices

STRATEGIES = ("ddp", "fsdp")


@dataclass
class DistributedConfig:
    """How to spread training over the processes torchrun starts (ignored in a single process)."""

    strategy: str = "ddp"  # "ddp" (replicated weights) or "fsdp" (FSDP2 fully_shard: sharded weights/optimizer)
    backend: str = ""  # "" = "nccl" on GPUs, "gloo" on CPUs
    timeout_min: int = 30  # collective time-out; raise it when rank 0 writes very large checkpoints

    BOUNDS = bounds({"strategy": one_of(*STRATEGIES), "timeout_min": COUNT})


@dataclass
class Context:
    """Where this process stands: its rank, the world size, its device and the wrapping strategy."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    strategy: str = "ddp"
    initialized: bool = False  # this module created the process group (and tears it down)

    @property
    def is_main(self) -> bool:
        """Logging, sampling and file writes happen here only."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_reduce_sum(self, t: Tensor) -> Tensor:
        """Sum a (small) tensor over ranks, in place, and return it."""
        if self.distributed:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def gather(self, obj) -> list:
        """Every rank's ``obj``, in rank order (on every rank)."""
        if not self.distributed:
            return [obj]
        out: list = [None] * self.world
        dist.all_gather_object(out, obj)
        return out


def setup(cfg: DistributedConfig | None = None) -> Context:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT)."""
    cfg = cfg or DistributedConfig()
    if cfg.strategy not in STRATEGIES:
        raise ValueError(f"distributed.strategy must be one of {STRATEGIES}, got {cfg.strategy!r}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if world <= 1:
        return Context(device=device, strategy=cfg.strategy)
    if cuda:
        torch.cuda.set_device(device)
    created = False
    if not dist.is_initialized():
        backend = cfg.backend or ("nccl" if cuda else "gloo")
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=cfg.timeout_min))
        created = True
    return Context(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local_rank, device=device,
                   strategy=cfg.strategy, initialized=created)


def teardown(ctx: Context) -> None:
    if ctx.initialized and dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# the data split


def rank_positions(global_batch: int, ctx: Context) -> Tensor:
    """The positions in the global batch this rank trains on (a contiguous block)."""
    if global_batch % ctx.world:
        raise ValueError(f"batch_size {global_batch} must be divisible by the number of processes {ctx.world}")
    per = global_batch // ctx.world
    return torch.arange(ctx.rank * per, (ctx.rank + 1) * per)


def micro_batches(positions: Tensor, grad_accum: int) -> list[Tensor]:
    """Split a rank's positions into ``grad_accum`` equal micro-batches."""
    if grad_accum < 1 or len(positions) % grad_accum:
        raise ValueError(f"the per-process batch {len(positions)} must be divisible by grad_accum {grad_accum}")
    return list(positions.chunk(grad_accum))


def bucket_chunks(batch: int, ctx: Context, grad_accum: int) -> list[Tensor]:
    """This rank's micro-batches of a global batch of any size (a bucket's short batches): near-equal blocks.

    Ranks may differ by one sample, so DDP's mean weights samples very slightly unevenly; a bucketed
    cache guarantees every rank at least one sample (``data.buckets.BucketBatches``).
    """
    mine = torch.arange(batch).tensor_split(ctx.world)[ctx.rank]
    return [c for c in mine.tensor_split(grad_accum) if len(c)]


def rank_indices(step: int, global_batch: int, n: int, seed: int, ctx: Context) -> Tensor:
    """This rank's data indices at ``step``: its block of the global batch (a sampler for plain data sets)."""
    return batch_indices(step, global_batch, n, seed)[rank_positions(global_batch, ctx)]


def sample_generators(seed: int, step: int, positions: Tensor) -> list[torch.Generator]:
    """One CPU generator per global-batch position, seeded from (seed, step, position).

    The random numbers of a sample (posterior noise, caption dropout, sigma, diffusion noise) then
    depend on neither the number of processes nor the micro-batch split, and a resumed run redraws
    exactly what the uninterrupted one drew.
    """
    out = []
    for p in positions.tolist():
        digest = hashlib.blake2b(f"{seed}/{step}/{p}".encode(), digest_size=8).digest()
        out.append(torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1)))
    return out


def per_sample(generators: list[torch.Generator], draw) -> Tensor:
    """``torch.cat([draw(g) for g in generators])``: a batch of draws, each from its sample's generator."""
    return torch.cat([draw(g) for g in generators])


# ---------------------------------------------------------------------------------------------
# wrapping


class Closure(nn.Module):
    """Runs a loss function inside ``forward`` so DDP / FSDP see one forward per micro-batch.

    DDP synchronizes gradients only for parameters used in a forward of the wrapper, and the training
    losses call several sub-modules (text encoder, network) in their own way; ``wrapped(fn, *args)``
    calls ``fn(*args)`` as that forward.
    """

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, fn, *args):
        return fn(*args)


def _fsdp_units(module: nn.Module) -> list[nn.Module]:
    """Blocks to shard one by one: the outermost residual and attention blocks, which the models call
    through their own ``forward`` (FSDP2 gathers a unit's weights in a hook on that call). Everything
    else (embeddings, in/out convolutions) is sharded with the root."""
    from latentdiff.models.layers import ResnetBlock2D, SpatialSelfAttention
    from latentdiff.models.unet import Transformer2D

    kinds = (ResnetBlock2D, SpatialSelfAttention, Transformer2D, nn.TransformerEncoderLayer)
    units: dict[str, nn.Module] = {}
    for name, m in module.named_modules():
        inside = any(name.startswith(u + ".") for u in units)
        if isinstance(m, kinds) and not inside and any(p.requires_grad for p in m.parameters()):
            units[name] = m
    return list(units.values())


def wrap(model: nn.Module, ctx: Context) -> nn.Module:
    """The module to call in the training step: ``Closure(model)``, under DDP or FSDP2 when distributed.

    With FSDP the parameters of ``model`` itself become sharded DTensors (use ``full_state`` to save).
    """
    model.to(ctx.device)
    closure = Closure(model)
    if not ctx.distributed:
        return closure
    if ctx.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        return DistributedDataParallel(closure, device_ids=ids)
    from torch.distributed.fsdp import fully_shard

    for unit in _fsdp_units(model):
        fully_shard(unit)
    fully_shard(closure)
    return closure


def shard_like(module: nn.Module, ctx: Context) -> nn.Module:
    """Shard a copy of the model (an EMA) the way ``wrap`` shards the model, so updates stay local."""
    if ctx.distributed and ctx.strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for unit in _fsdp_units(module):
            fully_shard(unit)
        fully_shard(module)
    return module


@contextmanager
def gradient_sync(wrapped: nn.Module, sync: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of an accumulated step."""
    if sync or not isinstance(wrapped, nn.Module):
        yield
        return
    if hasattr(wrapped, "no_sync"):  # DDP
        with wrapped.no_sync():
            yield
        return
    if hasattr(wrapped, "set_requires_gradient_sync"):  # FSDP2
        wrapped.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            wrapped.set_requires_gradient_sync(True)
        return
    with nullcontext():
        yield


# ---------------------------------------------------------------------------------------------
# state: full weights for checkpoints under FSDP, per-rank RNG


def is_sharded(module: nn.Module) -> bool:
    return any(type(p).__name__ == "DTensor" for p in module.parameters())


def full_state(module: nn.Module) -> dict[str, Tensor]:
    """The module's whole state dict on CPU (gathered from the shards under FSDP: a collective)."""
    if not is_sharded(module):
        return module.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state(module: nn.Module, state: dict[str, Tensor]) -> None:
    """Load a whole state dict into a (possibly sharded) module; every rank passes the same state."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(module, state, options=StateDictOptions(full_state_dict=True, strict=True))


def full_optimizer_state(model: nn.Module, opt: torch.optim.Optimizer) -> dict:
    """The optimizer's state dict in torch's usual integer-keyed form (gathered under FSDP: a collective)."""
    if not is_sharded(model):
        return opt.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    sd = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if "state" not in sd:  # ranks other than 0 receive nothing
        return {}
    index = {fqn: i for i, fqn in enumerate(fqn for g in sd["param_groups"] for fqn in g["params"])}
    groups = [{**g, "params": [index[f] for f in g["params"]]} for g in sd["param_groups"]]
    return {"state": {index[f]: s for f, s in sd["state"].items()}, "param_groups": groups}


def load_full_optimizer_state(model: nn.Module, opt: torch.optim.Optimizer, sd: dict) -> None:
    """Load an integer-keyed optimizer state dict (from ``full_optimizer_state``) into a sharded run."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = [n for n, p in model.named_parameters() if p.requires_grad]
    fqn = dict(enumerate(names))
    groups = [{**g, "params": [fqn[i] for i in g["params"]]} for g in sd["param_groups"]]
    full = {"state": {fqn[int(i)]: s for i, s in sd["state"].items()}, "param_groups": groups}
    set_optimizer_state_dict(model, opt, full, options=StateDictOptions(full_state_dict=True))


def encode_rng(state: Tensor) -> str:
    """An RNG state (uint8 tensor) as base64 text for JSON."""
    return base64.b64encode(state.numpy().tobytes()).decode()


def decode_rng(text: str) -> Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8).clone()


def rng_state(device: torch.device) -> dict:
    """This process's global RNG states (CPU, and the GPU's when training on one), JSON-able."""
    state = {"cpu": encode_rng(torch.get_rng_state())}
    if device.type == "cuda":
        state["cuda"] = encode_rng(torch.cuda.get_rng_state(device))
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(decode_rng(state["cpu"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(decode_rng(state["cuda"]), device)


def gathered(module: nn.Module, plain: nn.Module | None) -> nn.Module | None:
    """``module`` itself when it is whole; under FSDP its full weights loaded into ``plain`` (an unsharded
    copy that rank 0 keeps on the CPU for sampling and saving). A collective: every rank calls it."""
    if not is_sharded(module):
        return module
    state = full_state(module)
    if plain is None:
        return None
    plain.load_state_dict(state, strict=True)
    return plain
