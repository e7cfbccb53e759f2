"""Tiny real-format examples: a 48 x 48 px, 120-band ENVI cube with one injected plume, and its mask."""

from __future__ import annotations

from pathlib import Path

from domains.hyperspectral.synthesis import (
    COARSE_VSWIR,
    Plume,
    make_scene,
    plume_labels,
    write_capture,
    write_mask,
)

EXAMPLE_SHAPE = (48, 48)


def write_example(directory: Path, seed: int = 0, interleave: str = "bil") -> dict[str, Path]:
    """Write a tiny synthetic capture (ENVI, ``interleave`` BSQ/BIL/BIP) with one strong plume, and its mask.

    The cube has 120 bands over 381-2493 nm (PRISMA/EnMAP-class sampling, water bands flagged in ``bbl``),
    float32 radiance, a data ignore value and a UTM ``map info``; about 1.1 MB.

    Returns:
        ``{"source": <cube>.hdr, "data": <cube>.<interleave>, "labels": plume_mask.tif}``.
    """
    directory = Path(directory)
    plume = Plume(row=20.0, col=14.0, angle_deg=-20.0 + 10 * (seed % 3), length_px=14.0, peak_ppmm=5000.0,
                  shape="gaussian", seed=seed + 11)
    scene = make_scene(COARSE_VSWIR, EXAMPLE_SHAPE, [plume], seed=seed)
    data = write_capture(directory / f"example_{interleave}.{interleave}", scene, interleave=interleave)
    mask = write_mask(directory / "plume_mask.tif", plume_labels(scene))
    return {"source": data.with_suffix(".hdr"), "data": data, "labels": mask}
