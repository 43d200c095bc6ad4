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


# errors of the machine, not of the code: a full disk, a read-only or unwritable folder
ENVIRONMENT_ERRNOS = frozenset({"ENOSPC", "EDQUOT", "EACCES", "EPERM", "EROFS", "EFBIG", "EMFILE", "ENFILE"})


def environment_error(exc: OSError, doing: str) -> DKGMError | None:
    """The one-line DKGMError for an OSError the user must fix on the machine (None for others)."""
    import errno

    if errno.errorcode.get(exc.errno or -1) not in ENVIRONMENT_ERRNOS:
        return None
    where = f" {exc.filename}" if exc.filename else ""
    hint = {"ENOSPC": "free some space", "EDQUOT": "free some space", "EFBIG": "free some space or raise the file "
            "size limit"}.get(errno.errorcode[exc.errno], "check the folder's permissions")
    return DKGMError(f"{doing}: cannot write{where}: {exc.strerror or one_line(exc)} ({hint}); nothing was published")
