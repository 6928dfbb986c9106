"""`timm:<name>`: any registered timm model, freshly initialised (timm is an optional extra).

Never downloads: weights come from the user's own file, as for every other architecture. A timm name read
from a file is safe to build, since it only selects a model timm registered itself and imports no user code;
it is still checked to be a plain name first, so a file cannot smuggle anything else through it.
"""

from __future__ import annotations

import difflib
import re
from types import ModuleType

from torch import nn

from netslim.errors import NetslimError

PREFIX = "timm:"
DEFAULT_INPUT = (3, 224, 224)
_NAME = re.compile(r"[A-Za-z0-9_.]+")


def _timm() -> ModuleType:
    try:
        import timm
    except ImportError:
        raise NetslimError("timm models need timm: pip install 'netslim[timm]'") from None
    return timm


def _check_name(timm: ModuleType, name: str) -> None:
    """One NetslimError line for a name timm does not register (or a tag it has no config for)."""
    if not _NAME.fullmatch(name):
        raise NetslimError(f"{name!r} is not a timm model name (letters, digits, '_' and '.' only)")
    arch, _, tag = name.partition(".")
    if timm.is_model(arch) and (not tag or name in timm.list_pretrained(f"{arch}.*")):
        return
    close = difflib.get_close_matches(arch, timm.list_models(), n=5)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    part = arch.split("_")[0] or arch
    what = f"pretrained tag {tag!r} of timm model {arch!r}" if timm.is_model(arch) else f"timm model {name!r}"
    raise NetslimError(f"unknown {what}{hint}; timm.list_models('*{part}*') lists them")


def build_timm(name: str, num_classes: int, in_channels: int | None,
               image_size: tuple[int, int] | None = None) -> nn.Module:
    """timm.create_model(name, pretrained=False, ...); `image_size` goes in as img_size where the model takes
    one (ViTs fix their position embeddings to it), and is ignored by the models that need none (CNNs)."""
    timm = _timm()
    _check_name(timm, name)
    kwargs = {"pretrained": False, "num_classes": num_classes, "in_chans": 3 if in_channels is None else in_channels}
    if image_size is not None:
        try:
            return timm.create_model(name, img_size=tuple(image_size), **kwargs)
        except TypeError as exc:
            if "img_size" not in str(exc):
                raise
    return timm.create_model(name, **kwargs)


def default_input(model: nn.Module) -> tuple[int, int, int]:
    """The (C, H, W) input timm's config for the model names, else 224 px."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = cfg.get("input_size") if isinstance(cfg, dict) else None
    return tuple(size) if size and len(size) == 3 else DEFAULT_INPUT  # type: ignore[return-value]
