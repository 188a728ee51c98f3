"""How kvmlab writes a duration for a person watching progress: minutes and seconds."""


def elapsed(seconds: float) -> str:
    """``m:ss``, e.g. 13:49 for a kernel build or an ETA."""
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes}:{seconds:02d}"
