"""The de-identification gate for slide metadata: only pixel and resolution facts cross it.

Whole-slide files carry identifying metadata (Aperio's ``ScanScope ID``, ``Filename``, ``Date``,
``User``; barcodes; DICOM patient attributes) and label/macro images photographed with the slide's
label. None of it may reach a dataset, log, MLflow run or prediction. The gate is built so that it
cannot leak by accident: :func:`pixel_facts` is computed from :class:`SlideGeometry` alone (numbers and
fixed strings this package writes), never from the metadata, and :func:`metadata_audit` lists what
was dropped by name only. Associated images are listed by name from the reader's index; their pixels
are never read or copied.
"""

from __future__ import annotations

import re

# Associated-image names that are standard vocabulary (OpenSlide, tifffile's SVS/OME series names).
# Any other name (an OME Image Name, say, which is free text) is reported as a generic placeholder.
STANDARD_IMAGE_NAMES = {"label", "macro", "thumbnail", "overview", "baseline"}
# A metadata key name is listed as is only when it looks like a key; anything else (free text that a
# vendor parser turned into a key) is counted, not shown.
KEY_PATTERN = re.compile(r"^[A-Za-z][A-Za-z0-9_.\-\[\] ]{0,63}$")


def pixel_facts(slide) -> dict[str, str]:
    """The slide facts allowed through the gate: size, pyramid, resolution and its source, bounds, reader."""
    g = slide.geometry
    area = {"bounds_width": str(g.bounds_width), "bounds_height": str(g.bounds_height)} if g.bounds_width else {}
    return area | {
        "width": str(g.width),
        "height": str(g.height),
        "mpp_x": f"{g.mpp_x:.6g}",
        "mpp_y": f"{g.mpp_y:.6g}",
        "mpp_source": g.mpp_source,
        "levels": ";".join(f"{w}x{h}@{d:.6g}" for w, h, d in g.levels),
        "bounds_x": str(g.bounds_x),
        "bounds_y": str(g.bounds_y),
        "reader": g.format,
    }


def metadata_audit(slide) -> dict:
    """What the gate dropped, by name only: metadata keys and associated images (no values, no pixels)."""
    keys = slide.metadata_keys()
    listed = sorted(k for k in keys if KEY_PATTERN.match(k))
    images = []
    for index, name in enumerate(slide.associated_image_names()):
        images.append(name if name.lower() in STANDARD_IMAGE_NAMES else f"associated image {index + 1}")
    return {
        "kept": sorted(pixel_facts(slide)),
        "dropped_metadata_keys": listed,
        "dropped_metadata_keys_unnamed": len(keys) - len(listed),
        "dropped_associated_images": images,
        "note": "metadata values and associated images (label, macro...) are never read into any output",
    }
