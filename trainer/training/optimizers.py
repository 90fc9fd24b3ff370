"""Optimizers by kohya's names, with separate learning rates for UNet and text-encoder adapters.

``AdamW`` and ``Adafactor`` always work (torch; transformers is a requirement of the pack).
``AdamW8bit`` (bitsandbytes) and ``Prodigy`` (prodigyopt) are optional packages: when one cannot be
imported, ``make_optimizer`` raises ``OptimizerUnavailable`` saying exactly what to install, and
``unavailable_reason`` lets a node say so at queue time instead.

Learning rates are per param group. ``param_groups`` builds the usual two (UNet, text encoders);
the LR schedule then multiplies each group's own rate by the same factor.
Prodigy estimates its own step size: its learning rate is a multiplier and should be about 1.0
(``lr_advice`` says so when it is not).
"""
from __future__ import annotations

import ast
import importlib
import re
from typing import Any, Iterable

import torch

OPTIMIZERS = ("AdamW", "AdamW8bit", "Adafactor", "Prodigy")

# name -> (module to import, pip package, what it is)
_OPTIONAL = {
    "AdamW8bit": ("bitsandbytes", "bitsandbytes", "8-bit AdamW"),
    "Prodigy": ("prodigyopt", "prodigyopt", "the Prodigy optimizer"),
    "Adafactor": ("transformers.optimization", "transformers", "Adafactor"),
}


class OptimizerUnavailable(RuntimeError):
    """The optimizer's package is missing or does not import; ``package`` is what to pip install."""

    def __init__(self, name: str, package: str, detail: str):
        self.name, self.package, self.detail = name, package, detail
        super().__init__(
            f"the {name} optimizer needs the '{package}' package, which {detail}. Install it into the Python "
            f"that runs ComfyUI: `python -m pip install {package}` (portable Windows build: "
            f"`python_embeded\\python.exe -m pip install {package}`), then restart ComfyUI — or choose AdamW.")


def unavailable_reason(name: str) -> str | None:
    """None when ``name`` can be built here; otherwise the message ``make_optimizer`` would raise."""
    _check_name(name)
    try:
        _import_for(name)
    except OptimizerUnavailable as missing:
        return str(missing)
    return None


def param_groups(unet: Iterable[torch.nn.Parameter], unet_lr: float,
                 text_encoder: Iterable[torch.nn.Parameter] = (), text_encoder_lr: float | None = None,
                 text_encoder_2: Iterable[torch.nn.Parameter] = (), text_encoder_2_lr: float | None = None
                 ) -> list[dict[str, Any]]:
    """Groups named "unet", "text_encoder" and "text_encoder_2" (SDXL's second encoder), each only if
    it has trainable parameters.

    ``text_encoder_lr=None`` means "same as the UNet"; ``text_encoder_2_lr=None`` "same as the first
    text encoder". More groups can be built by hand in the same shape ({"params", "lr", "name"}).
    """
    text_encoder_lr = float(unet_lr if text_encoder_lr is None else text_encoder_lr)
    groups = [{"name": "unet", "params": list(unet), "lr": float(unet_lr)},
              {"name": "text_encoder", "params": list(text_encoder), "lr": text_encoder_lr},
              {"name": "text_encoder_2", "params": list(text_encoder_2),
               "lr": float(text_encoder_lr if text_encoder_2_lr is None else text_encoder_2_lr)}]
    return _normalise(groups, unet_lr)


def trainable_parameters(groups: Iterable[dict[str, Any]]) -> list[torch.nn.Parameter]:
    """All parameters of the groups, in order (for gradient clipping)."""
    return [p for group in groups for p in group["params"]]


def make_optimizer(name: str, params_groups, lr: float, weight_decay: float = 1e-2,
                   **extra) -> torch.optim.Optimizer:
    """Build optimizer ``name`` over ``params_groups``.

    ``params_groups``: parameters, or param-group dicts ({"params": [...], "lr": ..., other keys kept});
    parameters that do not require grad are dropped, empty groups too; a group without "lr" gets ``lr``.
    ``extra``: optimizer keyword arguments passed through (kohya's ``optimizer_args``), e.g.
    ``d_coef=2`` for Prodigy or ``beta1=0.9`` for Adafactor; they override the defaults below.

    Defaults: AdamW is torch's. Adafactor uses a fixed learning rate driven by our schedule —
    ``relative_step=False, scale_parameter=False, warmup_init=False``, what kohya recommends for LoRA.
    Prodigy keeps prodigyopt's defaults (decoupled weight decay, bias correction off).
    """
    _check_name(name)
    groups = _normalise(params_groups, lr)
    if name == "AdamW":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, **extra)
    module = _import_for(name)
    if name == "Adafactor":
        if not hasattr(module, "Adafactor"):
            raise OptimizerUnavailable(name, "transformers", "is installed in a version without Adafactor")
        options = {**_ADAFACTOR_DEFAULTS, **extra}
        return module.Adafactor(groups, lr=lr, weight_decay=weight_decay, **options)
    if name == "AdamW8bit":
        return module.optim.AdamW8bit(groups, lr=lr, weight_decay=weight_decay, **extra)
    return module.Prodigy(groups, lr=lr, weight_decay=weight_decay, **extra)  # Prodigy


def lr_advice(name: str, lr: float) -> str | None:
    """A warning worth logging for an unusual learning rate for this optimizer, else None."""
    if name == "Prodigy" and not 0.1 <= lr <= 10:
        return (f"Prodigy finds its own step size; its learning rate is a multiplier, usually 1.0 "
                f"(got {lr:g}). Training will barely move at small values.")
    if name != "Prodigy" and lr >= 0.1:
        return f"learning rate {lr:g} is very high for {name}; LoRAs usually train at 1e-4 to 1e-3."
    return None


def parse_optimizer_args(text: str) -> dict[str, Any]:
    """kohya-style ``optimizer_args``: "d_coef=2 decouple=True betas=(0.9,0.99)" -> keyword arguments.

    Pairs are separated by spaces, commas or new lines (commas inside brackets are kept); values are
    Python literals, anything else stays a string. Raises ValueError naming a malformed pair.
    ``weight_decay`` may be among them; pass them as ``make_optimizer(name, groups, lr,
    **{"weight_decay": default, **args})`` so they override the default.
    """
    args: dict[str, Any] = {}
    for pair in _split_pairs(text or ""):
        key, sep, raw = pair.partition("=")
        key, raw = key.strip(), raw.strip()
        if not sep or not key.isidentifier() or not raw:
            raise ValueError(f"optimizer argument {pair!r} is not key=value (e.g. weight_decay=0.01)")
        if key in ("lr", "params"):
            raise ValueError(f"optimizer argument {key!r} cannot be set here; use the learning rate inputs")
        try:
            args[key] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            args[key] = {"true": True, "false": False}.get(raw.lower(), raw)
    return args


# The class each name builds, as kohya's ss_optimizer names it (module.Class), without importing it.
OPTIMIZER_CLASSES = {"AdamW": "torch.optim.adamw.AdamW", "AdamW8bit": "bitsandbytes.optim.adamw.AdamW8bit",
                     "Adafactor": "transformers.optimization.Adafactor", "Prodigy": "prodigyopt.prodigy.Prodigy"}
_ADAFACTOR_DEFAULTS = dict(relative_step=False, scale_parameter=False, warmup_init=False)


def optimizer_description(name: str, weight_decay: float, args: dict[str, Any]) -> str:
    """kohya's ss_optimizer: "torch.optim.adamw.AdamW(weight_decay=0.01,betas=(0.9, 0.99))" — the class,
    then the keyword arguments it was built with (learning rates aside), as make_optimizer passes them."""
    keywords = {"weight_decay": weight_decay, **(_ADAFACTOR_DEFAULTS if name == "Adafactor" else {}), **args}
    listed = ",".join(f"{key}={value}" for key, value in keywords.items())
    return OPTIMIZER_CLASSES.get(name, name) + (f"({listed})" if listed else "")


# --- helpers --------------------------------------------------------------------------------------
def _check_name(name: str) -> None:
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")


def _import_for(name: str):
    if name not in _OPTIONAL:
        return None
    module_name, package, what = _OPTIONAL[name]
    try:
        return importlib.import_module(module_name)
    except ImportError as error:
        if getattr(error, "name", None) and not module_name.startswith(error.name.split(".")[0]):
            raise OptimizerUnavailable(name, error.name.split(".")[0],
                                       f"{module_name.split('.')[0]} imports but is not installed") from error
        raise OptimizerUnavailable(name, package, "is not installed") from error
    except Exception as error:  # e.g. bitsandbytes failing to find its CUDA library at import time
        raise OptimizerUnavailable(
            name, package, f"is installed but failed to load ({type(error).__name__}: {error}); "
            "reinstalling a version that matches your torch and CUDA usually fixes it") from error


def _normalise(params_groups, default_lr: float) -> list[dict[str, Any]]:
    items = list(params_groups)
    if items and not isinstance(items[0], dict):
        items = [{"params": items}]
    groups = []
    for group in items:
        group = dict(group)
        params = group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        group["params"] = [p for p in params if p.requires_grad]
        group.setdefault("lr", float(default_lr))
        if group["params"]:
            groups.append(group)
    if not groups:
        raise ValueError("there are no trainable parameters for the optimizer")
    return groups


def _split_pairs(text: str) -> list[str]:
    pairs, current, depth = [], "", 0
    for char in text:
        depth += char in "([{"
        depth -= char in ")]}"
        if depth == 0 and (char in ",\n" or char.isspace()) and "=" in current and _value_started(current):
            pairs.append(current)
            current = ""
            continue
        current += char
    if current.strip():
        pairs.append(current)
    return [p.strip() for p in pairs if p.strip()]


def _value_started(current: str) -> bool:
    return bool(re.search(r"=\s*\S", current))
