"""Images from outside, read one way everywhere: files found in folders, and paths, bytes, base64 strings or PIL
images decoded as 8-bit RGB, with a clear `ValueError` for anything that is not a readable image.

This file imports only Pillow and the standard library, so that it runs where the package does not: it is copied
beside `onnx_runtime.py` into every ONNX export and endpoint repository and imported there as a top-level module.
"""

from __future__ import annotations

import base64
import binascii
import io
import os

from PIL import Image


# Decoding holds width x height x 3 bytes (and resizing more), so a small file declaring a huge image could exhaust a
# server's memory; refused from the header, before decoding (4096 pixels a side).
MAX_PIXELS = 4096 * 4096
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def is_image_file(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def list_images(inputs: list[str]) -> list[str]:
    """Image files given directly or found (recursively, sorted) in the given folders."""
    files = []
    for item in inputs:
        if os.path.isdir(item):
            for root, _, names in sorted(os.walk(item)):
                files += [os.path.join(root, n) for n in sorted(names) if is_image_file(n)]
        elif os.path.isfile(item):
            files.append(item)
        else:
            raise FileNotFoundError(f"{item} is neither an image file nor a folder")
    if not files:
        raise ValueError(f"no images found in {inputs} (looked for {list(IMAGE_EXTENSIONS)})")
    return files


def read_rgb(path: str):
    """The image as 8-bit RGB (greyscale, palette, RGBA and 16-bit included); a clear error for anything else."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, SyntaxError, ValueError) as error:  # truncated, corrupted or not an image
        raise ValueError(f"cannot read image {path}: {error}") from error


def read_image(source, allow_paths: bool = True) -> Image.Image:
    """An image from a path, raw bytes, a base64 string (optionally a `data:` URL) or a PIL image, as 8-bit RGB; a
    `ValueError` saying what was received for anything that is not a readable image. A server passes
    `allow_paths=False`, so that a request cannot make it open its own files."""
    if isinstance(source, Image.Image):
        return to_rgb(source)
    if allow_paths and isinstance(source, str) and os.path.isfile(source):
        with open(source, "rb") as f:
            source = f.read()
    elif isinstance(source, str):
        text = source
        if source.startswith("data:"):
            _, comma, text = source.partition(",")
            if not comma:
                raise ValueError(f"a data: URL is data:<media type>;base64,<data>, got no comma in {source[:40]!r}")
        try:
            source = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError) as error:
            what = "an image file, image bytes" if allow_paths else "image bytes"
            raise ValueError(f"not {what} or a base64-encoded image: {source[:40]!r}") from error
    if not isinstance(source, (bytes, bytearray)):
        kinds = "a path, bytes" if allow_paths else "bytes"
        raise ValueError(f"an image is {kinds}, a base64 string or a PIL image, got {type(source).__name__}")
    try:
        image = Image.open(io.BytesIO(source))
    except Exception as error:  # PIL raises many kinds for bytes that are no image; each is the sender's fault
        raise ValueError(f"not an image that can be read ({type(error).__name__}: {error})") from error
    with image:
        return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """The image decoded as 8-bit RGB; a `ValueError` naming the problem for data that does not decode, or for an
    image of more than `MAX_PIXELS` pixels (checked on the header, before decoding)."""
    width, height = image.size
    if width * height > MAX_PIXELS:
        raise ValueError(
            f"image of {width} x {height} = {width * height} pixels; at most {MAX_PIXELS} pixels are read "
            f"({int(MAX_PIXELS**0.5)} x {int(MAX_PIXELS**0.5)})"
        )
    try:
        return image.convert("RGB")
    except Exception as error:  # truncated or corrupt data fails only here, as EOFError, struct.error, OSError...
        raise ValueError(f"not an image that can be read ({type(error).__name__}: {error})") from error


__all__ = ["IMAGE_EXTENSIONS", "MAX_PIXELS", "is_image_file", "list_images", "read_image", "read_rgb", "to_rgb"]
