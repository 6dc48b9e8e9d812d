"""A1111's infotext read back: the ``parameters`` text an image carries (Raydiance writes it into
every PNG, ``Generation.infotext``), found as A1111's ``images.read_info_from_image`` finds it and
parsed as its ``infotext_utils.parse_generation_parameters`` parses it, for ``/sdapi/v1/png-info``.
"""
from __future__ import annotations

import json
import re
from typing import Any

from PIL import ExifTags, Image

_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')  # A1111's re_param
_IMAGE_SIZE = re.compile(r"^(\d+)x(\d+)$")
IGNORED_INFO_KEYS = frozenset({
    "jfif", "jfif_version", "jfif_unit", "jfif_density", "dpi", "exif", "loop", "background",
    "timestamp", "duration", "progressive", "progression", "icc_profile", "chromaticity",
    "photoshop"})
"""What Pillow reads from a file that is no generation info (A1111's list)."""
DEFAULTS: dict[str, Any] = {
    "Clip skip": "1", "Hires resize-1": 0, "Hires resize-2": 0,
    "Hires sampler": "Use same sampler", "Hires checkpoint": "Use same checkpoint",
    "Hires prompt": "", "Hires negative prompt": "", "Mask mode": "Inpaint masked",
    "Masked content": "original", "Inpaint area": "Whole picture", "Masked area padding": 32,
    "Schedule type": "Automatic", "Schedule max sigma": 0, "Schedule min sigma": 0,
    "Schedule rho": 0, "VAE Encoder": "Full", "VAE Decoder": "Full", "FP8 weight": "Disable"}
"""What A1111's parser fills in for a key an infotext leaves out (what absence means there).
Its ``RNG: GPU`` is left out: Raydiance's noise is not A1111's GPU noise."""
_EXIF_CHARSETS = {b"ASCII\x00\x00\x00": "ascii", b"UNICODE\x00": "utf-16-be",
                  b"JIS\x00\x00\x00\x00\x00": "shift_jis"}


def unquote(text: str) -> str:
    """A value A1111 quoted (JSON) because it held a comma, colon or newline."""
    if len(text) < 2 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value if isinstance(value, str) else text


def quote(value: object) -> str:
    """``value`` as A1111 writes it into an infotext (JSON-quoted if it has , : or newline)."""
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def parse_infotext(text: str) -> dict[str, Any]:
    """``Prompt``, ``Negative prompt`` and the last line's ``Key: value`` pairs (values as text;
    ``Size: 64x64`` as ``Size-1`` and ``Size-2``), with A1111's defaults for what is missing."""
    *lines, last = (text or "").strip().split("\n")
    if len(_PARAM.findall(last)) < 3:
        lines.append(last)
        last = ""
    texts = {"Prompt": "", "Negative prompt": ""}
    key = "Prompt"
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            key, line = "Negative prompt", line[len("Negative prompt:"):].strip()
        texts[key] += ("\n" if texts[key] else "") + line
    result: dict[str, Any] = dict(texts)
    for key, value in _PARAM.findall(last):
        value = unquote(value)
        size = _IMAGE_SIZE.match(value)
        if size:
            result[f"{key}-1"], result[f"{key}-2"] = size.group(1), size.group(2)
        else:
            result[key] = value
    for key, value in DEFAULTS.items():
        result.setdefault(key, value)
    return result


def read_image_info(image: Image.Image) -> tuple[str | None, dict[str, Any]]:
    """The image's generation info (its ``parameters`` text; a JPEG's or WebP's EXIF
    UserComment; a GIF's comment) and the other text it carries, as JSON-safe values."""
    items = dict(image.info or {})
    info = items.pop("parameters", None)
    comment = _exif_user_comment(image) if "exif" in items else None
    if comment:
        info = comment
    elif "exif" not in items and "comment" in items:
        raw = items["comment"]
        info = raw.decode("utf-8", errors="ignore") if isinstance(raw, bytes) else str(raw)
    return (info if isinstance(info, str) else None), _json_safe(items)


def _exif_user_comment(image: Image.Image) -> str | None:
    try:
        raw = image.getexif().get_ifd(ExifTags.IFD.Exif).get(ExifTags.Base.UserComment)
    except Exception:  # noqa: BLE001 - a malformed EXIF block carries no readable info
        return None
    if isinstance(raw, str):
        return raw.strip("\x00") or None
    if not isinstance(raw, bytes):
        return None
    charset = _EXIF_CHARSETS.get(raw[:8])
    text = raw[8:].decode(charset, errors="ignore") if charset else raw.decode("utf-8", errors="ignore")
    return text.strip("\x00") or None


def _json_safe(items: dict[str, Any]) -> dict[str, Any]:
    """``items`` less what is no generation info and what JSON cannot carry (bytes)."""
    safe: dict[str, Any] = {}
    for key, value in items.items():
        if not isinstance(key, str) or key in IGNORED_INFO_KEYS:
            continue
        if isinstance(value, tuple) and all(isinstance(v, (int, float)) for v in value):
            value = list(value)
        if isinstance(value, (str, int, float, bool, list)) or value is None:
            safe[key] = value
    return safe
