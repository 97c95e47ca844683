"""``ModelStructure``: paths, parameter names and the modules the monitor watches."""

from __future__ import annotations

from typing import Dict, Optional

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from fimhooks.engine.layers import spec_for


class ModelStructure:
    """What the hooks and the backends read of a model, as it is now.

    Args:
        model: The watched model.

    Attributes:
        key: Identities of the modules and parameters: a changed key means a changed model.
        paths: ``{id(module): path}``.
        param_names: ``{id(parameter): name}``.
        declared: ``{id(parameter): [(path of a module declaring it, local name), ...]}``.
        layer_of: ``{parameter name: path of the layer declaring it}``, in model order.
        chain_leaves: Leaves by id when the chain backend may apply, else ``None``.
        watched: The modules that get a record hook.
    """

    def __init__(self, model: nn.Module):
        self.key = structure_key(model)
        self.paths = {id(m): path for path, m in model.named_modules()}
        self.param_names = {id(p): name for name, p in model.named_parameters()}
        self.declared = declarations(model)
        self.layer_of = {n: self.declared[id(p)][0][0] for n, p in model.named_parameters()}
        leaves = {path: m for path, m in model.named_modules() if not list(m.children())}
        self.chain_leaves = chain_leaves(model, leaves, self.declared)
        self.watched = [m for m in model.modules() if has_params(m) or isinstance(m, _BatchNorm)]
        if self.chain_leaves is not None:  # the chain check needs every layer's call
            self.watched += [m for m in leaves.values() if not has_params(m)]


def structure_key(model: nn.Module) -> tuple:
    """Identities of the model's modules and parameters."""
    return tuple(map(id, model.modules())) + tuple(map(id, model.parameters()))


def has_params(module: nn.Module) -> bool:
    """Whether ``module`` or a module inside it holds parameters."""
    return any(True for _ in module.parameters())


def declarations(model: nn.Module) -> Dict[int, list]:
    """``{id(parameter): [(path of a module declaring it, local name), ...]}``."""
    declared: Dict[int, list] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        for local, param in module.named_parameters(recurse=False):
            entry = declared.setdefault(id(param), [])
            if (path, local) not in entry:
                entry.append((path, local))
    return declared


def chain_leaves(model, leaves: dict, declared: dict) -> Optional[Dict[int, nn.Module]]:
    """Leaves by id when the chain backend may apply, else ``None``.

    It needs supported layers only, each parameter declared once, and no module holding
    parameters of its own besides the leaves.
    """
    if not all(spec_for(m).chain_rule(m) is not None for m in leaves.values()):
        return None
    if any(len(d) > 1 for d in declared.values()):
        return None
    if any(list(m.parameters(recurse=False)) for m in model.modules() if list(m.children())):
        return None
    return {id(m): m for m in leaves.values()}
