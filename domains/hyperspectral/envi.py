"""ENVI raster format: header parsing, windowed memmap reads and a writer for all three interleaves.

The format (Harris/NV5 "ENVI Header Format" reference): a plain-text ``.hdr`` starting with ``ENVI``,
``key = value`` lines (values in ``{...}`` may span lines), beside a headerless binary file named like
the header without ``.hdr`` (``cube.img``, ``cube.dat``, ``cube.bil``...) or with the header named
``<data file>.hdr``. The binary holds ``lines x samples x bands`` values of ``data type`` in one of
three orders: BSQ (band, line, sample), BIL (line, band, sample) and BIP (line, sample, band), after
``header offset`` bytes, in the ``byte order`` given (0 little endian, 1 big endian).

Reads never load the file: each window opens a fresh ``numpy.memmap``, copies the requested bands and
rows out and drops the map again, so the pages it touched leave the process's resident set.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from domains.input_guards import check_readable, check_source_size
from domains.spec import DomainInputError

# ENVI "data type" codes -> numpy dtypes (complex types are not radiance and are refused).
ENVI_DTYPES: dict[int, str] = {
    1: "u1", 2: "i2", 3: "i4", 4: "f4", 5: "f8", 12: "u2", 13: "u4", 14: "i8", 15: "u8",
}
DATA_SUFFIXES = (".img", ".dat", ".bsq", ".bil", ".bip", ".raw", "")
INTERLEAVES = ("bsq", "bil", "bip")


@dataclass(frozen=True)
class EnviHeader:
    """The fields of an ENVI header that Vitrail uses, in canonical units (wavelengths in nm)."""

    header_path: Path
    data_path: Path
    samples: int
    lines: int
    bands: int
    dtype: np.dtype
    interleave: str
    header_offset: int = 0
    wavelengths_nm: tuple[float, ...] | None = None
    fwhm_nm: tuple[float, ...] | None = None
    bad_bands: tuple[bool, ...] | None = None  # True where the band list ("bbl") marks a band bad
    ignore_value: float | None = None
    band_names: tuple[str, ...] | None = None
    map_info: str | None = None
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(bands, lines, samples)."""
        return self.bands, self.lines, self.samples

    @property
    def expected_bytes(self) -> int:
        return self.header_offset + self.samples * self.lines * self.bands * self.dtype.itemsize


def parse_header_text(text: str, path: Path) -> dict[str, str]:
    """Split an ENVI header into ``{lower-case key: raw value}``; braces may span lines."""
    if not text.lstrip().upper().startswith("ENVI"):
        raise DomainInputError(path, "is not an ENVI header (the first word must be 'ENVI')")
    fields: dict[str, str] = {}
    # One "key = value" per match; a braced value runs to its closing brace across newlines.
    for match in re.finditer(r"^\s*([^=\n]+?)\s*=\s*(\{[^}]*\}|[^\n]*)", text, flags=re.MULTILINE):
        fields[match.group(1).strip().lower()] = match.group(2).strip()
    return fields


def _list(value: str | None) -> list[str] | None:
    if value is None:
        return None
    inner = value.strip()
    if inner.startswith("{") and inner.endswith("}"):
        inner = inner[1:-1]
    items = [item.strip() for item in inner.replace("\n", " ").split(",")]
    return [item for item in items if item]


def _floats(value: str | None, key: str, path: Path) -> list[float] | None:
    items = _list(value)
    if items is None:
        return None
    try:
        return [float(item) for item in items]
    except ValueError as error:
        raise DomainInputError(path, f"header field '{key}' holds a non-number: {error}") from None


def _int(fields: dict[str, str], key: str, path: Path, default: int | None = None) -> int:
    if key not in fields:
        if default is not None:
            return default
        raise DomainInputError(path, f"header lacks the required field '{key}'")
    try:
        return int(fields[key])
    except ValueError:
        raise DomainInputError(path, f"header field '{key}' is not an integer: {fields[key]!r}") from None


def wavelength_scale_to_nm(units: str | None, values: list[float]) -> float:
    """Factor turning the header's wavelengths into nanometres (µm headers are common: AVIRIS, PRISMA)."""
    unit = (units or "").strip().lower()
    if unit in ("micrometers", "micrometer", "microns", "micron", "um", "µm"):
        return 1000.0
    if unit in ("nanometers", "nanometer", "nm"):
        return 1.0
    if unit in ("millimeters", "mm"):
        return 1e6
    # Unknown or absent units: imaging spectrometers cover ~0.35-2.5 µm, so small numbers are µm.
    return 1000.0 if values and max(values) < 30 else 1.0


def find_header_and_data(path: Path) -> tuple[Path, Path]:
    """Resolve a header or data path into (header, data file); raise naming what is missing."""
    path = Path(path)
    if path.suffix.lower() == ".hdr":
        header = path
        base = path.with_suffix("")
        candidates = [base.with_suffix(s) if s else base for s in DATA_SUFFIXES]
        # ``cube.img.hdr`` names its data file ``cube.img``.
        if base.suffix.lower() in DATA_SUFFIXES:
            candidates.insert(0, base)
        # A dangling or looping link named like the data file is that file, and is reported as such.
        data = next((c for c in candidates if (c.is_file() or c.is_symlink()) and c != header), None)
        check_readable(header, "file")
        if data is None:
            raise DomainInputError(header, f"has no data file beside it (looked for {', '.join(c.name for c in candidates)})")
        return header, check_readable(data, "file")
    check_readable(path, "file")
    for header in (path.with_suffix(".hdr"), path.with_name(path.name + ".hdr")):
        if header.is_file() or header.is_symlink():
            return check_readable(header, "file"), path
    raise DomainInputError(path, f"has no ENVI header beside it ({path.with_suffix('.hdr').name} or {path.name}.hdr)")


def read_envi_header(path: Path | str) -> EnviHeader:
    """Parse and validate an ENVI header and check its data file's size.

    Args:
        path: the ``.hdr`` or the data file.

    Raises:
        DomainInputError: missing files or fields, an unsupported data type or interleave, list fields
            whose length is not the band count, or a data file whose size is not what the header says.
    """
    header_path, data_path = find_header_and_data(Path(path))
    try:
        text = header_path.read_text(errors="replace")
    except OSError as error:
        raise DomainInputError(header_path, f"cannot be read: {error}") from None
    fields = parse_header_text(text, header_path)
    samples = _int(fields, "samples", header_path)
    lines = _int(fields, "lines", header_path)
    bands = _int(fields, "bands", header_path)
    if min(samples, lines, bands) < 1:
        raise DomainInputError(header_path, f"samples/lines/bands must be positive, got {samples}/{lines}/{bands}")
    check_source_size(header_path, (lines, samples, bands), "lines x samples x bands")
    code = _int(fields, "data type", header_path)
    if code not in ENVI_DTYPES:
        raise DomainInputError(header_path, f"data type {code} is not supported (supported: {sorted(ENVI_DTYPES)})")
    order = _int(fields, "byte order", header_path, default=0)
    if order not in (0, 1):
        raise DomainInputError(header_path, f"byte order must be 0 or 1, got {order}")
    dtype = np.dtype(("<" if order == 0 else ">") + ENVI_DTYPES[code])
    interleave = fields.get("interleave", "bsq").strip().lower()
    if interleave not in INTERLEAVES:
        raise DomainInputError(header_path, f"interleave {interleave!r} is not one of {', '.join(INTERLEAVES)}")
    offset = _int(fields, "header offset", header_path, default=0)

    wavelengths = _floats(fields.get("wavelength"), "wavelength", header_path)
    fwhm = _floats(fields.get("fwhm"), "fwhm", header_path)
    bbl = _floats(fields.get("bbl"), "bbl", header_path)
    names = _list(fields.get("band names"))
    for key, values in (("wavelength", wavelengths), ("fwhm", fwhm), ("bbl", bbl), ("band names", names)):
        if values is not None and len(values) != bands:
            raise DomainInputError(header_path, f"header field '{key}' has {len(values)} entries for {bands} bands")
    scale = wavelength_scale_to_nm(fields.get("wavelength units"), wavelengths or [])
    ignore = None
    if "data ignore value" in fields:
        try:
            ignore = float(fields["data ignore value"])
        except ValueError:
            raise DomainInputError(header_path, f"data ignore value is not a number: {fields['data ignore value']!r}") from None
    header = EnviHeader(
        header_path=header_path, data_path=data_path, samples=samples, lines=lines, bands=bands, dtype=dtype,
        interleave=interleave, header_offset=offset,
        wavelengths_nm=tuple(w * scale for w in wavelengths) if wavelengths else None,
        fwhm_nm=tuple(f * scale for f in fwhm) if fwhm else None,
        bad_bands=tuple(v == 0 for v in bbl) if bbl else None,
        ignore_value=ignore, band_names=tuple(names) if names else None,
        map_info=fields.get("map info"), extra={k: v for k, v in fields.items() if k in ("description", "sensor type")},
    )
    actual = data_path.stat().st_size
    if actual != header.expected_bytes:
        raise DomainInputError(
            data_path,
            f"holds {actual} bytes but its header describes {header.expected_bytes} "
            f"({lines} lines x {samples} samples x {bands} bands x {dtype.itemsize} bytes + {offset} offset): "
            f"{'truncated' if actual < header.expected_bytes else 'extra data'} or wrong header",
        )
    return header


def _map_data(header: EnviHeader, mode: str) -> np.ndarray:
    """The data file as an array in its interleave's axis order: BSQ (band, line, sample), BIL (line, band,
    sample), BIP (line, sample, band); nothing is read until it is indexed."""
    shapes = {
        "bsq": (header.bands, header.lines, header.samples),
        "bil": (header.lines, header.bands, header.samples),
        "bip": (header.lines, header.samples, header.bands),
    }
    return np.memmap(header.data_path, dtype=header.dtype, mode=mode, offset=header.header_offset,
                     shape=shapes[header.interleave])


def read_envi_window(header: EnviHeader, bands: np.ndarray | list[int] | None, rows: slice, cols: slice) -> np.ndarray:
    """Copy bands x rows x cols out of an ENVI data file as float32 (bands, rows, cols).

    Only the pages holding the requested values are touched: BSQ reads each band's row block, BIL reads
    the requested band lines of each row, BIP reads whole rows (every band of a pixel is adjacent).
    """
    band_index = np.arange(header.bands) if bands is None else np.asarray(bands, dtype=np.int64)
    raw = _map_data(header, "r")
    try:
        if header.interleave == "bsq":
            out = raw[band_index, rows, cols]
        elif header.interleave == "bil":
            out = raw[rows, band_index, cols].transpose(1, 0, 2)
        else:
            out = raw[rows, cols][:, :, band_index].transpose(2, 0, 1)
        return np.ascontiguousarray(out, dtype=np.float32)
    finally:
        # Unmap now so the touched file pages stop counting towards this process's memory.
        mm = getattr(raw, "_mmap", None)
        del raw
        if mm is not None:
            try:
                mm.close()
            except BufferError:
                pass


def _format_list(values, fmt: str = "{:.4f}") -> str:
    return "{" + ", ".join(fmt.format(v) for v in values) + "}"


def write_envi(
    path: Path | str,
    data: np.ndarray | None,
    wavelengths_nm: np.ndarray | list[float] | None,
    fwhm_nm: np.ndarray | list[float] | None = None,
    interleave: str = "bil",
    ignore_value: float | None = None,
    bad_bands: np.ndarray | list[bool] | None = None,
    byte_order: int = 0,
    header_offset: int = 0,
    shape: tuple[int, int, int] | None = None,
    dtype: str = "float32",
    description: str = "Vitrail hyperspectral cube",
    map_info: str | None = None,
) -> Path:
    """Write a (bands, lines, samples) cube as ENVI: ``<path>`` (data) and ``<path minus suffix>.hdr``.

    With ``data=None`` only the header and an empty data file of the right size are written (fill it
    afterwards with :func:`write_envi_rows`), which lets a capture larger than memory be generated.

    Returns:
        The data file's path.
    """
    path = Path(path)
    interleave = interleave.lower()
    if interleave not in INTERLEAVES:
        raise ValueError(f"interleave must be one of {INTERLEAVES}, got {interleave!r}")
    if data is not None:
        data = np.asarray(data)
        shape = data.shape
        dtype = data.dtype.name
    if shape is None or len(shape) != 3:
        raise ValueError("write_envi needs data or a (bands, lines, samples) shape")
    bands, lines, samples = shape
    codes = {np.dtype(v).name: k for k, v in ENVI_DTYPES.items()}
    if np.dtype(dtype).name not in codes:
        raise ValueError(f"dtype {dtype} has no ENVI data type code")
    fields = [
        "ENVI",
        f"description = {{{description}}}",
        f"samples = {samples}",
        f"lines = {lines}",
        f"bands = {bands}",
        f"header offset = {header_offset}",
        "file type = ENVI Standard",
        f"data type = {codes[np.dtype(dtype).name]}",
        f"interleave = {interleave}",
        f"byte order = {byte_order}",
    ]
    if wavelengths_nm is not None:
        fields += ["wavelength units = Nanometers", f"wavelength = {_format_list(wavelengths_nm)}"]
    if fwhm_nm is not None:
        fields.append(f"fwhm = {_format_list(fwhm_nm)}")
    if bad_bands is not None:
        fields.append(f"bbl = {_format_list([0 if b else 1 for b in bad_bands], '{:d}')}")
    if ignore_value is not None:
        fields.append(f"data ignore value = {ignore_value:g}")
    if map_info is not None:
        fields.append(f"map info = {map_info}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".hdr").write_text("\n".join(fields) + "\n")
    itemsize = np.dtype(dtype).itemsize
    with open(path, "wb") as handle:
        handle.write(b"\0" * header_offset)
        handle.truncate(header_offset + bands * lines * samples * itemsize)
    if data is not None:
        write_envi_rows(path, data, 0)
    return path


def write_envi_rows(path: Path | str, block: np.ndarray, first_row: int) -> None:
    """Write a (bands, rows, samples) block into an existing ENVI file at ``first_row``."""
    header = read_envi_header(path)
    block = np.asarray(block)
    raw = _map_data(header, "r+")
    rows = slice(first_row, first_row + block.shape[1])
    if header.interleave == "bsq":
        raw[:, rows, :] = block
    elif header.interleave == "bil":
        raw[rows] = block.transpose(1, 0, 2)
    else:
        raw[rows] = block.transpose(1, 2, 0)
    raw.flush()
    del raw
