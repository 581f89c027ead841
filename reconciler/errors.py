"""The one exception tree of reconciler.

Every error the package raises on purpose is a ``ReconcilerError``. Third-party
exceptions (httpx, sqlite3, ruamel.yaml, mutagen, OSError from file work) are
translated at the edge of the module that owns that library, so callers only
ever catch this tree. Whether an error is worth retrying is carried by its
class, not decided by string matching at the call site::

    ReconcilerError
    ├── ConfigError                 bad flag, environment or config file; missing key
    ├── SpecError                   a spec file is invalid (holds every SpecProblem found)
    ├── LockedError                 another daemon or sync holds the state directory
    ├── LedgerError                 the ledger is unusable or too new, or a write failed
    │   └── LeaseLostError          this replica no longer holds the lease: its write was refused
    ├── UnknownNameError            a soundtrack, track or trash path given is not known
    ├── OutputError                 an output path escapes the output folder, a write failed
    │   └── InvalidAudioError       a file does not decode as audio with a positive duration
    └── APIError                    anything the MusicAPI said or failed to say
        ├── TemporaryAPIError       retry later with backoff (429, 5xx, network faults)
        │   └── RateLimitedError    429; carries Retry-After
        ├── AmbiguousSubmitError    a submit may have been processed: never retry blindly
        ├── BatchUnsupportedError   the batch endpoint answered 404/405: fall back to singles
        ├── AudioExpiredError       an audio_url answered 403/404: poll again for a fresh one
        └── PermanentAPIError       do not retry until something changes
            ├── AuthError           401: the key is missing or wrong; stop submitting
            ├── InsufficientCreditsError  402/403 credits: pause submissions
            ├── RejectedError       400 validation or moderation: park the item with the reason
            └── NotFoundError       unknown task or batch id
"""

from __future__ import annotations

from dataclasses import dataclass


class ReconcilerError(Exception):
    """Base of every error reconciler raises on purpose."""


class ConfigError(ReconcilerError):
    """A flag, environment variable or config file value is wrong or missing."""


@dataclass(frozen=True)
class SpecProblem:
    """One thing wrong in one spec file, located for a person to fix."""

    file: str
    line: int | None
    field: str | None
    message: str

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        return f"{where} {self.field}: {self.message}" if self.field else f"{where}: {self.message}"


class PlanFileError(ReconcilerError):
    """A saved plan cannot be read, is not one, or no longer holds (``apply``)."""


class SpecError(ReconcilerError):
    """A spec file is invalid; ``problems`` lists everything found in it."""

    def __init__(self, problems: list[SpecProblem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


class LockedError(ReconcilerError):
    """Another reconciler process holds the state directory's lock."""


class LedgerError(ReconcilerError):
    """The ledger cannot be opened, migrated or written."""


class LeaseLostError(LedgerError):
    """The leader's lease expired or another replica took it over: the write was
    refused (rolled back), and this process must stop spending at once."""


class UnknownNameError(ReconcilerError):
    """A soundtrack, track or trash path named on the command line is not known."""


class OutputError(ReconcilerError):
    """An output file could not be written, or its path would escape the output folder."""


class InvalidAudioError(OutputError):
    """A file does not decode as audio with a positive duration."""


class APIError(ReconcilerError):
    """The MusicAPI refused, failed or did not answer.

    ``status`` is the HTTP status (None for network faults) and ``request_id``
    the ``x-request-id`` header when the service sent one; both are logged.
    """

    def __init__(
        self, message: str, *, status: int | None = None, request_id: str | None = None
    ) -> None:
        self.message = message
        self.status = status
        self.request_id = request_id
        super().__init__(message)


class TemporaryAPIError(APIError):
    """Worth retrying after a backoff: 429, 5xx, resets and timeouts."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        request_id: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, status=status, request_id=request_id)
        self.retry_after = retry_after


class RateLimitedError(TemporaryAPIError):
    """429 Too Many Requests; ``retry_after`` holds the server's hint in seconds."""


class AmbiguousSubmitError(APIError):
    """A submit whose request may have been processed though its answer was lost."""


class BatchUnsupportedError(APIError):
    """The deployment has no batch endpoint (404/405 on /sonic/batch)."""


class AudioExpiredError(APIError):
    """An ``audio_url`` answered 403/404; a fresh poll gives a new one."""


class PermanentAPIError(APIError):
    """Retrying the same request cannot succeed."""


class AuthError(PermanentAPIError):
    """401: the API key is missing or invalid."""


class InsufficientCreditsError(PermanentAPIError):
    """The account has too few credits (or no subscription) for this submit."""


class RejectedError(PermanentAPIError):
    """400 validation or 403 moderation: the item itself is refused."""


class NotFoundError(PermanentAPIError):
    """Unknown task or batch id (404, or 400 'task not found.')."""
