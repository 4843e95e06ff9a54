"""Images from outside, read one way everywhere (the command-line tools, the endpoint handlers, the Space, the ONNX
runtime, the Ray server): files found in folders, and paths, bytes, base64 strings or PIL images decoded as 8-bit RGB,
with a `ValueError` in one line for anything that is not a readable image within the limits.

The policy, in the order it runs:

1. a path must be a regular file (a FIFO or a device is refused before it is opened, and opened without blocking) of
   at most `MAX_IMAGE_FILE_BYTES`;
2. the image's size is read from its header and refused above `MAX_PIXELS` (or below `min_side`) before decoding;
3. given the size the model needs (`size`, an image processor's resize setting), a JPEG is decoded at a reduced
   scale (Pillow's `draft`), and any image much larger than needed is reduced by an integer factor right after
   decoding (Pillow's `reduce`), keeping at least `REDUCING_GAP` times the needed size so that the model's own resize
   gives the same pixels to within rounding; so a 4096 x 4096 image for a 28-pixel model never lives as a full-size
   RGB array;
4. a `PixelBudget` shared by the images of one request refuses those past its decoded pixels.

This file imports only Pillow and the standard library, so that it runs where the package does not: it is copied
beside `onnx_runtime.py` into every ONNX export and endpoint repository and imported there as a top-level module.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import stat
import sys

from PIL import Image


try:
    from ..limits import MAX_IMAGE_FILE_BYTES, MAX_PIXELS, MAX_REQUEST_PIXELS
except ImportError:  # the standalone copy: limits.py is the file beside this one
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from limits import MAX_IMAGE_FILE_BYTES, MAX_PIXELS, MAX_REQUEST_PIXELS


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
# an image is reduced only down to this many times the size the model needs (Pillow: with 3 or more, reducing first
# and resizing after is indistinguishable from resizing the full image)
REDUCING_GAP = 3
# modes Pillow's reduce() takes; others are made RGB first
REDUCIBLE_MODES = ("L", "LA", "RGB", "RGBA", "I", "F", "CMYK", "YCbCr")


class PixelBudget:
    """The pixels one request may decode, over all its images (`MAX_REQUEST_PIXELS` by default)."""

    def __init__(self, pixels: int = MAX_REQUEST_PIXELS) -> None:
        self.total = self.left = pixels

    def take(self, pixels: int) -> None:
        if pixels > self.left:
            raise ValueError(
                f"the request's images exceed its budget of {self.total:,} decoded pixels ({self.left:,} left, this "
                f"image needs {pixels:,}); send the rest in another request"
            )
        self.left -= pixels


def is_image_file(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def list_images(inputs: list[str]) -> list[str]:
    """Image files given directly or found (recursively, sorted) in the given folders; names given directly must be
    regular files (a FIFO would block the reader forever)."""
    files = []
    for item in inputs:
        if os.path.isdir(item):
            for root, _, names in sorted(os.walk(item)):
                files += [os.path.join(root, n) for n in sorted(names) if is_image_file(n)]
        elif os.path.isfile(item):
            files.append(item)
        elif os.path.exists(item):
            raise ValueError(f"{item!r} is neither an image file nor a folder (a device, FIFO or socket)")
        else:
            raise FileNotFoundError(f"{item!r} is neither an image file nor a folder")
    if not files:
        raise ValueError(f"no images found in {inputs[:10]} (looked for {list(IMAGE_EXTENSIONS)})")
    return files


def read_file(path: str) -> bytes:
    """The bytes of a regular file of at most `MAX_IMAGE_FILE_BYTES`, opened without blocking, so that a FIFO or a
    device named like an image is refused instead of waited on."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as error:
        raise ValueError(f"cannot open image file {path!r}: {error.strerror}") from error
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise ValueError(f"{path!r} is not a regular file (a device, FIFO or socket); expected an image file")
        if info.st_size > MAX_IMAGE_FILE_BYTES:
            raise ValueError(
                f"image file {path!r} has {info.st_size:,} bytes; at most {MAX_IMAGE_FILE_BYTES:,} are read"
            )
        return f.read(MAX_IMAGE_FILE_BYTES + 1)


def decode_base64(text: str, allow_paths: bool) -> bytes:
    """The bytes of a base64 string, optionally a `data:` URL."""
    data = text
    if text.startswith("data:"):
        _, comma, data = text.partition(",")
        if not comma:
            raise ValueError(f"a data: URL is data:<media type>;base64,<data>, got no comma in {text[:40]!r}")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as error:
        what = "an image file, image bytes" if allow_paths else "image bytes"
        raise ValueError(f"not {what} or a base64-encoded image: {text[:40]!r}") from error


def read_image(
    source,
    allow_paths: bool = True,
    size: dict | None = None,
    budget: PixelBudget | None = None,
    min_side: int = 1,
) -> Image.Image:
    """An image from a path, raw bytes, a base64 string (optionally a `data:` URL) or a PIL image, as 8-bit RGB, read
    by the policy above; a `ValueError` saying what was received for anything else.

    A server passes `allow_paths=False`, so that a request cannot make it open its own files, and a `budget` per
    request. `size`: the model's resize setting (`{"height", "width"}` or `{"shortest_edge"}`, an image processor's
    `size`), so that a large image is decoded and kept no larger than it needs.
    """
    if isinstance(source, Image.Image):
        return to_rgb(source, size, budget, min_side)
    name = ""  # a file's name, in messages about it
    if allow_paths and isinstance(source, (str, os.PathLike)) and os.path.lexists(source):
        name, source = f"{os.fspath(source)!r} is ", read_file(os.fspath(source))
    elif isinstance(source, str):
        source = decode_base64(source, allow_paths)
    if not isinstance(source, (bytes, bytearray)):
        kinds = "a path, bytes" if allow_paths else "bytes"
        raise ValueError(f"an image is {kinds}, a base64 string or a PIL image, got {type(source).__name__}")
    try:
        image = Image.open(io.BytesIO(source))
    except Image.DecompressionBombError as error:  # Pillow's own bound, far above ours: refused from the header
        raise ValueError(f"{name}an image of more than {MAX_PIXELS} pixels, which are not read ({error})") from error
    except Exception as error:  # PIL raises many kinds for bytes that are no image; each is the sender's fault
        raise ValueError(f"{name}not an image that can be read ({type(error).__name__}: {error})") from error
    with image:
        return to_rgb(image, size, budget, min_side)


def to_rgb(
    image: Image.Image, size: dict | None = None, budget: PixelBudget | None = None, min_side: int = 1
) -> Image.Image:
    """The image decoded as 8-bit RGB, no larger than `REDUCING_GAP` times what `size` needs; a `ValueError` naming
    the problem for an image outside the limits (checked on the header, before decoding) or data that does not
    decode."""
    width, height = image.size
    if width * height > MAX_PIXELS:
        side = int(MAX_PIXELS**0.5)
        raise ValueError(
            f"image of {width} x {height} = {width * height} pixels; at most {MAX_PIXELS} pixels are read "
            f"({side} x {side})"
        )
    if min(width, height) < min_side:
        raise ValueError(f"image of {width} x {height} pixels; expected each side to be at least {min_side} pixels")
    target = None if size is None else resized_size(size, width, height)
    try:
        if target is not None and image.format == "JPEG":  # decoded at 1/2, 1/4 or 1/8 scale when that suffices
            image.draft("RGB", (REDUCING_GAP * target[0], REDUCING_GAP * target[1]))
        if budget is not None:
            budget.take(image.size[0] * image.size[1])
        image.load()
        if target is not None:
            factor = min(image.size[0] // (REDUCING_GAP * target[0]), image.size[1] // (REDUCING_GAP * target[1]))
            if factor >= 2:
                image = (image if image.mode in REDUCIBLE_MODES else image.convert("RGB")).reduce(factor)
        return image.convert("RGB")
    except ValueError:
        raise
    except Exception as error:  # truncated or corrupt data fails only here, as EOFError, struct.error, OSError...
        raise ValueError(f"not an image that can be read ({type(error).__name__}: {error})") from error


def resized_size(size: dict, width: int, height: int) -> tuple[int, int]:
    """`(width, height)` after an image processor's resize step, `size` its setting: `{"height", "width"}`, or
    `{"shortest_edge"}` (the short side to that size, the aspect ratio kept)."""
    if size.get("height") and size.get("width"):
        return int(size["width"]), int(size["height"])
    if not size.get("shortest_edge"):
        raise ValueError(f"an image size gives height and width, or shortest_edge; got {size}")
    short, long = sorted((width, height))
    new_short, new_long = int(size["shortest_edge"]), int(size["shortest_edge"] * long / short)
    return (new_short, new_long) if width <= height else (new_long, new_short)


def read_rgb(path: str, size: dict | None = None) -> Image.Image:
    """An image file as 8-bit RGB, by the policy (`read_image` for paths)."""
    return read_image(os.fspath(path), allow_paths=True, size=size)


def read_image_files(
    paths: list[str], size: dict | None = None, skip_unreadable: bool = False
) -> tuple[list[Image.Image], list[int]]:
    """A batch of image files read by the policy, and the positions of those read. A file the policy refuses raises
    its `ValueError`, which tells how to skip it, unless `skip_unreadable` (then it is left out)."""
    images, kept = [], []
    for index, path in enumerate(paths):
        try:
            images.append(read_image(os.fspath(path), allow_paths=True, size=size))
            kept.append(index)
        except ValueError as error:
            if not skip_unreadable:
                raise ValueError(f"{error} (pass --skip_unreadable to skip it)") from error
    return images, kept


__all__ = [
    "IMAGE_EXTENSIONS",
    "MAX_PIXELS",
    "PixelBudget",
    "is_image_file",
    "list_images",
    "read_image",
    "read_image_files",
    "read_rgb",
    "resized_size",
    "to_rgb",
]
