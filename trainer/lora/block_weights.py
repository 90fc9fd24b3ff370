"""Block weights: one LoRA's strength scaled per block of the model, in the vectors users already know
from Inspire Pack's and hako-mikan's "LoRA Block Weight" (``1,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0``, or a
preset name such as ``MIDD``).

A vector's length says its layout (its family's block names, in order after BASE):

  family  length  layout                                             whose
  SD1/2   17      BASE IN01 IN02 IN04 IN05 IN07 IN08 M OUT03-OUT11   LoRA (attention blocks), both tools
  SD1/2   26      BASE IN00-IN11 M OUT00-OUT11                       LyCORIS, hako-mikan
  SD1/2   27      BASE IN01-IN11 M00-M02 OUT00-OUT11                 LyCORIS, Inspire
  SDXL    12      BASE IN04 IN05 IN07 IN08 M OUT00-OUT05             LoRA, both tools
  SDXL    20      BASE IN00-IN08 M OUT00-OUT08                       LyCORIS, hako-mikan
  SDXL    21      BASE IN01-IN08 M00-M02 OUT00-OUT08                 LyCORIS, Inspire
  Flux    20      BASE D00-D18, single blocks take the last entry    Inspire's FLUX-DBL presets
  Flux    58      BASE D00-D18 S00-S37                               Inspire

(M alone is the whole middle block.) Each patch's position comes from the model weight it changes:
``input_blocks.4.…`` is IN04, ``middle_block.1.…`` M01, ``output_blocks.3.…`` OUT03, ``double_blocks.7.…``
D07, ``single_blocks.0.…`` S00; everything else -- the text encoder, time embedding, conv_in/out, Flux's
img_in and final layer -- is BASE. So a block the LoRA lacks is simply not used, and the rest keep their
entries. (Inspire instead hands the entries to the blocks the LoRA has, in order, so one missing block
shifts every later entry.) A block the layout does not name keeps the LoRA's plain strength (ratio 1);
:func:`unnamed_blocks` lists those a LoRA has, so the report can say so.

Nothing here imports ComfyUI: the node layer passes the patched weight keys in.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

BASE = "BASE"
MIDDLE = "M"                  # a layout entry covering every middle_block.K
RATIO_LIMIT = 10.0            # the pedals' strength limit: a ratio multiplies a strength
SD, SDXL, FLUX = "SD", "SDXL", "FLUX"
FAMILY_NAMES = {SD: "SD1.5/SD2", SDXL: "SDXL", FLUX: "Flux"}


class BlockWeightsError(ValueError):
    """A vector or preset that cannot be used; ``problem`` and ``fix`` are worded for the user."""

    def __init__(self, problem: str, fix: str):
        super().__init__(f"{problem} Fix: {fix}")
        self.problem = problem
        self.fix = fix


def _numbered(prefix: str, numbers) -> list[str]:
    return [f"{prefix}{n:02d}" for n in numbers]


@dataclass(frozen=True)
class Layout:
    family: str
    labels: tuple            # BASE first
    rest_from_last: bool = False     # blocks it does not name take its last entry (else ratio 1)

    def __len__(self) -> int:
        return len(self.labels)


LAYOUTS = (
    Layout(SD, (BASE, *_numbered("IN", (1, 2, 4, 5, 7, 8)), MIDDLE, *_numbered("OUT", range(3, 12)))),
    Layout(SD, (BASE, *_numbered("IN", range(12)), MIDDLE, *_numbered("OUT", range(12)))),
    Layout(SD, (BASE, *_numbered("IN", range(1, 12)), *_numbered("M", range(3)), *_numbered("OUT", range(12)))),
    Layout(SDXL, (BASE, *_numbered("IN", (4, 5, 7, 8)), MIDDLE, *_numbered("OUT", range(6)))),
    Layout(SDXL, (BASE, *_numbered("IN", range(9)), MIDDLE, *_numbered("OUT", range(9)))),
    Layout(SDXL, (BASE, *_numbered("IN", range(1, 9)), *_numbered("M", range(3)), *_numbered("OUT", range(9)))),
    Layout(FLUX, (BASE, *_numbered("D", range(19))), rest_from_last=True),
    Layout(FLUX, (BASE, *_numbered("D", range(19)), *_numbered("S", range(38)))),
)
LENGTHS = tuple(sorted({len(layout) for layout in LAYOUTS}))


def _ones(*spans) -> tuple:
    """A vector of 0s with 1 at the given (start, stop) index spans; index 0 is BASE."""
    length = spans[0]
    values = [0.0] * length
    for start, stop in spans[1:]:
        values[start:stop] = [1.0] * (stop - start)
    return tuple(values)


# Inspire's presets (resources/lbw-preset.txt), by family. Those with R/U/A/B placeholders (random and
# user-set values) are left out; ALL, NONE and ALL0.5 exist for every family (see preset_vector).
PRESETS = {
    SD: {
        "INS": (1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0),
        "IND": (1, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0),
        "INALL": (1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0),
        "MIDD": (1, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0),
        "MIDD0.2": (1, 0, 0, 0, 0, 0, 0.2, 0.4, 0.4, 0.2, 0, 0, 0, 0, 0, 0, 0),
        "MIDD0.8": (1, 0, 0, 0, 0, 0.5, 0.8, 0.8, 0.4, 0, 0, 0, 0, 0, 0, 0, 0),
        "MOUT": (1, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 0.5, 0, 0),
        "OUTD": (1, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0),
        "OUTS": (1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1),
        "OUTALL": (1, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1),
        "LyC-INALL": _ones(27, (0, 12)),
        "LyC-MIDALL": _ones(27, (0, 1), (12, 15)),
        "LyC-OUTALL": _ones(27, (0, 1), (15, 27)),
    },
    SDXL: {
        "INALL": _ones(12, (0, 5)),
        "MIDALL": _ones(12, (0, 1), (5, 6)),
        "OUTALL": _ones(12, (0, 1), (6, 12)),
        "LyC-INALL": _ones(21, (0, 9)),
        "LyC-MIDALL": _ones(21, (0, 1), (9, 12)),
        "LyC-OUTALL": _ones(21, (0, 1), (12, 21)),
    },
    FLUX: {
        "DBL-ALL": _ones(20, (0, 20)),
        "DBL-FRONT7": _ones(20, (0, 8)),
        "DBL-MID6": _ones(20, (0, 1), (8, 14)),
        "DBL-TAIL6": _ones(20, (0, 1), (14, 20)),
        "SINGLE-ALL": _ones(58, (0, 1), (20, 58)),
        "SINGLE-1to10": _ones(58, (0, 1), (20, 30)),
        "SINGLE-11to20": _ones(58, (0, 1), (30, 40)),
        "SINGLE-21to30": _ones(58, (0, 1), (40, 50)),
        "SINGLE-31to37": _ones(58, (0, 1), (50, 58)),
    },
}
# Every block at one value, any family (Inspire's SD-ALL, SDXL-LyC-NONE, ...), blocks no layout names too:
# NONE mutes the whole LoRA whichever layout its file has.
UNIFORM = {"ALL": 1.0, "NONE": 0.0, "ALL0.5": 0.5, "LyC-ALL": 1.0, "LyC-NONE": 0.0}
PREFIXES = {"SD": SD, "SDXL": SDXL, "FLUX": FLUX}


@dataclass(frozen=True)
class BlockWeights:
    """A parsed block-weight text: a preset name, or numbers (``values``) whose length picks the layout."""
    text: str                      # as the user wrote it, trimmed: what the report and the stack show
    preset: str = ""               # without its family prefix
    family: str = ""               # from the preset's prefix ("SDXL-MIDALL"), else the model decides
    values: tuple = ()

    def for_family(self, family: str) -> "Ratios":
        """The ratio of each block for a model of this family; a message when the text does not fit it."""
        if self.family and self.family != family:
            raise BlockWeightsError(
                f"the block weights '{self.text}' are a {FAMILY_NAMES[self.family]} preset, but the model is "
                f"{FAMILY_NAMES[family]}.", f"use the preset without its prefix ('{self.preset}') or one of "
                f"{FAMILY_NAMES[family]}'s: {', '.join(preset_names(family))}.")
        if self.preset in UNIFORM:
            return Ratios({}, UNIFORM[self.preset], rest_chosen=True)
        values = self.values or preset_vector(self.preset, family)
        layouts = [layout for layout in LAYOUTS if layout.family == family and len(layout) == len(values)]
        if not layouts:
            lengths = [str(len(layout)) for layout in LAYOUTS if layout.family == family]
            fitting = " or ".join(lengths) if len(lengths) < 3 else f"{', '.join(lengths[:-1])} or {lengths[-1]}"
            raise BlockWeightsError(
                f"the block weights have {len(values)} entries, which is no {FAMILY_NAMES[family]} layout "
                f"({fitting} entries), and the model is {FAMILY_NAMES[family]}.",
                f"write {fitting} numbers (BASE first), or a preset such as ALL or {list(PRESETS[family])[1]}.")
        layout = layouts[0]
        values = tuple(float(value) for value in values)
        if layout.rest_from_last:
            return Ratios(dict(zip(layout.labels, values)), values[-1], rest_chosen=True)
        return Ratios(dict(zip(layout.labels, values)), 1.0, rest_chosen=False)


@dataclass(frozen=True)
class Ratios:
    by_block: dict          # layout label (BASE, IN04, M, M01, D07, ...) -> ratio
    rest: float             # the ratio of blocks the layout does not name
    rest_chosen: bool       # the text chose it (a uniform preset, Flux's 20) rather than the default 1

    def of_key(self, key) -> float:
        """The ratio for one patched weight (a ComfyUI model or CLIP key, or its (key, offset) tuple)."""
        return self.of_block(position(key))

    def of_block(self, label: str) -> float:
        if label in self.by_block:
            return self.by_block[label]
        if label.startswith("M") and MIDDLE in self.by_block:
            return self.by_block[MIDDLE]
        return self.rest

    def names_block(self, label: str) -> bool:
        return self.rest_chosen or label in self.by_block or (label.startswith("M") and MIDDLE in self.by_block)


_POSITIONS = (("input_blocks", "IN"), ("middle_block", "M"), ("output_blocks", "OUT"),
              ("double_blocks", "D"), ("single_blocks", "S"))
_POSITION_RE = re.compile(r"\.(" + "|".join(name for name, _ in _POSITIONS) + r")\.(\d+)\.")


def position(key) -> str:
    """The block a patched weight lies in (``IN04``, ``M01``, ``OUT03``, ``D07``, ``S00``), else BASE.

    Only diffusion-model weights have blocks: a text encoder's ``encoder.layers.3`` is BASE."""
    name = key if isinstance(key, str) else key[0]
    match = _POSITION_RE.match(name[len("diffusion_model"):]) if name.startswith("diffusion_model.") else None
    if not match:
        return BASE
    return f"{dict(_POSITIONS)[match.group(1)]}{int(match.group(2)):02d}"


def unnamed_blocks(keys, ratios: Ratios) -> list[str]:
    """The blocks these patched weights lie in that the layout does not name (they keep ratio 1)."""
    labels = {position(key) for key in keys} - {BASE}
    return sorted((label for label in labels if not ratios.names_block(label)), key=_block_order)


def _block_order(label: str):
    kind = label.rstrip("0123456789")
    return ("IN", "M", "OUT", "D", "S").index(kind), int(label[len(kind):])


def preset_names(family: str) -> list[str]:
    uniform = [name for name in UNIFORM if family != FLUX or not name.startswith("LyC-")]
    return [*uniform, *PRESETS[family]]


def preset_vector(name: str, family: str) -> tuple:
    """One of Inspire's vectors for this family (the uniform presets need none: see for_family)."""
    if name in PRESETS[family]:
        return PRESETS[family][name]
    owners = " and ".join(FAMILY_NAMES[other] for other in PRESETS if name in PRESETS[other]) or "no family"
    raise BlockWeightsError(
        f"the block-weight preset '{name}' is {owners}'s, and the model is {FAMILY_NAMES[family]}.",
        f"use one of {FAMILY_NAMES[family]}'s presets ({', '.join(preset_names(family))}) or write the numbers.")


def parse(text) -> BlockWeights | None:
    """The block weights a pedal or a row holds: None for empty (the plain LoRA), else its preset or
    numbers, checked as far as they can be without the model (its family picks the layout later).

    Accepts ``MIDD``, ``SD-MIDD``, ``1,0,0,...`` (commas, semicolons or spaces) and a line copied from
    Inspire's preset file, ``SD-MIDD:1,0,0,...`` (the label is ignored)."""
    if text is None:
        return None
    if not isinstance(text, str):
        raise BlockWeightsError(f"the block weights are a {type(text).__name__}, not text.",
                                "write a preset name such as MIDD, or numbers such as 1,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0.")
    cleaned = text.strip()
    if not cleaned:
        return None
    body = cleaned.split(":", 1)[1] if ":" in cleaned else cleaned
    parts = [part for part in re.split(r"[,;\s]+", body.strip()) if part]
    if len(parts) == 1 and ":" not in cleaned and not _is_number(parts[0]):
        return _preset(cleaned)
    values = []
    for part in parts:
        if not _is_number(part):
            raise BlockWeightsError(f"'{part}' in the block weights '{_short(cleaned)}' is not a number "
                                    "(random and A/B placeholders are not supported).",
                                    "write numbers separated by commas, or a preset name such as MIDD.")
        value = float(part)
        if abs(value) > RATIO_LIMIT:
            raise BlockWeightsError(f"the block weight {part} is outside -{RATIO_LIMIT:g}..{RATIO_LIMIT:g}.",
                                    "use values such as 0, 0.5 and 1 (1 keeps the block as trained).")
        values.append(value)
    if len(values) not in LENGTHS:
        raise BlockWeightsError(
            f"the block weights '{_short(cleaned)}' have {len(values)} entries; a layout has "
            f"{', '.join(map(str, LENGTHS))} (SD1.5 17/26/27, SDXL 12/20/21, Flux 20/58, BASE first).",
            "write one number per block of your model's layout, or a preset name such as ALL or MIDD.")
    return BlockWeights(cleaned, values=tuple(values))


def _preset(text: str) -> BlockWeights:
    name, family = text, ""
    head, _, tail = text.partition("-")
    if tail and head.upper() in PREFIXES:
        name, family = tail, PREFIXES[head.upper()]
    known = {key.casefold(): key for fam in PRESETS for key in preset_names(fam)}
    canonical = known.get(name.casefold())
    if canonical is None or (family and canonical not in preset_names(family)):
        raise BlockWeightsError(
            f"'{text}' is not a block-weight preset.",
            f"use one of {', '.join(dict.fromkeys(k for fam in PRESETS for k in preset_names(fam)))} (with or "
            "without SD-, SDXL- or FLUX-), or write the numbers.")
    return BlockWeights(text, preset=canonical, family=family)


def _is_number(part: str) -> bool:
    try:
        return math.isfinite(float(part))
    except ValueError:
        return False


def _short(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"
