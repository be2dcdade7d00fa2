"""Keep credentials out of what we record: MLflow parameters, manifests and resume markers.

A URL may carry them in its user:pass@ part or its query string (presigned object-store URLs, `?token=...`), and a
setting by its name (`api_key`, `hf_token`, `aws_secret_access_key`, `password`). What we record keeps the URL's
scheme, host and path, and the setting's name, so a run stays readable and comparable."""

from __future__ import annotations

import re
from typing import Any

REDACTED = "<redacted>"
_SECRET_WORDS = {"key", "apikey", "token", "secret", "password", "passwd", "credential", "credentials"}
_URL = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/@\s?#\"'<>]*@)?(?P<rest>[^\s?#\"'<>]*)"
                  r"(?P<query>\?[^\s#\"'<>]*)?")  # a URL ends at white space or a quote (inside JSON text)


def is_secret_name(name: str) -> bool:
    """True for a setting whose name ends in key, token, secret or password (`data.api_key`, `hf_token`); not for
    names that only contain such a word (`keep`, `tokenizer`, `token_topk_fraction`, `key_col`)."""
    return re.split(r"[^a-z0-9]+", name.rsplit(".", 1)[-1].lower())[-1] in _SECRET_WORDS


def redacted_text(text: str) -> str:
    """`text` with every URL's user:pass@ part and query string replaced by <redacted>."""
    def one(match: re.Match) -> str:
        userinfo = f"{REDACTED}@" if match["userinfo"] else ""
        query = f"?{REDACTED}" if match["query"] else ""
        return f"{match['scheme']}{userinfo}{match['rest']}{query}"

    return _URL.sub(one, text)


def redacted_setting(name: str, value: Any) -> Any:
    """What to record for the setting `name`: <redacted> for a secret's name, URLs redacted in a string."""
    if is_secret_name(name) and value not in (None, ""):
        return REDACTED
    return redacted_text(value) if isinstance(value, str) else value
