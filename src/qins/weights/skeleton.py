"""Empty model skeletons: parameters on the meta device, buffers real.

`qins.load` builds the model from its config inside `params_on_meta()`, swaps in QINS
modules, then fills every parameter and persistent buffer from the file with
`load_state_dict(assign=True)`. No float weight is ever allocated or initialised: a layer's
`torch.empty` weight is made on the meta device, and any parameter made otherwise (an
RMSNorm's `torch.ones`) is moved there as it is registered.

Buffers are left where they are made, on the CPU: the non-persistent ones (rotary `inv_freq`,
GPT-2's causal mask, position ids) are not in the file, and their values are computed in the
modules' `__init__`, which the meta device would skip. This is accelerate's
`init_empty_weights(include_buffers=False)` in plain torch, plus `torch.empty` on meta so the
weights are not even allocated uninitialised. A buffer built from `torch.empty` and filled in
`__init__` would end up on meta, without its values: `check_materialised` names it.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

META = torch.device("meta")


class _EmptyOnMeta(TorchFunctionMode):
    """`torch.empty` without an explicit device (how nn.Linear / nn.Embedding / Conv1D make
    their weights) gives a meta tensor; every other op runs as usual."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.empty and kwargs.get("device") is None:
            kwargs["device"] = META
        return func(*args, **kwargs)


@contextlib.contextmanager
def params_on_meta():
    """Modules built inside hold their parameters on the meta device; buffers stay real.

    It patches `nn.Module.register_parameter` for the whole process while active (as accelerate's
    `init_empty_weights` does): modules built meanwhile by another thread get meta parameters.
    """
    register = nn.Module.register_parameter

    def register_on_meta(module, name, param):
        if param is not None and param.device != META:
            param = type(param)(param.to(META), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = register_on_meta
    try:
        with _EmptyOnMeta():
            yield
    finally:
        nn.Module.register_parameter = register


def check_materialised(model: nn.Module, where: str) -> None:
    """Raise if a parameter or buffer is still on the meta device (it came from no file)."""
    left = [n for n, t in [*model.named_parameters(remove_duplicate=False),
                           *model.named_buffers(remove_duplicate=False)] if t is not None and t.is_meta]
    if left:
        raise ValueError(f"{where}: {len(left)} tensor(s) were neither in the file nor computed when the "
                         f"model was built, e.g. {left[:3]}")
