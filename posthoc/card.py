"""How an artifact reads to people: its Hub model card and the rows ``posthoc info`` prints.

The card is a ``huggingface_hub.ModelCard``: the front matter is a ``ModelCardData`` (library, license,
tags, base models) whose ``eval_results`` carry the metrics measured at build time, so the Hub renders
them; the body is the Jinja template in ``model_cards/ensemble.md``. :func:`summarize` renders the same
``config.json`` as ``(label, text)`` rows.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

from .ensemble import MetricKey, Provenance
from .views import IDENTITY, describe

METHOD_TEXT = {
    "ensemble": "A deep ensemble: independently obtained checkpoints of one label space, combined as they are.",
}
RULE_TEXT = {
    "prob_mean": " (softmax of each member, then the mean)",
    "logit_mean": " (mean of the members' logits, then softmax)",
    "vote": " (fraction of members voting for each class)",
    "coupling": " (a learned linear layer over the members' concatenated penultimate features)",
}
CARD_METRICS = (("top1", "accuracy", "top-1 (%)"), ("nll", "nll", "NLL"), ("ece", "ece", "ECE (%)"), ("brier", "brier", "Brier"))


def register_method_text(name: str, text: str) -> None:
    """Let a method describe itself in the cards of the artifacts it builds."""
    METHOD_TEXT[name] = text


def template_text(name: str) -> str:
    """A template from ``model_cards/``: installed as ``posthoc.model_cards``, or beside a source checkout."""
    try:
        return resources.files("posthoc.model_cards").joinpath(name).read_text()
    except ModuleNotFoundError:
        return (Path(__file__).resolve().parents[1] / "model_cards" / name).read_text()


def render_card(
    config: dict[str, Any], template: str = "ensemble.md", load_path: str = "PATH_OR_REPO", onnx_file: str | None = None
) -> str:
    """Render the model card of an artifact from its ``config.json`` dict.

    ``load_path`` is what the card's usage lines load: ``hf-hub:org/name`` once the artifact is pushed.
    ``onnx_file``: the name of an ONNX export uploaded beside it (``posthoc push --with-export``), which
    the card then shows how to run with ONNX Runtime.
    """
    from huggingface_hub import ModelCard, ModelCardData

    cfg = config.get("pretrained_cfg", {})
    combine = config["combine"]
    method = config["method"]
    meta = config["posthoc"]
    sources = config.get("sources") or []
    names = [m["name"] for m in config["members"]]
    shared = sum(g["shared_numel"] for g in config["groups"])
    member = sum(g["member_numel"] for g in config["groups"])
    title = f"{method['name']} ensemble of {config['groups'][0]['timm_config']['architecture']}"
    rule_text = RULE_TEXT[combine["rule"]]
    if combine.get("temperature", 1.0) != 1.0:
        rule_text += f", temperature {combine['temperature']:.3g}"
    if method.get("include_parent"):
        rule_text += "; the parent model is one of the members"
    card_data = ModelCardData(
        library_name="posthoc",
        license=cfg.get("license", "other"),
        pipeline_tag="image-classification",
        tags=["image-classification", "timm", "posthoc", "ensemble", method["name"]],
        base_model=[s.split(":", 1)[1].partition("@")[0] for s in sources if s.startswith("hf-hub:")] or None,
        model_name=title,
        eval_results=_eval_results(config) or None,
    )
    values = {
        "title": title,
        "method": method["name"],
        "num_members": config["num_members"],
        "num_classes": config["num_classes"],
        "source_text": ", ".join(f"`{s}`" for s in sources) if sources else "its members",
        "method_text": METHOD_TEXT.get(method["name"], ""),
        "member_list": ", ".join(names[:8]) + (f", ... ({len(names) - 8} more)" if len(names) > 8 else ""),
        "rule": combine["rule"],
        "rule_text": rule_text,
        "views_text": describe(combine.get("views") or IDENTITY),
        "stored_text": f"{shared / 1e6:.2f}M shared elements stored once, {member / 1e6:.2f}M member-specific elements",
        "cost_text": _cost_text(method.get("measured", {}).get("inference_cost"), config["num_members"]),
        "metrics_table": _metrics_table(config.get("metrics") or {}),
        "load_path": load_path,
        "onnx_file": onnx_file,
        "onnx_download": _download_args(load_path, onnx_file),
        "input_size": tuple(cfg.get("input_size", ())),
        "interpolation": cfg.get("interpolation", "?"),
        "crop_pct": cfg.get("crop_pct", "?"),
        "mean": tuple(cfg.get("mean", ())),
        "std": tuple(cfg.get("std", ())),
        "command_text": f"```bash\n{config['command']}\n```" if config.get("command") else "Built with the posthoc Python API.",
        "method_config": json.dumps(method.get("config", {}), indent=2),
        "posthoc_version": meta.get("posthoc_version"),
        "torch_version": meta.get("torch_version"),
        "timm_version": meta.get("timm_version"),
    }
    card = ModelCard.from_template(card_data, template_str=template_text(template), **values)
    return str(card.content).replace("\n\n\n", "\n\n")


def _download_args(load_path: str, filename: str | None) -> str:
    """``hf_hub_download``'s arguments for a file of the repository ``load_path`` (``hf-hub:org/name[@rev]``)."""
    repo, _, revision = load_path.removeprefix("hf-hub:").partition("@")
    return f'"{repo}", "{filename}"' + (f', revision="{revision}"' if revision else "")


def _cost_text(cost: dict[str, Any] | None, members: int) -> str:
    if not cost:
        return f"{members} member(s); the forward FLOPs were not recorded."
    budget = f" (built for an inference budget of {cost['budget']:g}x)" if cost.get("budget") is not None else ""
    return f"{cost['flops_ratio']:.2f}x the forward FLOPs of the base model per image, shared layers counted once{budget}."


def _eval_results(config: dict[str, Any]) -> list:
    from huggingface_hub import EvalResult

    dataset = Path(str((config.get("data") or {}).get("dataset", "data"))).name or "data"
    results = []
    for split, m in (config.get("metrics") or {}).items():
        if not isinstance(m, dict) or MetricKey.parse(split).role == "parent":
            continue
        for key, metric_type, label in CARD_METRICS:
            if isinstance(m.get(key), (int, float)):
                results.append(
                    EvalResult(
                        task_type="image-classification",
                        dataset_type="imagefolder",
                        dataset_name=dataset,
                        dataset_split=split,
                        metric_type=metric_type,
                        metric_name=label,
                        metric_value=round(float(m[key]), 4),
                    )
                )
    return results


def _metrics_table(metrics: dict[str, Any]) -> str:
    rows = [(split, m) for split, m in metrics.items() if isinstance(m, dict)]
    if not rows:
        return "No metrics were recorded at build time. Run `posthoc eval` on held-out data."
    lines = ["| data | " + " | ".join(label for _, _, label in CARD_METRICS) + " |", "|---" * (len(CARD_METRICS) + 1) + "|"]
    for split, m in rows:
        cells = [f"{m[k]:.4g}" if isinstance(m.get(k), (int, float)) else "" for k, _, _ in CARD_METRICS]
        lines.append(f"| {split} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summarize(config: dict[str, Any], size_mb: float | None = None) -> list[tuple[str, str]]:
    """``(label, text)`` rows describing an artifact: members, combine rule, what is shared, sizes,
    versions, hyper-parameters and stored metrics (what ``posthoc info`` prints)."""
    method, combine = config["method"], config["combine"]
    provenance = Provenance.from_config(config)
    rows = [
        ("method", method["name"]),
        ("members", f"{config['num_members']}: " + ", ".join(m["name"] for m in config["members"])),
    ]
    rule = combine["rule"] + (f" (temperature {combine['temperature']:.3g})" if combine.get("temperature", 1) != 1 else "")
    rows.append(("combine", rule + (", parent included" if provenance.include_parent else "")))
    rows.append(("test-time views", describe(combine.get("views") or IDENTITY)))
    rows.append(("classes", str(config["num_classes"])))
    for g, group in enumerate(config["groups"]):
        member_names = group["member_tensors"]
        total = group["shared_numel"] + group["member_numel"] // max(len(group["members"]), 1)
        share = 100.0 * group["shared_numel"] / max(total, 1)
        rows.append(
            (
                f"group {g}",
                f"{group['timm_config']['architecture']} x{len(group['members'])}: {len(group['shared_tensors'])} tensors shared "
                f"({group['shared_numel'] / 1e6:.2f}M elements, {share:.0f}% of a member), {len(member_names)} member-specific "
                f"({group['member_numel'] / 1e6:.2f}M elements in all)",
            )
        )
        if member_names:
            rows.append(("", "member-specific: " + _module_summary(member_names)))
    stored = sum(g["shared_numel"] + g["member_numel"] for g in config["groups"])
    rows.append(("stored elements", f"{stored / 1e6:.2f}M"))
    cost = provenance.measured.get("inference_cost")
    if cost:
        text = f"{cost['flops_ratio']:.2f}x the parent's forward FLOPs"
        if cost.get("time_ratio") is not None:
            text += f", {cost['time_ratio']:.2f}x its forward time where it was built"
        if cost.get("budget") is not None:
            text += f" (budget {cost['budget']:g}x)"
        rows.append(("inference cost", text))
    if size_mb is not None:
        rows.append(("size on disk", f"{size_mb:.1f} MB"))
    meta = config["posthoc"]
    rows.append(("built with", f"posthoc {meta['posthoc_version']}, torch {meta['torch_version']}, timm {meta['timm_version']}"))
    if provenance.method == "distill":
        teacher = provenance.measured
        rows.append(
            (
                "distilled from",
                f"{teacher.get('teacher')} ({teacher.get('teacher_members')} members, "
                f"{teacher.get('teacher_flops_ratio', 0):.2f}x FLOPs), about "
                f"{teacher.get('cost_parent_epochs', 0):.2f} parent-epochs",
            )
        )
    if provenance.config:
        rows.append(("hyper-parameters", ", ".join(f"{k}={v}" for k, v in provenance.config.items())))
    parent, own = provenance.metric("parent"), provenance.metric()
    if parent and own and "nll" in parent and "nll" in own:
        rows.append(
            (
                "gain on the select part",
                f"top-1 {own['top1'] - parent['top1']:+.2f}, NLL {own['nll'] - parent['nll']:+.4f} vs the parent",
            )
        )
    for split, metrics in provenance.metrics.items():
        if isinstance(metrics, dict):
            rows.append(
                (f"metrics ({split})", ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, (int, float))))
            )
    return rows


def _module_summary(names: list[str], limit: int = 6) -> str:
    """Tensor names grouped by their module prefix, e.g. 'layer4.* (30), fc.* (2)'."""
    groups: dict[str, int] = {}
    for n in names:
        parts = n.split(".")
        key = ".".join(parts[:2]) if len(parts) > 2 else parts[0]
        groups[key] = groups.get(key, 0) + 1
    items = [f"{k}.* ({v})" for k, v in groups.items()]
    return ", ".join(items[:limit]) + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")
