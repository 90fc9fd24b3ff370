"""LoRA adapters injected in place into a base model, removable without a trace, in kohya's key format.

The base model belongs to ComfyUI and is shared with every other node of the graph, so the contract is
strict: ``InjectedLora.remove()`` puts back the very module objects that were there, every parameter's
``requires_grad`` flag and every module's ``training`` flag, and the ``peft_config`` attribute peft sets
on the root. peft (``inject_adapter_in_model``) builds the adapter layers; this module owns the
bookkeeping around it, the initialisation and the kohya naming. The network types other than plain LoRA
(DoRA, LoHa, LoKr) and their keys are described in network_types.py.

Kohya format, per module name ``<name>`` (e.g. ``lora_unet_down_blocks_0_attentions_0_proj_in``):
``<name>.lora_down.weight`` = peft ``lora_A`` (r, in) or, for Conv2d, (r, in, kh, kw) with the base conv's
stride/padding; ``<name>.lora_up.weight`` = peft ``lora_B`` (out, r) or (out, r, 1, 1);
``<name>.alpha`` = scalar. The applied update is ``(alpha / r) * up @ down`` in both conventions.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

import torch
from torch import nn

from . import network_types as types
from .network_types import DORA, LORA

ADAPTER_NAME = "loralab"
SUPPORTED_TYPES = (nn.Linear, nn.Conv2d)
# Kohya names are flattened with "_"; A1111 splits keys at the first ".", so a dot would break them.
_KOHYA_NAME = re.compile(r"^[A-Za-z0-9_]+$")


@dataclass
class _Site:
    """Where one original module lives, so it can be put back whatever happened in between."""
    path: str
    kohya_name: str
    parent: nn.Module
    child_name: str
    original: nn.Module
    rank: int
    alpha: float


class InjectedLora:
    """peft LoRA adapters injected in place into ``root``, removable, with kohya-format import/export.

    ``targets`` maps module paths inside ``root`` (``"input_blocks.1.1.transformer_blocks.0.attn1.to_q"``)
    to kohya module names (``"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"``).
    Targets must be ``nn.Linear`` or ``nn.Conv2d`` (subclasses such as ComfyUI's ops are fine).
    ``ranks`` / ``alphas`` optionally override ``rank`` / ``alpha`` per target path. ``network_type`` is
    one of network_types.NETWORK_TYPES; ``lokr_factor`` is LoKr's factor (-1: as square as possible).

    Initialisation matches kohya: ``lora_down`` kaiming-uniform (a=sqrt(5)), ``lora_up`` zero (LoHa and LoKr:
    one factor zero, as peft has it), so the model's output is unchanged until the first optimizer step. Each
    module's init comes from its own generator seeded by ``(seed, kohya name)``: the same seed gives the same
    adapters on any device, adding a target does not change the others, and the global RNG is left alone.
    With ``seed=None`` one seed is drawn from the global torch RNG; it is kept in ``self.seed``.

    While injected, only the adapter parameters require grad. Use as a context manager, or call
    ``remove()`` in a ``finally``.
    """

    def __init__(self, root: nn.Module, targets: dict[str, str], rank: int, alpha: float,
                 dropout: float = 0.0, dtype: torch.dtype = torch.float32, seed: int | None = None,
                 ranks: dict[str, int] | None = None, alphas: dict[str, float] | None = None,
                 device: torch.device | str | None = None, network_type: str = LORA, lokr_factor: int = -1):
        self.root = root
        if network_type not in types.NETWORK_TYPES:
            raise ValueError(f"network type {network_type!r} is not one of {', '.join(types.NETWORK_TYPES)}")
        if dropout and network_type not in (LORA, DORA):
            raise ValueError(f"{network_type} has no input dropout in peft; dropout applies to LoRA and DoRA")
        self.network_type = network_type
        self.rank = int(rank)
        self.alpha = float(alpha)
        self.dtype = dtype
        self.seed = int(torch.randint(0, 2**62, ()).item()) if seed is None else int(seed)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
        self._removed = False
        self._hooks: list = []
        self._sites = _resolve_sites(root, targets, self.rank, self.alpha, ranks or {}, alphas or {})

        # Snapshot everything peft or training may touch, before touching anything.
        self._requires_grad = [(p, p.requires_grad) for p in root.parameters()]
        self._training = [(m, m.training) for m in root.modules()]
        self._had_peft_config = "peft_config" in vars(root)
        self._old_peft_config = vars(root).get("peft_config")

        try:
            # ComfyUI executes nodes under inference_mode; adapters created there could never be trained.
            # peft's layer constructors draw from the global RNG (then our init overwrites the values):
            # fork it so that injecting leaves the training loop's random stream where it was.
            with torch.inference_mode(False), torch.random.fork_rng(devices=[]):
                self._inject(dropout, lokr_factor)
                self._initialise(device)
        except BaseException:
            self.remove()
            raise

    # --- building ---------------------------------------------------------------------------------
    def _inject(self, dropout: float, lokr_factor: int) -> None:
        # One peft call per distinct (rank, alpha): peft's rank_pattern matches by suffix regex, which
        # differs between peft versions; exact target lists per call do not.
        groups: dict[tuple[int, float], list[str]] = {}
        for site in self._sites:
            groups.setdefault((site.rank, site.alpha), []).append(site.path)
        inject_adapter_in_model, BaseTunerLayer = _peft()
        for (rank, alpha), paths in groups.items():
            # peft stores its config on the root and, finding one there, would merge into it (with a
            # warning); we keep none on the root, so every call starts clean and remove() has less to undo.
            vars(self.root).pop("peft_config", None)
            config = types.peft_config(self.network_type, rank, alpha, dropout, paths, lokr_factor)
            inject_adapter_in_model(config, self.root, adapter_name=ADAPTER_NAME)
            vars(self.root).pop("peft_config", None)

        for site in self._sites:
            layer = site.parent._modules.get(site.child_name)
            if not isinstance(layer, BaseTunerLayer) or layer.get_base_layer() is not site.original:
                raise RuntimeError(f"peft did not wrap {site.path!r} as expected (found {type(layer).__name__})")
            if layer.r[ADAPTER_NAME] != site.rank or layer.scaling[ADAPTER_NAME] != site.alpha / site.rank:
                raise RuntimeError(f"peft built {site.path!r} with r={layer.r[ADAPTER_NAME]}, "
                                   f"scaling={layer.scaling[ADAPTER_NAME]}; expected r={site.rank}, "
                                   f"alpha={site.alpha}")
        ours = {id(site.parent._modules[site.child_name]) for site in self._sites}
        stray = [name for name, m in self.root.named_modules() if isinstance(m, BaseTunerLayer) and id(m) not in ours]
        if stray:
            raise RuntimeError(f"peft wrapped modules that were not targets: {stray[:5]}")
        self._hooks = [site.parent._modules[site.child_name].register_forward_pre_hook(_no_input_copy_under_autocast)
                       for site in self._sites]
        for site in self._sites:
            layer = site.parent._modules[site.child_name]
            if self.network_type == DORA:
                self._hooks.append(types.add_dora_magnitude(layer, site.original, ADAPTER_NAME))
            elif self.network_type != LORA:
                # peft's LoHa/LoKr layer draws a random number each forward while training (for its module
                # dropout, which is 0 here); in eval mode it draws none, so the run's random stream is ours.
                layer.training = False
            # The scale ComfyUI will apply the file with: alpha / rank, except for LoKr with two whole factors.
            layer.scaling[ADAPTER_NAME] = types.loader_scale(
                self.network_type, set(self._weights(site)), site.alpha, site.rank)

    def _initialise(self, device) -> None:
        for param, _ in self._requires_grad:
            if param.requires_grad:
                param.requires_grad_(False)
        for site in self._sites:
            weights = self._weights(site)
            target_device = device if device is not None else site.original.weight.device
            generator = torch.Generator().manual_seed(_module_seed(self.seed, site.kohya_name))
            for suffix, weight in weights.items():
                weight.data = weight.data.to(device=target_device, dtype=self.dtype)
                if suffix == types.DORA_SCALE:
                    pass                    # the base weight's own column norms (network_types.add_dora_magnitude)
                elif types.starts_at_zero(suffix, set(weights)):
                    weight.data.zero_()
                else:
                    # kaiming_uniform_(a=sqrt(5)) as kohya and peft use, drawn from a private generator in
                    # float32 on the CPU, so the same seed gives the same adapters on every device.
                    bound = types.kaiming_bound(weight.shape)
                    init = torch.empty(weight.shape, dtype=torch.float32).uniform_(-bound, bound, generator=generator)
                    weight.data.copy_(init)
                weight.requires_grad_(True)

    def _weights(self, site: _Site) -> dict[str, nn.Parameter]:
        """{file key suffix: trainable tensor} of one adapted layer (network_types.adapter_weights)."""
        return types.adapter_weights(self.network_type, site.parent._modules[site.child_name], ADAPTER_NAME)

    def _live_sites(self) -> list[_Site]:
        if self._removed:
            raise RuntimeError("this LoRA was removed from its model; its adapters are gone")
        return self._sites

    # --- training ---------------------------------------------------------------------------------
    def parameters(self) -> list[nn.Parameter]:
        """The trainable adapter weights, in target order: ``lora_down`` then ``lora_up`` of each target (DoRA:
        then its magnitude; LoHa and LoKr: their factors)."""
        return [weight for site in self._live_sites() for weight in self._weights(site).values()]

    def train(self, mode: bool = True) -> "InjectedLora":
        """Switch adapter dropout on or off without touching the base model's own train/eval flags."""
        if self.network_type in (LORA, DORA):
            for site in self._live_sites():
                site.parent._modules[site.child_name].lora_dropout.train(mode)
        return self

    # --- kohya format -----------------------------------------------------------------------------
    def kohya_state_dict(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Adapter weights under kohya keys: detached contiguous CPU copies, weights cast to ``dtype``.

        ``.alpha`` stays float32 whatever ``dtype`` is: loaders read it with ``.item()``, and fp16 would
        round values like 0.1.
        """
        tensors = {}
        for site in self._live_sites():
            for suffix, weight in self._weights(site).items():
                tensors[f"{site.kohya_name}.{suffix}"] = _cpu_copy(weight, dtype)
            tensors[f"{site.kohya_name}.alpha"] = torch.tensor(site.alpha, dtype=torch.float32)
        return tensors

    def _scale(self, site: _Site) -> float:
        """The scale this module's update is computed with (alpha / rank, but see network_types.loader_scale)."""
        return site.parent._modules[site.child_name].scaling[ADAPTER_NAME]

    def load_kohya_state_dict(self, state_dict: dict[str, torch.Tensor], strict: bool = True) -> None:
        """Load adapter weights saved in kohya format (for resuming). All checks run before anything is copied.

        A missing ``.alpha`` means alpha = rank (kohya's and ComfyUI's convention). When the file's scale
        differs from this adapter's, ``lora_up`` (LoHa, LoKr: their first factor) is rescaled by
        ``file_alpha / alpha`` so the model computes exactly the file's update; this adapter keeps its own
        alpha for further training and export. ``strict=False`` skips modules absent from the file and
        ignores keys for other modules; a module with only some of its tensors, or any shape mismatch, is an
        error either way.
        """
        self._apply_load(self._plan_load(state_dict, strict))

    def _plan_load(self, state_dict: dict[str, torch.Tensor], strict: bool) -> list:
        """Every check of ``load_kohya_state_dict``; raises ValueError, changes nothing."""
        sites = self._live_sites()
        known = set()
        missing, mismatched, plan = [], [], []
        for site in sites:
            weights = self._weights(site)
            keys = {f"{site.kohya_name}.{suffix}": weight for suffix, weight in weights.items()}
            alpha_key = f"{site.kohya_name}.alpha"
            known.update(keys, {alpha_key})
            present = [key in state_dict for key in keys]
            if not all(present):
                if any(present) or strict:
                    missing += [key for key, there in zip(keys, present) if not there]
                continue
            for key, weight in keys.items():
                got = tuple(state_dict[key].shape)
                if got != tuple(weight.shape):
                    mismatched.append(f"{key}: file {got}, adapter {tuple(weight.shape)}")
            if alpha_key in state_dict and state_dict[alpha_key].numel() != 1:
                mismatched.append(f"{alpha_key}: file {tuple(state_dict[alpha_key].shape)}, expected a scalar")
                continue
            file_alpha = float(state_dict[alpha_key].item()) if alpha_key in state_dict else float(site.rank)
            rescale = types.loader_scale(self.network_type, set(weights), file_alpha, site.rank) / self._scale(site)
            scaled = f"{site.kohya_name}.{types.scaled_weight(self.network_type, set(weights))}"
            plan += [(weight, state_dict[key], rescale if key == scaled else 1.0) for key, weight in keys.items()]
        unexpected = sorted(set(state_dict) - known) if strict else []
        problems = [f"{label}: {_listing(items)}" for label, items in
                    (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatch", mismatched))
                    if items]
        if problems:
            raise ValueError("cannot load LoRA weights; " + "; ".join(problems))
        return plan

    @staticmethod
    def _apply_load(plan: list) -> None:
        with torch.inference_mode(False), torch.no_grad():
            for weight, value, scale in plan:
                weight.copy_(value if scale == 1.0 else value.to(torch.float64) * scale)

    # --- removal ----------------------------------------------------------------------------------
    def remove(self) -> None:
        """Put the original modules back, restore requires_grad/training flags and peft's root attribute.

        Idempotent, and safe after a failed injection or from a ``finally`` block.
        """
        if self._removed:
            return
        self._removed = True
        for hook in self._hooks:
            hook.remove()
        for site in reversed(self._sites):
            if site.parent._modules.get(site.child_name) is not site.original:
                setattr(site.parent, site.child_name, site.original)
        for param, flag in self._requires_grad:
            if param.requires_grad != flag:
                param.requires_grad_(flag)
        for module, flag in self._training:
            module.training = flag
        if self._had_peft_config:
            self.root.peft_config = self._old_peft_config
        else:
            vars(self.root).pop("peft_config", None)
        # Drop our references so the adapter tensors can be freed (an optimizer may still hold them).
        self._requires_grad, self._training = [], []

    def __enter__(self) -> "InjectedLora":
        return self

    def __exit__(self, *exc_info) -> None:
        self.remove()


def _no_input_copy_under_autocast(layer: nn.Module, args: tuple) -> None:
    """Under autocast, peft's cast of an adapted layer's input to the adapter's dtype (fp32) only makes
    a copy: autocast casts it straight back for ``lora_A``, and autograd keeps that copy of the copy for
    ``lora_A``'s backward. Passing the input on as it is gives the same numbers, and layers that share an
    input keep one copy of it (q, k and v of one attention: one instead of three). Outside autocast
    (a half-precision text encoder, say) peft's cast is what makes the dtypes match, and stays."""
    if args and torch.is_tensor(args[0]):
        layer.cast_input_dtype_enabled = not _autocast_enabled(args[0].device.type)


def _autocast_enabled(device_type: str) -> bool:
    """Whether autocast is on for the device type (torch 2.4 and older alike; fp8_base.py asks too)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:                      # torch < 2.4: one flag per backend
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()


def _peft():
    """peft, imported on first use: with the transformers and accelerate code it pulls in it costs
    seconds and about 25 MB, which a ComfyUI that loads the pack but trains nothing should not pay."""
    from peft import inject_adapter_in_model
    from peft.tuners.tuners_utils import BaseTunerLayer
    return inject_adapter_in_model, BaseTunerLayer


def _resolve_sites(root: nn.Module, targets: dict[str, str], rank: int, alpha: float,
                   ranks: dict[str, int], alphas: dict[str, float]) -> list[_Site]:
    if not targets:
        raise ValueError("no LoRA targets given")
    stale = [name for name, m in root.named_modules() if isinstance(m, _peft()[1])]
    if stale:
        raise ValueError(f"the model already contains peft adapter layers ({_listing(stale)}); "
                         "remove the previous LoRA injection first")
    for label, overrides in (("ranks", ranks), ("alphas", alphas)):
        unknown = sorted(set(overrides) - set(targets))
        if unknown:
            raise ValueError(f"{label} overrides for paths that are not targets: {_listing(unknown)}")
    seen_names: dict[str, str] = {}
    sites = []
    for path, kohya_name in targets.items():
        if not path:
            raise ValueError("the root module itself cannot be a LoRA target")
        if not _KOHYA_NAME.match(kohya_name):
            raise ValueError(f"kohya module name {kohya_name!r} (for {path!r}) must be letters, digits and '_'")
        if kohya_name in seen_names:
            raise ValueError(f"{path!r} and {seen_names[kohya_name]!r} share the kohya name {kohya_name!r}")
        seen_names[kohya_name] = path
        try:
            module = root.get_submodule(path)
        except AttributeError:
            raise ValueError(f"LoRA target {path!r} does not exist in {type(root).__name__}") from None
        if not isinstance(module, SUPPORTED_TYPES):
            raise ValueError(f"LoRA target {path!r} is a {type(module).__name__}; only Linear and Conv2d "
                             "layers can carry a LoRA")
        if isinstance(module, nn.Conv2d) and (module.groups != 1 or module.dilation != (1, 1)
                                             or module.padding_mode != "zeros"):
            # kohya's lora_down is a plain conv with the base's kernel, stride and padding only.
            raise ValueError(f"LoRA target {path!r}: grouped, dilated or non-zero-padded convolutions "
                             "are not supported")
        site_rank = int(ranks.get(path, rank))
        site_alpha = float(alphas.get(path, alpha))
        if site_rank < 1 or site_alpha <= 0:
            raise ValueError(f"LoRA target {path!r}: rank must be >= 1 and alpha > 0 "
                             f"(got rank={site_rank}, alpha={site_alpha})")
        parent_path, _, child_name = path.rpartition(".")
        sites.append(_Site(path, kohya_name, root.get_submodule(parent_path), child_name, module,
                           site_rank, site_alpha))
    return sites


def _module_seed(seed: int, kohya_name: str) -> int:
    digest = hashlib.sha256(f"{seed}:{kohya_name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _cpu_copy(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return tensor.detach().to(device="cpu", dtype=dtype or tensor.dtype).clone(memory_format=torch.contiguous_format)


def _listing(items: list[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" … and {len(items) - limit} more" if len(items) > limit else "")


class LoraSet:
    """Several ``InjectedLora`` (UNet, text encoder) handled as one: one kohya state dict, one removal.

    Each part keeps its own model, targets and rank; kohya names are unique across parts (``lora_unet_``
    vs ``lora_te_``), so a key says which part it belongs to.
    """

    def __init__(self, parts: dict[str, InjectedLora]):
        self.parts = dict(parts)
        owners: dict[str, str] = {}
        for label, part in self.parts.items():
            for site in part._sites:
                if site.kohya_name in owners:
                    raise ValueError(f"{site.kohya_name!r} is in both {owners[site.kohya_name]} and {label}")
                owners[site.kohya_name] = label
        self._owner = owners

    def parameters(self) -> list[nn.Parameter]:
        return [p for part in self.parts.values() for p in part.parameters()]

    def parameters_by_part(self) -> dict[str, list[nn.Parameter]]:
        """{part label ("unet", "text_encoder"...): its trainable weights}: each part learns at its own rate."""
        return {label: part.parameters() for label, part in self.parts.items()}

    def train(self, mode: bool = True) -> "LoraSet":
        for part in self.parts.values():
            part.train(mode)
        return self

    def kohya_state_dict(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        tensors = {}
        for part in self.parts.values():
            tensors.update(part.kohya_state_dict(dtype))
        return tensors

    def load_kohya_state_dict(self, state_dict: dict[str, torch.Tensor], strict: bool = True) -> None:
        """Each part loads its own keys; with ``strict`` a key no part owns is an error. Checked first."""
        split: dict[str, dict] = {label: {} for label in self.parts}
        unexpected = []
        for key, value in state_dict.items():
            owner = self._owner.get(key.split(".", 1)[0])
            if owner is None:
                unexpected.append(key)
            else:
                split[owner][key] = value
        if strict and unexpected:
            raise ValueError(f"cannot load LoRA weights; unexpected keys: {_listing(sorted(unexpected))}")
        plans = [part._plan_load(split[label], strict) for label, part in self.parts.items()]
        for plan in plans:              # copied only once every part has accepted its keys
            InjectedLora._apply_load(plan)

    def remove(self) -> None:
        for part in reversed(list(self.parts.values())):
            part.remove()

    def __enter__(self) -> "LoraSet":
        return self

    def __exit__(self, *exc_info) -> None:
        self.remove()
