"""The exception tree. Workers decide what to do with a failure by its class alone.

    ModpipeError
    ├── RetryableError            -- try again with bounded exponential backoff, then review / dead letter
    │   ├── ReasonerUnavailable   -- Triton down, model not ready, connection refused
    │   ├── ReasonerTimeout       -- a generate call ran past its deadline
    │   ├── StoreUnavailable      -- Redis unreachable
    │   └── BrokerUnavailable     -- the broker did not acknowledge a publish (down, restarting, timed out)
    └── PermanentError            -- retrying cannot help: dead letter (or review for model output) at once
        ├── SchemaError           -- a message that does not decode or validate
        ├── ContentTooLarge       -- text over the configured size limit
        ├── PolicyError           -- a policy folder that does not load or lint
        ├── TriageArtefactError   -- the triage artefact is missing, corrupt or does not fit its embedder
        ├── ModelOutputError      -- reasoner output that cannot be parsed into a verdict
        └── StackError            -- the local stack cannot start (port in use, missing binary, not ready)
"""

from __future__ import annotations


class ModpipeError(Exception):
    """Base of every error modpipe raises on purpose."""


class RetryableError(ModpipeError):
    """A transient failure: the same call may succeed later."""


class ReasonerUnavailable(RetryableError):
    """The reasoning model cannot be reached or is not ready."""


class ReasonerTimeout(RetryableError):
    """A reasoning call did not finish within its deadline."""


class StoreUnavailable(RetryableError):
    """Redis cannot be reached."""


class BrokerUnavailable(RetryableError):
    """The Kafka broker cannot be reached or did not acknowledge a message in time."""


class PermanentError(ModpipeError):
    """A failure that retrying cannot fix."""


class SchemaError(PermanentError):
    """A message that is not valid JSON, not UTF-8, or not a valid wire model."""


class ContentTooLarge(PermanentError):
    """An item whose text exceeds the configured limit."""


class PolicyError(PermanentError):
    """A policy that does not load or does not pass lint."""


class TriageArtefactError(PermanentError):
    """The triage artefact folder is missing, incomplete, corrupt or does not fit the embedder."""


class ModelOutputError(PermanentError):
    """Reasoner output that cannot be parsed into an answer."""


class StackError(PermanentError):
    """The local stack could not start or be found."""
