"""``comfy_api.v0_0_2.ui`` (test double): the text preview a node can return in ``NodeOutput(ui=...)``."""
from __future__ import annotations


class PreviewText:
    def __init__(self, value: str):
        self.value = value

    def as_dict(self) -> dict:
        return {"text": (self.value,)}
