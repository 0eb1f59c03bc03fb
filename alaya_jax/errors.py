"""alaya_jax's exception types: one base class, then one class per kind of mistake."""


class AlayaError(Exception):
    """Base class of every error alaya_jax raises on purpose."""


class ConfigError(AlayaError, ValueError):
    """A config or plan field has a value outside what is supported."""


class ShapeError(AlayaError, ValueError):
    """An array has a shape or dtype other than the one the call expects."""


class PlanError(AlayaError, ValueError):
    """A plan cannot run on the given store (e.g. the index it needs was not built)."""


class CapacityError(AlayaError):
    """A static capacity is too small for the data and the caller asked for strictness."""


class UnsupportedModelError(AlayaError, ValueError):
    """A model file or config uses a feature alaya_jax does not support."""


# --- model loading and generation (owned by alaya_jax/model/) ----------------------------
class ModelNotFoundError(AlayaError, FileNotFoundError):
    """The default model package is not installed, or a model path does not exist."""


class ModelFileError(AlayaError, OSError):
    """A model file that cannot be read or parsed."""


class ContextLengthError(AlayaError, ValueError):
    """A prompt (plus the tokens to generate) longer than the model's context."""


# --- the database: sessions, pages, persistence (owned by alaya_jax/store/ and db.py) -----
class SessionError(AlayaError):
    """A session used in a way its state does not allow (closed, mid-update, no logits yet)."""


class SessionNotFoundError(SessionError, KeyError):
    """No stored session has the given name."""

    def __str__(self):  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class PoolFullError(SessionError, MemoryError):
    """The page pool reached its max_pages and no free page is left."""


class CheckpointError(SessionError, OSError):
    """A stored session cannot be read: damaged, truncated or missing files."""


class CheckpointFormatError(CheckpointError):
    """A stored session was written in a format newer than this alaya_jax reads."""


class ModelMismatchError(CheckpointError):
    """A stored session was computed by another model (its fingerprint differs)."""
