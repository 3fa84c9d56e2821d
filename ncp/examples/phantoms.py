"""Small synthetic images with anatomy-like structure, made with NumPy only (no pixel loops).

A body region is a list of ellipses, each a tissue; a modality maps tissues to values (HU for
CT, signal for an MR weighting, activity for PET, brightness for a radiograph). Volumes taper
towards their ends so neighbouring slices differ. Images are small (64 or 128 pixels square):
they exist to make viewers, transfers and checksums realistic, not to be read clinically.
"""

from __future__ import annotations

import numpy as np

Ellipse = tuple[str, float, float, float, float]
"""(tissue, centre row, centre column, row radius, column radius), relative to image size."""

_REGIONS: dict[str, tuple[Ellipse, ...]] = {
    "CHEST": (
        ("fat", 0.52, 0.5, 0.38, 0.46),
        ("soft", 0.52, 0.5, 0.35, 0.43),
        ("lung", 0.48, 0.3, 0.25, 0.15),
        ("lung", 0.48, 0.7, 0.25, 0.15),
        ("organ", 0.55, 0.56, 0.14, 0.13),
        ("vessel", 0.6, 0.47, 0.04, 0.04),
        ("bone", 0.8, 0.5, 0.06, 0.06),
        ("fluid", 0.8, 0.5, 0.025, 0.025),
    ),
    "ABDOMEN": (
        ("fat", 0.52, 0.5, 0.38, 0.46),
        ("soft", 0.52, 0.5, 0.33, 0.41),
        ("organ", 0.45, 0.32, 0.18, 0.17),
        ("organ", 0.45, 0.72, 0.08, 0.1),
        ("organ", 0.62, 0.3, 0.07, 0.05),
        ("organ", 0.62, 0.7, 0.07, 0.05),
        ("air", 0.38, 0.6, 0.04, 0.06),
        ("vessel", 0.64, 0.5, 0.03, 0.03),
        ("bone", 0.76, 0.5, 0.06, 0.06),
    ),
    "HEAD": (
        ("bone", 0.5, 0.5, 0.42, 0.36),
        ("brain", 0.5, 0.5, 0.38, 0.32),
        ("fluid", 0.47, 0.44, 0.09, 0.03),
        ("fluid", 0.47, 0.56, 0.09, 0.03),
        ("soft", 0.3, 0.5, 0.05, 0.2),
    ),
    "LSPINE": (
        ("fat", 0.5, 0.5, 0.48, 0.4),
        ("soft", 0.5, 0.5, 0.46, 0.36),
        ("bone", 0.14, 0.42, 0.06, 0.12),
        ("bone", 0.3, 0.42, 0.06, 0.12),
        ("bone", 0.46, 0.42, 0.06, 0.12),
        ("bone", 0.62, 0.42, 0.06, 0.12),
        ("bone", 0.78, 0.42, 0.06, 0.12),
        ("fluid", 0.5, 0.6, 0.46, 0.035),
    ),
}
_REGIONS["WHOLEBODY"] = _REGIONS["ABDOMEN"]

_TISSUES = ("air", "fat", "soft", "organ", "fluid", "bone", "lung", "brain", "vessel")
_CONTRAST: dict[str, tuple[float, ...]] = {
    # Order of _TISSUES. CT in Hounsfield units; the rest in arbitrary stored units.
    "CT": (-1000, -100, 40, 60, 10, 700, -850, 35, 180),
    "T1": (0, 1100, 500, 600, 150, 250, 30, 650, 300),
    "T2": (0, 800, 450, 400, 1500, 150, 30, 700, 100),
    "FLAIR": (0, 700, 450, 400, 100, 150, 30, 750, 100),
    "DWI": (0, 50, 300, 350, 100, 20, 10, 500, 20),
    "STIR": (0, 80, 400, 450, 1400, 200, 30, 500, 100),
    "PET": (0, 300, 1500, 2500, 800, 1200, 300, 9000, 1800),
}
_BACKGROUND = {"CT": -1000.0}


def _grid(rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:rows, 0:cols].astype(np.float32)
    return (yy + 0.5) / rows, (xx + 0.5) / cols


def _paint(
    region: tuple[Ellipse, ...],
    values: dict[str, float],
    scale: np.ndarray,
    rows: int,
    cols: int,
    background: float,
) -> np.ndarray:
    """Paint ellipses in order onto a stack; `scale` (n,) shrinks them slice by slice."""
    yy, xx = _grid(rows, cols)
    limit = (scale.astype(np.float32) ** 2)[:, None, None]
    out = np.full((len(scale), rows, cols), background, dtype=np.float32)
    for tissue, cy, cx, ry, rx in region:
        # Squared normalised radius in the plane; an ellipse scaled by s holds r2 <= s².
        r2 = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
        out[r2[None] <= limit] = values[tissue]
    return out


def _noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    return rng.standard_normal(shape, dtype=np.float32) * np.float32(sigma)


def _taper(n: int, strength: float) -> np.ndarray:
    """Per-slice size factor: 1 in the middle of the volume, smaller towards its ends."""
    z = np.linspace(-1.0, 1.0, n) if n > 1 else np.zeros(1)
    return np.sqrt(np.clip(1.0 - (strength * z) ** 2, 0.05, 1.0))


def smooth_field(shape: tuple[int, ...], rng: np.random.Generator, sigma: float) -> np.ndarray:
    """Low-pass filtered noise in [0, 1] over the last two axes, for tissue texture."""
    noise = rng.standard_normal(shape, dtype=np.float32)
    fy = np.fft.fftfreq(shape[-2])[:, None]
    fx = np.fft.rfftfreq(shape[-1])[None, :]
    kernel = np.exp(-((fy**2 + fx**2) * (2 * np.pi * sigma) ** 2) / 2)
    field = np.fft.irfft2(np.fft.rfft2(noise) * kernel, s=shape[-2:]).astype(np.float32)
    low, high = field.min(), field.max()
    return np.asarray((field - low) / (high - low + np.float32(1e-12)), dtype=np.float32)


def _region(body_part: str) -> tuple[Ellipse, ...]:
    return _REGIONS.get(body_part, _REGIONS["ABDOMEN"])


def _values(contrast: str) -> dict[str, float]:
    return dict(zip(_TISSUES, map(float, _CONTRAST[contrast]), strict=True))


def _volume(
    body_part: str, contrast: str, plane: str, n: int, rows: int, cols: int, background: float
) -> np.ndarray:
    """n slices in the given plane. Regions are drawn axially (the lumbar spine sagittally);
    another plane is cut from a cube of axial slices, rows running from head to feet."""
    taper = 0.95 if body_part == "HEAD" else 0.4
    region, values = _region(body_part), _values(contrast)
    if plane == "AXIAL" or body_part == "LSPINE":
        return _paint(region, values, _taper(n, taper), rows, cols, background)
    cube = _paint(region, values, _taper(rows, taper), rows, cols, background)  # (z, y, x)
    picks = np.linspace(0.3, 0.7, n) if n > 1 else np.array([0.5])
    index = (picks * (cols if plane == "SAGITTAL" else rows)).astype(int)
    if plane == "SAGITTAL":
        return np.ascontiguousarray(cube[:, :, index].transpose(2, 0, 1))  # (n, z, y)
    return np.ascontiguousarray(cube[:, index, :].transpose(1, 0, 2))  # (n, z, x)


def ct_volume(
    body_part: str,
    plane: str,
    n: int,
    rows: int,
    cols: int,
    rng: np.random.Generator,
    *,
    projection: bool = False,
) -> np.ndarray:
    """CT slices in HU. A localizer projects the volume front to back: a coronal view whose
    rows run from head to feet."""
    if projection:
        cube = _volume(body_part, "CT", "AXIAL", rows, rows, cols, -1000.0)
        hu = cube.mean(axis=1)[None]
    else:
        hu = _volume(body_part, "CT", plane, n, rows, cols, -1000.0)
    return np.asarray(hu + _noise(rng, hu.shape, 12.0))


def mr_volume(
    body_part: str,
    weighting: str,
    plane: str,
    n: int,
    rows: int,
    cols: int,
    rng: np.random.Generator,
) -> np.ndarray:
    signal = _volume(body_part, weighting, plane, n, rows, cols, 0.0)
    # One texture for the whole volume: tissue looks alike from slice to slice.
    texture = 0.85 + 0.3 * smooth_field((rows, cols), rng, 4.0)
    # Magnitude images have Rician noise: the modulus of a complex Gaussian around the signal.
    real = signal * texture + _noise(rng, signal.shape, 20.0)
    return np.asarray(np.hypot(real, _noise(rng, signal.shape, 20.0)))


def pet_volume(
    body_part: str, n: int, rows: int, cols: int, rng: np.random.Generator
) -> np.ndarray:
    activity = _paint(_region(body_part), _values("PET"), _taper(n, 0.4), rows, cols, 0.0)
    yy, xx = _grid(rows, cols)
    for _ in range(rng.integers(1, 4)):
        cy, cx = rng.uniform(0.35, 0.65, 2)
        first = int(rng.integers(0, n))
        lesion = (yy - cy) ** 2 + (xx - cx) ** 2 <= 0.03**2
        activity[first : first + 4, lesion] = 15000.0
    return activity * (1.0 + _noise(rng, activity.shape, 0.1))


def auto_window(stored: np.ndarray) -> tuple[float, float]:
    """Window centre and width spanning the bulk of the non-background values."""
    foreground = stored[stored > stored.max() * 0.05]
    if foreground.size == 0:
        return float(stored.max()) / 2 or 1.0, float(stored.max()) or 2.0
    low, high = np.percentile(foreground, [2, 98])
    return float((low + high) / 2), float(max(high - low, 2.0))


# Radiographs: brightness is attenuation along the beam (MONOCHROME2, bone bright).
_RADIOGRAPH: dict[str, tuple[Ellipse, ...]] = {
    "CHEST": (
        ("soft", 0.55, 0.5, 0.46, 0.46),
        ("lung", 0.45, 0.3, 0.3, 0.15),
        ("lung", 0.45, 0.7, 0.3, 0.15),
        ("organ", 0.62, 0.56, 0.15, 0.14),
        ("bone", 0.5, 0.5, 0.4, 0.05),
    ),
    "CHEST_LL": (
        ("soft", 0.55, 0.5, 0.46, 0.36),
        ("lung", 0.45, 0.48, 0.3, 0.26),
        ("organ", 0.6, 0.4, 0.14, 0.14),
        ("bone", 0.5, 0.8, 0.42, 0.05),
    ),
    "KNEE": (
        ("soft", 0.5, 0.5, 0.6, 0.27),
        ("bone", 0.22, 0.5, 0.3, 0.11),
        ("bone", 0.8, 0.5, 0.3, 0.1),
        ("bone", 0.55, 0.62, 0.05, 0.03),
    ),
    "HIP": (
        ("soft", 0.5, 0.5, 0.6, 0.46),
        ("bone", 0.3, 0.45, 0.2, 0.35),
        ("soft", 0.3, 0.45, 0.15, 0.28),
        ("bone", 0.48, 0.66, 0.07, 0.07),
        ("bone", 0.78, 0.7, 0.3, 0.06),
    ),
    "SHOULDER": (
        ("soft", 0.5, 0.45, 0.55, 0.45),
        ("bone", 0.15, 0.5, 0.04, 0.38),
        ("bone", 0.45, 0.58, 0.12, 0.1),
        ("bone", 0.8, 0.62, 0.3, 0.06),
        ("bone", 0.45, 0.38, 0.1, 0.04),
    ),
}
_XRAY = {"air": 300.0, "soft": 1800.0, "lung": 850.0, "organ": 2100.0, "bone": 3200.0}


def radiograph(
    body_part: str, view: str, rows: int, cols: int, rng: np.random.Generator
) -> np.ndarray:
    key = "CHEST_LL" if body_part == "CHEST" and view == "LL" else body_part
    layout = _RADIOGRAPH.get(key, _RADIOGRAPH["CHEST"])
    if view == "LL" and body_part != "CHEST":
        # A lateral view of a limb: the same bones, narrower and shifted.
        layout = tuple(
            (t, cy, 0.5 + (cx - 0.5) * 0.7, ry, rx * 0.8) for t, cy, cx, ry, rx in layout
        )
    image = _paint(layout, _XRAY, np.ones(1), rows, cols, _XRAY["air"])
    _, xx = _grid(rows, cols)
    heel = 0.92 + 0.16 * xx  # anode heel effect: intensity falls off across the field
    texture = 0.9 + 0.2 * smooth_field(image.shape, rng, 3.0)
    return np.asarray(image * heel * texture + _noise(rng, image.shape, 25.0))


def mammogram(view: str, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """A left breast with the chest wall at the image's left edge; mirror it for the right."""
    yy, xx = _grid(rows, cols)
    breast = ((yy - 0.5) / 0.45) ** 2 + (xx / 0.8) ** 2 <= 1.0
    glandular = smooth_field((1, rows, cols), rng, 6.0)[0]
    image = np.where(breast, 1200.0 + 1400.0 * glandular * (1.0 - xx), 150.0)
    if view == "MLO":
        pectoral = xx + yy * 0.6 < 0.3
        image = np.where(pectoral & breast, 2600.0, image)
    return np.asarray(image + _noise(rng, image.shape, 20.0))[None]


def ultrasound(n: int, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """B-mode sector images as RGB, grey speckle with a colour Doppler box in some frames."""
    yy, xx = _grid(rows, cols)
    depth = np.hypot(yy, xx - 0.5)
    angle = np.arctan2(xx - 0.5, yy)
    sector = (depth < 0.95) & (np.abs(angle) < np.radians(35))
    structure = 0.3 + 0.7 * smooth_field((n, rows, cols), rng, 5.0)
    speckle = rng.rayleigh(0.5, (n, rows, cols))
    grey = np.where(sector, 190.0 * speckle * structure * np.exp(-0.8 * depth), 0.0)
    rgb = np.repeat(np.clip(grey, 0, 255)[..., None], 3, axis=3)
    vessel = ((yy - 0.55) / 0.05) ** 2 + ((xx - 0.5) / 0.12) ** 2 <= 1.0
    doppler = rng.random(n) < 0.3
    flow = doppler[:, None, None] & vessel
    rgb[..., 0] = np.where(flow & (xx < 0.5), 220.0, rgb[..., 0])
    rgb[..., 2] = np.where(flow & (xx >= 0.5), 220.0, rgb[..., 2])
    return rgb.astype(np.uint8)


def nm_views(
    body_part: str, n: int, frames: int, rows: int, cols: int, rng: np.random.Generator
) -> np.ndarray:
    """Planar gamma camera counts, one frame per detector (anterior, posterior)."""
    yy, xx = _grid(rows, cols)
    if body_part == "HEAD":
        r = np.hypot((yy - 0.5) / 0.4, (xx - 0.5) / 0.34)
        rate = np.where(r <= 1.0, np.where(r > 0.7, 60.0, 25.0), 0.5)
    else:
        body = (
            (np.hypot((yy - 0.1) / 0.08, (xx - 0.5) / 0.07) <= 1)
            | (np.hypot((yy - 0.4) / 0.22, (xx - 0.5) / 0.17) <= 1)
            | (np.hypot((yy - 0.78) / 0.21, (xx - 0.42) / 0.05) <= 1)
            | (np.hypot((yy - 0.78) / 0.21, (xx - 0.58) / 0.05) <= 1)
        )
        skeleton = (np.abs(xx - 0.5) < 0.02) & (yy > 0.18) & (yy < 0.6)
        bladder = np.hypot((yy - 0.6) / 0.03, (xx - 0.5) / 0.04) <= 1
        rate = (
            np.where(body, 6.0, 0.3) + np.where(skeleton, 40.0, 0.0) + np.where(bladder, 150.0, 0.0)
        )
    lam = np.broadcast_to(rate, (n, frames, rows, cols)).copy()
    lam[:, 1::2] = lam[:, 1::2, :, ::-1] * 0.85  # posterior view: mirrored, more attenuated
    lam *= 0.8 + 0.4 * smooth_field((n, frames, rows, cols), rng, 3.0)
    return rng.poisson(lam * 4.0)
