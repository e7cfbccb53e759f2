"""Scenes given as STAC items (a local item JSON, or a static catalogue folder), and STAC items for predictions.

Bands are resolved from the item's assets: an asset's ``eo:bands`` name (or common name and centre
wavelength) says which band of the sensor table it holds, its ``raster:bands`` scale and offset say how its
values read. The sensor comes from ``platform``/``constellation``, the processing level from
``processing:level`` or the item id. Quality assets (``qa_pixel``, ``scl``, ``fmask``, ``bqa``) are the
scene's mask, as in a band folder.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from domains.satellite.sensors import (
    HLS,
    LANDSAT_C2_L2_SR,
    SENSORS,
    SENTINEL1,
    SENTINEL2,
    SENTINEL2_BASELINE_0400,
    SENTINEL2_L1C,
    BandFile,
    FolderScan,
    QualityFile,
    ReflectanceScale,
    Sensor,
)
from domains.spec import DomainInputError

_QUALITY_ASSETS = {"qa_pixel": "landsat-qa-pixel", "bqa": "landsat-bqa", "scl": "sentinel2-scl",
                   "fmask": "hls-fmask"}


def is_stac_source(path: Path) -> bool:
    """A ``.json`` file (a STAC item) or a folder holding a ``catalog.json`` (a static catalogue)."""
    if path.is_file():
        return path.suffix.lower() == ".json"
    return path.is_dir() and (path / "catalog.json").is_file()


def catalog_items(path: Path) -> list[Path]:
    """The item files of a static catalogue folder (or ``[path]`` for an item file), sorted by id.

    Raises:
        DomainInputError: the catalogue cannot be read or holds no item.
    """
    if path.is_file():
        return [path]
    import pystac

    try:
        catalog = pystac.Catalog.from_file(str(path / "catalog.json"))
        items = sorted(catalog.get_items(recursive=True), key=lambda item: item.id)
    except Exception as error:  # noqa: BLE001 - pystac raises many types for one bad file
        raise DomainInputError(path / "catalog.json", f"is not a readable STAC catalogue: {error}") from None
    if not items:
        raise DomainInputError(path / "catalog.json", "holds no STAC item")
    return [Path(item.get_self_href()) for item in items]


def _read_item(path: Path):
    import pystac

    try:
        return pystac.Item.from_file(str(path))
    except Exception as error:  # noqa: BLE001
        raise DomainInputError(path, f"is not a readable STAC item: {error}") from None


def _item_sensor(item, path: Path, table: Sensor | None) -> Sensor:
    text = " ".join(str(item.properties.get(k, "")) for k in ("platform", "constellation", "instruments"))
    text = (text + " " + item.id).lower()
    found = None
    if re.search(r"landsat[-_ ]?0?([4-9])", text):
        found = SENSORS[f"landsat{re.search(r'landsat[-_ ]?0?([4-9])', text)[1]}"]
    elif "hls" in text:
        found = HLS
    elif "sentinel-2" in text or "sentinel2" in text or item.id.upper().startswith("S2"):
        found = SENTINEL2
    elif "sentinel-1" in text or "sentinel1" in text or item.id.upper().startswith("S1"):
        found = SENTINEL1
    if table is not None:
        if found is not None and found.name != table.name:
            raise DomainInputError(path, f"sensor {table.name} was asked for but the item is {found.title}")
        return table
    if found is None:
        raise DomainInputError(path, f"the item names no known sensor (platform {item.properties.get('platform')!r}); "
                                     "give --sensor")
    return found


def _item_level(item, sensor: Sensor) -> str:
    level = str(item.properties.get("processing:level", "")).lower()
    text = f"{item.id} {level}".upper()
    if sensor is SENTINEL2:
        return "l2a" if "L2A" in text else "l1c" if "L1C" in text else ""
    if sensor.name.startswith("landsat"):
        return "l2sr" if "L2" in text else "l1" if "L1" in text else ""
    return sensor.levels[0] if len(sensor.levels) == 1 else ""


def _asset_band(key: str, asset, sensor: Sensor) -> str | None:
    """Which band of ``sensor`` an asset holds: its eo:bands name, its key, or its centre wavelength."""
    bands = asset.extra_fields.get("eo:bands") or asset.extra_fields.get("bands") or []
    candidates = [b.get("name", "") for b in bands if isinstance(b, dict)] + [key]
    for name in candidates:
        plain = re.sub(r"^(SR|ST)_", "", str(name), flags=re.IGNORECASE)
        for spelled in (plain, re.sub(r"^B0?(\d)$", r"B0\1", plain), re.sub(r"^B0(\d)$", r"B\1", plain)):
            try:
                return sensor.channel(spelled).name
            except KeyError:
                continue
    for band in bands:
        wavelength = band.get("center_wavelength") if isinstance(band, dict) else None
        if wavelength:
            nearest = min(sensor.channels, key=lambda c: abs((c.wavelength_nm or 0) - wavelength * 1000))
            if abs((nearest.wavelength_nm or 0) - wavelength * 1000) <= 30:
                return nearest.name
    return None


def _asset_scaling(asset, sensor: Sensor, level: str, item) -> ReflectanceScale:
    raster = asset.extra_fields.get("raster:bands") or []
    if raster and isinstance(raster[0], dict) and ("scale" in raster[0] or "offset" in raster[0]):
        return ReflectanceScale("stac-raster-bands", float(raster[0].get("scale", 1.0)),
                                float(raster[0].get("offset", 0.0)))
    if sensor is SENTINEL2:
        baseline = str(item.properties.get("s2:processing_baseline", "0"))
        return SENTINEL2_BASELINE_0400 if float(baseline or 0) >= 4.0 else SENTINEL2_L1C
    if sensor.name.startswith("landsat") and level == "l2sr":
        return LANDSAT_C2_L2_SR
    return sensor.scaling


def scan_stac_item(path: Path, table: Sensor | None = None) -> FolderScan:
    """Resolve a STAC item's band and quality assets into a scene scan (see :class:`FolderScan`).

    A catalogue folder must hold exactly one item to be one scene (several are a time series).

    Raises:
        DomainInputError: the item is unreadable, names no known sensor, holds no band asset, or an asset's
            file is missing (naming the asset and its href).
    """
    items = catalog_items(path)
    if len(items) != 1:
        raise DomainInputError(path, f"catalogue holds {len(items)} items; one scene is one item (give the item "
                                     "file, or the catalogue as a time series)")
    item_path = items[0]
    item = _read_item(item_path)
    sensor = _item_sensor(item, item_path, table)
    level = _item_level(item, sensor)
    bands: dict[str, BandFile] = {}
    quality = None
    missing = []
    for key, asset in item.assets.items():
        href = Path(asset.get_absolute_href() or asset.href)
        kind = _QUALITY_ASSETS.get(key.lower())
        band = None if kind else _asset_band(key, asset, sensor)
        if kind is None and band is None:
            continue  # thumbnails, metadata, angles
        if not href.is_file():
            missing.append(f"{key} ({asset.href})")
            continue
        if kind is not None:
            quality = QualityFile(href, sensor.name, kind)
        elif band not in bands:
            bands[band] = BandFile(href, sensor.name, band, _asset_scaling(asset, sensor, level, item), level)
    if missing:
        raise DomainInputError(item_path, f"asset file(s) missing: {', '.join(missing)}")
    if not bands:
        raise DomainInputError(item_path, f"no asset holds a {sensor.title} band (assets: {', '.join(item.assets)}); "
                                          "bands are named by eo:bands, the asset key or centre wavelength")
    ordered = {name: bands[name] for name in sensor.band_names if name in bands}
    return FolderScan(item_path, sensor, ordered, quality, level)


def write_prediction_item(raster: Path, layout, class_names: tuple[str, ...], source: Path) -> Path:
    """Write a STAC item beside a prediction GeoTIFF (``<raster>.json``), so catalogues pick the map up.

    The item's geometry is the scene's footprint in WGS84, its asset the class raster (roles data and
    classification, ``classification:classes`` naming each value), its datetime the source item's when the
    source is one (else the time of writing), and a ``derived_from`` link points at the source.
    """
    from datetime import datetime, timezone

    import pystac
    from rasterio.warp import transform_bounds

    height, width = layout.shape
    t = layout.transform
    left, top = t.c, t.f
    right, bottom = t.c + t.a * width, t.f + t.e * height
    west, south, east, north = transform_bounds(layout.crs, "EPSG:4326", min(left, right), min(top, bottom),
                                                max(left, right), max(top, bottom))
    when = datetime.now(timezone.utc)
    if layout.path.suffix.lower() == ".json" and layout.path.is_file():
        source_item = _read_item(layout.path)
        when = source_item.datetime or when
    item = pystac.Item(
        id=raster.stem, bbox=[west, south, east, north], datetime=when,
        geometry={"type": "Polygon", "coordinates": [[[west, south], [east, south], [east, north], [west, north],
                                                        [west, south]]]},
        properties={"vitrail:sensor": layout.sensor.name, "vitrail:level": layout.level,
                    "proj:code": f"EPSG:{layout.crs.to_epsg()}" if layout.crs.to_epsg() else None,
                    "proj:shape": [height, width], "proj:transform": [t.a, t.b, t.c, t.d, t.e, t.f]},
    )
    item.add_asset("classes", pystac.Asset(
        href=f"./{raster.name}", media_type=pystac.MediaType.GEOTIFF, roles=["data", "classification"],
        extra_fields={"classification:classes": [{"value": i, "name": name} for i, name in enumerate(class_names)],
                      "nodata": 255},
    ))
    item.add_link(pystac.Link("derived_from", str(Path(source).resolve())))
    target = raster.with_suffix(".json")
    payload = item.to_dict(include_self_link=False, transform_hrefs=False)
    target.write_text(json.dumps(payload, indent=2, default=str))
    return target


def write_scene_item(scene: Path, target: Path, item_id: str | None = None, sensor: Sensor | str | None = None) -> Path:
    """Describe a band folder as a STAC item (``eo:bands`` per band asset, the quality layer as a ``qa`` asset).

    The inverse of :func:`scan_stac_item`, for catalogues of local scenes (and for tests and demos): asset
    hrefs are relative to ``target``.

    Returns:
        The item file written.
    """
    import os
    from datetime import datetime, timezone

    import pystac

    from domains.satellite.scene import inspect_scene
    from domains.satellite.sensors import scan_band_folder
    from domains.satellite.timeseries import scene_date

    scan = scan_band_folder(scene, sensor)
    layout = inspect_scene(Path(scene), None, scan.sensor.name, None)
    date = scene_date(Path(scene))
    when = datetime.fromisoformat(date).replace(tzinfo=timezone.utc) if date else datetime.now(timezone.utc)
    platform = {"sentinel2": "sentinel-2a", "hls": "hls", "sentinel1": "sentinel-1a"}.get(
        scan.sensor.name, scan.sensor.name.replace("landsat", "landsat-"))
    item = pystac.Item(id=item_id or Path(scene).name, geometry=None, bbox=None, datetime=when,
                       properties={"platform": platform, "processing:level": scan.level.upper()})
    target.parent.mkdir(parents=True, exist_ok=True)
    for name, band in scan.bands.items():
        channel = scan.sensor.channel(name)
        extra = {"eo:bands": [{"name": name, "center_wavelength": (channel.wavelength_nm or 0) / 1000}],
                 "raster:bands": [{"scale": band.scaling.scale, "offset": band.scaling.offset}]}
        source = next(b for b in layout.bands if b.name == name)
        item.add_asset(name, pystac.Asset(href=os.path.relpath(source.path, target.parent), roles=["data"],
                                          media_type=pystac.MediaType.GEOTIFF, extra_fields=extra))
    if scan.quality is not None:
        key = {v: k for k, v in _QUALITY_ASSETS.items()}[scan.quality.kind]
        item.add_asset(key, pystac.Asset(href=os.path.relpath(scan.quality.path, target.parent), roles=["cloud"]))
    target.write_text(json.dumps(item.to_dict(include_self_link=False, transform_hrefs=False), indent=2))
    return target
