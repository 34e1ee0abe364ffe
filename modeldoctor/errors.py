"""Errors a user can act on. Their message is shown as-is by the CLI and the app."""


class ModelDoctorError(Exception):
    """Base class: the message is a complete, user-facing sentence."""


class ModelLoadError(ModelDoctorError):
    """The model files are missing, corrupt or truncated."""


class UnsafeModelError(ModelLoadError):
    """Loading would run code or unpickle data the user did not opt in to."""


class UnsupportedModelError(ModelLoadError):
    """The architecture is not a causal LM the engine can take apart."""


class DataError(ModelDoctorError):
    """Evaluation text is missing, empty, undecodable or too short."""


class PlanError(ModelDoctorError):
    """A checkup plan names something that does not exist or does not apply."""


class CancelledError(ModelDoctorError):
    """The user cancelled a running job; everything was restored."""

    def __init__(self, message: str = "Cancelled by the user; the model was restored.") -> None:
        super().__init__(message)


class ResourceError(ModelDoctorError):
    """Not enough disk space or memory for the requested job."""


class ModelNotRestoredError(ResourceError):
    """A modified weight could not be put back (its saved original could not be read): the model
    in memory is no longer the one loaded, and must be loaded again (its files were never written)."""
