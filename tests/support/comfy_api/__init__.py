"""A test double of ComfyUI's node API package ``comfy_api`` (ComfyUI is not on PyPI).

Only the numbered version the pack pins, ``v0_0_2``, and only the part of it the pack uses. Our own
code, written from the behaviour of ComfyUI v0.24's ``comfy_api/latest/_io.py``: same names, same
arguments, and the same conversion of a V3 schema to the classic ``INPUT_TYPES`` / ``/object_info``
description that ComfyUI's prompt validation and the front end read.
"""
