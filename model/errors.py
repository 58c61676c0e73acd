"""Errors a generator raises for bad input; each message says what was wrong and what is accepted."""


class PortraitError(ValueError):
    """The portrait image cannot be used (unreadable, too small, no face, ...)."""


class NoFaceError(PortraitError):
    """No face was found in the portrait."""


class WeightsError(FileNotFoundError):
    """Model weights are missing or do not match the expected layout."""
