"""How one trial's model is spread over its ranks (`train.num_workers` > 1), and the full views of
its state that checkpoints and the final save need.

- DDP (default): every rank holds the whole model; gradients are averaged across ranks each step.
- FSDP (`train.fsdp=true`, full fine-tuning): parameters, gradients and optimizer state are
  sharded over the ranks with torch's FSDP2 (`fully_shard`, one unit per decoder layer plus the
  root), so a model whose training state does not fit one device trains on several. It runs on
  NCCL (GPU) and on gloo (CPU). Checkpoints stay sharded (`save_sharded` / `load_sharded`:
  each rank writes and reads its own shards, and a checkpoint loads into another sharding);
  only the final model is gathered, by every rank calling `gather_model`, for rank 0.
"""

from __future__ import annotations

from typing import Callable

from trainers.runtime import DistInfo


def wrap(model, dist: DistInfo, device, fsdp: bool = False):
    """The model as the training loop drives it: itself (one rank), DDP, or FSDP-sharded in place."""
    if dist.world_size == 1:
        return model
    if fsdp:
        return shard(model)
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if getattr(device, "type", "cpu") == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def shard(model):
    """FSDP2: each decoder layer (the classes transformers lists as `_no_split_modules`) is one
    unit that is gathered only while it computes; embeddings and head stay with the root unit."""
    from torch.distributed.fsdp import fully_shard

    layer_classes = set(getattr(model, "_no_split_modules", None) or ())
    for module in list(model.modules()):
        if module is not model and type(module).__name__ in layer_classes:
            fully_shard(module)
    fully_shard(model)
    return model


def is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def unwrap(model):
    """The module itself, without a DDP wrapper (whose parameter names gain a `module.` prefix)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def trainable_names(model) -> list[str]:
    return [name for name, p in unwrap(model).named_parameters() if p.requires_grad]


def trainable_state(model) -> dict:
    """{name: CPU tensor} of the trainable parameters of a model that is not sharded."""
    return {n: p.detach().to("cpu").contiguous() for n, p in unwrap(model).named_parameters() if p.requires_grad}


def load_state(model, optimizer, tensors: dict, optim_state: dict) -> None:
    """Put saved full tensors and optimizer state back (every rank calls it, with the same data);
    a sharded model takes each rank's part of them."""
    import torch

    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)

        options = StateDictOptions(full_state_dict=True, strict=False)
        set_model_state_dict(model, tensors, options=options)
        set_optimizer_state_dict(model, optimizer, optim_state_dict=optim_state, options=options)
        return
    params = dict(unwrap(model).named_parameters())
    with torch.no_grad():
        for name, tensor in tensors.items():
            params[name].copy_(tensor.to(params[name].device))
    optimizer.load_state_dict(optim_state)


def save_sharded(model, optimizer, directory) -> None:
    """Weights and optimizer state with torch.distributed.checkpoint: a collective in which each
    rank writes only its own shards (nothing is gathered), fsynced, plus rank 0 the metadata."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    weights, optim = get_state_dict(model, optimizer)
    dcp.save({"model": weights, "optimizer": optim}, storage_writer=dcp.FileSystemWriter(str(directory)))


def load_sharded(model, optimizer, directory) -> None:
    """A `save_sharded` checkpoint into the model as it is spread now: sharded over the same or
    another number of ranks (DCP reshards), or whole (one worker, or DDP)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    module = unwrap(model)
    weights, optim = get_state_dict(module, optimizer)  # the layout to fill (initializes empty optimizer state)
    state = {"model": weights, "optimizer": optim}
    dcp.load(state, storage_reader=dcp.FileSystemReader(str(directory)))
    set_state_dict(module, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def gather_model(model, build: Callable[[], object], dist: DistInfo):
    """After sharded training: a plain copy of the trained model on rank 0 (built by `build`, then
    loaded with the gathered weights) for evaluation and saving; None on the other ranks.
    Unsharded models are returned as they are (unwrapped)."""
    if not is_sharded(model):
        return unwrap(model)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not dist.is_main:
        return None
    plain = build()
    plain.load_state_dict(full, strict=False)
    return plain
