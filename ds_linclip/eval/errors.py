"""The one error type of the eval job: a problem with an input the user gave (checkpoint, data,
class file). CLIs print its message and exit non-zero; the watcher records it and goes on."""


class EvalError(RuntimeError):
    pass


def exit_with(err: Exception) -> int:
    """The eval CLIs' one-line error: the message on stderr; exit 2 for a config problem (named
    key, missing file), 1 for an EvalError (checkpoint or data contents)."""
    import sys

    from ds_linclip.config import ConfigError

    print(f"error: {err}", file=sys.stderr)
    return 2 if isinstance(err, ConfigError) else 1
