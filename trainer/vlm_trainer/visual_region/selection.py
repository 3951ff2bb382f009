"""Which LLM layers a pruning removes (arXiv 2412.12785), as pure functions of the
measured block influence (`visual_region.influence`) and the visual region R:

1. candidates = every layer NOT in R (layers in R are never removed);
2. candidates are ranked by their BI on IMAGE-token positions, ascending (``criterion``
   ``image``, the default; ``text`` or ``all`` rank by those positions instead); when the
   calibration data has no image positions the image BI is undefined and ``all`` is used;
   ties are broken by the ``all`` BI, then by the higher layer index first;
3. the first K candidates are removed. K comes from ``remove`` or ``keep_fraction``
   (keep round(F x depth) layers); K must not exceed the candidates (depth - |R|).
"""

from __future__ import annotations

import logging
import math
from typing import Iterable, Sequence

from .influence import LayerInfluence

log = logging.getLogger(__name__)

CRITERIA = ("image", "text", "all")


def layers_to_remove_count(depth: int, *, remove: int | None = None, keep_fraction: float | None = None) -> int:
    if (remove is None) == (keep_fraction is None):
        raise ValueError("give exactly one of remove or keep_fraction")
    if remove is not None:
        k = int(remove)
    else:
        if not 0 < keep_fraction <= 1:
            raise ValueError(f"keep fraction must be in (0, 1], got {keep_fraction}")
        k = depth - max(1, math.floor(keep_fraction * depth + 0.5))
    if k < 0 or k >= depth:
        raise ValueError(f"cannot remove {k} of {depth} layers")
    return k


def choose_layers(influence: Sequence[LayerInfluence], k: int, visual_region: Iterable[int], *,
                  criterion: str = "image") -> list[int]:
    """The ``k`` layers to remove (sorted), per the module doc's criterion."""
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}")
    region = set(visual_region)
    candidates = [layer for layer in influence if layer.layer not in region]
    if k > len(candidates):
        raise ValueError(f"cannot remove {k} layers: only {len(candidates)} of {len(influence)} lie outside the "
                         f"visual region {sorted(region)}")
    if criterion == "image" and all(math.isnan(layer.image) for layer in candidates):
        log.warning("no image positions in the calibration data: ranking by the all-positions influence")
        criterion = "all"

    def key(layer: LayerInfluence):
        v = layer.get(criterion)
        return (math.inf if math.isnan(v) else v, layer.all if not math.isnan(layer.all) else math.inf, -layer.layer)

    return sorted(layer.layer for layer in sorted(candidates, key=key)[:k])


def remap_indices(indices: Iterable[int], removed: Iterable[int]) -> list[int]:
    """Old -> new index of kept layers: ``o - |{r in removed: r < o}|`` (removed ones dropped)."""
    removed = sorted(set(removed))
    out = []
    for o in indices:
        if o in removed:
            continue
        out.append(o - sum(1 for r in removed if r < o))
    return out

