"""The hyperspectral demo: a generated EMIT-like capture with a dozen injected methane plumes."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from domains.hyperspectral.synthesis import (
    EMIT_LIKE,
    LABEL_THRESHOLD_PPMM,
    make_scene,
    plume_labels,
    random_plumes,
    write_capture,
    write_mask,
)

DEMO_SHAPE = (544, 544)  # 17 x 17 tiles of 32 px: ~290 training tiles at stride 32
DEMO_PLUMES = 36
DEMO_SEED = 20250611
DEMO_PEAK_PPMM = (2000.0, 8000.0)
DEMO_LENGTH_PX = (20.0, 60.0)


def prepare_demo(folder: Path) -> dict[str, Path]:
    """Generate the demo capture (ENVI BIL) and its plume mask in ``folder``; reuse them when present.

    Returns:
        ``{"source": <folder>/demo_capture.hdr, "labels": <folder>/demo_plume_mask.tif}``.
    """
    folder = Path(folder)
    header = folder / "demo_capture.hdr"
    mask = folder / "demo_plume_mask.tif"
    if header.is_file() and mask.is_file() and (folder / "demo_capture.bil").is_file():
        return {"source": header, "labels": mask}
    rng = np.random.default_rng(DEMO_SEED)
    plumes = random_plumes(DEMO_SHAPE, DEMO_PLUMES, rng, peak_ppmm=DEMO_PEAK_PPMM, length_px=DEMO_LENGTH_PX, margin=16)
    scene = make_scene(EMIT_LIKE, DEMO_SHAPE, plumes, seed=DEMO_SEED)
    write_capture(folder / "demo_capture.bil", scene, interleave="bil")
    write_mask(mask, plume_labels(scene))
    return {"source": header, "labels": mask}


DEMO_NOTES = (
    f"A generated {DEMO_SHAPE[0]} x {DEMO_SHAPE[1]} px EMIT-like capture (285 bands, 381-2493 nm, float32 radiance "
    "in µW cm⁻² sr⁻¹ nm⁻¹, ENVI BIL): surface spectra (vegetation, dry grass, soil, sand, concrete, water) mixed by "
    "smooth random fields under a synthetic atmosphere (scattering, O2, CO2, per-pixel water vapour, background CH4) "
    f"with sensor noise. {DEMO_PLUMES} methane plumes (Gaussian-plume and random-walk shapes, peaks "
    f"{DEMO_PEAK_PPMM[0]:.0f}-{DEMO_PEAK_PPMM[1]:.0f} ppm·m, lengths {DEMO_LENGTH_PX[0]:.0f}-{DEMO_LENGTH_PX[1]:.0f} px, "
    f"seed {DEMO_SEED}) are injected by Beer-Lambert absorption through the CH4 unit absorption spectrum resampled "
    f"to the bands. Labels are not annotations: a pixel is 'plume' where the injected enhancement is at least "
    f"{LABEL_THRESHOLD_PPMM:.0f} ppm·m. The model sees RGB plus a Mag1c-SAS enhancement product, as in the on-board "
    "pipeline of Herec et al.; everything is synthetic, so scores say the pipeline works, not how it does on real data."
)
