"""Export a finished cell run (``final.pt``, `substrate.cell.final_state`) in standard formats.

Slot k of the bank is one LoRA adapter across every adapted projection: in the tool, projection
``W`` computes ``y = W x + sum_k g_k (alpha / r) B_k A_k x``; PEFT's LoRA layer computes
``y = W x + (lora_alpha / r) lora_B (lora_A x)``. So slot k is the PEFT adapter with
``lora_A.weight = A_k (r, d_in)`` and ``lora_B.weight = B_k (d_out, r)`` on every projection,
``r`` and ``lora_alpha`` unchanged, and the tool's forward with one-hot gates ``e_k`` equals the
PEFT model's with adapter k active. A gated mixture with gates that do not depend on the token is
the PEFT model with every adapter active, adapter k's scale multiplied by ``g_k``
(``LoraLayer.set_scale``); the tool's per-token routing has no PEFT equivalent, so the router is
exported beside the slots (its parameters and config), not as a PEFT object.

Formats (`write_export`):

- ``peft``: ``slot-00/ ... slot-(K-1)/``, each ``adapter_model.safetensors`` (keys
  ``base_model.model.<module>.lora_{A,B}.weight``) and ``adapter_config.json`` (LoRA,
  ``target_modules`` = the adapted projections), loadable with ``PeftModel.from_pretrained`` on
  `plain_model` (the base with each adapted projection a `PlainLinear`, an ``nn.Linear``).
- ``safetensors``: ``bank.safetensors`` with the stacked factors ``<module>.A (K, r, d_in)`` and
  ``<module>.B (K, d_out, r)``, and ``bank.json`` (K, r, lora_alpha, scale, modules).

Both add ``router.safetensors`` + ``router.json`` (kind, config, features, pooling, the step the
temperature is read at) and, unless ``base=False``, ``base.safetensors`` + ``model.json`` (the
frozen base the adapters were trained on; the output head is tied to ``wte.weight``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor, nn

from sandbox.errors import BadInput
from sandbox.results import atomic_write_bytes, load_torch
from substrate.adapt import FINAL
from substrate.model import GPT, AdaptedLinear, ModelConfig

FORMATS = ("peft", "safetensors")


def load_final(folder: str | Path) -> dict:
    """The trained state of a finished run folder (``final.pt``); one line naming RUN when absent."""
    path = Path(folder) / FINAL
    if not path.is_file():
        why = ("a finished `sandbox full` run folder (this one has no final.pt: a run finished before final banks "
               "were kept, or not finished; rerun it into a new --out)")
        raise BadInput("RUN", str(folder), why)
    return load_torch(path, "RUN", "final.pt", "rerun the cell into a new --out", map_location="cpu", weights_only=False)


def run_folders(run: str | Path) -> list[Path]:
    """The seed folders of RUN: itself when it holds ``final.pt`` or ``metrics.json``, else its ``seed-*``."""
    run = Path(run)
    if not run.is_dir():
        raise BadInput("RUN", str(run), "a run folder of `sandbox full` (a seed folder or the parent of seed-*)")
    if (run / FINAL).exists() or (run / "metrics.json").exists():
        return [run]
    seeds = sorted(p for p in run.glob("seed-*") if p.is_dir())
    if not seeds:
        raise BadInput("RUN", str(run), "a run folder of `sandbox full` (a seed folder or the parent of seed-*)")
    return seeds


# ---------------------------------------------------------------------------------------------
# Tensors and configs of each format
# ---------------------------------------------------------------------------------------------


def model_config(final: dict) -> ModelConfig:
    return ModelConfig(**final["model"])


def peft_slot(final: dict, k: int) -> dict[str, Tensor]:
    """Slot k as a PEFT LoRA state dict: ``base_model.model.<module>.lora_A.weight = A_k (r, d_in)``,
    ``... lora_B.weight = B_k (d_out, r)``."""
    out = {}
    for name, (A, B) in final["banks"].items():
        out[f"base_model.model.{name}.lora_A.weight"] = A[k].contiguous()    # (r, d_in)
        out[f"base_model.model.{name}.lora_B.weight"] = B[k].contiguous()    # (d_out, r)
    return out


def peft_config(final: dict) -> dict:
    """``adapter_config.json`` of every slot (PEFT LoRA, no dropout, no bias, plain scaling)."""
    m = model_config(final)
    return {"peft_type": "LORA", "task_type": None, "base_model_name_or_path": None, "inference_mode": True,
            "r": m.rank, "lora_alpha": float(m.lora_alpha), "lora_dropout": 0.0, "bias": "none",
            "target_modules": sorted(final["banks"]), "fan_in_fan_out": False, "use_rslora": False,
            "use_dora": False, "init_lora_weights": True, "modules_to_save": None}


def bank_tensors(final: dict) -> dict[str, Tensor]:
    """The stacked bank: ``<module>.A (K, r, d_in)``, ``<module>.B (K, d_out, r)``."""
    out = {}
    for name, (A, B) in final["banks"].items():
        out[f"{name}.A"], out[f"{name}.B"] = A.contiguous(), B.contiguous()
    return out


def router_meta(final: dict) -> dict:
    return {"router_kind": final["router_kind"], "features": final["features"], "pooling": final["pooling"],
            "step": final["step"], "config": final["router_config"],
            "acar_score": None if final["acar_score"] is None else final["acar_score"].tolist(),
            "assignment": final["assignment"].tolist()}


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def _save(tensors: dict[str, Tensor], path: Path) -> None:
    from safetensors.torch import save

    atomic_write_bytes(path, save({k: v.contiguous() for k, v in tensors.items()}, metadata={"format": "pt"}))


def _json(obj: dict, path: Path) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def write_export(final: dict, out: str | Path, fmt: str = "peft", base: bool = True) -> list[Path]:
    """Write `final` (a `load_final` dict) in format `fmt` into folder `out`; returns the files."""
    try:
        import safetensors  # noqa: F401
    except ImportError:
        raise BadInput("--format", fmt, "a format whose library is installed (pip install 'molora-regimes[export]')") from None
    if fmt not in FORMATS:
        raise BadInput("--format", fmt, "one of " + ", ".join(FORMATS))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = []
    if fmt == "peft":
        cfg = peft_config(final)
        K = next(iter(final["banks"].values()))[0].shape[0]
        for k in range(K):
            d = out / f"slot-{k:02d}"
            d.mkdir(exist_ok=True)
            _save(peft_slot(final, k), d / "adapter_model.safetensors")
            _json(cfg, d / "adapter_config.json")
            files += [d / "adapter_model.safetensors", d / "adapter_config.json"]
    else:
        m = model_config(final)
        _save(bank_tensors(final), out / "bank.safetensors")
        _json({"slots": m.slots, "rank": m.rank, "lora_alpha": float(m.lora_alpha), "scale": m.lora_alpha / m.rank,
               "modules": sorted(final["banks"]), "update": "y = W x + sum_k g_k scale B_k A_k x"}, out / "bank.json")
        files += [out / "bank.safetensors", out / "bank.json"]
    _save(final["router"] or {"empty": torch.zeros(0)}, out / "router.safetensors")
    _json(router_meta(final), out / "router.json")
    files += [out / "router.safetensors", out / "router.json"]
    if base:
        _save(final["base"], out / "base.safetensors")
        _json(final["model"], out / "model.json")
        files += [out / "base.safetensors", out / "model.json"]
    return files


# ---------------------------------------------------------------------------------------------
# The equivalent module layout PEFT loads onto
# ---------------------------------------------------------------------------------------------


class PlainLinear(nn.Linear):
    """A bias-free ``nn.Linear`` standing where an `AdaptedLinear` was; it takes (and ignores) the
    gates argument the blocks pass, so PEFT's LoRA layer can wrap it and forward the call."""

    def forward(self, x: Tensor, gates: Tensor | None = None) -> Tensor:
        return super().forward(x)


def plain_model(cfg: ModelConfig, base: dict[str, Tensor]) -> GPT:
    """The base model with every adapted projection a `PlainLinear` (same names, same weights, no
    bank): the module layout an exported slot loads onto with ``PeftModel.from_pretrained``."""
    model = GPT(cfg, torch.Generator().manual_seed(0))
    for name, mod in list(model.named_modules()):
        for child, sub in list(mod.named_children()):
            if isinstance(sub, AdaptedLinear):
                d_out, d_in = sub.weight.shape
                setattr(mod, child, PlainLinear(d_in, d_out, bias=False))
    missing, unexpected = model.load_state_dict(base, strict=False)
    if missing or unexpected:
        raise BadInput("base", f"{len(missing)} missing, {len(unexpected)} unexpected", "the base of this model config")
    return model.eval()
