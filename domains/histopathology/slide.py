"""Whole-slide image reading at an exact resolution: the mpp contract, pyramid level choice, region reads.

A slide is gigapixel: nothing here reads a whole level of a large slide. Every read is a bounded region
rendered at a requested microns-per-pixel (mpp) from the coarsest pyramid level that is still at least
as fine as the request, then resampled to exactly the requested size. The slide's own mpp comes from its
metadata and is recorded with where it came from; a slide without one is refused unless the user gives
it (``--mpp``). Objective power is never used to guess it: scanners disagree on what "40x" means
(0.23 to 0.27 um/px), and a wrong guess silently changes the scale of every tile.

Readers: OpenSlide (through the ``openslide-bin`` wheel: SVS, NDPI, MRXS, SCN, Philips TIFF, generic
tiled TIFF, DICOM WSI) and ``tifffile`` for the TIFFs OpenSlide cannot open or opens without their
pyramid (OME-TIFF, SubIFD pyramids). Both are imported inside functions so ``import domains`` stays light.
"""

from __future__ import annotations

import math
import os
import threading
from collections import defaultdict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from domains.input_guards import check_readable
from domains.spec import DomainInputError

SLIDE_EXTENSIONS = (".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif",
                    ".dcm", ".btf", ".tf2", ".tf8", ".qptiff")
# Plausible scanner resolutions; a value outside is a unit mistake (e.g. a TIFF "resolution" of 1 dpi).
MPP_RANGE = (0.02, 100.0)
# Longest side a slide may cover, in mm: glass slides are 75 x 25 mm, large-format ones about 127 x 102 mm.
# A header declaring more is damaged (or its resolution is wrong) and is refused before any read; anything
# within it also keeps the tissue-mask thumbnail (2048 px on its longest side) inside MPP_RANGE.
MAX_SLIDE_MM = 200.0
# A pyramid level this close to the requested mpp (relative) is used as is, not passed over for a finer one.
LEVEL_MPP_TOLERANCE = 0.01
# Largest side, in pixels of the level read, of one region read: bounds the memory of a read (4 bytes/px
# for OpenSlide's RGBA, so about 64 MB) while grouping many neighbouring tiles into one call.
MAX_REGION_SIDE = 4096
# iter_tiles groups tiles into regions of about this side (level pixels) before reading.
REGION_SIDE = 2048
WHITE = 255


@dataclass(frozen=True)
class SlideGeometry:
    """Pixel geometry and resolution of a slide, with where the resolution came from.

    Attributes:
        width, height: level-0 size in pixels.
        mpp_x, mpp_y: level-0 microns per pixel.
        mpp_source: where mpp came from ("openslide.mpp-x/y", "tiff.XResolution (centimeter)",
            "OME PhysicalSizeX", "user --mpp").
        levels: (width, height, downsample) of every pyramid level, finest first.
        bounds_x, bounds_y: level-0 offset of the scanned area (``openslide.bounds-x/y``; 0 if none).
            QuPath's coordinates start there.
        format: the reader and vendor, e.g. "openslide:aperio" or "tifffile:ome".
    """

    width: int
    height: int
    mpp_x: float
    mpp_y: float
    mpp_source: str
    levels: tuple[tuple[int, int, float], ...]
    bounds_x: int
    bounds_y: int
    format: str
    bounds_width: int | None = None
    bounds_height: int | None = None

    def level_mpp(self, level: int) -> tuple[float, float]:
        """Microns per pixel of pyramid level ``level``."""
        downsample = self.levels[level][2]
        return self.mpp_x * downsample, self.mpp_y * downsample

    def best_level(self, mpp: float) -> int:
        """The coarsest level still at least as fine as ``mpp`` (level 0 when the slide is coarser).

        Reading the coarsest sufficient level decodes the fewest pixels; never choosing a coarser one
        means a tile is never upsampled unless the slide itself is coarser than the request.
        """
        best = 0
        for index in range(len(self.levels)):
            level_mpp = max(self.level_mpp(index))
            if level_mpp <= mpp * (1 + LEVEL_MPP_TOLERANCE):
                best = index if level_mpp > max(self.level_mpp(best)) else best
        return best


def tile_grid(geometry: SlideGeometry, size: int, mpp: float, stride: int | None = None) -> np.ndarray:
    """Level-0 origins (n, 2) int64 (x, y) of a regular grid of ``size`` px tiles at ``mpp`` over the slide.

    The grid covers the scanned area: from its offset (``bounds_x``, ``bounds_y``) over ``bounds_width`` x
    ``bounds_height`` when the reader knows them (MRXS, Leica SCN scan only part of the glass), else to the
    slide's edge. ``stride`` is in output pixels (default ``size``: touching tiles). Only tiles whose
    origin lies in the area are listed; the last row/column may reach past it (outside the slide: white).
    """
    _check_tile_request(size, mpp)
    stride = size if stride is None else stride
    if stride <= 0:
        raise ValueError(f"stride must be positive, got {stride}")
    step_x = stride * mpp / geometry.mpp_x
    step_y = stride * mpp / geometry.mpp_y
    right = geometry.bounds_x + (geometry.bounds_width or geometry.width - geometry.bounds_x)
    bottom = geometry.bounds_y + (geometry.bounds_height or geometry.height - geometry.bounds_y)
    xs = geometry.bounds_x + np.round(np.arange(0, right - geometry.bounds_x, step_x)).astype(np.int64)
    ys = geometry.bounds_y + np.round(np.arange(0, bottom - geometry.bounds_y, step_y)).astype(np.int64)
    xs = xs[xs < min(right, geometry.width)]
    ys = ys[ys < min(bottom, geometry.height)]
    grid_y, grid_x = np.meshgrid(ys, xs, indexing="ij")
    return np.stack([grid_x.ravel(), grid_y.ravel()], axis=1).astype(np.int64)


def _check_tile_request(size: int, mpp: float) -> None:
    if int(size) != size or size <= 0:
        raise ValueError(f"tile size must be a positive integer, got {size}")
    if not (MPP_RANGE[0] <= mpp <= MPP_RANGE[1]):
        raise ValueError(f"requested mpp {mpp} is outside {MPP_RANGE[0]}..{MPP_RANGE[1]} um/px")


class Slide:
    """An open whole-slide image; use :func:`open_slide` (a context manager) to get one."""

    def __init__(self, path: Path, backend: "_Backend", geometry: SlideGeometry, workers: int | None = None):
        self.path = path
        self._backend = backend
        self.geometry = geometry
        self._workers = workers or min(4, usable_cpus())

    # -- context manager -------------------------------------------------------------------------------
    def __enter__(self) -> "Slide":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._backend.close()

    # -- metadata the de-identification gate inspects (names only; see slide_metadata.py) --------------
    def metadata_keys(self) -> list[str]:
        """Names of every metadata property the reader exposes (values are not returned)."""
        return sorted(self._backend.metadata_keys())

    def associated_image_names(self) -> list[str]:
        """Names of the associated images (label, macro, thumbnail...); their pixels are never read."""
        return sorted(self._backend.associated_names())

    # -- pixels -----------------------------------------------------------------------------------------
    def read_region(self, x: int, y: int, size: int, mpp: float) -> np.ndarray:
        """The ``size`` x ``size`` RGB uint8 tile whose top-left is level-0 (x, y), at exactly ``mpp`` um/px.

        It covers ``size * mpp`` micrometres whatever the scanner; parts outside the slide are white.
        """
        _check_tile_request(size, mpp)
        tiles, _ = self._render_tiles(np.array([[x, y]], np.int64), size, mpp, self.geometry.best_level(mpp))
        return tiles[0]

    def iter_tiles(self, origins: Sequence[tuple[int, int]] | np.ndarray, size: int, mpp: float,
                   batch: int = 64) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield ``(tiles (n, size, size, 3) uint8, origins (n, 2) int64)`` in batches of at most ``batch``.

        Tiles are grouped into regions of neighbouring tiles and each region is read once from the best
        pyramid level (a few worker threads read regions in parallel: the codecs, OpenSlide and Pillow
        release the GIL), so this is much faster than one read per tile. Tiles come out region by
        region, not in the input order: the returned origins say which tile is which. Memory is bounded
        by ``batch`` and a few regions in flight, not by the slide.
        """
        _check_tile_request(size, mpp)
        if batch <= 0:
            raise ValueError(f"batch must be positive, got {batch}")
        points = np.asarray(origins, dtype=np.int64).reshape(-1, 2)
        if len(points) == 0:
            return
        level = self.geometry.best_level(mpp)
        groups = _group_by_region(points, self._region_span(level, size, mpp))
        out_tiles = np.empty((min(batch, len(points)), size, size, 3), np.uint8)
        out_origins = np.empty((len(out_tiles), 2), np.int64)
        filled = 0
        with ThreadPoolExecutor(max_workers=self._workers) as pool:
            for tile, origin in self._rendered(pool, groups, size, mpp, level):
                out_tiles[filled], out_origins[filled] = tile, origin
                filled += 1
                if filled == len(out_tiles):
                    yield out_tiles.copy(), out_origins.copy()
                    filled = 0
        if filled:
            yield out_tiles[:filled].copy(), out_origins[:filled].copy()

    def _rendered(self, pool: ThreadPoolExecutor, groups: list[np.ndarray], size: int, mpp: float, level: int):
        """(tile, origin) pairs, region after region, with one region more in flight than there are workers.

        Bounding what is in flight bounds memory; the extra one keeps every worker busy while the caller
        copies the finished region's tiles out.
        """
        pending: deque = deque()
        for group in groups:
            pending.append(pool.submit(self._render_tiles, group, size, mpp, level))
            if len(pending) > self._workers:
                yield from zip(*pending.popleft().result())
        while pending:
            yield from zip(*pending.popleft().result())

    def thumbnail(self, mpp: float) -> np.ndarray:
        """The whole slide (from level-0 (0, 0) to its width/height) as RGB uint8 at about ``mpp`` um/px.

        Read from the coarsest sufficient level in bounded blocks, so a slide without a low-resolution
        level is still never read whole. Pixel (r, c) covers level-0 (c * mpp / mpp_x, r * mpp / mpp_y).
        """
        g = self.geometry
        if not (MPP_RANGE[0] <= mpp <= MPP_RANGE[1]):
            raise ValueError(f"thumbnail mpp {mpp} is outside {MPP_RANGE[0]}..{MPP_RANGE[1]} um/px")
        out_w = max(1, int(round(g.width * g.mpp_x / mpp)))
        out_h = max(1, int(round(g.height * g.mpp_y / mpp)))
        level = g.best_level(mpp)
        level_mpp_x, level_mpp_y = g.level_mpp(level)
        # Output block side such that its source region stays within MAX_REGION_SIDE level pixels.
        block = max(1, int(MAX_REGION_SIDE * min(level_mpp_x, level_mpp_y) / mpp))
        thumb = np.empty((out_h, out_w, 3), np.uint8)
        for top in range(0, out_h, block):
            for left in range(0, out_w, block):
                w, h = min(block, out_w - left), min(block, out_h - top)
                thumb[top : top + h, left : left + w] = self._render_rect(
                    left * mpp / g.mpp_x, top * mpp / g.mpp_y, w, h, mpp, level)
        return thumb

    # -- internals --------------------------------------------------------------------------------------
    def _region_span(self, level: int, size: int, mpp: float) -> float:
        """Side, in level-0 pixels, of the cells that tiles are grouped into (one read per cell).

        When the tiles' footprint on the level is a whole number of pixels, the cell is a multiple of
        both that footprint and the file's tile size, so a grid of touching tiles starting on a file-tile
        boundary never straddles two cells: no file tile is decoded twice. Otherwise about REGION_SIDE.
        """
        downsample = self.geometry.levels[level][2]
        tile_level_px = size * mpp / min(self.geometry.level_mpp(level))
        segment = self._backend.segment_size(level)
        footprint = int(round(tile_level_px))
        if segment and abs(tile_level_px - footprint) < 1e-6 and footprint > 0:
            period = int(np.lcm(footprint, segment))
            if period <= MAX_REGION_SIDE:
                return period * max(1, REGION_SIDE // period) * downsample
        # At least one tile per region; otherwise about REGION_SIDE level pixels.
        return max(tile_level_px, REGION_SIDE - tile_level_px) * downsample

    def _level_box(self, x0: float, y0: float, w_out: int, h_out: int, mpp: float, level: int):
        """Continuous box in level-``level`` pixels covered by an output rectangle at level-0 (x0, y0)."""
        g = self.geometry
        downsample = g.levels[level][2]
        span_x = w_out * mpp / g.mpp_x
        span_y = h_out * mpp / g.mpp_y
        return x0 / downsample, y0 / downsample, (x0 + span_x) / downsample, (y0 + span_y) / downsample

    def _read_level(self, level: int, left: int, top: int, width: int, height: int) -> np.ndarray:
        """Level pixels [top, top+height) x [left, left+width) as RGB uint8; outside the level is white."""
        level_w, level_h, _ = self.geometry.levels[level]
        x0, y0 = max(left, 0), max(top, 0)
        x1, y1 = min(left + width, level_w), min(top + height, level_h)
        if (x0, y0, x1, y1) == (left, top, left + width, top + height):
            return self._backend.read(level, left, top, width, height)
        out = np.full((height, width, 3), WHITE, np.uint8)
        if x1 > x0 and y1 > y0:
            out[y0 - top : y1 - top, x0 - left : x1 - left] = self._backend.read(level, x0, y0, x1 - x0, y1 - y0)
        return out

    def _render_rect(self, x0: float, y0: float, w_out: int, h_out: int, mpp: float, level: int) -> np.ndarray:
        """One output rectangle (h_out, w_out, 3) at ``mpp`` whose top-left is level-0 (x0, y0)."""
        box = self._level_box(x0, y0, w_out, h_out, mpp, level)
        left, top = math.floor(box[0]), math.floor(box[1])
        right, bottom = math.ceil(box[2]), math.ceil(box[3])
        pixels = self._read_level(level, left, top, right - left, bottom - top)
        return _resample(pixels, (box[0] - left, box[1] - top, box[2] - left, box[3] - top), w_out, h_out)

    def _render_tiles(self, points: np.ndarray, size: int, mpp: float, level: int):
        """Read one region covering every tile in ``points`` once, then cut and resample each tile."""
        boxes = [self._level_box(float(x), float(y), size, size, mpp, level) for x, y in points]
        left = math.floor(min(b[0] for b in boxes))
        top = math.floor(min(b[1] for b in boxes))
        right = math.ceil(max(b[2] for b in boxes))
        bottom = math.ceil(max(b[3] for b in boxes))
        pixels = self._read_level(level, left, top, right - left, bottom - top)
        from PIL import Image

        tiles = np.empty((len(points), size, size, 3), np.uint8)
        factor = _common_integer_factor(boxes, left, top, size)
        if factor is not None:
            # Every tile is an aligned integer shrink: shrink the region once and cut the tiles out.
            shrunk = pixels if factor == 1 else np.asarray(Image.fromarray(pixels).reduce(factor))
            for index, b in enumerate(boxes):
                row, col = int(b[1] - top) // factor, int(b[0] - left) // factor
                tiles[index] = shrunk[row : row + size, col : col + size]
            return tiles, points
        image = Image.fromarray(pixels)
        for index, b in enumerate(boxes):
            tiles[index] = _resample(image, (b[0] - left, b[1] - top, b[2] - left, b[3] - top), size, size)
        return tiles, points


def _common_integer_factor(boxes, left: int, top: int, size: int) -> int | None:
    """The integer k if every box is exactly k*size wide and high and starts on the k-grid of (left, top)."""
    width = boxes[0][2] - boxes[0][0]
    factor = int(round(width / size))
    if factor < 1 or abs(width - factor * size) > 1e-6:
        return None
    for b in boxes:
        if (abs(b[2] - b[0] - factor * size) > 1e-6 or abs(b[3] - b[1] - factor * size) > 1e-6
                or not float(b[0]).is_integer() or not float(b[1]).is_integer()
                or (int(b[0]) - left) % factor or (int(b[1]) - top) % factor):
            return None
    return factor


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, e.g. under taskset or a container's cpuset)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _resample(pixels, box: tuple[float, float, float, float], w_out: int, h_out: int) -> np.ndarray:
    """Resample the continuous ``box`` of ``pixels`` (array or PIL image) to exactly (h_out, w_out).

    Area averaging (BOX) when shrinking, as scanners build their pyramids; bilinear when enlarging.
    An integer-aligned box of the output's size is copied without resampling.
    """
    from PIL import Image

    image = pixels if isinstance(pixels, Image.Image) else Image.fromarray(pixels)
    bw, bh = box[2] - box[0], box[3] - box[1]
    if (abs(bw - w_out) < 1e-6 and abs(bh - h_out) < 1e-6 and float(box[0]).is_integer()
            and float(box[1]).is_integer()):
        crop = image.crop((int(box[0]), int(box[1]), int(box[0]) + w_out, int(box[1]) + h_out))
        return np.asarray(crop)
    factor = bw / w_out
    if (factor >= 2 and abs(factor - round(factor)) < 1e-9 and abs(bh / h_out - round(factor)) < 1e-9
            and float(box[0]).is_integer() and float(box[1]).is_integer()):
        # An exact integer shrink of an aligned box: Pillow's block average (same result as BOX, faster).
        left, top = int(box[0]), int(box[1])
        return np.asarray(image.crop((left, top, left + int(round(bw)), top + int(round(bh)))).reduce(int(round(factor))))
    method = Image.Resampling.BOX if bw >= w_out and bh >= h_out else Image.Resampling.BILINEAR
    return np.asarray(image.resize((w_out, h_out), method, box=box))


def _group_by_region(points: np.ndarray, span: float) -> list[np.ndarray]:
    """Split tile origins into cells of ``span`` level-0 pixels (row-major cells), each read as one region."""
    cells: dict[tuple[int, int], list[int]] = defaultdict(list)
    # Cells start at 0, as the file's tiles do (see Slide._region_span).
    keys = np.floor(points / max(span, 1.0)).astype(np.int64)
    for index, (cx, cy) in enumerate(keys):
        cells[(int(cy), int(cx))].append(index)
    return [points[cells[key]] for key in sorted(cells)]


# -- opening and the mpp contract -------------------------------------------------------------------------

def open_slide(path: Path | str, mpp: float | None = None, workers: int | None = None) -> Slide:
    """Open a whole-slide image and settle its resolution (the mpp contract).

    Args:
        path: the slide file (SVS, NDPI, MRXS, SCN, tiled TIFF, OME-TIFF, DICOM...).
        mpp: microns per pixel given by the user (``--mpp``). It overrides the slide's metadata and is
            recorded as "user --mpp"; without it a slide whose metadata has no resolution is refused.
        workers: threads reading regions in parallel in :meth:`Slide.iter_tiles` (default: up to 4).

    Raises:
        DomainInputError: zero-byte, truncated or unreadable file, an extension that is not a slide's,
            or no resolution in the metadata and none given.
    """
    path = Path(path)
    _check_file(path)
    if mpp is not None and not (MPP_RANGE[0] <= mpp <= MPP_RANGE[1]):
        raise DomainInputError(path, f"--mpp {mpp} is outside the plausible {MPP_RANGE[0]}..{MPP_RANGE[1]} um/px")
    backend = _open_backend(path)
    try:
        metadata_mpp = backend.mpp()
        if mpp is not None:
            mpp_x = mpp_y = float(mpp)
            source = "user --mpp"
        elif metadata_mpp is not None:
            mpp_x, mpp_y, source = metadata_mpp
        else:
            raise DomainInputError(path, "the slide's metadata gives no microns-per-pixel resolution; pass "
                                         "--mpp with the scanner's value (it is never guessed from objective power)")
        if not (MPP_RANGE[0] <= mpp_x <= MPP_RANGE[1] and MPP_RANGE[0] <= mpp_y <= MPP_RANGE[1]):
            raise DomainInputError(path, f"resolution {mpp_x} x {mpp_y} um/px from {source} is outside the plausible "
                                         f"{MPP_RANGE[0]}..{MPP_RANGE[1]}; pass --mpp")
        levels = backend.levels()
        _check_extent(path, levels[0][0], levels[0][1], mpp_x, mpp_y)
        _check_pyramid(path, levels)
        bounds_x, bounds_y, bounds_width, bounds_height = backend.bounds()
        geometry = SlideGeometry(width=levels[0][0], height=levels[0][1], mpp_x=mpp_x, mpp_y=mpp_y,
                                 mpp_source=source, levels=levels, bounds_x=bounds_x, bounds_y=bounds_y,
                                 bounds_width=bounds_width, bounds_height=bounds_height,
                                 format=backend.format)
    except BaseException:
        backend.close()
        raise
    return Slide(path, backend, geometry, workers)


def _check_extent(path: Path, width: int, height: int, mpp_x: float, mpp_y: float) -> None:
    """Refuse a slide whose declared size and resolution make it larger than any glass slide."""
    width_mm, height_mm = width * mpp_x / 1000, height * mpp_y / 1000
    if max(width_mm, height_mm) > MAX_SLIDE_MM:
        raise DomainInputError(path, f"header declares {width} x {height} px at {mpp_x:g} x {mpp_y:g} um/px, "
                                     f"{width_mm:.0f} x {height_mm:.0f} mm: larger than any glass slide (limit "
                                     f"{MAX_SLIDE_MM:g} mm); the file is damaged or its resolution is wrong")


def _check_file(path: Path) -> None:
    if not path.exists() and not path.is_symlink():
        raise DomainInputError(path, "no such slide file")
    if path.is_dir():
        raise DomainInputError(path, "is a folder, not a slide file (for DICOM WSI give one of its .dcm files)")
    # A looping or dangling link, or a file this process may not read, is named here: otherwise the first
    # open() raises a bare OSError, which predict reports as an unexpected error with a traceback.
    check_readable(path, "file")
    suffix = path.suffix.lower()
    if suffix not in SLIDE_EXTENSIONS:
        raise DomainInputError(path, f"extension {suffix or '(none)'!r} is not a whole-slide image format; "
                                     f"expected one of {', '.join(SLIDE_EXTENSIONS)}")
    if suffix == ".mrxs":
        # OpenSlide reads a MIRAX slide from the folder beside the .mrxs (which may be empty): check that.
        slidedat = path.with_suffix("") / "Slidedat.ini"
        if not slidedat.is_file() or slidedat.stat().st_size == 0:
            raise DomainInputError(path, "MIRAX slide without its data: the Slidedat.ini of the folder of the same "
                                         "name beside the .mrxs is missing or empty (copy that folder with it)")
        return
    if path.stat().st_size == 0:
        raise DomainInputError(path, "empty file (0 bytes): the slide was not copied or not written")


def _is_tiff(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(4)
    return head in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def _check_tiff_complete(path: Path) -> None:
    """Refuse a TIFF whose tiles or strips point past the end of the file (a truncated copy).

    Reading the offsets costs little and catches truncation before a read deep into a run fails.
    """
    import tifffile

    size = path.stat().st_size
    try:
        with tifffile.TiffFile(path) as tif:
            pages = list(tif.pages)
            # SubIFD pyramid levels are not in tif.pages; the series' levels list them.
            for series in tif.series:
                for level in series.levels:
                    pages.extend(level.pages)
            for page in pages:
                if page is None:
                    continue
                offsets = np.asarray(page.dataoffsets, dtype=np.int64)
                counts = np.asarray(page.databytecounts, dtype=np.int64)
                present = counts > 0
                if present.any() and int((offsets[present] + counts[present]).max()) > size:
                    raise DomainInputError(path, f"truncated: image data of a {page.shape} image ends past the "
                                                 f"end of the file ({size} bytes)")
    except DomainInputError:
        raise
    except Exception as error:  # tifffile raises several types on a damaged file
        raise DomainInputError(path, f"truncated or damaged TIFF: {error}") from error


def _open_backend(path: Path) -> "_Backend":
    """Pick the reader: OpenSlide for metadata where it knows the format; pixels decoded tile by tile.

    OpenSlide renders regions through its own compositing path (about 20 Mpx/s here) while decoding the
    TIFF tiles directly runs at the codec's speed (about 10x faster), so for the plain tiled-TIFF formats
    (Aperio SVS, generic tiled TIFF) whose levels tifffile finds with the same sizes, pixels are decoded
    from the tiles and OpenSlide supplies the metadata. Vendors with quirks (overlapping BIF tiles,
    Philips sparse tiles, NDPI strips, MRXS, DICOM) stay entirely with OpenSlide. TIFFs OpenSlide cannot
    open, or opens without their pyramid (OME-TIFF, SubIFD pyramids), are read by tifffile alone.
    """
    import openslide

    is_tiff = _is_tiff(path)
    if is_tiff:
        _check_tiff_complete(path)
    try:
        vendor = openslide.OpenSlide.detect_format(str(path))
    except openslide.OpenSlideError:
        vendor = None
    if vendor is None and not is_tiff:
        raise DomainInputError(path, "not a whole-slide image: neither OpenSlide nor tifffile can read it")
    if not is_tiff:
        return _OpenSlideBackend(path)
    tiff = _TiffBackend(path)
    if vendor is None or tiff.is_ome or (vendor == "generic-tiff" and tiff.pyramid_in_subifds):
        # OpenSlide's generic-tiff reader sees neither SubIFD/OME pyramids nor OME's PhysicalSizeX.
        return tiff
    backend = _OpenSlideBackend(path)
    if vendor in FAST_TIFF_VENDORS:
        pages = tiff.pages_matching(backend.levels())
        if pages is not None:
            backend.use_tiles(_TiffTiles(path, pages, tiff))
            return backend
    tiff.close()
    return backend



def _check_pyramid(path: Path, levels: tuple[tuple[int, int, float], ...]) -> None:
    """Refuse a pyramid whose reduced levels are not reductions of the full image (same factor across and down).

    Such a level maps regions to the wrong pixels (a thumbnail, a tissue mask or a coarse tile would come from
    elsewhere); scanners write levels of ``floor`` or ``ceil`` of the full size over the factor, so a pixel or
    two of rounding is allowed.
    """
    width0, height0, _ = levels[0]
    for index, (width, height, _) in enumerate(levels[1:], start=1):
        factor = width0 / width
        if abs(height0 / factor - height) > max(2.0, 0.01 * height):
            raise DomainInputError(path, f"pyramid level {index} is {width} x {height} px, not a reduction of the "
                                         f"{width0} x {height0} px full image ({width0 / width:.3g}x across, "
                                         f"{height0 / height:.3g}x down); the file is damaged")

# OpenSlide vendors whose levels are plain tiled TIFF pages that decode the same without OpenSlide.
FAST_TIFF_VENDORS = ("aperio", "generic-tiff")
# Decoded tiles kept for neighbouring region reads (tiles straddling two regions are decoded once).
TILE_CACHE_BYTES = 128 * 2**20


class _Backend:
    format: str

    def levels(self) -> tuple[tuple[int, int, float], ...]: ...
    def mpp(self) -> tuple[float, float, str] | None: ...
    def bounds(self) -> tuple[int, int, int | None, int | None]:
        """Level-0 x, y, width, height of the scanned area (width/height None when not known)."""
        ...

    def read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray: ...

    def segment_size(self, level: int) -> int | None:
        """Side of the file's square tiles at ``level`` when pixels are decoded tile by tile, else None."""
        return None

    def metadata_keys(self) -> list[str]: ...
    def associated_names(self) -> list[str]: ...
    def close(self) -> None: ...


class _TiffTiles:
    """Decodes the tiles (or strips) of one TIFF page per pyramid level; thread-safe, GIL-free I/O.

    Each region read decodes only the segments it touches (``os.pread`` on a private descriptor, the
    page's own codec through tifffile), keeps recently decoded segments in a small LRU cache, and
    shows sparse (zero-length) segments as white.
    """

    def __init__(self, path: Path, pages: list, owner: "_TiffBackend"):
        import functools

        self.path = path
        self._pages = pages
        self._owner = owner  # keeps the TiffFile (and its pages) alive
        self._fd = os.open(path, os.O_RDONLY)
        first = pages[0]
        segment_bytes = max(1, int(np.prod(first.chunks)))
        self._decode = functools.lru_cache(maxsize=max(8, TILE_CACHE_BYTES // segment_bytes))(self._decode_segment)

    @staticmethod
    def supports(page) -> bool:
        return (page.dtype == np.uint8 and page.planarconfig == 1 and page.samplesperpixel in (3, 4)
                and page.shaped[0] == 1 and page.shaped[1] == 1 and len(page.chunked) == 3)

    def _decode_segment(self, level: int, index: int) -> np.ndarray | None:
        page = self._pages[level]
        count = int(page.databytecounts[index])
        if count == 0:
            return None
        data = os.pread(self._fd, count, int(page.dataoffsets[index]))
        try:
            segment, _, shape = page.decode(data, index, jpegtables=page.jpegtables)
        except Exception as error:
            raise DomainInputError(self.path, f"cannot decode tile {index} of level {level}: {error}") from error
        return segment.reshape(shape[-3:])[..., :3]

    def read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        page = self._pages[level]
        seg_h, seg_w = page.chunks[0], page.chunks[1]
        rows, cols = page.chunked[0], page.chunked[1]
        out = np.empty((h, w, 3), np.uint8)
        for row in range(y // seg_h, min(rows, (y + h - 1) // seg_h + 1)):
            for col in range(x // seg_w, min(cols, (x + w - 1) // seg_w + 1)):
                top, left = row * seg_h, col * seg_w
                y0, y1 = max(y, top), min(y + h, top + seg_h)
                x0, x1 = max(x, left), min(x + w, left + seg_w)
                segment = self._decode(level, row * cols + col)
                if segment is None:
                    out[y0 - y : y1 - y, x0 - x : x1 - x] = WHITE
                    continue
                # The last strip of a stripped page may be shorter than the others.
                part = segment[y0 - top : y1 - top, x0 - left : x1 - left]
                out[y0 - y : y0 - y + part.shape[0], x0 - x : x0 - x + part.shape[1]] = part
        return out

    def segment_size(self, level: int) -> int | None:
        page = self._pages[level]
        return int(page.chunks[0]) if page.is_tiled and page.chunks[0] == page.chunks[1] else None

    def close(self) -> None:
        os.close(self._fd)
        self._owner.close()


class _OpenSlideBackend(_Backend):
    def __init__(self, path: Path):
        import openslide

        self.path = path
        self._tiles: _TiffTiles | None = None
        try:
            self._slide = openslide.OpenSlide(str(path))
        except (openslide.OpenSlideError, OSError) as error:
            raise DomainInputError(path, f"unreadable slide (OpenSlide: {error})") from error
        props = self._slide.properties
        self.format = f"openslide:{props.get('openslide.vendor', 'unknown')}"

    def segment_size(self, level):
        return self._tiles.segment_size(level) if self._tiles is not None else None

    def use_tiles(self, tiles: _TiffTiles) -> None:
        """Decode pixels from the TIFF tiles instead of through OpenSlide (same pixels, much faster)."""
        self._tiles = tiles
        self.format += " (tiles decoded by tifffile)"

    def levels(self):
        s = self._slide
        return tuple((int(w), int(h), float(d)) for (w, h), d in zip(s.level_dimensions, s.level_downsamples))

    def mpp(self):
        props = self._slide.properties
        try:
            mpp_x, mpp_y = float(props["openslide.mpp-x"]), float(props["openslide.mpp-y"])
        except (KeyError, ValueError):
            return None
        if mpp_x <= 0 or mpp_y <= 0:
            return None
        unit = props.get("tiff.ResolutionUnit")
        if props.get("openslide.vendor") == "generic-tiff" and unit:
            return mpp_x, mpp_y, f"tiff.XResolution ({unit})"
        if props.get("openslide.vendor") == "dicom":  # OpenSlide's mpp is the shared PixelSpacing (mm) x 1000
            return mpp_x, mpp_y, "DICOM PixelSpacing"
        return mpp_x, mpp_y, "openslide.mpp-x/y"

    def bounds(self):
        props = self._slide.properties
        width, height = props.get("openslide.bounds-width"), props.get("openslide.bounds-height")
        return (int(props.get("openslide.bounds-x", 0) or 0), int(props.get("openslide.bounds-y", 0) or 0),
                int(width) if width else None, int(height) if height else None)

    def read(self, level, x, y, w, h):
        import openslide

        if self._tiles is not None:
            return self._tiles.read(level, x, y, w, h)
        downsample = self._slide.level_downsamples[level]
        try:
            image = self._slide.read_region((int(round(x * downsample)), int(round(y * downsample))), level, (w, h))
        except openslide.OpenSlideError as error:
            raise DomainInputError(self.path, f"unreadable region at level {level} ({x}, {y}, {w}x{h}): "
                                              f"{error}") from error
        rgba = np.asarray(image)
        rgb = rgba[..., :3]
        alpha = rgba[..., 3]
        # OpenSlide returns transparent pixels outside the scanned area: show them as white glass.
        if alpha.min() < 255:
            rgb = rgb.copy()
            rgb[alpha == 0] = WHITE
        return rgb

    def metadata_keys(self):
        return list(self._slide.properties.keys())

    def associated_names(self):
        return list(self._slide.associated_images.keys())

    def close(self):
        self._slide.close()
        if self._tiles is not None:
            self._tiles.close()


class _TiffBackend(_Backend):
    """Tiled or stripped TIFF / OME-TIFF pyramids through tifffile (pages or SubIFDs per level)."""

    def __init__(self, path: Path):
        import tifffile

        self.path = path
        try:
            self._tif = tifffile.TiffFile(path)
            self._series = self._pick_series()
        except DomainInputError:
            raise
        except Exception as error:
            raise DomainInputError(path, f"unreadable TIFF: {error}") from error
        self.is_ome = bool(self._tif.is_ome)
        self.pyramid_in_subifds = bool(self._tif.pages[0].subifds)
        self.format = "tifffile:ome" if self.is_ome else "tifffile:tiff"
        self._tiles: _TiffTiles | None = None
        self._lock = threading.Lock()
        self._closed = False

    def _pick_series(self):
        candidates = [s for s in self._tif.series
                      if s.levels[0].axes.endswith("YXS") and s.levels[0].shape[-1] in (3, 4) and s.dtype == np.uint8]
        if not candidates:
            raise DomainInputError(self.path, "no 8-bit RGB image in this TIFF (a bright-field slide is 8-bit RGB)")
        # The main image is the largest; the others are label/macro/thumbnail images.
        return max(candidates, key=lambda s: s.levels[0].shape[-3] * s.levels[0].shape[-2])

    def pages_matching(self, levels) -> list | None:
        """One tiled page per level of ``levels`` with exactly its size, or None if any is missing."""
        pages = list(self._tif.pages)
        for series in self._tif.series:
            for level in series.levels:
                pages.extend(level.pages)
        found = []
        for width, height, _ in levels:
            match = [p for p in pages if p is not None and p.is_tiled and p.shape[:2] == (height, width)
                     and _TiffTiles.supports(p)]
            if not match:
                return None
            found.append(match[0])
        return found

    def _level_pages(self) -> list:
        return [level.pages[0] for level in self._series.levels]

    def levels(self):
        pages = self._level_pages()
        height0, width0 = pages[0].shape[:2]
        return tuple((int(p.shape[1]), int(p.shape[0]), width0 / p.shape[1]) for p in pages)

    def mpp(self):
        if self.is_ome:
            found = _ome_physical_size(self._tif.ome_metadata)
            if found is not None:
                return found[0], found[1], "OME PhysicalSizeX"
        tags = self._level_pages()[0].tags
        unit_tag = tags.get("ResolutionUnit")
        unit = int(unit_tag.value) if unit_tag is not None else 2  # TIFF 6.0: inch when the tag is absent
        microns = {2: 25400.0, 3: 10000.0}.get(unit)
        x_tag, y_tag = tags.get("XResolution"), tags.get("YResolution")
        if microns is None or x_tag is None or y_tag is None:
            return None
        (x_num, x_den), (y_num, y_den) = x_tag.value, y_tag.value
        if x_num <= 0 or y_num <= 0:
            return None
        name = {2: "inch", 3: "centimeter"}[unit]
        return microns * x_den / x_num, microns * y_den / y_num, f"tiff.XResolution ({name})"

    def bounds(self):
        return 0, 0, None, None

    def read(self, level, x, y, w, h):
        with self._lock:  # worker threads may arrive together at the first read
            if self._tiles is None:
                pages = self._level_pages()
                unsupported = [p.shape for p in pages if not _TiffTiles.supports(p)]
                if unsupported:
                    raise DomainInputError(self.path, f"levels {unsupported} are not 8-bit interleaved RGB; "
                                                      "convert the slide to a tiled RGB TIFF")
                self._tiles = _TiffTiles(self.path, pages, self)
        return self._tiles.read(level, x, y, w, h)

    def segment_size(self, level):
        page = self._level_pages()[level]
        return int(page.chunks[0]) if page.is_tiled and page.chunks[0] == page.chunks[1] else None

    def metadata_keys(self):
        keys = [f"tiff.{tag.name}" for tag in self._tif.pages[0].tags.values()]
        if self.is_ome:
            keys.append("ome.xml")
        return keys

    def associated_names(self):
        return [s.name or f"series {i}" for i, s in enumerate(self._tif.series) if s is not self._series]

    def close(self):
        if self._closed:
            return
        self._closed = True
        if self._tiles is not None:
            tiles, self._tiles = self._tiles, None
            os.close(tiles._fd)
        self._tif.close()


def _ome_physical_size(xml: str | None) -> tuple[float, float] | None:
    """PhysicalSizeX/Y of the first OME Pixels element, in micrometres (None when absent)."""
    if not xml:
        return None
    import xml.etree.ElementTree as ET

    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    to_um = {"µm": 1.0, "um": 1.0, "\u03bcm": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6}
    for element in root.iter():
        if element.tag.rsplit("}", 1)[-1] != "Pixels":
            continue
        sizes = []
        for axis in ("X", "Y"):
            value = element.get(f"PhysicalSize{axis}")
            factor = to_um.get(element.get(f"PhysicalSize{axis}Unit", "µm"))
            if value is None or factor is None:
                return None
            sizes.append(float(value) * factor)
        if min(sizes) <= 0:
            return None
        return sizes[0], sizes[1]
    return None
