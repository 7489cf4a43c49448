"""Write docs/openapi.json from the HTTP service's app, so the checked-in API document cannot drift from the code.

    python tools/openapi_doc.py            # rewrite docs/openapi.json (`make docs`)
    python tools/openapi_doc.py --check    # exit 1 if the committed document differs

tests/integration/test_http_api.py compares a running service's /openapi.json with the committed document.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: the packages come from this checkout

from service.app import create_app  # noqa: E402
from service.settings import ServiceSettings  # noqa: E402

DOCUMENT = ROOT / "docs" / "openapi.json"


def document() -> dict[str, Any]:
    """The app's OpenAPI document; defaults, not this environment's RENDER_*, so it is the same everywhere."""
    openapi: dict[str, Any] = create_app(ServiceSettings.model_construct()).openapi()
    return openapi


def render(openapi: dict[str, Any]) -> str:
    return json.dumps(openapi, indent=2, sort_keys=True) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/openapi.json is out of date")
    args = parser.parse_args()
    text = render(document())
    if args.check:
        if DOCUMENT.read_text() != text:
            sys.stderr.write("docs/openapi.json is out of date; run `make docs`\n")
            return 1
        return 0
    DOCUMENT.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
