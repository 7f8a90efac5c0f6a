"""A griffe extension for the documentation site (loaded from mkdocs.yml).

learnax's docstrings are Markdown, in equinox's style (**Arguments:**, **Returns:**,
**Example:**), but a few name other objects with Sphinx roles (:class:`Checkpointer`,
:meth:`load_latest`). Here those become Markdown cross-references when the object is
on the site, and code otherwise.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(class|func|meth|attr|exc):`~?([\w.]+)`")
_PUBLIC = "learnax.checkpoint"


class LearnaxDocs(griffe.Extension):
    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        if pkg.name != "learnax":
            return
        public = pkg["checkpoint"]
        exported = set(public.exports or [])
        for obj in _walk(pkg):
            if obj.docstring is not None:
                obj.docstring.value = _with_references(obj.docstring.value, obj, exported)

    # The same event under its name in griffe 1.x (rewriting twice changes nothing).
    on_package_loaded = on_package


def _with_references(text: str, obj: griffe.Object, exported: set[str]) -> str:
    return _ROLE.sub(lambda match: _reference(match, obj, exported), text)


def _walk(obj: griffe.Object) -> Any:
    yield obj
    for member in obj.members.values():
        if not member.is_alias:
            yield from _walk(member)


def _reference(match: re.Match[str], obj: griffe.Object, exported: set[str]) -> str:
    role, name = match.groups()
    short = name.rpartition(".")[2]
    code = f"`{short}`"
    if role in ("class", "func", "exc") and short in exported:
        return f"[{code}][{_PUBLIC}.{short}]"
    if role in ("meth", "attr"):
        owner = obj if obj.is_class else obj.parent
        if (
            owner is not None
            and owner.is_class
            and owner.name in exported
            and short in owner.members
            and not short.startswith("_")
        ):
            return f"[{code}][{_PUBLIC}.{owner.name}.{short}]"
    return code
