"""Reading a report page back with the standard library's ``html.parser`` (what the tests check
instead of a browser): images, ids, and the ``data-value`` cells."""

from __future__ import annotations

import base64
import io
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

from PIL import Image


class Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.images: dict[str, bytes] = {}
        self.ids: dict[str, dict[str, str]] = {}
        self.cells: dict[
            tuple[str | None, str], str
        ] = {}  # (row's data-k/data-row, class) -> value
        self.external: list[str] = []
        self.scripts = 0
        self.text: list[str] = []
        self._row_k: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if "id" in a:
            self.ids[a["id"]] = a
        if tag == "script":
            self.scripts += 1
        if tag == "tr":
            self._row_k = a.get("data-k", a.get("data-row"))
        if tag == "img":
            src = a.get("src", "")
            prefix = "data:image/png;base64,"
            if not src.startswith(prefix):
                self.external.append(src)
            else:
                self.images[a.get("id", str(len(self.images)))] = base64.b64decode(
                    src[len(prefix) :]
                )
        if tag in ("link", "iframe") or (tag == "a" and "://" in a.get("href", "")):
            self.external.append(str(a))
        if "data-value" in a:
            self.cells[(self._row_k, a.get("class", a.get("id", "")))] = a["data-value"]
            if "id" in a:
                self.cells[(None, a["id"])] = a["data-value"]

    def handle_data(self, data: str) -> None:
        self.text.append(data)

    @property
    def all_text(self) -> str:
        return " ".join(" ".join(self.text).split())


def read_page(path: Path) -> Page:
    p = Page()
    p.feed(path.read_text(encoding="utf-8"))
    p.close()
    return p


def decode_png(data: bytes) -> Any:
    img = Image.open(io.BytesIO(data))
    img.load()  # decodes every pixel (verify() would only check the structure)
    assert img.format == "PNG" and img.size[0] > 100 and img.size[1] > 100
    return img
