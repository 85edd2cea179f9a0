"""Exceptions raised by the engine layer.

Every error that concerns one weight names it in ``.name``; every refit error is raised before
anything is copied, so the engine keeps serving the weights it served before the call (I4).

Errors about a bad value are also ``ValueError``s (a wrong dtype is also a ``TypeError``), so a
caller's ``except ValueError`` catches them as Python's conventions lead it to expect. Every error
pickles and unpickles to an equal one (type, message, ``name``/``names``): they cross process
boundaries (Ray) intact.
"""

from __future__ import annotations


class EngineError(Exception):
    """Base class of every error the engine layer raises on purpose."""


class EngineFileError(EngineError):
    """An engine file is missing, truncated, malformed or of an unknown format."""


class RefitError(EngineError):
    """A refit was refused. The engine still serves its previous weights."""


class RefitDisabledError(RefitError):
    """The engine was built without ``enable_refit``: its weights are frozen."""


class WeightError(RefitError, ValueError):
    """A refit was refused because of one named weight (a bad value: also a ``ValueError``)."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"weight {name!r}: {message}")
        self.name = name
        self.message = message

    def __reduce__(self) -> tuple:
        return (type(self), (self.name, self.message), self.__dict__)


class UnknownWeightError(WeightError):
    """A weight name that the engine's manifest does not list."""


class ShapeMismatchError(WeightError):
    """A weight whose shape differs from the manifest's."""


class DtypeMismatchError(WeightError, TypeError):
    """A weight whose dtype differs from the manifest's (no silent casts); also a ``TypeError``."""


class NonFiniteWeightError(WeightError):
    """A floating-point weight holding NaN or Inf while the policy is ``reject``."""


class WeightFileError(RefitError, ValueError):
    """Weights that cannot be read safely: a file that is malformed, truncated, not a regular file
    or carrying code (pickle), or a value that is not a plain dense tensor (meta, sparse,
    quantized, ...). ``name`` is the weight concerned, None for the file as a whole."""

    def __init__(self, message: str, *, name: str | None = None) -> None:
        super().__init__(message)
        self.name = name


class StagedSetError(RefitError):
    """Commit or discard of a staged set that is no longer in a state that allows it, or that
    this engine did not stage."""


class StagedSetDiscardedError(StagedSetError):
    """Commit of a staged set that was discarded."""


class StagedSetSupersededError(StagedSetError):
    """Commit of a staged set staged against a live set that another commit has since replaced."""


class MemoryBudgetError(RefitError):
    """Staging a set would exceed the engine's memory budget; nothing was allocated."""


class InputError(EngineError, ValueError):
    """An inference input that does not fit the engine's input specs, refused before anything ran:
    ``name`` the input, ``expected`` its spec, ``got`` what was given (``engines.inputs``)."""

    def __init__(self, name: str, expected: str, got: str) -> None:
        super().__init__(f"input {name!r}: expected {expected}, got {got}")
        self.name = name
        self.expected = expected
        self.got = got

    def __reduce__(self) -> tuple:
        return (type(self), (self.name, self.expected, self.got), self.__dict__)


class BackendUnavailableError(EngineError):
    """The requested backend or device is not available on this machine (SDK or hardware absent)."""


class VersionOrderError(RefitError, ValueError):
    """A staged version number that is not newer than the live one (versions only grow)."""


class InvalidVersionError(VersionOrderError):
    """A version that is not an integer in ``[0, 2**63)``: a bool, a float (even ``5.0``), a
    string, a negative number. Refused, never truncated or coerced."""


class NotRetainedError(RefitError):
    """A request to re-stage a weight set the engine no longer holds (not live, not previous)."""


class MissingWeightsError(RefitError, ValueError):
    """A refit declared complete lacks weights; ``names`` lists them."""

    def __init__(self, names: list[str]) -> None:
        shown = ", ".join(repr(n) for n in names[:10]) + (" ..." if len(names) > 10 else "")
        super().__init__(f"{len(names)} weight(s) missing from a complete refit: {shown}")
        self.names = names

    def __reduce__(self) -> tuple:
        return (type(self), (self.names,), self.__dict__)
