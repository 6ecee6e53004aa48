"""One error tree for the whole platform; every failure that crosses NATS is one of these, with a code.

    AubeError                      code
    ├── InvalidName                invalid_name
    ├── InvalidRequest             invalid_request      (a body that is not the schema)
    ├── InvalidBundle              invalid_bundle       (and a finer code per problem, see BundleProblem)
    │                              bundle_invalid_requirements  (requirements.txt holds more than requirements)
    ├── UnknownFunction            unknown_function
    ├── UnknownInstance            unknown_instance
    ├── CapacityExhausted          capacity_exhausted   (max_instances reached)
    ├── BuildFailed                build_failed
    ├── HealthCheckFailed          health_check_failed
    ├── RuntimeFailure             runtime_failure      (the container engine or a process failed)
    ├── NotReady                   not_ready            (a request arrived before the service could serve it)
    ├── TooManyRequests            too_many_requests    (a tenant has its maximum of requests in flight)
    ├── QuotaExceeded              quota_exceeded       (a tenant has its maximum of functions)
    └── ServiceUnavailable         unavailable          (a NATS request got no answer)

Foreign exceptions are translated at the adapter that meets them (`raise ... from e`).
"""

from __future__ import annotations


class AubeError(Exception):
    code = "internal"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return self.message


class InvalidName(AubeError):
    code = "invalid_name"


class InvalidRequest(AubeError):
    code = "invalid_request"


class InvalidBundle(AubeError):
    """The uploaded archive or its contents are unusable; `code` names the exact problem."""

    code = "invalid_bundle"


class UnknownFunction(AubeError):
    code = "unknown_function"


class NameTaken(AubeError):
    """The function name belongs to another tenant."""

    code = "name_taken"


class UnknownInstance(AubeError):
    code = "unknown_instance"


class CapacityExhausted(AubeError):
    code = "capacity_exhausted"


class BuildFailed(AubeError):
    code = "build_failed"


class HealthCheckFailed(AubeError):
    code = "health_check_failed"


class RuntimeFailure(AubeError):
    code = "runtime_failure"


class NotReady(AubeError):
    code = "not_ready"


class ServiceUnavailable(AubeError):
    code = "unavailable"


class TooManyRequests(AubeError):
    code = "too_many_requests"


class QuotaExceeded(AubeError):
    code = "quota_exceeded"


_BY_CODE: dict[str, type[AubeError]] = {
    cls.code: cls
    for cls in (
        InvalidName,
        InvalidRequest,
        InvalidBundle,
        UnknownFunction,
        UnknownInstance,
        CapacityExhausted,
        BuildFailed,
        HealthCheckFailed,
        RuntimeFailure,
        NotReady,
        ServiceUnavailable,
        TooManyRequests,
        QuotaExceeded,
    )
}


def error_from_code(code: str, message: str) -> AubeError:
    """Rebuild the exception a remote service replied with; bundle sub-codes map to InvalidBundle."""
    cls = _BY_CODE.get(code)
    if cls is None:
        cls = InvalidBundle if code.startswith("bundle_") else AubeError
    return cls(message, code=code)
