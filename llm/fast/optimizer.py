"""`Optimizer`: torch.optim.Optimizer minus a start-up cost, the base of `llm.optim`'s optimizers.

torch.optim.Optimizer's add_param_group, zero_grad, state_dict and load_state_dict are wrapped in
@torch._disable_dynamo, whose first call imports torch._dynamo: 4+ s of start-up for every process that
builds an optimizer. This base class calls the undecorated methods (`__wrapped__`) while dynamo is not
loaded; once it is (torch.compile in use), the decorated ones, so compiled code sees what it expects.
Behaviour is otherwise unchanged.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch


def _undecorated(name: str) -> Callable[..., Any]:
    """torch.optim.Optimizer's method `name` without its @torch._disable_dynamo wrapper."""
    method = getattr(torch.optim.Optimizer, name)
    return getattr(method, "__wrapped__", method)


class Optimizer(torch.optim.Optimizer):
    def _call(self, name: str, *args: Any) -> Any:
        if "torch._dynamo" in sys.modules:
            return getattr(super(), name)(*args)
        return _undecorated(name)(self, *args)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self._call("add_param_group", param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._call("zero_grad", set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return self._call("state_dict")

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._call("load_state_dict", state_dict)
