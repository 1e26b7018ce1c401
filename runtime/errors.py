"""Typed errors a user can meet. The CLIs print them without a traceback (``--debug`` shows it)."""


class BlockSkipError(Exception):
    """Base class: a problem the user can fix. ``exit_code`` is what the CLI returns."""

    exit_code = 2


class PlanError(BlockSkipError):
    """The plan cannot be built for this model (bad split, sizes, targets)."""


class ImageError(BlockSkipError):
    """Training photos are missing, unreadable or too few."""


class ProfileError(BlockSkipError):
    """Unknown or malformed device profile."""


class ModelError(BlockSkipError):
    """Unknown model family or a model folder that cannot be read."""


class BundleError(BlockSkipError):
    """A bundle is missing, malformed, or a file in it does not match its recorded sha256."""


class CacheError(BlockSkipError):
    """The residual cache is missing, incomplete, or a shard does not match its sha256."""


class OutputError(BlockSkipError):
    """An output folder cannot be created or written."""


class FolderInUseError(OutputError):
    """Another run holds the output or cache folder (its pid is in the message)."""
