"""Fused inference: one ``nn.Module`` that runs K members, computing what they share once.

Each :class:`~posthoc.ensemble.MemberGroup` runs in a :class:`GroupExecutor`:

1. The members' common network is traced with ``torch.fx`` (with timm's own list of untraceable
   modules and functions) and cut in two: the **shared prefix**, every operation that does not depend
   on a member-specific tensor, and the **member suffix**, everything downstream of one. The prefix runs
   once per batch. For members that differ only in the classifier, the prefix is the whole trunk.
2. The suffix runs for all K members with ``torch.func.functional_call``, either batched in one pass
   (``vmap``: member tensors batched, the prefix's outputs unbatched; convolutions become grouped
   convolutions), member after member (``loop``), or members side by side on CPU threads that share
   the intra-op threads out among them (``threads``). ``auto`` picks ``vmap`` on CUDA, where one wide kernel
   beats K small launches; on CPU, where PyTorch's grouped convolutions are slower than K plain ones,
   ``threads`` when the suffix is more than the classifier (a member's whole network splits across
   cores better than each small convolution does) and ``loop`` otherwise (timings:
   ``benchmarks/results/inference.md``).

Before the cut, every BatchNorm (``nn.BatchNorm2d`` or timm's ``BatchNormAct2d``, whose activation
stays) that directly follows a plain convolution (``nn.Conv2d`` or timm's ``Conv2dSame``; weight-
standardized convolutions are left alone) is folded into it: its eval-mode affine map becomes the
convolution's weight scale and bias, per member where the tensors are member-specific, which saves one
pass over each activation; a pair is folded only when both are
shared or both member-specific, so folding never moves work from the shared prefix to the members.

A model that ``torch.fx`` cannot trace runs whole: under ``vmap`` (which still computes operations on
unbatched inputs only once) or, on CPU, as K full forward passes.
"""

from __future__ import annotations

import copy
import os
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.func import functional_call, vmap

from .ensemble import Ensemble, MemberGroup, combine_probabilities
from .errors import PosthocError
from .graph import FeaturesAndLogits, split_shared_prefix, tracer
from .timm_io import build_from_timm_config, load_weights
from .views import stack_views

STRATEGIES = ("auto", "vmap", "loop", "threads")
_THREADS_LOCK = threading.Lock()
_POOL: tuple[ThreadPoolExecutor, int] | None = None  # (pool, its worker count)


class EnsembleModule(nn.Module):
    """An ensemble as one module: ``forward(x)`` returns class probabilities of shape (B, C).

    ``forward(x, return_members=True)`` returns ``(probs, member_probs)`` with ``member_probs`` of
    shape (K, B, C): each member's own softmax, at the ensemble's temperature (for a ``coupling``
    ensemble, of the member's own classifier), averaged over the test-time views. ``views`` (from the
    combine rule, :mod:`posthoc.views`) run as one batch of V*B images through the shared prefix and the
    member suffixes. The module carries ``pretrained_cfg`` (preprocessing, timm's convention),
    ``num_classes``, ``num_members``, ``member_names`` and, once loaded from disk, ``posthoc_config``.

    ``strategy`` chooses how member-specific layers run: ``auto`` (``vmap`` on CUDA; on CPU
    ``threads`` for heavy member suffixes, else ``loop``), ``vmap``, ``loop`` or ``threads``; shared
    layers always run once. ``threads`` shares torch's intra-op threads out among members running side
    by side and restores the count afterwards (concurrent calls are serialized). ``fold_bn`` folds BatchNorm into the
    preceding convolutions (outputs equal up to float rounding).
    """

    returns_probabilities = True

    def __init__(self, ensemble: Ensemble, strategy: str = "auto", fold_bn: bool = True):
        super().__init__()
        if strategy not in STRATEGIES:
            raise PosthocError(f"unknown execution strategy '{strategy}'; use {', '.join(STRATEGIES)}")
        self.strategy = strategy
        self.executors = nn.ModuleList([GroupExecutor(g, fold_bn=fold_bn) for g in ensemble.groups])
        self.rule = ensemble.combine.rule
        self.temperature = float(ensemble.combine.temperature)
        self.views = ensemble.combine.views
        self.num_members = ensemble.num_members
        self.num_classes = ensemble.num_classes
        self.member_names = ensemble.member_names
        self.pretrained_cfg = ensemble.pretrained_cfg
        self.default_cfg = self.pretrained_cfg
        self.posthoc_config: dict[str, Any] = {}
        self.coupling = None
        if self.rule == "coupling":
            w = ensemble.combine.coupling_weight
            self.coupling = nn.Linear(w.shape[1], w.shape[0])
            with torch.no_grad():
                self.coupling.weight.copy_(w)
                self.coupling.bias.copy_(ensemble.combine.coupling_bias)
            self.coupling.requires_grad_(False)

    def num_parameters(self) -> int:
        """Parameters stored: shared ones once, member-specific ones per member, the coupling layer."""
        total = 0 if self.coupling is None else sum(p.numel() for p in self.coupling.parameters())
        return total + sum(ex.parameter_count for ex in self.executors)

    def member_outputs(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Per-group penultimate features (K_g, B, D_g) and all members' logits (K, B, C)."""
        feats, logits = zip(*(ex(x, self._mode(ex, x)) for ex in self.executors))
        return list(feats), torch.cat(logits) if len(logits) > 1 else logits[0]

    def _mode(self, executor: GroupExecutor, x: torch.Tensor) -> str:
        if self.strategy != "auto":
            return self.strategy
        if x.device.type == "cuda":
            return "vmap"
        return "threads" if executor.heavy_suffix and torch.get_num_threads() > 1 else "loop"

    def raw_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What the combine rule starts from, before the temperature: ``(combined, members)``.

        The V views of the batch run as one batch of V*B images. ``members`` are the member logits (K, V, B, C);
        ``combined`` is what the rule combines: every member under every view (K*V, B, C), or for ``coupling``
        the coupled logits of each view (V, B, C)."""
        v, b = len(self.views), x.shape[0]
        feats, logits = self.member_outputs(stack_views(x, self.views))
        members = logits.unflatten(1, (v, b))
        if self.coupling is None:
            return members.flatten(0, 1), members
        z = torch.cat([f.transpose(0, 1).reshape(f.shape[1], -1) for f in feats], dim=1)  # member order
        return self.coupling(z).unflatten(0, (v, b)), members

    def forward(self, x: torch.Tensor, return_members: bool = False):
        combined, members = self.raw_logits(x)
        probs = combine_probabilities(combined, self.rule, self.temperature)
        if return_members:  # each member's own probabilities, averaged over the views
            return probs, (members / self.temperature).softmax(-1).mean(1)
        return probs


class GroupExecutor(nn.Module):
    """Runs one group's K members: shared prefix once, member suffix batched or looped.

    Member tensors are stored stacked (K, ...) in buffers ``member_<i>``. The ``loop`` mode calls K
    lightweight copies of the suffix whose member tensors are views into those stacks (no copies, no
    ``functional_call`` overhead). Convolution weights are kept channels-last, which PyTorch's CPU
    kernels run faster, and CPU inputs are converted to match.
    """

    def __init__(self, group: MemberGroup, fold_bn: bool = True):
        super().__init__()
        first = group.member_state_dict(0)
        source = f"the {group.architecture} group's weights"
        model = build_from_timm_config(group.timm_config, source, elements=sum(t.numel() for t in first.values()))
        load_weights(model, first, source)
        self.parameter_count = sum(
            group.member_tensors[n].numel() if n in group.member_tensors else p.numel() for n, p in model.named_parameters()
        )
        member_tensors = fold_batchnorm(model.eval(), group.member_tensors) if fold_bn else dict(group.member_tensors)
        self.net = FeaturesAndLogits(model).requires_grad_(False).to(memory_format=torch.channels_last)
        self.num_members = group.num_members
        self.names = [f"model.{n}" for n in member_tensors]
        for i, name in enumerate(member_tensors):
            self.register_buffer(f"member_{i}", _channels_last_stack(member_tensors[name].clone()))
        self._point_net_at_member(0)
        self.prefix, self.suffix, self.outputs_member, self.num_boundary = split_shared_prefix(self.net, set(self.names))
        self.traced = self.prefix is not None
        head = model.get_classifier()
        head_names = {f"model.{n}" for n, m in model.named_modules() if m is head}
        # members differ beyond the classifier (whole blocks run per member), or run whole
        self.heavy_suffix = not self.traced or any(n.rpartition(".")[0] not in head_names for n in self.names)
        self._members: list[nn.Module] | None = None

    def _point_net_at_member(self, k: int) -> None:
        """Member-specific tensors of the skeleton become views of member ``k`` (no second copy)."""
        for name, stack in self.member_tensors().items():
            _assign(self.net, name, stack[k])

    def member_tensors(self) -> dict[str, torch.Tensor]:
        """Stacked (K, ...) member tensors by their name in ``self.net``."""
        return {n: getattr(self, f"member_{i}") for i, n in enumerate(self.names)}

    def _apply(self, fn, *args, **kwargs):
        result = super()._apply(fn, *args, **kwargs)
        self._members = None  # member views point at the old tensors; rebuilt on next use
        self._point_net_at_member(0)
        return result

    def member_modules(self) -> list[nn.Module]:
        """K copies of the suffix (or of the whole network when untraced) sharing all storage."""
        if self._members is None:
            fn = self.suffix if self.traced else self.net
            shared = {id(t): t for t in [*fn.parameters(), *fn.buffers()]}
            members = []
            for k in range(self.num_members):
                copy_k = copy.deepcopy(fn, memo=dict(shared))
                for name, stack in self.member_tensors().items():
                    _assign(copy_k, name, stack[k])
                members.append(copy_k)
            self._members = members
        return self._members

    def forward(self, x: torch.Tensor, mode: str = "loop") -> tuple[torch.Tensor, torch.Tensor]:
        if x.dim() == 4 and x.device.type == "cpu":
            x = x.contiguous(memory_format=torch.channels_last)
        params = self.member_tensors()
        k = self.num_members
        if self.traced:
            shared = tuple(self.prefix(x))
            fn, args = self.suffix, shared[: self.num_boundary]
        else:
            fn, args = self.net, (x,)
        if not params:  # identical members
            outs = fn(*args)
        elif mode == "vmap":
            with warnings.catch_warnings():
                # channels-last convolutions feeding a pooling op make vmap restride the pooled output
                # through its per-member fallback: a few tiny copies, no measurable cost (inference.py)
                warnings.filterwarnings("ignore", message=".*batching rule for aten::as_strided_", category=UserWarning)
                outs = vmap(lambda p: functional_call(fn, p, args), randomness="error")(params)
        else:
            members = self.member_modules()
            if mode == "threads" and x.device.type == "cpu":
                per_member = run_side_by_side([lambda m=m: m(*args) for m in members])
            else:
                per_member = [m(*args) for m in members]
            outs = tuple(torch.stack(o) for o in zip(*per_member))
        if not self.traced:
            return outs if params else tuple(o.expand(k, *o.shape) for o in outs)
        # the suffix returns only member-dependent outputs; shared ones come from the prefix
        result = []
        for is_member, index in self.outputs_member:
            if is_member and params:
                result.append(outs[index])
            else:
                value = outs[index] if is_member else shared[index]
                result.append(value.expand(k, *value.shape))
        return tuple(result)


def run_side_by_side(calls: list) -> list:
    """Run CPU calls concurrently on ``min(len(calls), threads)`` workers, results in order.

    The intra-op threads are shared out: each worker gets ``threads // workers`` (one each when there
    are at least as many calls as threads). Torch's intra-op thread count is global, so it is set for
    the duration and restored after,
    under a lock (concurrent callers wait their turn instead of corrupting it). Grad, inference-mode
    and CPU autocast state are thread-local: the worker threads get the caller's.
    """
    global _POOL
    threads = min(len(calls), torch.get_num_threads())
    if threads < 2:
        return [c() for c in calls]
    grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()
    try:
        autocast, autocast_dtype = torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")
    except (TypeError, AttributeError):  # torch < 2.4
        autocast, autocast_dtype = torch.is_autocast_cpu_enabled(), torch.get_autocast_cpu_dtype()

    def run_chunk(chunk: list) -> list:
        with (
            torch.inference_mode(inference),
            torch.set_grad_enabled(grad),
            torch.autocast("cpu", dtype=autocast_dtype, enabled=autocast),
        ):
            return [c() for c in chunk]

    chunks = [calls[i::threads] for i in range(threads)]
    with _THREADS_LOCK:
        if _POOL is None or _POOL[1] < threads:
            if _POOL is not None:
                _POOL[0].shutdown(wait=False)
            size = max(threads, os.cpu_count() or 1)
            _POOL = (ThreadPoolExecutor(size, thread_name_prefix="posthoc-member"), size)
        saved = torch.get_num_threads()
        torch.set_num_threads(max(1, saved // threads))
        try:
            done = list(_POOL[0].map(run_chunk, chunks))
        finally:
            torch.set_num_threads(saved)
    out = [None] * len(calls)
    for i, results in enumerate(done):
        out[i::threads] = results
    return out


def fold_batchnorm(model: nn.Module, member_tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fold each eval-mode BatchNorm that is the only user of a plain convolution into that conv.

    BatchNorms: ``nn.BatchNorm2d`` and timm's ``BatchNormAct2d``; convolutions: ``nn.Conv2d`` and timm's
    ``Conv2dSame`` (not weight-standardized ones, whose forward would undo the scale). ``model`` holds
    member 0 (shared tensors are its own); ``member_tensors`` maps member-specific tensor names to (K, ...)
    stacks. The folded conv gets the scaled weight and a bias (torch's ``fuse_conv_bn_weights``), per
    member when the conv weight is member-specific; the BatchNorm becomes ``nn.Identity`` (for
    ``BatchNormAct2d``, its dropout and activation). A shared conv followed by a BatchNorm with member-specific tensors is left
    alone: folding would turn the shared conv into K. Returns the new ``member_tensors`` dict; ``model`` is
    changed in place. Untraceable models are returned unchanged.
    """
    from timm.layers import BatchNormAct2d, Conv2dSame
    from torch.nn.utils.fusion import fuse_conv_bn_weights

    member_tensors = dict(member_tensors)
    try:
        graph = tracer().trace(model)
    except Exception:
        return member_tensors
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    for node in list(graph.nodes):
        if node.op != "call_module" or not node.args or not isinstance(node.args[0], fx.Node):
            continue
        src, bn_name = node.args[0], node.target
        if src.op != "call_module" or len(src.users) != 1 or calls[bn_name] != 1 or calls[src.target] != 1:
            continue
        conv, bn = model.get_submodule(src.target), model.get_submodule(bn_name)
        if type(conv) not in (nn.Conv2d, Conv2dSame) or type(bn) not in (nn.BatchNorm2d, BatchNormAct2d):
            continue
        if bn.running_mean is None or not bn.affine:
            continue
        conv_keys = [f"{src.target}.{t}" for t in ("weight", "bias") if getattr(conv, t) is not None]
        bn_keys = [f"{bn_name}.{t}" for t in ("running_mean", "running_var", "weight", "bias")]
        conv_member = f"{src.target}.weight" in member_tensors
        if not conv_member and any(k in member_tensors for k in conv_keys + bn_keys):
            continue

        def fold(k: int | None) -> tuple[torch.Tensor, torch.Tensor]:
            def get(key: str, module: nn.Module, attr: str):
                value = member_tensors[key][k] if k is not None and key in member_tensors else getattr(module, attr)
                return None if value is None else value.detach()

            w, b = fuse_conv_bn_weights(
                get(f"{src.target}.weight", conv, "weight"),
                get(f"{src.target}.bias", conv, "bias") if conv.bias is not None else None,
                get(f"{bn_name}.running_mean", bn, "running_mean"),
                get(f"{bn_name}.running_var", bn, "running_var"),
                bn.eps,
                get(f"{bn_name}.weight", bn, "weight"),
                get(f"{bn_name}.bias", bn, "bias"),
            )
            return w.detach(), b.detach()

        if conv_member:
            folded = [fold(k) for k in range(next(iter(member_tensors.values())).shape[0])]
            for key in [*bn_keys, f"{bn_name}.num_batches_tracked"]:
                member_tensors.pop(key, None)
            member_tensors[f"{src.target}.weight"] = torch.stack([w for w, _ in folded])
            member_tensors[f"{src.target}.bias"] = torch.stack([b for _, b in folded])
            weight, bias = folded[0]
        else:
            member_tensors.pop(f"{bn_name}.num_batches_tracked", None)
            weight, bias = fold(None)
        conv.weight = nn.Parameter(weight, requires_grad=False)
        conv.bias = nn.Parameter(bias, requires_grad=False)
        owner, _, attr = bn_name.rpartition(".")
        after = nn.Sequential(bn.drop, bn.act) if isinstance(bn, BatchNormAct2d) else nn.Identity()
        setattr(model.get_submodule(owner) if owner else model, attr, after)
    return member_tensors


def _channels_last_stack(t: torch.Tensor) -> torch.Tensor:
    """Lay out stacked conv weights (K, O, I, kh, kw) so each member's slice is channels-last."""
    if t.dim() != 5 or not t.is_floating_point():
        return t
    return t.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)


def _assign(module: nn.Module, name: str, value: torch.Tensor) -> None:
    owner_name, _, attr = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    if attr in owner._parameters:
        owner._parameters[attr] = nn.Parameter(value, requires_grad=False)
    else:
        owner._buffers[attr] = value
