"""torch.fx graph cutting: the shared prefix of a network and the part downstream of given tensors.

Fused inference runs what members share once (:func:`split_shared_prefix`), the methods train only the
part of a network after the layers they change on cached activations (:class:`Cut`), and noisy scores
children on the part downstream of the mutated tensors. All of them trace the network the same way:
with timm's own lists of modules and functions that ``torch.fx`` must not trace into.
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Sequence
from types import ModuleType

import torch
import torch.fx as fx
from torch import nn

from .errors import PosthocError

_logger = logging.getLogger(__name__)


class FeaturesAndLogits(nn.Module):
    """A timm model as ``x -> (penultimate features, logits)`` via ``forward_head(pre_logits=True)``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor):
        x = self.model.forward_features(x)
        feats = self.model.forward_head(x, pre_logits=True)
        head = self.model.get_classifier()
        # models with two heads (distilled ViTs) combine them in forward_head: use it for their logits
        logits = head(feats) if isinstance(head, nn.Module) else self.model.forward_head(x)
        return feats, logits


def tracer(wrap: Sequence[ModuleType] = ()) -> fx.Tracer:
    """A ``torch.fx`` tracer that treats timm's untraceable modules as leaves and wraps its functions;
    the public functions of the modules in ``wrap`` are left opaque too."""
    from timm.layers import get_notrace_functions, get_notrace_modules

    leaf_types = tuple(m for m in get_notrace_modules() if isinstance(m, type))

    class Tracer(fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return isinstance(m, leaf_types) or super().is_leaf_module(m, qualname)

    return Tracer(autowrap_modules=(math, *wrap), autowrap_functions=tuple(f for f in get_notrace_functions() if callable(f)))


def trace(net: nn.Module) -> fx.Graph:
    """``net``'s graph by :func:`tracer`; where that fails, traced again with the public functions of the
    timm model's own module left opaque (a ViT with ``dynamic_img_size`` resamples its position
    embedding by the input's shape, data-dependent control flow inside ``resample_abs_pos_embed``).
    Models that trace the first way keep exactly that graph."""
    try:
        return tracer().trace(net)
    except Exception:
        home = sys.modules.get(type(getattr(net, "model", net)).__module__)
        if home is None:
            raise
        return tracer(wrap=(home,)).trace(net)


def split_shared_prefix(net: nn.Module, member_names: set[str]):
    """Cut ``net``'s traced graph into a shared prefix and a member suffix.

    Returns ``(prefix, suffix, outputs, num_boundary)``: ``prefix(x)`` returns the ``num_boundary``
    shared values the suffix reads, then every shared graph output; ``suffix(*boundary)`` returns the
    member-dependent graph outputs; ``outputs`` maps each graph output to ``(is_member, index)`` in the
    suffix's or the prefix's result. All ``None`` when the model cannot be traced.
    """
    try:
        graph = trace(net)
    except Exception as e:
        _logger.info("torch.fx cannot trace %s (%s); members run whole", type(getattr(net, "model", net)).__name__, e)
        return None, None, None, None
    owners = {n.rsplit(".", 1)[0] for n in member_names}

    def uses_member_tensor(node: fx.Node) -> bool:
        if node.op == "get_attr":
            return node.target in member_names or any(m.startswith(node.target + ".") for m in member_names)
        if node.op == "call_module":
            return node.target in owners or any(o.startswith(node.target + ".") for o in owners)
        return False

    member: set[fx.Node] = set()
    for node in graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        if uses_member_tensor(node) or any(a in member for a in node.all_input_nodes):
            member.add(node)
    output_node = next(n for n in graph.nodes if n.op == "output")
    results = output_node.args[0]
    results = list(results) if isinstance(results, (tuple, list)) else [results]
    # shared values the suffix needs, in graph order
    boundary = [n for n in graph.nodes if n not in member and n.op != "output" and any(u in member for u in n.users)]

    prefix_graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in graph.nodes:
        if node in member or node.op == "output":
            continue
        env[node] = prefix_graph.node_copy(node, lambda a: env[a])
    shared_results = [r for r in results if r not in member]
    prefix_graph.output(tuple(env[n] for n in boundary + shared_results))

    suffix_graph = fx.Graph()
    senv: dict[fx.Node, fx.Node] = {}
    for node in boundary:
        senv[node] = suffix_graph.placeholder(f"shared_{node.name}")
    for node in graph.nodes:
        if node in member:
            senv[node] = suffix_graph.node_copy(node, lambda a: senv[a])
    member_results = [r for r in results if r in member]
    suffix_graph.output(tuple(senv[n] for n in member_results))

    outputs = []
    for r in results:
        if r in member:
            outputs.append((True, member_results.index(r)))
        else:
            outputs.append((False, len(boundary) + shared_results.index(r)))
    prefix = fx.GraphModule(net, prefix_graph, class_name="SharedPrefix")
    suffix = fx.GraphModule(net, suffix_graph, class_name="MemberSuffix")
    return prefix, suffix, outputs, len(boundary)


class Cut:
    """A network with outputs ``(features, logits)`` cut before the parameters ``names``.

    ``inputs(*args)`` runs the frozen part (the shared prefix of the traced graph) and returns the
    distinct tensors the rest needs, which is what gets cached; ``outputs(inputs)`` runs the rest
    (everything downstream of ``names``) and returns ``(features, logits)``. The rest calls the
    original network's modules, so training it trains the network in place.
    """

    def __init__(self, net: nn.Module, names: set[str]):
        prefix, suffix, outputs, nb = split_shared_prefix(net, names)
        if prefix is None:
            raise PosthocError(
                f"torch.fx cannot trace {type(getattr(net, 'model', net)).__name__}; training its last layers needs a traceable model"
            )
        if not any(is_member for is_member, _ in outputs):
            raise PosthocError("the trained layers do not influence the logits; check --last-layers")
        self.prefix, self.suffix, self.outputs_map, self.num_boundary = prefix, suffix, outputs, nb
        # the prefix returns the boundary values, then the shared graph outputs; one node may be both
        results = next(n for n in prefix.graph.nodes if n.op == "output").args[0]
        distinct: list = []
        self._alias = []
        for node in results:
            if node not in distinct:
                distinct.append(node)
            self._alias.append(distinct.index(node))
        self._keep = [self._alias.index(j) for j in range(len(distinct))]

    def inputs(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The frozen part's results, each distinct tensor once (what gets cached)."""
        out = self.prefix(*args)
        return tuple(out[i] for i in self._keep)

    def boundary(self, inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """The tensors the rest of the network reads, from :meth:`inputs`'s result."""
        return tuple(inputs[self._alias[i]] for i in range(self.num_boundary))

    def outputs(self, inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(features, logits)`` from :meth:`inputs`'s result (cached or fresh)."""
        full = [inputs[j] for j in self._alias]
        rest = self.suffix(*full[: self.num_boundary])
        feats, logits = (rest[i] if is_member else full[i] for is_member, i in self.outputs_map)
        return feats, logits
