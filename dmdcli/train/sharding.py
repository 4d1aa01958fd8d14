"""FSDP for full-weight runs across GPUs and nodes: PyTorch's FSDP2 (`fully_shard`) on the
UNets' blocks, and full (unsharded) state dicts for checkpoints.

Why not `accelerator.prepare`: accelerate's FSDP2 path prepares ONE model with its optimizer,
and DMD2 trains two networks with two optimizers through a frozen third (the teacher). So the
engine is still PyTorch's FSDP2, applied here to each network before its optimizer is built
(the optimizers then hold the sharded parameters); accelerate's FSDP plugin, when the launcher
set one, contributes its options (reshard after forward, CPU offload).

Sharding units are the UNet's ResNet and transformer blocks (the unit the all-gather brings
whole onto a device); the rest of each UNet (conv_in/out, embeddings, resamplers, the
transformers' projections) is its root unit. Checkpoints hold full tensors in the same layout
as an unsharded run's: a sharded run resumes without FSDP and the other way round.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from dmdcli.errors import UsageError


@dataclass(frozen=True)
class ShardingOptions:
    param_dtype: torch.dtype | None = None  # all-gathered weights' dtype (bf16 under bf16 mixed precision)
    reshard_after_forward: bool = True  # free gathered weights after forward (ZeRO-3); False: ZeRO-2
    cpu_offload: bool = False  # sharded weights, gradients and optimizer states in host memory


def sharding_options(accelerator, precision: str) -> ShardingOptions:
    """Options from accelerate's FSDP plugin when `accelerate launch` was given an FSDP config."""
    options = ShardingOptions(param_dtype=torch.bfloat16 if precision == "bf16" else None)
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    if plugin is None:
        return options
    if plugin.fsdp_version != 2:
        raise UsageError(
            "dmd shards with FSDP2: set fsdp_version: 2 in the accelerate config (see recipes/accelerate/)"
        )
    from torch.distributed.fsdp import CPUOffloadPolicy

    return replace(
        options,
        reshard_after_forward=bool(plugin.reshard_after_forward),
        cpu_offload=isinstance(plugin.cpu_offload, CPUOffloadPolicy),
    )


def _kwargs(options: ShardingOptions) -> dict:
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy

    return dict(
        reshard_after_forward=options.reshard_after_forward,
        mp_policy=MixedPrecisionPolicy(param_dtype=options.param_dtype, reduce_dtype=torch.float32),
        offload_policy=CPUOffloadPolicy() if options.cpu_offload else OffloadPolicy(),
    )


def broadcast_from_rank0(module: nn.Module, device: torch.device) -> None:
    """Give every process process 0's weights, as DDP does when it wraps a module: FSDP keeps
    each process's own slice, and randomly initialised weights would otherwise be a patchwork of
    the processes' draws. Sent through `device` (NCCL sends no host tensors)."""
    import torch.distributed as dist

    for tensor in [*module.parameters(), *module.buffers()]:
        sent = tensor.data.to(device)
        dist.broadcast(sent, src=0)
        tensor.data.copy_(sent)


def shard_units(network: nn.Module) -> list[nn.Module]:
    """The network's blocks that are sharded (and gathered) as units, in the order modules() lists
    them: the innermost of the modules kept in an nn.ModuleList under a class named *Block* (a
    UNet's ResNet and transformer blocks, not the down and up blocks that hold them; every diffusers
    transformer's blocks, refiners included). Read from the network, so a new family's transformer
    needs no entry here; the same units as a list of diffusers' classes gave for every family."""
    listed = {id(m) for lst in network.modules() if isinstance(lst, nn.ModuleList) for m in lst}
    blocks = {id(m) for m in network.modules() if id(m) in listed and "Block" in type(m).__name__}
    return [m for m in network.modules() if id(m) in blocks and not any(id(s) in blocks for s in list(m.modules())[1:])]


def shard_network(network: nn.Module, options: ShardingOptions) -> nn.Module:
    """fully_shard each of `network`'s shard_units, then `network` itself (the rest) (in place)."""
    from torch.distributed.fsdp import fully_shard

    for block in shard_units(network):
        fully_shard(block, **_kwargs(options))
    fully_shard(network, **_kwargs(options))
    return network


def shard_head(module: nn.Module, options: ShardingOptions) -> nn.Module:
    """fully_shard the classifier head as one unit, its gathered weights and inputs in fp32 whatever
    the networks' param_dtype: the head runs in fp32, as the reference's and as it does unsharded
    (a bf16 policy would cast its weights and its features to bf16 before its forward)."""
    from torch.distributed.fsdp import fully_shard

    return fully_shard(module, **_kwargs(replace(options, param_dtype=None)))


def trainable(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


# -- full state dicts of sharded modules (collectives: every process calls them) -----------------


def _options(**kwargs):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


def full_model_state(module: nn.Module) -> dict[str, Tensor]:
    """The module's whole weights on the CPU of process 0 (empty elsewhere)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(module, options=_options(cpu_offload=True))


def load_full_model_state(module: nn.Module, state: dict[str, Tensor]) -> None:
    """Load whole weights that process 0 holds (the others pass {}) into the sharded module."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(module, state, options=_options(broadcast_from_rank0=True))


def _parameter_names(module: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Each optimizer parameter's name in `module`, in the optimizer's order (its state's indices)."""
    names = {id(p): name for name, p in module.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def full_optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's whole state on process 0 (empty elsewhere), keyed by parameter index as
    `optimizer.state_dict()` of an unsharded run is, so both write the same checkpoint."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    state = get_optimizer_state_dict(module, optimizer, options=_options(cpu_offload=True))
    if not state:
        return {}
    index = {name: i for i, name in enumerate(_parameter_names(module, optimizer))}
    return {
        "state": {index[name]: values for name, values in state["state"].items()},
        "param_groups": [{**g, "params": [index[name] for name in g["params"]]} for g in state["param_groups"]],
    }


def load_full_optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load an index-keyed optimizer state that process 0 holds (the others pass {})."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    if state:
        names = _parameter_names(module, optimizer)
        state = {
            "state": {names[i]: values for i, values in state["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]],
        }
    set_optimizer_state_dict(module, optimizer, state, options=_options(broadcast_from_rank0=True))
