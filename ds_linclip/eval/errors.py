"""The one error type of the eval job: a problem with an input the user gave (checkpoint, data,
class file). CLIs print its message and exit non-zero; the watcher records it and goes on."""


class EvalError(RuntimeError):
    pass
