"""Decode speed: PIL against torchvision.io's C++ decoders, image bytes -> ``uint8 (H, W, C)`` numpy.

``python -m ctray.benchmarks.decode [--repeats 3]`` (or ``python ctray/benchmarks/decode.py``; imports nothing from
ctray, needs PIL + numpy; torchvision optional, only PIL is measured when it does not import).

Builds in memory, from real Fashion-MNIST (train split, ``/usr/share/datasets/fashion-mnist``):
  a. 5,000 28x28 grey PNG (PIL, ``compress_level=1``, as ctray's shard writer does);
  b. 2,000 32x32 RGB PNG (three Fashion-MNIST images upsampled bilinear, one per channel, scaled 1/0.8/0.6);
  c. 500 256x256 RGB JPEG quality 90 (same construction, upsampled to 256).
Then times, single thread (``torch.set_num_threads(1)``), best of ``--repeats`` passes, wall clock and
process CPU time (the CPU figure is the steadier one on a loaded machine; ratios use it):
  pil+convert  ``np.asarray(Image.open(BytesIO(b)).convert(mode))``
  pil          ``np.asarray(Image.open(BytesIO(b)))`` (ctray's path when the mode already matches)
  tv.decode_image  ``decode_image(torch.frombuffer(b, dtype=torch.uint8), mode=GRAY/RGB).permute(1, 2, 0).numpy()``
  tv.decode_png / tv.decode_jpeg  the same with the format-specific function.
Checks the torchvision pixels equal PIL's for PNG and reports the max abs difference for JPEG.
"""

from __future__ import annotations

import argparse
import gzip
import io
import time
import warnings
from collections.abc import Callable

import numpy as np
from PIL import Image

FMNIST = "/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"


def fashion_mnist(n: int) -> np.ndarray:
    with gzip.open(FMNIST, "rb") as f:
        raw = f.read(16 + n * 784)
    return np.frombuffer(raw, np.uint8, offset=16).reshape(n, 28, 28)


def encode(arr: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    kw = {"compress_level": 1} if fmt == "PNG" else {"quality": 90}
    Image.fromarray(arr).save(buf, format=fmt, **kw)
    return buf.getvalue()


def rgb(imgs: np.ndarray, i: int, size: int) -> np.ndarray:
    chans = [np.asarray(Image.fromarray(imgs[(i + k) % len(imgs)]).resize((size, size), Image.Resampling.BILINEAR))
             for k in range(3)]
    return (np.stack(chans, axis=2) * np.array([1.0, 0.8, 0.6])).astype(np.uint8)


def build_sets() -> list[tuple[str, str, list[bytes]]]:
    imgs = fashion_mnist(5000)
    return [
        ("28x28 L PNG", "L", [encode(im, "PNG") for im in imgs]),
        ("32x32 RGB PNG", "RGB", [encode(rgb(imgs, 3 * i, 32), "PNG") for i in range(2000)]),
        ("256x256 RGB JPEG q90", "RGB", [encode(rgb(imgs, 3 * i, 256), "JPEG") for i in range(500)]),
    ]


def decoders(mode: str, fmt: str) -> dict:
    def pil_convert(b: bytes) -> np.ndarray:
        return np.asarray(Image.open(io.BytesIO(b)).convert(mode))

    def pil(b: bytes) -> np.ndarray:
        return np.asarray(Image.open(io.BytesIO(b)))

    out: dict[str, Callable[[bytes], np.ndarray]] = {"pil+convert": pil_convert, "pil": pil}
    try:
        import torch
        from torchvision.io import ImageReadMode, decode_image, decode_jpeg, decode_png
    except Exception:  # noqa: BLE001 - any import failure means "PIL only"
        return out
    torch.set_num_threads(1)
    tv_mode = ImageReadMode.GRAY if mode == "L" else ImageReadMode.RGB
    specific = decode_png if fmt == "PNG" else decode_jpeg
    for name, fn in (("tv.decode_image", decode_image), (f"tv.decode_{fmt.lower()}", specific)):
        # a def, not a lambda: mypy cannot infer a lambda's type here
        def tv(b: bytes, fn: Callable[..., torch.Tensor] = fn) -> np.ndarray:
            return fn(torch.frombuffer(b, dtype=torch.uint8), mode=tv_mode).permute(1, 2, 0).numpy()

        out[name] = tv
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    warnings.filterwarnings("ignore", message="The given buffer is not writable")  # frombuffer on bytes
    try:
        import torch
        import torchvision
        print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, ", end="")
    except Exception as e:  # noqa: BLE001
        print(f"torchvision not importable: {type(e).__name__}: {e}")
    import PIL
    print(f"Pillow {PIL.__version__}, numpy {np.__version__}")
    t0 = time.perf_counter()
    sets = build_sets()
    print(f"built sets in {time.perf_counter() - t0:.1f}s: "
          + ", ".join(f"{n}: {len(bs)} x {sum(map(len, bs)) / len(bs):.0f} B" for n, _, bs in sets))
    print(f"{'set':<22}{'decoder':<18}{'img/s cpu':>10}{'img/s wall':>11}{'vs pil':>8}{'vs pil+convert':>16}  check")
    for name, mode, blobs in sets:
        fmt = "JPEG" if "JPEG" in name else "PNG"
        decs = decoders(mode, fmt)
        ref = [d[:, :, None] if d.ndim == 2 else d for d in map(decs["pil+convert"], blobs)]
        wall, best = dict.fromkeys(decs, float("inf")), dict.fromkeys(decs, float("inf"))
        for _ in range(args.repeats):  # decoders interleaved per repeat so machine load hits all alike
            for dname, fn in decs.items():
                t, c = time.perf_counter(), time.process_time()
                for b in blobs:
                    fn(b)
                best[dname] = min(best[dname], time.process_time() - c)
                wall[dname] = min(wall[dname], time.perf_counter() - t)
        for dname, fn in decs.items():
            got = [d[:, :, None] if d.ndim == 2 else d for d in map(fn, blobs)]
            diff = max(int(np.abs(g.astype(np.int16) - r).max()) if g.shape == r.shape else 999
                       for g, r in zip(got, ref, strict=True))
            check = ("identical" if diff == 0 else f"max|diff|={diff}") if dname != "pil+convert" else "reference"
            print(f"{name:<22}{dname:<18}{len(blobs) / best[dname]:>10.0f}{len(blobs) / wall[dname]:>11.0f}"
                  f"{best['pil'] / best[dname]:>8.2f}"
                  f"{best['pil+convert'] / best[dname]:>16.2f}  {check}")


if __name__ == "__main__":
    main()
