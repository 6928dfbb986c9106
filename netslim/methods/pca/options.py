"""PCA design's options (`--opt key=value`): the variance kept (width), the depth rule, the images analysed."""

from __future__ import annotations

from dataclasses import dataclass, field

from netslim.errors import NetslimError
from netslim.methods.base import MethodOptions
from netslim.methods.pca.depth import RULES, SATURATED, SCOPES


@dataclass
class PCAOptions(MethodOptions):
    """Width from `variance`, depth from `depth_variance` and the depth rule (netslim.methods.pca.depth)."""

    variance: float = field(default=0.999, metadata={"help": "fraction of each layer's response variance its "
                                                             "significant dimensions hold, in (0, 1]"})
    depth_variance: float | None = field(default=None, metadata={"help": "variance at which depth is decided, in "
                                                                         "(0, 1] (default: variance)"})
    images: int = field(default=512, metadata={"help": "calibration images analysed (every spatial position "
                                                       "is a sample)"})
    min_keep: int = field(default=1, metadata={"help": "channels every layer keeps at least"})
    depth_rule: str = field(default="grow", metadata={"help": f"depth rule: {' | '.join(RULES)} (none: width only)"})
    depth_threshold: float = field(default=0.0, metadata={"help": "a unit is dropped unless its dimensions exceed "
                                                                  "(1 + this) x the largest kept before it, >= 0"})
    depth_scope: str = field(default="stage", metadata={"help": f"where the rule compares: {' | '.join(SCOPES)}"})
    saturated: str = field(default="keep", metadata={"help": "units whose dimensions equal their width: "
                                                             f"{' | '.join(SATURATED)}"})
    heads: bool = field(default=True, metadata={"help": "also keep whole heads of each attention (ViT): "
                                                        "ceil(significant dims / head_dim) of the head outputs"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.variance <= 1:
            raise NetslimError(f"option variance must be in (0, 1], not {self.variance}")
        if self.depth_variance is not None and not 0 < self.depth_variance <= 1:
            raise NetslimError(f"pca option depth_variance must be in (0, 1], not {self.depth_variance}")
        if self.images < 1:
            raise NetslimError(f"pca option images must be at least 1, not {self.images}")
        for name, allowed in (("depth_rule", RULES), ("depth_scope", SCOPES), ("saturated", SATURATED)):
            if getattr(self, name) not in allowed:
                raise NetslimError(f"pca option {name} must be one of {', '.join(allowed)}, "
                                   f"not {getattr(self, name)!r}")
        if self.depth_threshold < 0:
            raise NetslimError("pca option depth_threshold must be >= 0")
