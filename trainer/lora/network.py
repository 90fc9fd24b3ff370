"""The network trained: its rank and alpha, and which layers of the denoiser carry it (kohya's presets).

  preset            layers (SD1/SD2/SDXL UNet, as kohya's networks/lora.py picks them)
  attention only    to_q / to_k / to_v / to_out of every attention layer
  kohya default     every Linear and 1x1 conv inside the transformer blocks (attention, feed-forward,
                    proj_in/proj_out): kohya's plain LoRA
  LoCon (+conv)     kohya default + the ResBlocks (both 3x3 convs, the 1x1 skip conv, the time-embedding
                    Linear) and the down/upsample convs: kohya's LoRA with ``conv_dim`` (LyCORIS "locon")

  preset            layers (SD3 / Flux.1 DiT, as kohya's networks/lora_sd3.py / lora_flux.py pick them)
  attention only    the attention's qkv and output projections: Flux double blocks' img_attn / txt_attn
                    .qkv and .proj, Flux single blocks' linear1 and linear2 (see below), SD3 joint blocks'
                    context_block / x_block attn(2) .qkv and .proj
  kohya default     every Linear inside the DiT blocks: attention, MLP and the modulation Linears (Flux
                    img_mod.lin, txt_mod.lin, modulation.lin; SD3 adaLN_modulation.1)
  LoCon (+conv)     the same as kohya default: DiT blocks hold no convolutions

The DiT blocks are Flux's DoubleStreamBlock and SingleStreamBlock and SD3's JointBlock; layers outside
them (img_in, txt_in, time/vector/guidance embedders, final layer) are not trained, as in kohya's
defaults. A Flux single block fuses the attention into its two Linears: ``linear1`` makes q, k, v and
the MLP input in one matrix, ``linear2`` projects the attention output and the MLP output back. kohya
trains them whole (its files have no sliced keys), so "attention only" trains both whole too: leaving
them out would leave most of Flux (38 of its 57 blocks) without an adapter.

As in kohya, ``conv_rank`` / ``conv_alpha`` apply to convolutions with a kernel larger than 1x1 only;
Linear and 1x1 layers use ``rank`` / ``alpha``. 0 means "the same as rank / alpha".
No ComfyUI in here: nodes/comfy_bridge.py walks the model and asks ``part_of`` for each layer.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from .network_types import LORA, NETWORK_TYPES

ATTENTION_ONLY, KOHYA_DEFAULT, LOCON = "attention only", "kohya default", "LoCon (+conv)"
PRESETS = (KOHYA_DEFAULT, ATTENTION_ONLY, LOCON)

# ComfyUI's CrossAttention: to_q, to_k, to_v and to_out = Sequential(Linear, Dropout).
_ATTENTION_PROJECTION = re.compile(r"(?:^|\.)attn\d+\.(?:to_q|to_k|to_v|to_out\.0)$")
# The DiT blocks of the flow-matching models (ComfyUI class names), and their attention Linears:
# Flux DoubleStreamBlock img_attn/txt_attn.{qkv,proj}, SingleStreamBlock linear1/linear2 (fused, see
# the module doc), SD3 JointBlock {context,x}_block.attn.{qkv,proj} (and SD3.5's x_block.attn2).
DIT_BLOCKS = ("DoubleStreamBlock", "SingleStreamBlock", "JointBlock")
_DIT_ATTENTION = re.compile(r"^(?:(?:img|txt)_attn\.(?:qkv|proj)|linear[12]"
                            r"|(?:context|x)_block\.attn2?\.(?:qkv|proj))$")


@dataclass(frozen=True)
class Network:
    """What is trained, in one object (as peft's LoraConfig is): rank and alpha, which layers (the preset),
    the larger convolutions' own rank and alpha, dropout, and the network type (network_types.py)."""
    rank: int = 16                # kohya network_dim
    alpha: float = 8.0            # kohya network_alpha; the LoRA is scaled by alpha / rank
    preset: str = KOHYA_DEFAULT
    dropout: float = 0.0          # peft lora_dropout (kohya's --network_dropout slot in the metadata)
    conv_rank: int = 0            # kohya conv_dim; 0 = rank
    conv_alpha: float = 0.0       # kohya conv_alpha; 0 = alpha
    network_type: str = LORA      # LoRA, DoRA, LoHa or LoKr (LyCORIS' algo)
    lokr_factor: int = -1         # LyCORIS' factor: LoKr's smaller Kronecker factor; -1 = as square as possible

    def __post_init__(self):
        if self.rank < 1 or self.alpha <= 0:
            raise ValueError(f"rank must be >= 1 and alpha > 0, got {self.rank} and {self.alpha}")
        if self.preset not in PRESETS:
            raise ValueError(f"network preset {self.preset!r} is not one of {', '.join(PRESETS)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"network dropout must be in [0, 1), got {self.dropout}")
        if self.conv_rank < 0 or self.conv_alpha < 0:
            raise ValueError(f"conv_rank and conv_alpha must be >= 0 (0 = same as rank/alpha), "
                             f"got {self.conv_rank} and {self.conv_alpha}")
        if self.network_type not in NETWORK_TYPES:
            raise ValueError(f"network type {self.network_type!r} is not one of {', '.join(NETWORK_TYPES)}")
        if self.dropout and self.network_type not in (LORA, "DoRA"):
            raise ValueError(f"network dropout is {self.dropout}, but {self.network_type} has no input dropout "
                             "(peft's LoHa and LoKr drop whole ranks or modules instead); set dropout to 0")
        if self.lokr_factor == 0 or self.lokr_factor < -1:
            raise ValueError(f"lokr_factor must be -1 (as square as possible) or a positive number, "
                             f"got {self.lokr_factor}")

    @property
    def trains_convs(self) -> bool:
        return self.preset == LOCON

    def part_of(self, block_kind: str, inner_path: str, layer_kind: str, kernel: tuple[int, ...] = ()) -> str | None:
        """'linear' or 'conv' (which rank/alpha applies) when this layer is a target, else None.

        ``block_kind``: the class name of the block holding the layer (UNet: SpatialTransformer,
        ResBlock, Downsample, Upsample; DiT: DoubleStreamBlock, SingleStreamBlock, JointBlock);
        ``inner_path``: the layer's path inside that block;
        ``layer_kind``: "Linear" or "Conv2d"; ``kernel``: a conv's kernel size.
        """
        pointwise = layer_kind == "Linear" or tuple(kernel) in ((1, 1), (1,))
        if block_kind == "SpatialTransformer":
            if not pointwise:
                return None
            if self.preset == ATTENTION_ONLY and not _ATTENTION_PROJECTION.search(inner_path):
                return None
            return "linear"
        if block_kind in DIT_BLOCKS:
            if layer_kind != "Linear":
                return None
            if self.preset == ATTENTION_ONLY and not _DIT_ATTENTION.search(inner_path):
                return None
            return "linear"
        if self.trains_convs and block_kind in ("ResBlock", "Downsample", "Upsample"):
            return "linear" if pointwise else "conv"
        return None

    def rank_alpha(self, part: str) -> tuple[int, float]:
        """The rank and alpha of a 'linear' or 'conv' part (see ``part_of``)."""
        if part == "conv":
            return (self.conv_rank or self.rank), (self.conv_alpha or self.alpha)
        return self.rank, self.alpha

    def adapter_arguments(self, layers: dict[str, tuple[str, str]]):
        """{path: (kohya name, part)} -> InjectedLora's targets, ranks and alphas (overrides for conv parts)."""
        targets = {path: name for path, (name, _) in layers.items()}
        ranks, alphas = {}, {}
        for path, (_, part) in layers.items():
            part_rank, part_alpha = self.rank_alpha(part)
            if (part_rank, part_alpha) != (self.rank, self.alpha):
                ranks[path], alphas[path] = part_rank, part_alpha
        return targets, ranks, alphas
