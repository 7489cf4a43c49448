"""A key given in a URL (`?access_token=`, for event streams and files) never reaches the service's access log."""

from __future__ import annotations

import logging

from service.serve import RedactTokens


def test_the_access_log_redacts_a_key_given_in_the_url() -> None:
    record = logging.LogRecord(
        "uvicorn.access",
        logging.INFO,
        __file__,
        1,
        '%s - "%s %s HTTP/%s" %d',
        ("127.0.0.1:5000", "GET", "/v1/jobs/abc/events?access_token=rk_secret-key&x=1", "1.1", 200),
        None,
    )
    assert RedactTokens().filter(record)
    line = record.getMessage()
    assert "rk_secret-key" not in line
    assert "/v1/jobs/abc/events?access_token=<redacted>&x=1" in line
