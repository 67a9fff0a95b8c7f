"""Reading and writing images with clear errors.

Images are returned as float32 tensors (3, H, W) in [0, 1]. Accepted: PNG, JPEG, TIFF,
BMP; 8-bit or 16-bit; RGB, grayscale (replicated to 3 channels), RGBA / LA (alpha
dropped), palette (converted to RGB). A JPEG / PNG with an EXIF orientation is turned the
way viewers show it (rotated phone and drone frames), so results and scores are upright;
a white-is-zero TIFF is inverted, and CMYK / CIELab TIFFs and stacks of pages are refused.
Every conversion is documented here (and noted in ``LoadedImage.conversion``) and every
failure names the file. 16-bit PNGs are read and written with pypng (Pillow reduces
16-bit colour PNGs to 8 bits and cannot write them). Every write is atomic: a temporary
file in the same folder, then a rename, so a killed run never leaves half an image.

Size limit: before anything is decoded, the size is read from the file's header (PNG's
IHDR, TIFF's first page, Pillow's lazy open for the rest) and an image of more than
``max_pixels`` pixels (default :data:`DEFAULT_MAX_PIXELS`, 100 Mpx; ``None``: no limit)
is refused with the limit named; Pillow's own decompression-bomb limit is replaced by it.
"""
from __future__ import annotations

import contextlib
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple, Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .atomicfile import write_atomic, write_text_atomic  # noqa: F401  (re-exported)
from .choices import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, TIFF_EXTENSIONS, is_image_file  # noqa: F401  (re-exported)
from .messages import megapixels



class ImageReadError(ValueError):
    """An image file that cannot be used; the message names the file and the problem."""


@dataclass
class LoadedImage:
    tensor: torch.Tensor     # (3, H, W) float32 in [0, 1]
    bit_depth: int           # 8 or 16: what the file held, used to write results back alike
    path: Path
    conversion: str = ""     # what was done to make it RGB, if anything


def _expand_palette(indices: np.ndarray, colormap: np.ndarray) -> np.ndarray:
    """(H, W) indices, (3, N) uint16 TIFF colour map -> (H, W, 3) RGB: 8-bit when every entry
    is an 8-bit value scaled by 257 (how 8-bit palettes are stored), else 16-bit."""
    rgb = np.moveaxis(colormap[:, indices], 0, -1)
    return (rgb // 257).astype(np.uint8) if not (colormap % 257).any() else rgb.astype(np.uint16)


def _to_rgb_array(arr: np.ndarray, path: Path) -> tuple:
    note = ""
    if arr.ndim == 2:
        arr, note = np.repeat(arr[:, :, None], 3, axis=2), "grayscale replicated to RGB"
    elif arr.ndim == 3 and arr.shape[2] in (1, 2):
        arr, note = np.repeat(arr[:, :, :1], 3, axis=2), "grayscale replicated to RGB (alpha dropped)"
    elif arr.ndim == 3 and arr.shape[2] == 4:
        arr, note = arr[:, :, :3], "alpha channel dropped"
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ImageReadError(f"{path}: unsupported image layout {arr.shape} (need an RGB or grayscale image)")
    return arr, note


# A float result may stray this far past [0, 1] and still be clipped (clip_float): a network's
# unclamped output overshoots by a little; a file in another scale (0-255, reflectance x 1e4)
# by far more, and is refused rather than clipped into a white image.
FLOAT_CLIP_SLACK = 0.5


def _array_to_unit(arr: np.ndarray, path: Path, clip_float: bool = False) -> tuple:
    """(H, W, 3) float32 in [0, 1], bit depth, note ('' or what clipping did)."""
    if arr.dtype == np.bool_:           # bilevel (1-bit) TIFF: black and white, as 1-bit PNG / BMP
        return arr.astype(np.float32), 8, ""
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0, 8, ""
    if arr.dtype == np.uint16:
        return arr.astype(np.float32) / 65535.0, 16, ""
    if arr.dtype in (np.int32, np.uint32, np.int16) and arr.max(initial=0) <= 65535 and arr.min(initial=0) >= 0:
        return arr.astype(np.float32) / 65535.0, 16, ""
    if arr.dtype.kind == "f":
        if not arr.size:
            return arr.astype(np.float32), 16, ""
        if not np.isfinite(arr).all():
            raise ImageReadError(f"{path}: floating-point image with NaN or infinite values")
        lo, hi = float(arr.min()), float(arr.max())
        if lo >= 0 and hi <= 1:
            return arr.astype(np.float32), 16, ""
        if clip_float and lo >= -FLOAT_CLIP_SLACK and hi <= 1 + FLOAT_CLIP_SLACK:
            return np.clip(arr, 0, 1).astype(np.float32), 16, f"float values in [{lo:.4g}, {hi:.4g}] clipped to [0, 1]"
        raise ImageReadError(f"{path}: floating-point image with values in [{lo:.4g}, {hi:.4g}], outside [0, 1]"
                             + (f" by more than {FLOAT_CLIP_SLACK} (another scale?)" if clip_float else ""))
    raise ImageReadError(f"{path}: unsupported pixel type {arr.dtype}")


def _tiff_values_as_shown(arr: np.ndarray, photometric: int, compression: int, bits: int, path: Path) -> np.ndarray:
    """A TIFF's stored values as grey or RGB levels: white-is-zero grey (fax scans,
    bilevel documents) inverted; colour spaces other than grey, RGB, palette and
    JPEG-compressed YCbCr (which the decoder turns into RGB) refused: CMYK, CIELab, ..."""
    import tifffile
    if photometric == tifffile.PHOTOMETRIC.MINISWHITE:
        if arr.dtype == np.bool_:
            return ~arr
        if arr.dtype.kind == "u":
            return ((1 << bits) - 1 - arr).astype(arr.dtype)
        raise ImageReadError(f"{path}: white-is-zero TIFF of {arr.dtype} values is not supported")
    shown = (tifffile.PHOTOMETRIC.MINISBLACK, tifffile.PHOTOMETRIC.RGB, tifffile.PHOTOMETRIC.PALETTE)
    if photometric in shown or (photometric == tifffile.PHOTOMETRIC.YCBCR and compression == tifffile.COMPRESSION.JPEG):
        return arr
    try:
        name = tifffile.PHOTOMETRIC(photometric).name
    except ValueError:
        name = "unknown"
    raise ImageReadError(f"{path}: {name} TIFF (photometric {photometric}) is not supported; convert it to RGB")


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_bit_depth(path: Path) -> int:
    """Bit depth from a PNG's IHDR chunk (0 when the file is not a PNG)."""
    with open(path, "rb") as f:
        head = f.read(25)
    return head[24] if len(head) == 25 and head[:8] == PNG_SIGNATURE else 0


def _read_png16(path: Path) -> np.ndarray:
    import png
    try:
        # read(), not asDirect(): the stored values (asDirect shifts them down to an sBIT chunk's depth)
        width, height, rows, info = png.Reader(filename=str(path)).read()
        arr = np.vstack([np.asarray(r, dtype=np.uint16) for r in rows])
    except Exception as exc:   # pypng raises its own FormatError / ChunkError on bad files
        raise ImageReadError(f"{path}: cannot decode 16-bit PNG (truncated or corrupt?): {exc}") from None
    planes = info["planes"]
    return arr.reshape(height, width, planes) if planes > 1 else arr.reshape(height, width)


# EXIF orientation (tag 274) -> how the stored (H, W, C) pixels turn into what viewers show
_ORIENTATIONS = {
    2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
    5: lambda a: a.swapaxes(0, 1), 6: lambda a: np.rot90(a, -1), 7: lambda a: a[::-1, ::-1].swapaxes(0, 1),
    8: lambda a: np.rot90(a, 1),
}


def _exif_orientation(block: Optional[bytes]) -> int:
    """The orientation in an EXIF block (1, as stored, when there is none or it is unreadable)."""
    try:
        exif = Image.Exif()
        if block:
            exif.load(block)
        value = exif.get(0x0112, 1)
    except Exception:          # no EXIF to speak of: reading the pixels reports any real problem
        return 1
    return value if value in _ORIENTATIONS else 1


def _png_exif(path: Path) -> Optional[bytes]:
    """The (first) eXIf chunk of a PNG wherever it stands, before or after the image data
    (some writers put it after), found by walking the chunk headers, nothing decoded; None
    when it has none or the file is not a readable PNG."""
    try:
        with open(path, "rb") as f:
            if f.read(8) != PNG_SIGNATURE:
                return None
            while True:
                head = f.read(8)
                if len(head) < 8:
                    return None
                length, kind = struct.unpack(">I4s", head)
                if kind == b"eXIf":
                    return f.read(length)
                if kind == b"IEND":
                    return None
                f.seek(length + 4, os.SEEK_CUR)         # the data and its CRC
    except OSError:             # reading the pixels reports any real problem
        return None


@contextlib.contextmanager
def _pillow_limit_off():
    """Pillow's decompression-bomb check off (our own pixel limit was checked from the header)."""
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def image_size(path: Union[str, Path]) -> Tuple[int, int]:
    """(height, width) from the file's header, nothing decoded; ImageReadError when unreadable."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(33)
    if head[:8] == PNG_SIGNATURE and head[12:16] == b"IHDR":
        return int.from_bytes(head[20:24], "big"), int.from_bytes(head[16:20], "big")
    if path.suffix.lower() in TIFF_EXTENSIONS:
        try:
            import tifffile
            with tifffile.TiffFile(str(path)) as tif:
                page = tif.pages[0]
                return int(page.imagelength), int(page.imagewidth)
        except Exception as exc:
            raise ImageReadError(f"{path}: cannot read TIFF ({type(exc).__name__}: {exc})") from None
    try:
        with _pillow_limit_off(), Image.open(path) as im:
            return im.size[1], im.size[0]
    except UnidentifiedImageError:
        raise ImageReadError(f"{path}: not a readable image file") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageReadError(f"{path}: cannot read image header (truncated or corrupt?): {exc}") from None


def check_pixel_limit(path: Union[str, Path], max_pixels: Optional[int]) -> Tuple[int, int]:
    """(height, width) of the image, or ImageReadError when it has more than ``max_pixels``."""
    h, w = image_size(path)
    if max_pixels is not None and h * w > max_pixels:
        raise ImageReadError(f"{path}: {w} x {h} pixels ({megapixels(h * w)}) is above the pixel limit of "
                             f"{megapixels(max_pixels)} (--max-pixels); not decoded")
    return h, w


def read_image(path: Union[str, Path], max_pixels: Optional[int] = DEFAULT_MAX_PIXELS,
               clip_float: bool = False) -> LoadedImage:
    """Read an image file as (3, H, W) float32 in [0, 1]; more than ``max_pixels`` pixels
    (read from the header, before decoding) is an ImageReadError, and so is a float image
    with values outside [0, 1], unless ``clip_float`` (a method's result being scored):
    then values within FLOAT_CLIP_SLACK of [0, 1] are clipped, with a note."""
    path = Path(path)
    if not path.is_file():
        broken = f"broken link (to {os.readlink(path)})" if path.is_symlink() else ""
        raise ImageReadError(f"{path}: {broken or 'file not found'}")
    check_pixel_limit(path, max_pixels)
    palette, orientation, colours_from = False, 1, ""    # a TIFF's own orientation tag is not applied (README)
    if path.suffix.lower() in TIFF_EXTENSIONS:
        try:
            import tifffile
            with tifffile.TiffFile(str(path)) as tif:
                arr, page = tif.asarray(), tif.pages[0]
                colormap = page.colormap if page.photometric == tifffile.PHOTOMETRIC.PALETTE else None
                colours = (int(page.photometric), int(page.compression), int(page.bitspersample))
                planar = page.planarconfig == tifffile.PLANARCONFIG.SEPARATE and page.samplesperpixel > 1
                stacked = len(tif.series[0].pages) if tif.series else 1
        except Exception as exc:
            raise ImageReadError(f"{path}: cannot read TIFF ({type(exc).__name__}: {exc})") from None
        if stacked > 1:                 # its pages would be taken as the colour channels
            raise ImageReadError(f"{path}: a stack of {stacked} pages (shape {arr.shape}); give one image per file")
        if planar and arr.ndim == 3:    # samples first (S, H, W): whatever the size, not guessed from the shape
            arr = np.moveaxis(arr, 0, 2)
        arr = _tiff_values_as_shown(arr, *colours, path)
        if colormap is not None:        # the values are indices into the colour map, not grey levels
            arr, palette = _expand_palette(arr, colormap), True
    elif path.suffix.lower() == ".png" and _png_bit_depth(path) == 16:
        arr, orientation = _read_png16(path), _exif_orientation(_png_exif(path))
    else:
        try:
            with _pillow_limit_off(), Image.open(path) as im:
                im.load()           # (a PNG's eXIf chunk after the image data is in .info only now)
                orientation = _exif_orientation(im.info.get("exif"))
                if im.mode == "P":
                    palette = True
                    im = im.convert("RGBA" if "transparency" in im.info else "RGB")
                elif im.mode in ("CMYK", "YCbCr", "LAB", "HSV"):
                    colours_from = im.mode      # e.g. a print-ready CMYK JPEG: Pillow's formula, no ICC profile
                    im = im.convert("RGB")
                elif im.mode == "1":
                    im = im.convert("L")
                arr = np.array(im)
        except UnidentifiedImageError:
            raise ImageReadError(f"{path}: not a readable image file") from None
        except (OSError, SyntaxError, ValueError) as exc:
            raise ImageReadError(f"{path}: cannot decode image (truncated or corrupt?): {exc}") from None
    arr, note = _to_rgb_array(arr, path)
    if orientation != 1:        # as viewers show it (phones and drones store frames unrotated)
        arr = _ORIENTATIONS[orientation](arr)
        note = f"turned upright (EXIF orientation {orientation})" + (f"; {note}" if note else "")
    if palette:
        note = "palette image expanded to RGB" + (f"; {note}" if note else "")
    if colours_from:
        note = f"{colours_from} converted to RGB (no colour management)" + (f"; {note}" if note else "")
    unit, depth, clipped = _array_to_unit(arr, path, clip_float)
    if clipped:
        note = f"{note}; {clipped}" if note else clipped
    if unit.shape[0] < 1 or unit.shape[1] < 1:
        raise ImageReadError(f"{path}: empty image")
    return LoadedImage(torch.from_numpy(np.ascontiguousarray(unit.transpose(2, 0, 1))), depth, path, note)


def to_uint(image: torch.Tensor, bit_depth: int = 8) -> np.ndarray:
    """(3, H, W) float in [0, 1] -> (H, W, 3) uint8 / uint16, clamped and rounded."""
    peak = 65535.0 if bit_depth == 16 else 255.0
    arr = (image.detach().float().clamp(0, 1) * peak).round().cpu().numpy().transpose(1, 2, 0)
    return arr.astype(np.uint16 if bit_depth == 16 else np.uint8)


def write_image(image: torch.Tensor, path: Union[str, Path], bit_depth: int = 8) -> None:
    """Write (3, H, W) in [0, 1], atomically. TIFF and PNG are written with ``bit_depth``
    (8 or 16); JPEG and BMP are 8-bit."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in TIFF_EXTENSIONS:
        import tifffile
        arr = to_uint(image, bit_depth)
        write_atomic(path, lambda p: tifffile.imwrite(str(p), arr, photometric="rgb"))
    elif suffix == ".png" and bit_depth == 16:
        import png
        arr = to_uint(image, 16)
        h, w, _ = arr.shape
        write_atomic(path, lambda p: png.from_array(arr.reshape(h, w * 3), "RGB;16").save(str(p)))
    elif suffix in (".jpg", ".jpeg"):
        write_atomic(path, lambda p: Image.fromarray(to_uint(image, 8)).save(p, quality=95))
    else:
        write_atomic(path, lambda p: Image.fromarray(to_uint(image, 8)).save(p))


def list_images(folder: Union[str, Path]) -> list:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    return sorted(p for p in folder.iterdir() if is_image_file(p))
