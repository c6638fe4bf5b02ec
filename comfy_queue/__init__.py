"""comfy_queue: batch-render a ComfyUI API workflow over rows of overrides, on one or more servers.

Standard library only: it talks to ComfyUI over HTTP and needs nothing from ``tbac_core``, so it
works for any workflow (``python -m comfy_queue --help``).
"""
