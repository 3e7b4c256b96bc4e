"""The one error eval raises for bad input: `longtune eval` prints it as one paragraph, exit 2."""


class EvalError(RuntimeError):
    """An evaluation that cannot start; the message names the key or file and says what to do."""
