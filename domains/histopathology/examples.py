"""Tiny real-format histopathology examples: pyramidal tiled TIFF slides, a manifest CSV and QuPath GeoJSON.

:func:`write_pyramid_tiff` is also the demo's slide writer: a generic tiled TIFF, one page per pyramid
level (the layout OpenSlide's generic-tiff reader expects), with the resolution in the TIFF resolution
tags (pixels per centimetre), so the mpp contract finds it the way it finds a scanner's.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np

EXAMPLE_PATIENTS = ("CASE-A", "CASE-B", "CASE-C")
EXAMPLE_MPP = 0.5
EXAMPLE_SIZE = 384
EXAMPLE_CLASSES = ("normal", "tumor")


def write_pyramid_tiff(path: Path | str, rgb: np.ndarray, mpp: float, tile: int = 128, min_level_side: int = 64,
                       compression: str | None = "jpeg", description: str | None = None) -> Path:
    """Write ``rgb`` (H, W, 3) uint8 as a tiled pyramidal TIFF at ``mpp`` um/px (levels halve until small).

    Args:
        path: the ``.tif`` to write.
        rgb: level-0 pixels.
        mpp: level-0 microns per pixel, stored as XResolution/YResolution in pixels per centimetre.
        tile: tile side (a multiple of 16).
        min_level_side: no level is made whose shorter side would fall below this.
        compression: ``jpeg`` (as scanners store H&E), ``zlib``/``None`` for lossless.
        description: the ImageDescription text (tests plant scanner metadata here).
    """
    import tifffile
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    levels = [np.ascontiguousarray(rgb, dtype=np.uint8)]
    while min(levels[-1].shape[:2]) // 2 >= min_level_side:
        h, w = levels[-1].shape[:2]
        levels.append(np.asarray(Image.fromarray(levels[-1]).resize((w // 2, h // 2), Image.Resampling.BOX)))
    options = {"compression": compression} if compression else {}
    if compression == "jpeg":
        options["compressionargs"] = {"level": 90}
    with tifffile.TiffWriter(path) as tif:
        for index, level in enumerate(levels):
            downsample = rgb.shape[1] / level.shape[1]
            per_cm = 1e4 / (mpp * downsample)
            tif.write(level, photometric="rgb", tile=(tile, tile), resolution=(per_cm, per_cm),
                      resolutionunit="CENTIMETER", subfiletype=0 if index == 0 else 1,
                      description=description if index == 0 else None, metadata=None, **options)
    return path


def tissue_texture(rng: np.random.Generator, height: int, width: int, dense: bool = False) -> np.ndarray:
    """Pink (eosin) tissue with purple (haematoxylin) nuclei, float RGB in [0, 1] (H, W, 3).

    ``dense`` draws more, smaller and darker nuclei: the example's "tumor" texture.
    """
    image = np.empty((height, width, 3), np.float32)
    image[:] = (0.93, 0.62, 0.78)
    image += rng.normal(0, 0.03, (height, width, 1)).astype(np.float32)
    count = int(height * width / (60 if dense else 220))
    radius = 1.6 if dense else 2.6
    yy, xx = np.mgrid[0:height, 0:width]
    nuclei = np.zeros((height, width), np.float32)
    for cy, cx in zip(rng.uniform(0, height, count), rng.uniform(0, width, count)):
        y0, y1 = int(max(cy - 4, 0)), int(min(cy + 5, height))
        x0, x1 = int(max(cx - 4, 0)), int(min(cx + 5, width))
        d = (yy[y0:y1, x0:x1] - cy) ** 2 + (xx[y0:y1, x0:x1] - cx) ** 2
        nuclei[y0:y1, x0:x1] = np.maximum(nuclei[y0:y1, x0:x1], np.exp(-d / (2 * radius**2)))
    purple = np.array((0.35, 0.2, 0.55) if dense else (0.45, 0.3, 0.62), np.float32)
    image = image * (1 - nuclei[..., None]) + purple * nuclei[..., None]
    return np.clip(image, 0, 1)


def region_feature(name: str, ring: list[list[float]], holes: list[list[list[float]]] = ()) -> dict:
    """A QuPath-style GeoJSON annotation feature (classification name in its properties)."""
    return {"type": "Feature", "id": name, "geometry": {"type": "Polygon", "coordinates": [ring, *holes]},
            "properties": {"objectType": "annotation", "classification": {"name": name, "color": [200, 0, 0]}}}


def write_geojson(path: Path, features: list[dict]) -> Path:
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return path


def write_example(directory: Path, seed: int = 0) -> dict[str, Path]:
    """Three patients' slides (one has two), each a small pyramidal TIFF at 0.5 um/px, with a manifest.

    Each slide is tissue on white glass: a band of "normal" tissue with a "tumor" block of dense, dark
    nuclei, both outlined in a QuPath GeoJSON beside the manifest (the outlines cover all the tissue, so
    every tile the reader keeps is labelled). The manifest names each slide's patient, site, slide label
    and annotation file; the patient names are synthetic.

    Returns:
        ``{"source": <slides folder>, "labels": <manifest CSV>}``.
    """
    directory = Path(directory)
    rng = np.random.default_rng(seed)
    slides = directory / "slides"
    slides.mkdir(parents=True, exist_ok=True)
    rows = []
    size, margin = EXAMPLE_SIZE, 32
    plan = [(EXAMPLE_PATIENTS[0], "A1"), (EXAMPLE_PATIENTS[1], "B1"), (EXAMPLE_PATIENTS[1], "B2"),
            (EXAMPLE_PATIENTS[2], "C1")]
    for index, (patient, name) in enumerate(plan):
        image = np.ones((size, size, 3), np.float32)
        inner = size - 2 * margin
        image[margin:size - margin, margin:size - margin] = tissue_texture(rng, inner, inner)
        split = margin + inner // 2
        image[margin:size - margin, split:size - margin] = tissue_texture(rng, inner, size - margin - split, dense=True)
        write_pyramid_tiff(slides / f"{name}.tif", (image * 255).round().astype(np.uint8), EXAMPLE_MPP, tile=64,
                           min_level_side=96)
        geojson = write_geojson(directory / f"{name}.geojson", [
            region_feature("normal", [[0, 0], [split, 0], [split, size], [0, size], [0, 0]]),
            region_feature("tumor", [[split, 0], [size, 0], [size, size], [split, size], [split, 0]]),
        ])
        rows.append([f"{name}.tif", patient, f"SITE-{index % 2}", "tumor", geojson.name])
    manifest = directory / "manifest.csv"
    with manifest.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["slide", "patient", "site", "label", "annotations"])
        writer.writerows(rows)
    return {"source": slides, "labels": manifest}


DICOM_WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"
"""VL Whole Slide Microscopy Image Storage (DICOM PS3.3 A.32.8)."""


def _dicom_uid(*parts: object) -> str:
    """A deterministic synthetic UID (pydicom's 2.25 root from a hash of ``parts``): same slide, same UIDs."""
    from pydicom.uid import generate_uid

    return generate_uid(prefix=None, entropy_srcs=[str(p) for p in parts])


def _dicom_frames(rgb: np.ndarray, tile: tuple[int, int], compression: str | None) -> list[bytes]:
    """The TILED_FULL frames of ``rgb``: row-major (rows, cols) tiles, the edge ones padded with white."""
    from PIL import Image

    height, width = rgb.shape[:2]
    frames = []
    for y in range(0, height, tile[0]):
        for x in range(0, width, tile[1]):
            frame = np.full((*tile, 3), 255, np.uint8)
            part = rgb[y:y + tile[0], x:x + tile[1]]
            frame[:part.shape[0], :part.shape[1]] = part
            if compression == "jpeg":
                buffer = io.BytesIO()
                Image.fromarray(frame).save(buffer, format="JPEG", quality=90)
                frames.append(buffer.getvalue())
            else:
                frames.append(frame.tobytes())
    return frames


def _dicom_instance(rgb: np.ndarray, spacing_mm: tuple[float, float], tile: tuple[int, int], image_type: list[str],
                    uids: dict[str, str], instance: int, compression: str | None, identifiers: dict[str, str]):
    """One DICOM WSI instance (a pyramid level or an associated image) holding ``rgb`` as tiled frames."""
    from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit, PYDICOM_IMPLEMENTATION_UID

    sop_instance = _dicom_uid(uids["series"], "instance", instance)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DICOM_WSI_SOP_CLASS
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = JPEGBaseline8Bit if compression == "jpeg" else ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = DICOM_WSI_SOP_CLASS, sop_instance
    ds.StudyInstanceUID, ds.SeriesInstanceUID = uids["study"], uids["series"]
    ds.FrameOfReferenceUID = uids["frame"]
    ds.Modality, ds.InstanceNumber, ds.SeriesNumber = "SM", instance, 1
    ds.ImageType = image_type
    for keyword, value in identifiers.items():
        setattr(ds, keyword, value)
    height, width = rgb.shape[:2]
    frames = _dicom_frames(rgb, tile, compression)
    ds.Rows, ds.Columns = tile
    ds.TotalPixelMatrixRows, ds.TotalPixelMatrixColumns = height, width
    ds.TotalPixelMatrixFocalPlanes = 1
    ds.NumberOfFrames = len(frames)
    ds.DimensionOrganizationType = "TILED_FULL"
    ds.SamplesPerPixel, ds.PlanarConfiguration = 3, 0
    ds.PhotometricInterpretation = "YBR_FULL_422" if compression == "jpeg" else "RGB"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.ImagedVolumeWidth, ds.ImagedVolumeHeight = width * spacing_mm[1], height * spacing_mm[0]
    measures = Dataset()
    measures.PixelSpacing = [f"{spacing_mm[0]:.10g}", f"{spacing_mm[1]:.10g}"]  # row (y), then column (x)
    measures.SliceThickness = "0.001"
    shared = Dataset()
    shared.PixelMeasuresSequence = [measures]
    ds.SharedFunctionalGroupsSequence = [shared]
    if compression == "jpeg":
        ds.PixelData = encapsulate(frames)
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
    else:
        ds.PixelData = b"".join(frames)
        ds["PixelData"].VR = "OB"
    return ds


def write_dicom_wsi(folder: Path | str, rgb: np.ndarray, mpp: float, tile: int = 64, levels: int = 2,
                    compression: str | None = "jpeg", label: np.ndarray | None = None,
                    identifiers: dict[str, str] | None = None, seed: object = 0) -> Path:
    """Write ``rgb`` (H, W, 3) uint8 as a DICOM WSI: one VL Whole Slide Microscopy file per pyramid level.

    The layout OpenSlide 4 reads: every file of the slide in one folder, sharing a SeriesInstanceUID;
    TILED_FULL frames (row-major tiles); ImageType ``ORIGINAL/PRIMARY/VOLUME/NONE`` for level 0 and
    ``DERIVED/PRIMARY/VOLUME/RESAMPLED`` for the halved levels; the resolution as the shared functional
    group's PixelSpacing in millimetres (OpenSlide's ``openslide.mpp-x/y``).

    Args:
        folder: the slide's folder (created; it should hold no other slide).
        rgb: level-0 pixels.
        mpp: level-0 microns per pixel.
        tile: frame side in pixels.
        levels: pyramid levels (each halves the previous, box filter).
        compression: ``jpeg`` (baseline, YCbCr, as scanners write) or ``None`` (explicit VR little endian RGB).
        label: an optional slide-label photo (H, W, 3), written as a ``LABEL`` image in its own file.
        identifiers: DICOM keywords and values to plant in every file (e.g. ``PatientName``), for the
            de-identification tests.
        seed: makes the synthetic UIDs of one slide differ from another's.

    Returns:
        the level-0 file (OpenSlide opens the slide by any of its files).
    """
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    uids = {"study": _dicom_uid(seed, "study"), "series": _dicom_uid(seed, "series"), "frame": _dicom_uid(seed, "frame")}
    identifiers = dict(identifiers or {})
    level = np.ascontiguousarray(rgb, dtype=np.uint8)
    first = None
    for index in range(levels):
        if index:
            h, w = level.shape[:2]
            level = np.asarray(Image.fromarray(level).resize((w // 2, h // 2), Image.Resampling.BOX))
        spacing = mpp * rgb.shape[1] / level.shape[1] / 1000.0
        image_type = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"] if index == 0 else \
            ["DERIVED", "PRIMARY", "VOLUME", "RESAMPLED"]
        ds = _dicom_instance(level, (spacing, spacing), (tile, tile), image_type, uids, index + 1, compression,
                             identifiers)
        path = folder / f"level-{index}.dcm"
        ds.save_as(path, enforce_file_format=True)
        first = first or path
    if label is not None:
        # An associated image is one frame of its own size (OpenSlide decodes frame (0, 0) as the whole image).
        ds = _dicom_instance(np.ascontiguousarray(label, dtype=np.uint8), (0.05, 0.05), label.shape[:2],
                             ["ORIGINAL", "PRIMARY", "LABEL", "NONE"], uids, levels + 1, compression, identifiers)
        ds.save_as(folder / "label.dcm", enforce_file_format=True)
    return first


def write_aperio_svs(path: Path | str, rgb: np.ndarray, mpp: float, label: np.ndarray | None = None,
                     description: str = "", label_description: str = "label", tile: int = 128) -> Path:
    """Write an Aperio-layout TIFF (OpenSlide reads it as ``aperio``): level 0, thumbnail, level 2, label.

    The layout OpenSlide's Aperio reader expects: tiled pyramid pages whose ImageDescription starts with
    "Aperio" (level 0 carrying ``MPP = ...`` and any extra ``|Key = value`` fields in ``description``), a
    stripped thumbnail as the second page, and the label photo as a stripped page with NewSubfileType 1
    whose description names it ``label``. The label is stored uncompressed, so its pixel bytes are in the
    file as given (tests plant text in them).
    """
    import tifffile
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    height, width = rgb.shape[:2]
    head = "Aperio Image Library v12.0.15 \r\n"
    half = np.asarray(Image.fromarray(rgb).resize((width // 2, height // 2), Image.Resampling.BOX))
    thumb = np.asarray(Image.fromarray(rgb).resize((max(1, width // 8), max(1, height // 8)), Image.Resampling.BOX))
    plain = {"photometric": "rgb", "metadata": None}
    with tifffile.TiffWriter(path) as tif:
        tif.write(rgb, tile=(tile, tile), compression="jpeg",
                  description=f"{head}{width}x{height} ({tile}x{tile}) JPEG/RGB Q=90|AppMag = 20|MPP = {mpp:.4f}"
                              f"{'|' + description if description else ''}", **plain)
        tif.write(thumb, compression="jpeg", description=f"{head}{width}x{height} -> {thumb.shape[1]}x"
                                                        f"{thumb.shape[0]} - ", **plain)
        tif.write(half, tile=(tile, tile), compression="jpeg",
                  description=f"{head}{width}x{height} -> {half.shape[1]}x{half.shape[0]} JPEG/RGB Q=90", **plain)
        if label is not None:
            tif.write(np.ascontiguousarray(label, dtype=np.uint8), subfiletype=1,
                      description=f"Aperio Image Library v12.0.15\r\n{label_description}", **plain)
    return path


def _philips_attribute(name: str, value: str, group: str = "0x301D", element: str = "0x1000",
                       vr: str = "IString") -> str:
    return f'<Attribute Name="{name}" Group="{group}" Element="{element}" PMSVR="{vr}">{value}</Attribute>'


def write_philips_tiff(path: Path | str, rgb: np.ndarray, mpp: float, levels: int = 2, tile: int = 128,
                       barcode: str | None = None, label: np.ndarray | None = None) -> Path:
    """Write ``rgb`` (H, W, 3) uint8 as a Philips TIFF (OpenSlide's ``philips`` reader).

    The layout that reader checks: Software starting with "Philips"; the first page's ImageDescription a
    ``DataObject`` of type ``DPUfsImport`` whose one ``WSI`` scanned image carries ``DICOM_PIXEL_SPACING``
    (mm, row then column: OpenSlide's mpp) and one ``PixelDataRepresentation`` per pyramid level (their
    spacings give the downsamples); tiled JPEG levels, the reduced ones marked as such; a stripped page
    whose description starts with "Label" for the label photo. ``barcode`` is stored base64-encoded as
    ``PIM_DP_UFS_BARCODE``, as the scanner does.
    """
    import base64

    import tifffile
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pyramid = [np.ascontiguousarray(rgb, dtype=np.uint8)]
    for _ in range(1, levels):
        h, w = pyramid[-1].shape[:2]
        pyramid.append(np.asarray(Image.fromarray(pyramid[-1]).resize((w // 2, h // 2), Image.Resampling.BOX)))

    def spacing(level: int) -> str:
        mm = mpp * 2**level / 1000.0
        return f'"{mm:.10g}" "{mm:.10g}"'

    representations = "".join(
        '<DataObject ObjectType="PixelDataRepresentation">'
        + _philips_attribute("DICOM_PIXEL_SPACING", spacing(i), "0x0028", "0x0030", "IDoubleArray")
        + _philips_attribute("PIIM_PIXEL_DATA_REPRESENTATION_NUMBER", str(i), "0x101D", "0x100B", "IUInt32")
        + "</DataObject>" for i in range(levels))
    wsi = ('<DataObject ObjectType="DPScannedImage">'
           + _philips_attribute("PIM_DP_IMAGE_TYPE", "WSI", element="0x1004")
           + _philips_attribute("DICOM_PIXEL_SPACING", spacing(0), "0x0028", "0x0030", "IDoubleArray")
           + _philips_attribute("PIIM_PIXEL_DATA_REPRESENTATION_SEQUENCE", f"<Array>{representations}</Array>",
                                "0x1001", "0x8B01", "IDataObjectArray")
           + "</DataObject>")
    header = _philips_attribute("PIM_DP_UFS_BARCODE", base64.b64encode(barcode.encode()).decode(),
                                element="0x1002") if barcode else ""
    description = ('<?xml version="1.0" encoding="UTF-8" ?>\n<DataObject ObjectType="DPUfsImport">' + header
                   + _philips_attribute("PIM_DP_SCANNED_IMAGES", f"<Array>{wsi}</Array>", element="0x1003",
                                        vr="IDataObjectArray")
                   + "</DataObject>")
    with tifffile.TiffWriter(path) as tif:
        for index, level in enumerate(pyramid):
            tif.write(level, photometric="rgb", tile=(tile, tile), compression="jpeg", metadata=None,
                      subfiletype=0 if index == 0 else 1, software="Philips DP v1.0",
                      description=description if index == 0 else f"level={index}")
        if label is not None:
            tif.write(np.ascontiguousarray(label, dtype=np.uint8), photometric="rgb", metadata=None,
                      software="Philips DP v1.0", description="Label")
    return path



# Hamamatsu NDPI private tags (OpenSlide's hamamatsu reader: the flag marks the format, the lens tells a
# pyramid level (> 0) from the macro photo (-1), the MCU starts let a reader seek to a restart interval).
NDPI_FORMAT_FLAG, NDPI_SOURCELENS, NDPI_FOCAL_PLANE, NDPI_MCU_STARTS = 65420, 65421, 65424, 65426
NDPI_PROPERTY_MAP = 65449


def _ndpi_jpeg(rgb: np.ndarray, tile: int | None) -> tuple[bytes, list[int]]:
    """A baseline 4:4:4 JPEG of ``rgb`` with a restart marker every ``tile`` px of an 8 px MCU row (None: no
    markers), and the byte offset of each restart interval's first MCU (the scan start, then after each RSTn).

    4:4:4 as the scanner writes it: with vertical chroma subsampling libjpeg's smooth upsampling reads the
    next MCU row too, which a reader decoding one restart interval does not have."""
    from PIL import Image

    options = {"restart_marker_blocks": tile // 8} if tile else {}
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, "JPEG", quality=90, subsampling="4:4:4", **options)
    data = buffer.getvalue()
    sos = data.index(b"\xff\xda")
    scan = sos + 2 + int.from_bytes(data[sos + 2:sos + 4], "big")
    starts, at = [scan], scan
    while tile:
        at = data.find(b"\xff", at)
        if at < 0 or data[at + 1] == 0xD9:  # end of image
            break
        if 0xD0 <= data[at + 1] <= 0xD7:
            starts.append(at + 2)
        at += 2
    return data, starts


def _ndpi_file(pages: list[tuple[bytes, list[tuple[int, int, object]]]]) -> bytes:
    """A classic little-endian TIFF laid out as NDPI is: 8-byte offsets to the first and each next directory
    (the header's 4 high bytes zero), after each directory a block of the entries' high offset bytes, each
    page's strip and out-of-line values before its directory.

    ``pages``: (strip bytes, [(tag, TIFF type, values)]); StripOffsets and StripByteCounts are added."""
    import struct

    formats = {2: "s", 3: "H", 4: "I", 5: "II", 9: "i", 11: "f"}
    out = bytearray(b"II*\x00" + bytes(8))
    next_pointer = 4
    for strip, tags in pages:
        strip_at = len(out)
        out += strip
        entries = []
        for tag, kind, values in sorted(tags + [(273, 4, [strip_at]), (279, 4, [len(strip)])], key=lambda t: t[0]):
            if kind == 2:
                payload, count = values.encode("ascii") + b"\x00", len(values) + 1
            else:
                flat = [v for value in values for v in (value if isinstance(value, tuple) else (value,))]
                payload, count = struct.pack("<" + formats[kind][0] * len(flat), *flat), len(values)
            if len(payload) <= 4:
                entries.append(struct.pack("<HHI", tag, kind, count) + payload.ljust(4, b"\x00"))
            else:
                if len(out) % 2:
                    out += b"\x00"
                entries.append(struct.pack("<HHII", tag, kind, count, len(out)))
                out += payload
        if len(out) % 2:
            out += b"\x00"
        out[next_pointer:next_pointer + 8] = struct.pack("<Q", len(out))
        out += struct.pack("<H", len(entries)) + b"".join(entries)
        next_pointer = len(out)
        out += bytes(8) + bytes(4 * len(entries))  # then the high 4 bytes of each entry's value (all zero here)
    return bytes(out)


def write_ndpi(path: Path | str, rgb: np.ndarray, mpp: float | None, levels: int = 2, tile: int = 128,
               lens: float = 20.0, macro: np.ndarray | None = None, properties: dict[str, str] | None = None) -> Path:
    """Write ``rgb`` (H, W, 3) uint8 as a Hamamatsu NDPI (OpenSlide's ``hamamatsu-ndpi`` reader).

    The layout that reader checks: TIFF pages carrying tag 65420, 8-byte directory offsets; each pyramid level
    (widest first) one JPEG strip of the whole level with a restart marker every ``tile`` px of an MCU row
    (OpenSlide's tiles are those restart intervals), its ``SourceLens`` (65421) the objective power over the
    downsample, focal plane (65424) 0 and the offset of every restart interval (65426); the resolution tags
    in pixels per centimetre (OpenSlide's mpp; none when ``mpp`` is None). ``macro`` is stored as a page with
    lens -1 (OpenSlide's ``macro`` associated image) and ``properties`` as the ``key=value`` map of tag 65449
    (scanner metadata; tests plant identifiers in both). Every level's sides must be multiples of ``tile`` and 8.
    """
    from fractions import Fraction

    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pyramid = [np.ascontiguousarray(rgb, dtype=np.uint8)]
    for _ in range(1, levels):
        h, w = pyramid[-1].shape[:2]
        pyramid.append(np.asarray(Image.fromarray(pyramid[-1]).resize((w // 2, h // 2), Image.Resampling.BOX)))
    for level in pyramid:
        if level.shape[1] % tile or level.shape[0] % 8:
            raise ValueError(f"an NDPI level of {level.shape[1]} x {level.shape[0]} px is not a whole number of "
                             f"{tile} x 8 px restart intervals")
    pages = [(level, lens / 2**index, tile) for index, level in enumerate(pyramid)]
    if macro is not None:
        pages.append((np.ascontiguousarray(macro, dtype=np.uint8), -1.0, None))
    encoded = []
    for index, (image, page_lens, page_tile) in enumerate(pages):
        data, starts = _ndpi_jpeg(image, page_tile)
        height, width = image.shape[:2]
        tags = [(254, 4, [0]), (256, 4, [width]), (257, 4, [height]), (258, 3, [8, 8, 8]), (259, 3, [7]),
                (262, 3, [6]), (277, 3, [3]), (278, 4, [height]), (305, 2, "NDP.scan 3.2.4"),
                (NDPI_FORMAT_FLAG, 4, [1]), (NDPI_SOURCELENS, 11, [page_lens]), (NDPI_FOCAL_PLANE, 9, [0])]
        if page_lens > 0 and mpp is not None:
            per_cm = Fraction(1e4 * width / (mpp * rgb.shape[1])).limit_denominator(10_000)
            ratio = (per_cm.numerator, per_cm.denominator)
            tags += [(282, 5, [ratio]), (283, 5, [ratio]), (296, 3, [3])]
        if page_tile:
            tags.append((NDPI_MCU_STARTS, 4, starts))
        if index == 0 and properties:
            tags.append((NDPI_PROPERTY_MAP, 2, "".join(f"{k}={v}\r\n" for k, v in properties.items())))
        encoded.append((data, tags))
    path.write_bytes(_ndpi_file(encoded))
    return path


def _le32(*values: int) -> bytes:
    import struct

    return struct.pack(f"<{len(values)}i", *values)


def write_mrxs(path: Path | str, rgb: np.ndarray, mpp: float, image: int = 128, levels: int = 3,
               missing: tuple[tuple[int, int], ...] = (), label: np.ndarray | None = None,
               general: dict[str, str] | None = None, slide_id: str = "5c1de0f7-0d6a-4d1a-9f4e-000000000001") -> Path:
    """Write ``rgb`` (H, W, 3) uint8 as a 3DHISTECH MIRAX slide (OpenSlide's ``mirax`` reader).

    A MIRAX slide is ``slide.mrxs`` plus a folder ``slide/`` holding ``Slidedat.ini`` (the layout),
    ``Index.dat`` (where each image is) and ``Data0000.dat`` (the JPEG images). Level 0 is a grid of camera
    images of ``image`` px, one per camera position, without overlap (so no position buffer is needed);
    each next level halves the previous one and concatenates 2 x 2 of its images into one image of the same
    size (``IMAGE_CONCAT_FACTOR`` 1), as the scanner stores them. ``missing`` lists grid cells (column, row)
    the scanner skipped (no image at any level unless a sibling is present): OpenSlide's bounds then start
    at the first scanned image, the offset QuPath applies. ``label`` is stored as the slide barcode image
    (OpenSlide's ``label``) and ``general`` as extra ``[GENERAL]`` keys (tests plant identifiers in both).
    """
    from PIL import Image

    path = Path(path)
    folder = path.with_suffix("")
    folder.mkdir(parents=True, exist_ok=True)
    height, width = rgb.shape[:2]
    if width % image or height % image:
        raise ValueError(f"a {width} x {height} px slide is not a whole number of {image} px camera images")
    across, down = width // image, height // image
    present = np.ones((down, across), bool)
    for column, row in missing:
        present[row, column] = False

    data, records = bytearray(), []  # records[level] = [(image index, offset, length)]
    for level in range(levels):
        concat = 2**level
        records.append([])
        for y in range(0, down, concat):
            for x in range(0, across, concat):
                if not present[y:y + concat, x:x + concat].any():
                    continue
                block = np.full((image * concat, image * concat, 3), 255, np.uint8)
                part = rgb[y * image:(y + concat) * image, x * image:(x + concat) * image]
                block[:part.shape[0], :part.shape[1]] = part
                for row, column in zip(*np.nonzero(~present[y:y + concat, x:x + concat])):
                    block[row * image:(row + 1) * image, column * image:(column + 1) * image] = 255
                picture = Image.fromarray(block).resize((image, image), Image.Resampling.BOX)
                buffer = io.BytesIO()
                picture.save(buffer, "JPEG", quality=90)
                records[-1].append((y * across + x, len(data), len(buffer.getvalue())))
                data += buffer.getvalue()
    label_record = None
    if label is not None:
        buffer = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(label, dtype=np.uint8)).save(buffer, "JPEG", quality=95)
        label_record = (len(data), len(buffer.getvalue()))
        data += buffer.getvalue()
    (folder / "Data0000.dat").write_bytes(bytes(data))

    # Index.dat: version, slide id, then a pointer to the table of zoom-level lists and one to the table of
    # non-hierarchical records; each list is a head (0, first page) and pages (count, next, records...).
    head = b"01.02" + slide_id.encode("ascii")
    index = bytearray(head + bytes(8))
    hier_table = len(index)
    index += bytes(4 * levels)
    for level, level_records in enumerate(records):
        page = len(index) + 8
        index[hier_table + 4 * level:hier_table + 4 * level + 4] = _le32(len(index))
        index += _le32(0, page) + _le32(len(level_records), 0)
        for image_index, offset, length in level_records:
            index += _le32(image_index, offset, length, 0)
    nonhier_table = len(index)
    if label_record is not None:
        index += _le32(nonhier_table + 4)
        index += _le32(0, len(index) + 8) + _le32(1, 0, 0, 0, label_record[0], label_record[1], 0)
    index[len(head):len(head) + 8] = _le32(hier_table, nonhier_table)
    (folder / "Index.dat").write_bytes(bytes(index))

    lines = ["[GENERAL]", f"SLIDE_ID = {slide_id}", f"IMAGENUMBER_X = {across}", f"IMAGENUMBER_Y = {down}",
             "OBJECTIVE_MAGNIFICATION = 20", "CameraImageDivisionsPerSide = 1",
             *(f"{k} = {v}" for k, v in (general or {}).items()),
             "[HIERARCHICAL]", "HIER_COUNT = 1", f"NONHIER_COUNT = {0 if label is None else 1}",
             "INDEXFILE = Index.dat", "HIER_0_NAME = Slide zoom level", f"HIER_0_COUNT = {levels}"]
    for level in range(levels):
        lines += [f"HIER_0_VAL_{level} = ZoomLevel_{level}",
                  f"HIER_0_VAL_{level}_SECTION = LAYER_0_LEVEL_{level}_SECTION"]
    if label is not None:
        lines += ["NONHIER_0_NAME = Scan data layer", "NONHIER_0_COUNT = 1",
                  "NONHIER_0_VAL_0 = ScanDataLayer_SlideBarcode",
                  "NONHIER_0_VAL_0_SECTION = NONHIERLAYER_0_VAL_0_SECTION"]
    lines += ["[DATAFILE]", "FILE_COUNT = 1", "FILE_0 = Data0000.dat"]
    for level in range(levels):
        lines += [f"[LAYER_0_LEVEL_{level}_SECTION]", f"IMAGE_CONCAT_FACTOR = {0 if level == 0 else 1}",
                  "OVERLAP_X = 0", "OVERLAP_Y = 0", f"MICROMETER_PER_PIXEL_X = {mpp * 2**level:.6g}",
                  f"MICROMETER_PER_PIXEL_Y = {mpp * 2**level:.6g}", "IMAGE_FILL_COLOR_BGR = 16777215",
                  f"DIGITIZER_WIDTH = {image}", f"DIGITIZER_HEIGHT = {image}", "IMAGE_FORMAT = JPEG"]
    if label is not None:
        lines += ["[NONHIERLAYER_0_VAL_0_SECTION]", "BARCODE_IMAGE_TYPE = JPEG"]
    (folder / "Slidedat.ini").write_text("\r\n".join(lines) + "\r\n", encoding="utf-8")
    path.write_bytes(b"")  # OpenSlide only checks that the .mrxs exists; it reads the folder beside it
    return path
