"""Write the app's OpenAPI document: ``python -m service.api.openapi > openapi.yaml``.

``tests/unit/test_openapi.py`` fails when the committed ``openapi.yaml`` drifts from the app."""

from __future__ import annotations

import sys
from typing import Any


def document() -> dict[str, Any]:
    from service.runtime.app import create_app

    return create_app().openapi()


def main() -> int:
    import yaml

    yaml.safe_dump(document(), sys.stdout, sort_keys=False, allow_unicode=True, width=100)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
