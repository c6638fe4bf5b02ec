"""Sets of our opt-in accelerations as the benchmarks take them on the command line.

No imports: ``side_by_side.py`` parses its arguments in worker processes before they time their imports.
"""

# SamplingParams' acceleration fields and their types.
ACCELERATION_KEYS = {"cache_threshold": float, "cache_max_skips": int, "guidance_cutoff": float}


def parse_accelerated(text: str) -> list[dict]:
    """``"cache_threshold=0.2,cache_max_skips=3;guidance_cutoff=0.9"`` -> one settings dict per set."""
    configs = []
    for chunk in (c for c in text.split(";") if c.strip()):
        config = {}
        for item in chunk.split(","):
            key, _, value = item.partition("=")
            key = key.strip()
            if key not in ACCELERATION_KEYS or not value.strip():
                raise ValueError(f"{item.strip()!r}: use key=value with a key of {', '.join(ACCELERATION_KEYS)}")
            try:
                config[key] = ACCELERATION_KEYS[key](value)
            except ValueError:
                raise ValueError(f"{item.strip()!r}: {key} takes a {ACCELERATION_KEYS[key].__name__}") from None
        configs.append(config)
    return configs


def acceleration_label(config: dict) -> str:
    return " + ".join(f"{key} {value:g}" for key, value in config.items())
