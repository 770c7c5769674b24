"""Which S3 errors are worth a retry, and the backoff between tries.

Transient: timeouts, connection problems (refused, reset, closed), 5xx and throttling
(``SlowDown``...). Never 4xx: a missing key, a missing bucket or a denied request fails at once.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

_TRANSIENT_CODES = {
    "SlowDown", "RequestTimeout", "RequestTimeoutException", "InternalError", "ServiceUnavailable",
    "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottled",
    "TooManyRequestsException", "PriorRequestNotComplete", "500", "502", "503", "504",
}


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter: delay_i = min(max_delay, base_delay * 2**i) * U(0.5, 1)."""

    attempts: int = 5
    base_delay: float = 0.2
    max_delay: float = 5.0

    def delay(self, attempt: int) -> float:
        return min(self.max_delay, self.base_delay * 2**attempt) * random.uniform(0.5, 1.0)


DEFAULT_RETRY = RetryPolicy()


def is_transient(err: BaseException) -> bool:
    """Timeouts, connection problems, 5xx and throttling — never 4xx."""
    from botocore.exceptions import ClientError, ConnectionError, HTTPClientError

    if isinstance(err, (ConnectionError, HTTPClientError, ConnectionResetError, TimeoutError)):
        return True
    if isinstance(err, ClientError):
        code = str(err.response.get("Error", {}).get("Code", ""))
        status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        return code in _TRANSIENT_CODES or status >= 500
    from boto3.exceptions import RetriesExceededError, S3UploadFailedError

    if isinstance(err, (S3UploadFailedError, RetriesExceededError)):  # the transfer manager's wrappers
        return not any(code in str(err) for code in USER_CODES)
    return False


USER_CODES = ("NoSuchBucket", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken")


def error_code(err: BaseException) -> str:
    """The S3 error code, also from the transfer manager's wrapped errors."""
    from botocore.exceptions import ClientError

    if isinstance(err, ClientError):
        return str(err.response.get("Error", {}).get("Code", ""))
    return next((code for code in USER_CODES if code in str(err)), "")
