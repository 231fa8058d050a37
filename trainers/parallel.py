"""How one trial's model is spread over its ranks (`train.num_workers` > 1), and the full views of
its state that checkpoints and the final save need.

- DDP (default): every rank holds the whole model; gradients are averaged across ranks each step.
- FSDP (`train.fsdp=true`, full fine-tuning): parameters, gradients and optimizer state are
  sharded over the ranks with torch's FSDP2 (`fully_shard`, one unit per decoder layer plus the
  root), so a model whose training state does not fit one device trains on several. It runs on
  NCCL (GPU) and on gloo (CPU). Reading the full weights is then a collective: every rank calls
  `trainable_state` / `optimizer_state` / `gather_model`, rank 0 gets the result.
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
    """{name: full CPU tensor} of the trainable parameters. Sharded: a collective whose result
    only rank 0 gets (the others get {})."""
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        names = set(trainable_names(model))
        return {k: v.contiguous() for k, v in full.items() if k in names}
    return {n: p.detach().to("cpu").contiguous() for n, p in unwrap(model).named_parameters() if p.requires_grad}


def optimizer_state(model, optimizer) -> dict:
    """The optimizer's state dict; sharded: the full one (a collective, rank 0 gets it)."""
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(model, optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return optimizer.state_dict()


def load_state(model, optimizer, tensors: dict, optim_state: dict) -> None:
    """Put saved full tensors and optimizer state back (every rank calls it, with the same data)."""
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
