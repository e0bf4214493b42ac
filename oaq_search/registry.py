"""How every pluggable component is found from its name: one registry per kind (cost model, sensitivity
metric, seed, sampler), each resolving a built-in name, an installed entry point, or a `module:attribute`
the user names, and checking that what it found is of the right kind. Nothing else is ever imported.

Each list of names exists once, in its registry: study files are validated against it, `--help` and
error messages list it, and the engine resolves through it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .errors import UserError
from .plugins import entry_point_names, entry_point_object, import_named


class Registry:
    """Components of one `kind`: built in by name (`register`), in entry-point `group`, or `module:attribute`.

    A class found is instantiated (without arguments); the result must be an instance of `base`, or,
    without a base, callable (a function such as a seed builder)."""

    def __init__(self, kind: str, base: type | None = None, group: str | None = None,
                 other_names: Callable[[], list[str]] = list):
        self.kind, self.base, self.group = kind, base, group
        self.other_names = other_names  # names the caller resolves itself (shipped target tables), for listings
        self.builtin: dict[str, Any] = {}

    def register(self, name: str) -> Callable[[Any], Any]:
        """A decorator adding a built-in under `name`."""
        def add(component: Any) -> Any:
            self.builtin[name] = component
            return component
        return add

    def names(self) -> list[str]:
        """Built-in names, the caller's other names, then installed plug-ins'."""
        known = [*self.builtin, *self.other_names()]
        plugins = entry_point_names(self.group) if self.group else []
        return known + [name for name in plugins if name not in known]

    def check(self, spec: str, key: str) -> str:
        """`spec` if it can name a component (nothing is imported yet), else a one-line error naming `key`."""
        if spec in self.builtin or ":" in spec or (self.group and spec in entry_point_names(self.group)):
            return spec
        raise UserError(f"unknown {self.kind} {spec!r} for {key}: use one of {', '.join(self.names())} or "
                        f"module:attribute")

    def get(self, spec: Any) -> Any:
        """The component `spec` names; a component passed as an object is checked and returned as it is."""
        if not isinstance(spec, str):
            return self._checked(spec, type(spec).__name__)
        if spec in self.builtin:
            found = self.builtin[spec]
        elif ":" in spec:
            found = import_named(spec, self.kind)
        else:
            found = entry_point_object(self.group, spec) if self.group else None
            if found is None:
                raise UserError(f"unknown {self.kind} {spec!r}: use one of {', '.join(self.names())} or module:attribute")
        return self._checked(found, spec)

    def _checked(self, found: Any, spec: str) -> Any:
        if self.base is None:
            if not callable(found):
                raise UserError(f"{self.kind} {spec!r} is a {type(found).__name__}, not a function")
            return found
        if isinstance(found, type) and issubclass(found, self.base):
            try:
                return found()
            except TypeError as error:
                raise UserError(f"{self.kind} {spec!r} cannot be made without arguments ({error}): give it defaults "
                                f"for every constructor argument, or name an instance") from None
        if not isinstance(found, self.base):
            what = f"class {found.__name__}" if isinstance(found, type) else f"a {type(found).__name__}"
            raise UserError(f"{self.kind} {spec!r} is {what}, not a {self.base.__module__}.{self.base.__name__}")
        return found
