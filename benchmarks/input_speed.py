"""Real-file input speed (issue 19, item 3): JPEG decode + field-of-view crop + resize to FLAIR's 512
canvas, images per second on one core, for each decoder, checked against PIL's full decode.

The images are exported the way a user's dataset is (`python -m retina_jax.data.export --format flair_csv
--image_format jpeg`, quality 95) at `--sizes` pixels a side (1200 and 1400: 1.4 and 2.0
megapixels). Each decoder runs the same chain as the file pipeline (`data/images.decode_image` ->
`fov_crop` -> `transforms.to_canvas(.., 512, 'flair')`), single-threaded, over every image
`--repeats` times:

- `pipeline`: `data/images.decode_image`, the file pipeline's decoder (libjpeg-turbo through
  simplejpeg at full size for YCbCr and grey JPEGs, PIL for the rest);
- `pil`: PIL's full decode (what the pipeline did before; PNGs and CMYK JPEGs still take it);
- `pil_draft`: PIL's `Image.draft`, libjpeg's DCT-domain downscaling by 1/2, 1/4 or 1/8 to the
  smallest size whose sides are still >= `--decode_floor` x the canvas (the FOV crop then never
  drops below the canvas);
- `simplejpeg`: libjpeg-turbo through simplejpeg, full size and with `min_height/min_width` (the same
  DCT downscaling);
- `opencv`: `cv2.imdecode` full size and with `IMREAD_REDUCED_COLOR_2/4/8`.

Correctness is judged against the truth, not against one decoder: the same images are also exported
losslessly (PNG, the same seed), and each chain's canvas is compared with the PNG chain's. JPEG
at quality 95 already costs PIL's full decode some PSNR against that truth; a decoder decodes
correctly when its PSNR against the truth is within `--max_psnr_loss` dB of PIL's full decode's on
every image (a reduced decode downscales in the DCT domain rather than by PIL's bilinear resize, so
it differs from PIL's canvas without being further from the image). PIL's bilinear resize of the
full image may favour the full-size chains, so the loss is also given against a second truth that
favours no decoder: the lossless image's FOV area-averaged to the canvas (PIL's BOX filter: each
canvas pixel the mean of the source pixels it covers, what DCT downscaling approximates); a
decoder is correct when it is within `--max_psnr_loss` against both. The mean absolute difference
from PIL's canvas (0-255 levels) is printed beside it. simplejpeg is in the pinned set (the file
pipeline decodes JPEGs with it since this benchmark); OpenCV is optional:
`pip install opencv-python-headless==5.1.0.95`.

    python benchmarks/input_speed.py --n 24
"""
from __future__ import annotations

import argparse
import glob
import io
import math
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
from PIL import Image

from retina_jax.data import images, transforms

CANVAS = 512


def reduced_scale(height: int, width: int, floor: int) -> int:
    """The largest JPEG DCT scale divisor (1, 2, 4, 8) keeping both sides >= `floor`."""
    for d in (8, 4, 2):
        if math.ceil(height / d) >= floor and math.ceil(width / d) >= floor:
            return d
    return 1


def pil_full(data: bytes, floor: int) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def pipeline(data: bytes, floor: int) -> np.ndarray:
    """`data/images.decode_image` as the file pipeline calls it."""
    return images.decode_image(data, "bench")


def pil_draft(data: bytes, floor: int) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        im.draft("RGB", (floor, floor))  # libjpeg picks the smallest scale with both sides >= floor
        return np.asarray(im.convert("RGB"))


def simplejpeg_full(data: bytes, floor: int) -> np.ndarray:
    import simplejpeg
    return simplejpeg.decode_jpeg(data, colorspace="RGB")


def simplejpeg_reduced(data: bytes, floor: int) -> np.ndarray:
    import simplejpeg
    return simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=floor, min_width=floor)


def opencv_full(data: bytes, floor: int) -> np.ndarray:
    import cv2
    return cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def opencv_reduced(data: bytes, floor: int) -> np.ndarray:
    import cv2
    h, w = _jpeg_size(data)
    flag = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
            8: cv2.IMREAD_REDUCED_COLOR_8}[reduced_scale(h, w, floor)]
    return cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), flag), cv2.COLOR_BGR2RGB)


def _jpeg_size(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as im:  # reads the header only
        return im.height, im.width


DECODERS = {"pipeline": pipeline, "pil": pil_full, "pil_draft": pil_draft, "simplejpeg": simplejpeg_full,
            "simplejpeg_reduced": simplejpeg_reduced, "opencv": opencv_full, "opencv_reduced": opencv_reduced}


def chain(decoder, data: bytes, floor: int) -> np.ndarray:
    return transforms.to_canvas(images.fov_crop(decoder(data, floor)), CANVAS, "flair")


def area_canvas(data: bytes) -> np.ndarray:
    """The second truth: the lossless image's FOV, long side area-averaged to the canvas, zero-padded
    bottom/right as `transforms.resize_long_side_and_pad`."""
    image = images.fov_crop(pil_full(data, 0))
    h, w = image.shape[:2]
    scale = CANVAS / max(h, w)
    new_h, new_w = max(1, round(h * scale)), max(1, round(w * scale))
    out = np.zeros((CANVAS, CANVAS, 3), np.float32)
    out[:new_h, :new_w] = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BOX), np.float32) / 255.0
    return out


def export(out: str, n: int, size: int, image_format: str) -> list[bytes]:
    """The bytes of `n` synthetic images exported as a user's dataset is (seed 0)."""
    cmd = [sys.executable, "-m", "retina_jax.data.export", "--format", "flair_csv", "--out", out, "--size", str(n),
           "--image_size", str(size), "--image_format", image_format]
    subprocess.run(cmd, check=True, capture_output=True)
    paths = sorted(glob.glob(os.path.join(out, "images", "*.*")))
    if len(paths) != n:
        raise SystemExit(f"input_speed: the export wrote {len(paths)} images, expected {n}")
    return [open(p, "rb").read() for p in paths]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a * 255.0 - b * 255.0) ** 2))
    return float("inf") if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=24, help="images per size")
    parser.add_argument("--sizes", default="1200,1400", help="exported image sides in pixels")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--decoders", default=",".join(DECODERS))
    parser.add_argument("--decode_floor", type=float, default=1.25,
                        help="reduced decoders keep both sides >= this x the 512 canvas")
    parser.add_argument("--max_psnr_loss", type=float, default=0.5,
                        help="dB below PIL full decode's PSNR against the lossless export still counted correct")
    args = parser.parse_args(argv)
    names = args.decoders.split(",")
    for name in names:
        if name not in DECODERS:
            parser.error(f"--decoders: unknown {name!r}; known: {', '.join(DECODERS)}")
        try:
            DECODERS[name](_tiny_jpeg(), 8)
        except ImportError as e:
            raise SystemExit(f"input_speed: decoder {name!r} needs {e.name} (pip install "
                             "opencv-python-headless==5.1.0.95), or leave it out of --decoders")
    try:
        import cv2
        cv2.setNumThreads(1)  # one core, as a grain worker
    except ImportError:
        pass
    floor = int(round(args.decode_floor * CANVAS))
    with tempfile.TemporaryDirectory() as tmp:
        for size in map(int, args.sizes.split(",")):
            data = export(os.path.join(tmp, f"{size}_jpeg"), args.n, size, "jpeg")
            lossless = export(os.path.join(tmp, f"{size}_png"), args.n, size, "png")
            truth = [chain(pil_full, d, floor) for d in lossless]
            area = [area_canvas(d) for d in lossless]
            reference = [chain(pil_full, d, floor) for d in data]
            reference_psnr = [psnr(r, t) for r, t in zip(reference, truth)]
            reference_area = [psnr(r, t) for r, t in zip(reference, area)]
            print(f"{args.n} exported JPEGs of {size}x{size} ({size * size / 1e6:.1f} MP, "
                  f"{np.mean([len(d) for d in data]) / 1e3:.0f} kB each), chain to the {CANVAS} canvas, one core; "
                  f"PIL's full decode is {np.mean(reference_psnr):.1f} dB from the lossless export's bilinear canvas "
                  f"and {np.mean(reference_area):.1f} dB from its area-averaged one:")
            for name in names:
                fn = DECODERS[name]
                out = [chain(fn, d, floor) for d in data]
                loss = max(r - psnr(o, t) for o, t, r in zip(out, truth, reference_psnr))
                loss_area = max(r - psnr(o, t) for o, t, r in zip(out, area, reference_area))
                diff = max(float(np.mean(np.abs(o - r))) * 255.0 for o, r in zip(out, reference))
                began = time.perf_counter()
                for _ in range(args.repeats):
                    for d in data:
                        chain(fn, d, floor)
                rate = args.repeats * len(data) / (time.perf_counter() - began)
                verdict = "correct" if max(loss, loss_area) <= args.max_psnr_loss else "NOT correct"
                print(f"  {name:20s} {rate:7.1f} images/s  PSNR loss against PIL's {loss:+.2f} dB bilinear truth, "
                      f"{loss_area:+.2f} dB area truth (worst image), "
                      f"mean |difference| from PIL's canvas <= {diff:.2f} levels  {verdict}", flush=True)


def _tiny_jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (120, 30, 10)).save(buffer, format="JPEG")
    return buffer.getvalue()


if __name__ == "__main__":
    main()
