"""The ensemble representation every method produces, and the record of how it was made.

An :class:`Ensemble` is a list of member *groups* plus a :class:`Combine` rule. A group holds members
of one architecture (one timm config): the tensors all its members share, stored once, and the
*member tensors* that differ, stacked with a leading member dimension. A method that perturbs only
the classifier of one parent produces one group whose member tensors are just ``fc.weight`` and
``fc.bias``; a deep ensemble of four independently trained checkpoints produces one group in which
every tensor is a member tensor; members of different architectures form one group each.

The combine rule turns per-member outputs into class probabilities:

- ``prob_mean`` (default): softmax each member's logits, then average (the rule most ensemble papers
  state; the subnetwork thesis's prose uses it while its pseudo-code averages logits);
- ``logit_mean``: average the logits, then softmax;
- ``vote``: the fraction of members whose top-1 is each class (hard majority vote);
- ``coupling``: a learned linear layer over the members' concatenated penultimate features (the
  SuperNet merge), softmax of its output.

``temperature`` divides the logits before the softmax (1 = none), so calibration fitted on validation
data travels with the artifact. ``views`` are the test-time views every member sees
(:mod:`posthoc.views`); the rule combines over members and views alike (``prob_mean``: the mean of K*V
softmaxes; ``logit_mean``: of K*V logits; ``vote``: K*V votes; ``coupling``: the coupled logits of each
view, softmaxed and averaged).

:class:`Provenance` is what built the ensemble (method, hyper-parameters, what it measured, sources,
data, command line, build-time metrics); it is written next to the ensemble, never inside it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import nn

from .errors import PosthocError
from .timm_io import build_from_timm_config, timm_config
from .views import IDENTITY, check_views

COMBINE_RULES = ("prob_mean", "logit_mean", "vote", "coupling")


def combine_probabilities(logits: torch.Tensor, rule: str, temperature: float = 1.0) -> torch.Tensor:
    """Class probabilities (B, C) from logits (K, B, C) under a combine rule, each member's logits divided
    by ``temperature`` first. ``coupling`` takes the coupled logits as one member (1, B, C)."""
    if temperature != 1.0:
        logits = logits / temperature
    if rule in ("prob_mean", "coupling"):
        return logits.softmax(-1).mean(0)
    if rule == "logit_mean":
        return logits.mean(0).softmax(-1)
    if rule == "vote":
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).to(logits.dtype).mean(0)
    raise PosthocError(f"unknown combine rule '{rule}'; use {', '.join(COMBINE_RULES)}")


@dataclass(frozen=True, eq=False)
class Combine:
    """How member outputs become the ensemble's class probabilities."""

    rule: str = "prob_mean"
    temperature: float = 1.0
    coupling_weight: torch.Tensor | None = None  # (C, sum of member feature sizes)
    coupling_bias: torch.Tensor | None = None  # (C,)
    views: tuple[str, ...] = IDENTITY

    def __post_init__(self):
        if self.rule not in COMBINE_RULES:
            raise PosthocError(f"unknown combine rule '{self.rule}'; use {', '.join(COMBINE_RULES)}")
        if self.rule == "coupling" and (self.coupling_weight is None or self.coupling_bias is None):
            raise PosthocError("the coupling rule needs a coupling layer (weight and bias)")
        if not self.temperature > 0:
            raise PosthocError(f"temperature must be positive, got {self.temperature}")
        object.__setattr__(self, "views", check_views(self.views))

    def to_config(self) -> dict[str, Any]:
        """The JSON-able part (the coupling tensors go to the weights file)."""
        return {"rule": self.rule, "temperature": self.temperature, "views": list(self.views)}


@dataclass
class MemberGroup:
    """Members of one architecture: shared tensors once, member tensors stacked (K, ...)."""

    timm_config: dict[str, Any]
    member_names: list[str]
    shared: dict[str, torch.Tensor]
    member_tensors: dict[str, torch.Tensor]

    @property
    def num_members(self) -> int:
        return len(self.member_names)

    @property
    def architecture(self) -> str:
        return self.timm_config["architecture"]

    def member_state_dict(self, k: int) -> dict[str, torch.Tensor]:
        """The full state dict of member ``k`` (shared tensors are not copied)."""
        state = dict(self.shared)
        state.update({name: t[k] for name, t in self.member_tensors.items()})
        return state

    def classifier_in_features(self) -> int:
        """Input width of the members' classifier (from its weight; a model build as a fallback)."""
        name = self.timm_config.get("pretrained_cfg", {}).get("classifier")
        for key in [name] if isinstance(name, str) else list(name or []):
            weight = self.shared.get(f"{key}.weight")
            if weight is None and f"{key}.weight" in self.member_tensors:
                weight = self.member_tensors[f"{key}.weight"][0]
            if weight is not None and weight.dim() == 2:
                return int(weight.shape[1])
        head = build_from_timm_config(self.timm_config).get_classifier()
        if not isinstance(head, nn.Linear):
            raise PosthocError(f"cannot tell the feature width of {self.architecture}'s classifier ({type(head).__name__})")
        return int(head.in_features)

    def stored_numel(self) -> tuple[int, int]:
        """(elements stored once, elements stored per member summed over members)."""
        return sum(t.numel() for t in self.shared.values()), sum(t.numel() for t in self.member_tensors.values())

    @classmethod
    def from_state_dicts(
        cls, timm_config: dict[str, Any], state_dicts: Sequence[dict[str, torch.Tensor]], names: Sequence[str]
    ) -> MemberGroup:
        """Split member state dicts into shared (bitwise equal in every member) and member tensors."""
        if not state_dicts:
            raise PosthocError("an ensemble needs at least one member")
        keys = list(state_dicts[0])
        for sd, name in zip(state_dicts, names):
            if (
                sd.keys() != state_dicts[0].keys()
            ):  # the same tensors, in any order (a removed parametrization re-adds its weight last)
                raise PosthocError(
                    f"member '{name}' has different tensors than '{names[0]}'; members of a group must share an architecture"
                )
        shared, member = {}, {}
        for key in keys:
            first = state_dicts[0][key]
            if all(sd[key] is first or torch.equal(sd[key], first) for sd in state_dicts[1:]):
                shared[key] = first.detach().clone()
            else:
                member[key] = torch.stack([sd[key].detach() for sd in state_dicts])
        return cls(dict(timm_config), list(names), shared, member)


@dataclass
class Ensemble:
    """Member groups and a combine rule: everything needed to run the ensemble, nothing about its history."""

    groups: list[MemberGroup]
    combine: Combine = field(default_factory=Combine)

    def __post_init__(self):
        classes = {g.timm_config.get("num_classes") for g in self.groups}
        if len(classes) != 1:
            raise PosthocError(
                f"members disagree on the number of classes ({sorted(map(str, classes))}); ensemble checkpoints of one label space"
            )
        if self.combine.rule == "coupling":
            expected = (self.num_classes, sum(self.feature_dims()))
            got = tuple(self.combine.coupling_weight.shape)
            if got != expected:
                raise PosthocError(f"coupling layer has shape {got} but the members need {expected}")

    @property
    def num_members(self) -> int:
        return sum(g.num_members for g in self.groups)

    @property
    def num_classes(self) -> int:
        return int(self.groups[0].timm_config["num_classes"])

    @property
    def member_names(self) -> list[str]:
        return [n for g in self.groups for n in g.member_names]

    @property
    def pretrained_cfg(self) -> dict[str, Any]:
        """Preprocessing of the first group (all members are fed the same images)."""
        return dict(self.groups[0].timm_config.get("pretrained_cfg", {}))

    def feature_dims(self) -> list[int]:
        """Width of the features each member's classifier reads (``forward_head(pre_logits=True)``),
        in member order. Read from the classifier weight, since timm's ``num_features`` is narrower
        for models with a head hidden layer (MobileNetV3)."""
        dims = []
        for g in self.groups:
            dims += [g.classifier_in_features()] * g.num_members
        return dims

    def members(self) -> list[nn.Module]:
        """Every member as a plain timm model in eval mode (for loops, tests and export)."""
        out = []
        for g in self.groups:
            for k in range(g.num_members):
                m = build_from_timm_config(g.timm_config)
                m.load_state_dict(g.member_state_dict(k))
                out.append(m.eval())
        return out

    def as_float32(self) -> Ensemble:
        """This ensemble with weights stored in half precision widened to float32 for inference (as timm
        loads half checkpoints into a float32 model; ``torch.autocast`` or ``module.half()`` give lower
        precision where it is wanted)."""

        def wide(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return {k: v.float() if v.is_floating_point() and v.dtype != torch.float64 else v for k, v in tensors.items()}

        groups = [dataclasses.replace(g, shared=wide(g.shared), member_tensors=wide(g.member_tensors)) for g in self.groups]
        combine = self.combine
        if combine.coupling_weight is not None:
            combine = dataclasses.replace(
                combine, coupling_weight=combine.coupling_weight.float(), coupling_bias=combine.coupling_bias.float()
            )
        return Ensemble(groups, combine)

    def stored_numel(self) -> int:
        """Elements stored in the artifact: shared tensors once, member tensors per member, coupling."""
        n = sum(sum(g.stored_numel()) for g in self.groups)
        if self.combine.coupling_weight is not None:
            n += self.combine.coupling_weight.numel() + self.combine.coupling_bias.numel()
        return n

    @classmethod
    def from_models(
        cls, models: Sequence[nn.Module], names: Sequence[str] | None = None, combine: Combine | None = None
    ) -> Ensemble:
        """Group models by architecture (their timm config) and split shared from member tensors."""
        names = list(names or [f"member-{i}" for i in range(len(models))])
        if len(names) != len(models):
            raise PosthocError("give one name per member")
        by_arch: dict[str, list[int]] = {}
        configs = []
        for i, m in enumerate(models):
            cfg = timm_config(m)
            configs.append(cfg)
            key = repr((cfg["architecture"], sorted(cfg.get("model_args", {}).items())))
            by_arch.setdefault(key, []).append(i)
        groups = [
            MemberGroup.from_state_dicts(configs[idx[0]], [models[i].state_dict() for i in idx], [names[i] for i in idx])
            for idx in by_arch.values()
        ]
        return cls(groups=groups, combine=combine or Combine())


ROLES = ("artifact", "parent", "teacher", "calibrated")


class MetricKey(NamedTuple):
    """The key of a build-time evaluation in an artifact's ``metrics``: whose figures (``role``: the
    artifact itself, its ``parent``, a distilled student's ``teacher``, or the artifact once re-calibrated)
    on which data ``part`` (e.g. ``val:select``). Written as ``val:select``, ``parent on val:select``,
    ``teacher on val:select`` and ``val:select (calibrated)``."""

    part: str
    role: str = "artifact"

    def __str__(self) -> str:
        if self.role == "artifact":
            return self.part
        if self.role == "calibrated":
            return f"{self.part} (calibrated)"
        return f"{self.role} on {self.part}"

    @classmethod
    def parse(cls, text: str) -> MetricKey:
        """The key a metrics entry was written under."""
        if text.endswith(" (calibrated)"):
            return cls(text.removesuffix(" (calibrated)"), "calibrated")
        role, sep, part = text.partition(" on ")
        return cls(part, role) if sep and role in ROLES else cls(text)


@dataclass
class Provenance:
    """How an artifact was made: written to its ``config.json`` and model card, never used to run it.

    ``config`` holds the method's hyper-parameters as given, ``measured`` what the method measured
    while building (noise scale found, stages, select scores...), ``metrics`` the build-time
    evaluations by data part, and ``include_parent`` whether one member is the unchanged parent.
    """

    method: str = "ensemble"
    config: dict[str, Any] = field(default_factory=dict)
    measured: dict[str, Any] = field(default_factory=dict)
    include_parent: bool = False
    sources: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    command: str | None = None

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Provenance:
        """The record stored in an artifact's ``config.json`` (also from artifacts of posthoc 0.1)."""
        method = config.get("method") or {}
        settings = dict(method.get("config") or {})
        measured = method.get("measured", settings.pop("measured", {}))  # 0.1 nested it in the config
        include = method.get("include_parent", (config.get("combine") or {}).get("include_parent", False))
        return cls(
            method=method.get("name", "ensemble"),
            config=settings,
            measured=measured or {},
            include_parent=bool(include),
            sources=list(config.get("sources") or []),
            data=dict(config.get("data") or {}),
            metrics=dict(config.get("metrics") or {}),
            command=config.get("command"),
        )

    def metric(self, role: str = "artifact", part: str | None = None) -> dict[str, Any] | None:
        """The recorded figures of ``role`` on ``part`` (default: the part it was tuned on), if any."""
        key = MetricKey(part or str(self.data.get("tuned_on")), role)
        value = self.metrics.get(str(key))
        return value if isinstance(value, dict) else None
