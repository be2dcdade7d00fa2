"""Zero-shot prompt templates by name: CLIP's 80 ImageNet templates and the per-dataset English templates that
CLIP_benchmark ships (zeroshot_templates.json, copied from its en_zeroshot_classification_templates.json, MIT
licence, Copyright (c) 2022 Mehdi Cherti), with its `{c}` placeholder read as ours, `{}`.

A template setting is a list of templates, a name from that table (`imagenet1k`, `cifar10`, ...; `imagenet` is
`imagenet1k`, CLIP's 80), or `auto`: the evaluated dataset's own templates file when it has one (CLIP_benchmark's
`zeroshot_classification_templates.txt`), else the bare class name.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

AUTO = "auto"
BARE = ["{}"]
ALIASES = {"imagenet": "imagenet1k"}


@cache
def named_templates() -> dict[str, list[str]]:
    table = json.loads((Path(__file__).with_name("zeroshot_templates.json")).read_text())
    return {name: [as_ours(t) for t in templates] for name, templates in table.items()}


def as_ours(template: str) -> str:
    """CLIP_benchmark writes the class as `{c}`; our templates are str.format patterns with `{}`."""
    return template.replace("{c}", "{}")


def resolve(setting: str | list[str], own: list[str] | None = None, where: str = "templates") -> list[str]:
    """The templates a setting names; ValueError in one line for an unknown name or a template without `{}`."""
    if isinstance(setting, str):
        if setting == AUTO:
            return list(own) if own else list(BARE)
        table = named_templates()
        name = ALIASES.get(setting, setting)
        if name not in table:
            raise ValueError(f"{where}: unknown template set {setting!r}; use a list, auto, imagenet or one of "
                             f"{', '.join(sorted(table))}")
        return list(table[name])
    templates = [str(t) for t in setting]
    bad = [t for t in templates if "{}" not in t]
    if not templates or bad:
        raise ValueError(f"{where}: every template needs a {{}} where the class name goes, got {bad or templates}")
    return templates
