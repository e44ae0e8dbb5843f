"""The attributes a latent direction can be fitted for (``voxgen fit-direction --attribute``): their
windows in physical units.  Free of torch, so the command line's help lists them without loading it;
``model.latent.directions`` measures them."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class AttributeSpec:
    """``kind="volume_ml"``: volume in mL of the voxels with ``lo <= v < hi`` (physical units);
    ``kind="mean"``: mean physical value over the whole volume.  ``modality`` is "ct", "mri" or
    "any"."""

    name: str
    modality: str
    lo: float
    hi: float
    description: str
    kind: str = "volume_ml"


# Windows are in the model's physical units.  CT: Hounsfield units (the model's window is
# -1024..600 HU, so "> 300 HU" is 300..600 after clipping).  MRI: the model's [0, 1] arbitrary-unit
# scale, where 1 is the training data's 99.9th percentile; the T1 classes below are intensity
# classes, not a segmentation (scalp fat is as bright as white matter on T1; background noise under
# 0.05 is not counted).
ATTRIBUTES: dict[str, AttributeSpec] = {
    a.name: a
    for a in [
        AttributeSpec("bone_volume_ml", "ct", 300.0, math.inf, "CT volume of voxels above 300 HU (bone), mL"),
        AttributeSpec("lung_volume_ml", "ct", -950.0, -500.0, "CT volume of voxels in -950..-500 HU (lung), mL"),
        AttributeSpec("soft_tissue_ml", "ct", -100.0, 100.0, "CT volume of voxels in -100..100 HU (soft tissue), mL"),
        AttributeSpec("bright_tissue_ml", "mri", 0.6, math.inf, "MRI volume above 0.6 (T1 white-matter-like), mL"),
        AttributeSpec("mid_tissue_ml", "mri", 0.3, 0.6, "MRI volume in 0.3..0.6 (T1 grey-matter-like), mL"),
        AttributeSpec("dark_tissue_ml", "mri", 0.05, 0.3, "MRI volume in 0.05..0.3 (T1 CSF-like), mL"),
        AttributeSpec("brain_tissue_ml", "mri", 0.3, math.inf, "MRI volume above 0.3 (T1 grey + white-like), mL"),
        AttributeSpec(
            "mean_intensity", "any", -math.inf, math.inf, "mean over the volume, physical units", kind="mean"
        ),
    ]
}
