"""PCA design's analysis: the spectrum of every layer's response (and of residual block outputs).

Every spatial position of a conv response is a sample, so a few hundred images give hundreds of
thousands of samples per layer. The analysis depends only on the model and the number of calibration
images, so it is kept in the Context's AnalysisCache (keyed by that number) for every design drawn from it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from netslim.data import ImageSet, batches, calibration_subset
from netslim.errors import NetslimError
from netslim.methods.base import AnalysisCache, Context
from netslim.methods.common.spectral import eigenvalues, energy_width
from netslim.methods.common.stats import response_stats
from netslim.methods.pca.depth import DropUnit, block_units, structure, transformer_blocks
from netslim.probe import LayerStats, collect
from netslim.probe.points import ResponsePoint

DEFAULT_IMAGES = 512


@dataclass
class Spectrum:
    """Eigenvalues of one response covariance; `analysable` when there are more samples than channels."""

    name: str
    channels: int
    samples: int
    eigs: torch.Tensor

    @property
    def analysable(self) -> bool:
        return self.samples > self.channels

    def dims(self, tau: float, min_keep: int = 1) -> int:
        return energy_width(self.eigs, tau, min_keep) if self.analysable else self.channels


@dataclass
class PcaAnalysis:
    layers: dict[str, Spectrum]  # conv/linear responses, forward order
    blocks: dict[str, Spectrum]  # residual block outputs (residual nets only)
    kind: str  # "sequential" | "residual" | "width-only"
    why: str
    images: int


@dataclass
class Design:
    tau: float
    depth_tau: float
    widths: dict[str, int]  # group root -> kept width (before rounding)
    units: list[DropUnit]
    drop: list[str]


def _spectra(stats: dict[str, LayerStats], order: list[str]) -> dict[str, Spectrum]:
    return {n: Spectrum(n, stats[n].channels, stats[n].n, eigenvalues(stats[n].cov)) for n in order if n in stats}


def image_count(ctx: Context) -> int:
    """The `images` option: at most this many calibration images are analysed (spatial samples make that enough)."""
    images = int(ctx.option("images", DEFAULT_IMAGES))
    if images < 1:
        raise NetslimError(f"pca option images must be at least 1, not {images}")
    return images


def dropped(name: str, drop: list[str]) -> bool:
    """Whether layer `name` goes with a dropped unit (the unit itself or a layer inside a dropped block)."""
    return any(name == d or name.startswith(d + ".") for d in drop)


def spatial_stats(ctx: Context) -> tuple[dict[str, LayerStats], ImageSet]:
    """The probe's spatial statistics on at most `images` calibration images, and those images.

    With no more images than that, this is the shared `response_stats(ctx, "spatial")` pass; otherwise the
    pass runs on a subset and is cached under its own key, so other methods still see the full set."""
    images = image_count(ctx)
    if ctx.calib is None or len(ctx.calib.labels) == 0:
        raise NetslimError("pca needs calibration data, and none was given")
    if len(ctx.calib.labels) <= images:
        return response_stats(ctx, "spatial"), ctx.calib
    key = f"pca:stats:{images}"
    cache = ctx.cache
    if key not in cache.stats:
        subset = calibration_subset(ctx.calib, images)
        sub = dataclasses.replace(ctx, calib=subset, cache=AnalysisCache(groups=ctx.groups()))
        cache.stats[key] = response_stats(sub, "spatial")
        cache.passes.append(key)
        cache.derived[f"pca:calib:{images}"] = subset
    return cache.stats[key], cache.derived[f"pca:calib:{images}"]


def analyse(ctx: Context) -> PcaAnalysis:
    """One spatial-sample PCA pass over every prunable layer (and residual block outputs); cached."""
    key = f"pca:analysis:{image_count(ctx)}"
    if key in ctx.cache.derived:
        return ctx.cache.derived[key]
    from netslim.surgery.depth import call_order

    stats, calib = spatial_stats(ctx)
    order = call_order(ctx.model, ctx.example(), (torch.nn.Conv2d, torch.nn.Linear))
    kind, why = structure(ctx.model, ctx.groups())
    blocks: dict[str, Spectrum] = {}
    if kind == "residual":
        units = block_units(ctx.model, ctx.example())
        tokens = "linear" if transformer_blocks(ctx.model) else "conv"  # channels last, every token a sample
        points = {u.name: ResponsePoint(u.name, tokens, u.channels, None, None, u.name) for u in units}
        block_stats = collect(ctx.model, batches(calib, ctx.batch_size, device=ctx.device), layers=points,
                              reduce="spatial", device=ctx.device)
        blocks = _spectra(block_stats, [u.name for u in units])
    result = PcaAnalysis(_spectra(stats, order), blocks, kind, why, len(calib.labels))
    ctx.cache.derived[key] = result
    return result
