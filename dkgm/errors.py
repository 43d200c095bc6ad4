"""User-facing errors: a bad input, not a bug. The CLI prints them as one line."""


class DKGMError(ValueError):
    """An input problem the user can fix (bad value, missing file, wrong shape)."""


def one_line(exc: BaseException) -> str:
    """An exception's message on one line (its type name when it has none)."""
    text = str(exc) or type(exc).__name__
    return " ".join(text.split())


def torch_load_reason(exc: BaseException) -> str:
    """Why torch.load(weights_only=True) failed, in one line: a file holding anything but tensors and
    plain containers (a pickle that would run code) is named as refused, not as an unpickling bug."""
    text = str(exc)
    if "Weights only load failed" in text:
        detail = text.split("WeightsUnpickler error:", 1)[-1].strip().splitlines()
        return f"refused: it holds objects other than tensors and plain containers ({detail[0] if detail else 'unknown'})"
    return one_line(exc)
