"""Image decoding and field-of-view cropping for the real dataset formats (docs/data.md, "Real formats").

`decode_image` turns the bytes or the file of a JPEG/PNG (any size; RGB, grey, RGBA, LA, palette,
16-bit grey) into ``uint8 [H, W, 3]``. Channel handling follows PIL's ``.convert('RGB')``, which is what
ViLReF / Chinese-CLIP apply (``_convert_to_rgb``) and what OpenCV's ``imread(IMREAD_COLOR)`` does:
grey is replicated to three equal channels, an alpha channel is dropped (the colour under a transparent
pixel is kept, not composited on a background), palette images are looked up. FLAIR's and KeepFIT's
``LoadImage`` instead keep ``img[1:]`` of a 4-channel array, i.e. drop the RED channel and keep alpha
(and repeat a 2-channel LA image to 6 channels); that is a bug on inputs their public datasets do
not contain (RGB and grey photographs), so it is not reproduced. 16-bit grey (PIL mode ``I;16``) is
scaled to 8 bits (``round(x / 257)``) where ``.convert('RGB')`` would clip everything above 255 to
white; modes whose range is unknown (32-bit ``I``, float ``F``) are refused.

Baseline and progressive JPEGs in YCbCr or grey are decoded by libjpeg-turbo through simplejpeg:
the same library and settings as PIL's decoder (accurate integer DCT, smooth chroma upsampling), so
the same pixels (tests/test_sources.py compares them), 1.1-1.4 times as fast at 1.4-2 megapixels
(benchmarks/input_speed.py). Every other file (PNG, CMYK/YCCK JPEG, ...) is decoded by PIL.

The whole image is decoded (``Image.load()``) with ``ImageFile.LOAD_TRUNCATED_IMAGES`` off, and
simplejpeg in its strict mode, so a truncated file is an error rather than an image whose missing
rows are grey. Every bad input - a
missing file, a truncated or undecodable file, a zero-size image (PIL refuses one when it identifies
the file), an unsupported mode - raises `DataError` whose message starts with where it happened
(file and row / LMDB key / JSONL line).

`fov_crop` crops a fundus photograph to its field of view (FOV). Neither FLAIR (``LoadImage`` +
``ImageScaling``: resize the long side to 512 and zero-pad), KeepFIT (``pre_transform.py``: the same
resize and pad) nor ViLReF / Chinese-CLIP (``Resize((224, 224))``) crops the FOV, so the step is
ours (docs/methods.md, "FLAIR") and off unless a pipeline asks for it. It is meant for colour (CFP) and
angiography (FFA) photographs; an OCT B-scan has no circular FOV and must not be cropped by it.

How the FOV is found, and why (constants chosen on the three real photographs in
``tests/data/fundus_samples`` and typical camera output):
- The surround is read off the image's outermost one-pixel frame (median colour). A camera's
  surround is black; atlas figures (MM-Retinal's source books, ``sample_macular_hole.png``) are
  often on white.
- Dark surround (every channel of the frame median <= ``threshold``): foreground = RED channel >
  ``threshold``. Red is the brightest channel of a colour fundus photograph, so even the dim,
  vignetted periphery stays well above the surround: 5-10 px inside the FOV edge the samples' red
  is >= 44 (0.1st percentile), while their black surround, JPEG noise included, is <= 12 (99th
  percentile <= 6); the edge itself ramps between the two over a few pixels. Grey (FFA) images
  have red = grey.
- Light surround (every channel of the frame median >= 255 - ``threshold``): foreground = darkest
  channel < 255 - ``threshold`` (a white surround is bright in all channels; the retina, even its
  saturated red areas and the pale optic disc, has a dark blue channel).
- Any other surround (no border: the image is already the FOV, or a textured background): the
  image is returned unchanged.
- ``threshold = 20`` (of 255) sits between the surround (<= 12) and the dimmest retina (>= 44) with
  room for noisier cameras (10..30 move the samples' box edges by at most 2 px).
- The largest 4-connected component (``scipy.ndimage.label``) is the FOV, so captions, camera marks
  and specks outside it are ignored; a component smaller than ``min_area`` (1% of the image) is not a
  FOV, and the image is returned unchanged, as it is when no pixel passes the threshold (an empty
  crop is never returned).
"""
from __future__ import annotations

import io
import os

import numpy as np
import simplejpeg
from PIL import Image, ImageFile
from scipy import ndimage

from retina_jax.errors import UserError

__all__ = ['DataError', 'FOV_THRESHOLD', 'FOV_MIN_AREA', 'decode_image', 'fov_box', 'fov_crop']

FOV_THRESHOLD = 20
FOV_MIN_AREA = 0.01

_SIXTEEN_BIT_MODES = ('I;16', 'I;16L', 'I;16B', 'I;16N')


class DataError(UserError, ValueError):
    """Bad input data; the message starts with where it happened (file and row / LMDB key / JSONL line)."""


def decode_image(data: bytes | str | os.PathLike, where: str) -> np.ndarray:
    """JPEG/PNG bytes or file -> ``uint8 [H, W, 3]`` (see the module docstring for the channel rules).

    ``where`` names the record the image belongs to (e.g. ``'train.csv row 17'``); a file path is
    appended to it in error messages.
    """
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        # PIL would fill the missing rows of a truncated file with grey and report success.
        raise RuntimeError('PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set: truncated images would decode silently; '
                           'unset it before reading datasets')
    if isinstance(data, (bytes, bytearray, memoryview)):
        data, label = bytes(data), where
    else:
        path = os.fspath(data)
        label = f'{where}: {path}'
        if not os.path.isfile(path):
            raise DataError(f'{label}: image file not found')
        with open(path, 'rb') as f:
            data = f.read()
    jpeg = data[:3] == b'\xff\xd8\xff'
    # PIL ignores libjpeg's warnings (e.g. extraneous bytes before a marker) and fails only when the
    # data runs out; simplejpeg's strict mode raises on any warning. Strict exactly when the file
    # lacks its end-of-image marker keeps PIL's verdicts: a cut-off file fails, a complete one with
    # recoverable damage decodes.
    complete = data.rstrip(b'\0').endswith(b'\xff\xd9')
    try:
        if jpeg and simplejpeg.decode_jpeg_header(data)[2] in _TURBO_COLORSPACES:
            return simplejpeg.decode_jpeg(data, colorspace='RGB', strict=not complete)
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return _to_rgb(im, label)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, EOFError, ... on bad bytes
        # libjpeg-turbo's words for a cut-off file ('Premature end of JPEG file', or a header it cannot
        # read) do not say truncated, as PIL's do: a JPEG without its end-of-image marker is called so.
        cut = 'truncated JPEG (no end-of-image marker), ' if jpeg and not complete else ''
        raise DataError(f'{label}: cannot decode image ({cut}{type(e).__name__}: {e})') from e


# JPEG colour spaces libjpeg-turbo turns into RGB as PIL's `.convert('RGB')` does; CMYK and YCCK
# (Adobe) JPEGs go to PIL, whose inversion of Adobe CMYK libjpeg-turbo does not do.
_TURBO_COLORSPACES = ('RGB', 'YCbCr', 'Gray')


def _to_rgb(im: Image.Image, label: str) -> np.ndarray:
    if im.mode in _SIXTEEN_BIT_MODES:
        grey = np.round(np.asarray(im, np.float32) / 257.0).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if im.mode in ('I', 'F'):
        raise DataError(f'{label}: unsupported image mode {im.mode!r} (32-bit integer or float pixels of unknown range)')
    return np.asarray(im.convert('RGB'), np.uint8)


def fov_box(image: np.ndarray, threshold: int = FOV_THRESHOLD, min_area: float = FOV_MIN_AREA,
            margin: int = 0) -> tuple[int, int, int, int] | None:
    """The field of view's bounding box ``(top, bottom, left, right)`` (end-exclusive, grown by ``margin``
    pixels and clipped to the image) of a ``uint8 [H, W, 3]`` image, or None when no FOV is found."""
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise ValueError(f'expected a uint8 RGB image [H, W, 3], got {image.dtype} {image.shape}')
    h, w = image.shape[:2]
    frame = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])     # [2H + 2W, 3]
    surround = np.median(frame, axis=0)
    if surround.max() <= threshold:
        mask = image[..., 0] > threshold
    elif surround.min() >= 255 - threshold:
        mask = image.min(axis=-1) < 255 - threshold
    else:
        return None
    components, count = ndimage.label(mask)
    if count == 0:
        return None
    sizes = np.bincount(components.ravel())[1:]
    largest = int(np.argmax(sizes)) + 1
    if sizes[largest - 1] < min_area * h * w:
        return None
    rows, cols = ndimage.find_objects(components)[largest - 1]
    return (max(rows.start - margin, 0), min(rows.stop + margin, h),
            max(cols.start - margin, 0), min(cols.stop + margin, w))


def fov_crop(image: np.ndarray, threshold: int = FOV_THRESHOLD, min_area: float = FOV_MIN_AREA,
             margin: int = 0) -> np.ndarray:
    """Crop a ``uint8 [H, W, 3]`` fundus image to its field of view (`fov_box`); unchanged when none is found."""
    box = fov_box(image, threshold, min_area, margin)
    if box is None:
        return image
    top, bottom, left, right = box
    return image[top:bottom, left:right]
