"""Any S3 API (AWS, MinIO, R2, moto) through boto3; credentials come the standard boto3 way (env, profile, role)."""

from __future__ import annotations

from functools import cached_property
from typing import TYPE_CHECKING

from producer.errors import StorageError, StorageUnavailable
from worker.storage.base import Storage

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

_MAX_EXPIRES = 7 * 24 * 3600  # SigV4's limit
_MISSING = {"NoSuchKey", "404", "NotFound"}
_TRANSIENT = {
    "InternalError",
    "ServiceUnavailable",
    "SlowDown",
    "RequestTimeout",
    "Throttling",
    "500",
    "502",
    "503",
    "504",
}
_DENIED = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken"}


class S3Storage(Storage):
    """Objects under `s3://bucket/prefix`. boto3 is imported here, not at module import; one thread-safe client.

    Each call gets botocore's quick retries (`max_attempts`, standard mode); on top of them an endpoint that
    cannot be reached or answers 5xx/throttling is retried with backoff for `retry_seconds` (see `Storage`).
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        max_attempts: int = 3,
        connect_timeout: float = 5.0,
        read_timeout: float = 60.0,
        retry_seconds: float = 0.0,
    ) -> None:
        import boto3
        from botocore.config import Config
        from botocore.exceptions import BotoCoreError, ClientError

        self.bucket = bucket
        self.retry_seconds = retry_seconds
        self.prefix = prefix.strip("/")
        self.base_url = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        config = Config(
            retries={"mode": "standard", "max_attempts": max_attempts},
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
        )
        # Its own session: boto3's default one is shared, not thread-safe, and caches the credentials it first found.
        session = boto3.session.Session()
        self.client: S3Client = session.client("s3", endpoint_url=endpoint_url, config=config)
        self.endpoint_url: str = self.client.meta.endpoint_url
        self._errors = (BotoCoreError, ClientError)

    def close(self) -> None:
        """Close the client's pooled connections (long-lived storages never need to)."""
        self.client.close()

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def _link(self, name: str, *, index_name: str, expires: int) -> str:
        if not 1 <= expires <= _MAX_EXPIRES:
            raise StorageError(f"a presigned S3 link lasts 1 to {_MAX_EXPIRES} seconds (7 days); got {expires}")
        params = {"Bucket": self.bucket, "Key": self._key(name)}
        try:
            return self._presigner.generate_presigned_url("get_object", Params=params, ExpiresIn=expires)
        except self._errors as exc:
            raise self._error("sign a link to", name, exc) from exc

    @cached_property
    def _presigner(self) -> S3Client:
        """A client like `client` that presigns with SigV4: botocore presigns with SigV2 unless told otherwise
        (boto/boto3#2680), and S3 refuses SigV2 for buckets made since June 2020 and in newer regions."""
        import boto3
        from botocore.config import Config

        config = self.client.meta.config.merge(Config(signature_version="s3v4"))
        region = self.client.meta.region_name
        return boto3.session.Session().client("s3", endpoint_url=self.endpoint_url, region_name=region, config=config)

    def _put(self, name: str, data: bytes, content_type: str, metadata: dict[str, str]) -> None:
        try:
            self.client.put_object(
                Bucket=self.bucket, Key=self._key(name), Body=data, ContentType=content_type, Metadata=metadata
            )
        except self._errors as exc:
            raise self._error("write", name, exc) from exc

    def _get(self, name: str) -> bytes | None:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(name))["Body"].read()
        except self._errors as exc:
            if self._missing(exc):
                return None
            raise self._error("read", name, exc) from exc

    def _delete(self, name: str) -> None:
        try:  # S3 answers 204 whether or not the key existed
            self.client.delete_object(Bucket=self.bucket, Key=self._key(name))
        except self._errors as exc:
            raise self._error("delete", name, exc) from exc

    @staticmethod
    def _missing(exc: Exception) -> bool:
        """Whether an S3 error says the object is not there (or, to a HEAD, nothing is)."""
        return _error_code(exc) in _MISSING

    def _error(self, verb: str, name: str, exc: Exception) -> StorageError:
        from botocore.exceptions import (
            ConnectionClosedError,
            ConnectTimeoutError,
            EndpointConnectionError,
            NoCredentialsError,
            ReadTimeoutError,
        )

        where = f"cannot {verb} s3://{self.bucket}/{self._key(name)} at {self.endpoint_url}"
        code = _error_code(exc)
        if code == "NoSuchBucket":
            problem = f"bucket {self.bucket!r} does not exist; create it or fix RENDER_STORAGE_URL"
        elif code in _DENIED:
            problem = f"access denied ({code}); check the AWS credentials and the bucket's policy"
        elif isinstance(exc, NoCredentialsError):
            problem = "no AWS credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)"
        elif isinstance(exc, EndpointConnectionError | ConnectTimeoutError | ConnectionClosedError):
            problem = "the S3 endpoint cannot be reached; start the server or fix RENDER_S3_ENDPOINT_URL"
            return StorageUnavailable(f"{where}: {problem}")
        elif isinstance(exc, ReadTimeoutError) or code in _TRANSIENT:
            return StorageUnavailable(f"{where}: the S3 endpoint is failing or too slow ({type(exc).__name__}: {exc})")
        else:
            problem = " ".join(f"{type(exc).__name__}: {exc}".split())
        return StorageError(f"{where}: {problem}")


def _error_code(exc: Exception) -> str | None:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        code = response.get("Error", {}).get("Code")
        return str(code) if code is not None else None
    return None
