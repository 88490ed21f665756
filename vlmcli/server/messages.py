"""OpenAI chat messages -> the structured messages our processors take, and the images
their image parts name, in order.

    data:image/png;base64,...   decoded here (PNG, JPEG, WebP)
    http(s)://...               fetched later, with `vlm describe`'s size and time limits
    file:///path or a path      only with --allow-local-files
"""

from __future__ import annotations

import base64
import binascii
import re
from pathlib import Path
from urllib.parse import unquote, urlparse

from vlmcli import inputs
from vlmcli.inputs import ImageInput
from vlmcli.sequence import Message
from vlmcli.server.schemas import ApiError, ChatMessage, ImagePart

DATA_URL_TYPES = {"image/png", "image/jpeg", "image/jpg", "image/webp"}
_DATA_URL = re.compile(r"data:(?P<type>[^;,]*)(?P<params>(;[^;,]*)*),(?P<data>.*)", re.DOTALL)


def convert(messages: list[ChatMessage], *, allow_local_files: bool) -> tuple[list[Message], list[ImageInput]]:
    out: list[Message] = []
    images: list[ImageInput] = []
    for i, message in enumerate(messages):
        role = "system" if message.role == "developer" else message.role
        parts = [] if message.content is None else message.content
        if isinstance(parts, str):
            parts = [{"type": "text", "text": parts}]
        else:
            converted = []
            for j, part in enumerate(parts):
                if isinstance(part, ImagePart):
                    if role != "user":
                        raise ApiError(400, f"images are accepted in user messages only, not in {message.role} messages", param=f"messages[{i}].content[{j}]")
                    images.append(_image(part.image_url.url, len(images) + 1, f"messages[{i}].content[{j}].image_url.url", allow_local_files))
                    converted.append({"type": "image"})
                else:
                    converted.append({"type": "text", "text": part.text})
            parts = converted
        if role == "system":  # templates print a system message's content as a string
            out.append({"role": role, "content": "".join(p["text"] for p in parts)})
        else:
            out.append({"role": role, "content": parts})
    if out[-1]["role"] != "user":
        raise ApiError(400, "the last message must be a user message", param="messages")
    return out, images


def _image(url: str, number: int, param: str, allow_local_files: bool) -> ImageInput:
    if url.startswith("data:"):
        return ImageInput(f"image {number} (data URL)", _data_url(url, number, param))
    if inputs.is_url(url):
        return ImageInput(url, url)  # fetched when the request is prepared
    scheme = urlparse(url).scheme.lower()
    if scheme == "file" or scheme == "" or (len(scheme) == 1 and url[1:3] in (":\\", ":/")):
        if not allow_local_files:
            raise ApiError(400, f"image {number}: local files are refused (start the server with --allow-local-files to allow them)", param=param, code="local_files_refused")
        path = Path(unquote(urlparse(url).path)) if scheme == "file" else Path(url).expanduser()
        if not path.is_file():
            raise ApiError(400, f"image {number}: cannot read image '{path}': no such file", param=param, code="invalid_image")
        return ImageInput(str(path), path)
    raise ApiError(400, f"image {number}: unsupported URL scheme '{scheme}:' (use a data:, http: or https: URL)", param=param, code="invalid_image_url")


def _data_url(url: str, number: int, param: str) -> bytes:
    match = _DATA_URL.fullmatch(url)
    if match is None:
        raise ApiError(400, f"image {number}: malformed data URL", param=param, code="invalid_image_url")
    media_type = match["type"].strip().lower()
    if media_type not in DATA_URL_TYPES:
        raise ApiError(400, f"image {number}: unsupported data URL type '{media_type or '(none)'}' (use image/png, image/jpeg or image/webp)", param=param, code="invalid_image_url")
    if "base64" not in [p.strip().lower() for p in match["params"].split(";")]:
        raise ApiError(400, f"image {number}: the data URL must be base64-encoded (data:{media_type};base64,...)", param=param, code="invalid_image_url")
    try:
        data = base64.b64decode(re.sub(r"\s+", "", match["data"]), validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"image {number}: the data URL's base64 data is not valid", param=param, code="invalid_image_url") from None
    if not data:
        raise ApiError(400, f"image {number}: the data URL holds no data", param=param, code="invalid_image_url")
    return data
