"""Any S3 API (AWS, MinIO, R2, moto) through boto3; credentials come the standard boto3 way."""

from __future__ import annotations

from typing import Any

from producer.errors import StorageError
from worker.storage.base import Storage

_MISSING = {"NoSuchKey", "404", "NotFound"}


class S3Storage(Storage):
    """Objects under `s3://bucket/prefix`. boto3 clients are thread-safe; one per instance."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        max_attempts: int = 5,
        connect_timeout: float = 5.0,
        read_timeout: float = 60.0,
    ) -> None:
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint_url = endpoint_url
        self.base_url = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        config = Config(
            retries={"mode": "standard", "max_attempts": max_attempts},
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
        )
        self.client: Any = boto3.client("s3", endpoint_url=endpoint_url, config=config)

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def _put(self, name: str, data: bytes, content_type: str, metadata: dict[str, str]) -> None:
        try:
            self.client.put_object(
                Bucket=self.bucket, Key=self._key(name), Body=data, ContentType=content_type, Metadata=metadata
            )
        except Exception as exc:
            raise self._error("write", name, exc) from exc

    def _get(self, name: str) -> bytes | None:
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self._key(name))
            body: bytes = response["Body"].read()
            return body
        except Exception as exc:
            if _error_code(exc) in _MISSING:
                return None
            raise self._error("read", name, exc) from exc

    def _error(self, verb: str, name: str, exc: Exception) -> StorageError:
        where = f"s3://{self.bucket}/{self._key(name)}" + (f" at {self.endpoint_url}" if self.endpoint_url else "")
        code = _error_code(exc)
        if code == "NoSuchBucket":
            return StorageError(
                f"cannot {verb} {where}: bucket {self.bucket!r} does not exist; create it or fix RENDER_STORAGE_URL"
            )
        if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return StorageError(f"cannot {verb} {where}: access denied ({code}); check the AWS credentials")
        return StorageError(f"cannot {verb} {where}: {type(exc).__name__}: {exc}")


def _error_code(exc: Exception) -> str | None:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        code = response.get("Error", {}).get("Code")
        return str(code) if code is not None else None
    return None
