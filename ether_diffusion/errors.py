"""User-facing errors: the command line prints their message as one line and exits with status 2."""


class EtherError(ValueError):
    """Bad input from the user: a path, a file, a shape, a hyperparameter. The message says what and where."""


class AdapterFileError(EtherError):
    """An adapter file that cannot be used: not safetensors, truncated, unknown version, wrong base, bad values."""
