"""The logged pyfunc's environment: pinned serving packages, never this unpublished package."""

from __future__ import annotations

from importlib.metadata import version

import mlflow


def test_logged_model_pins_the_serving_packages_and_not_this_package(tmp_path):
    from components.tracking.pyfunc import SERVING_PACKAGES, log_embedding_model

    export = tmp_path / "export"
    export.mkdir()
    (export / "config.json").write_text("{}")  # logging copies the export; it does not load it
    with mlflow.start_run():
        info = log_embedding_model(export, registered_name=None)
    lines = open(mlflow.pyfunc.get_model_dependencies(info.model_uri)).read().split()
    assert {f"{name}=={version(name)}" for name in SERVING_PACKAGES} <= set(lines)
    assert not any(line.startswith("clipforge") for line in lines)


def test_settings_named_as_secrets_and_credentials_in_urls_are_redacted():
    from components.secrets import REDACTED, redacted_setting

    for name in ("data.api_key", "hf_token", "aws_secret_access_key", "mlflow.password", "db.credentials"):
        assert redacted_setting(name, "xyz") == REDACTED, name
    for name in ("filters.language.keep", "model.tokenizer", "max_caption_tokens", "model.token_topk_fraction",
                 "data.key_col"):
        assert redacted_setting(name, "xyz") == "xyz", name
    assert redacted_setting("data.api_key", None) is None  # an unset secret stays visibly unset
    assert redacted_setting("data.url_list", "s3://bucket/list.parquet") == "s3://bucket/list.parquet"
    assert (redacted_setting("data.url_list", "https://u:p@host.example/a/list.csv?X-Amz-Signature=abc#top")
            == f"https://{REDACTED}@host.example/a/list.csv?{REDACTED}#top")
    assert redacted_setting("overrides", '["data.url_list=http://h/l.csv?token=abc", "x=1"]') == (
        f'["data.url_list=http://h/l.csv?{REDACTED}", "x=1"]')
