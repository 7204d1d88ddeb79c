"""Loads plugins from entry points: enabled by name and in order, nothing else imported.

Each enabled name is looked up in both groups; it must exist in at least one. A plugin that
fails to import, or whose `api_version` differs from `sealkv.plugins.api.API_VERSION`, stops
start-up with one error naming the entry point and its distribution.
"""
from __future__ import annotations

from dataclasses import dataclass
from importlib import metadata
from typing import Any, Optional

from sealkv.plugins.api import API_VERSION

STORAGE_GROUP = "sealkv.storage_layers"
ADMIN_GROUP = "sealkv.admin_services"
GROUPS = (STORAGE_GROUP, ADMIN_GROUP)
# KEK providers are chosen by the encryption plugin's kek_provider option, not enabled as
# plugins; they are listed beside them so an operator sees what is installed.
KEK_GROUP = "sealkv.kek_providers"
KINDS = {STORAGE_GROUP: "storage", ADMIN_GROUP: "admin", KEK_GROUP: "kek"}


class PluginError(RuntimeError):
    """An enabled plugin is missing or cannot be loaded."""


@dataclass(frozen=True)
class InstalledPlugin:
    """One entry point of a sealkv plugin group."""

    group: str
    name: str
    value: str
    distribution: str
    version: str

    @property
    def kind(self) -> str:
        return KINDS[self.group]


def installed() -> list[InstalledPlugin]:
    """Lists every installed plugin and KEK provider entry point, importing none of them."""
    found = []
    for group in KINDS:
        for ep in metadata.entry_points(group=group):
            dist = ep.dist
            found.append(InstalledPlugin(group, ep.name, ep.value,
                                         dist.metadata["Name"] if dist else "?",
                                         dist.version if dist else "?"))
    return sorted(found, key=lambda p: (p.group, p.name))


def _entry_point(group: str, name: str) -> Optional[metadata.EntryPoint]:
    matches = [ep for ep in metadata.entry_points(group=group) if ep.name == name]
    return matches[0] if matches else None


def load(names: list[str], group: str) -> list[tuple[str, Any]]:
    """Imports the enabled plugins of `group`, in order; returns (name, class) pairs."""
    unknown = [n for n in names if all(_entry_point(g, n) is None for g in GROUPS)]
    if unknown:
        available = ", ".join(sorted({p.name for p in installed() if p.group in GROUPS})) or "none"
        raise PluginError(f"plugin {unknown[0]!r} is not installed (installed: {available})")
    loaded = []
    for name in names:
        ep = _entry_point(group, name)
        if ep is None:
            continue
        dist = f"{ep.dist.metadata['Name']} {ep.dist.version}" if ep.dist else "unknown distribution"
        try:
            cls = ep.load()
        except Exception as exc:
            raise PluginError(f"plugin {name!r} ({ep.value}, from {dist}) failed to load: "
                              f"{type(exc).__name__}: {exc}") from exc
        version = getattr(cls, "api_version", None)
        if version != API_VERSION:
            raise PluginError(f"plugin {name!r} ({ep.value}, from {dist}) targets plugin API "
                              f"{version}, this sealkv provides {API_VERSION}")
        loaded.append((name, cls))
    return loaded


def method_rules(name: str, plugin: Any, service_names: list[str]) -> dict:
    """Returns the authorization rules of an admin plugin's services, from its declarations.

    Every method of every service the plugin serves must appear in its `method_roles`
    (full method name "/package.Service/Method" -> "readonly", "readwrite" or "admin");
    `peer_methods` names those node certificates may call too. A method left undeclared, an
    unknown role, or a declaration for a method the plugin does not serve raises PluginError
    naming the plugin (the node refuses to start: a method nobody declared would be denied to
    everyone anyway).
    """
    from google.protobuf import descriptor_pool

    from sealkv.node.security.authz import Rule

    declared = dict(getattr(plugin, "method_roles", None) or {})
    peers = set(getattr(plugin, "peer_methods", None) or ())
    rules = {}
    for service in service_names:
        try:
            descriptor = descriptor_pool.Default().FindServiceByName(service)
        except KeyError:
            raise PluginError(f"plugin {name!r} serves {service}, which no imported proto "
                              "module describes") from None
        for method in descriptor.methods:
            path = f"/{service}/{method.name}"
            role = declared.pop(path, None)
            if role is None:
                raise PluginError(f"plugin {name!r} does not declare the role {path} needs: "
                                  "add it to the plugin's method_roles (readonly, readwrite "
                                  "or admin)")
            try:
                rules[path] = Rule(role, peers=path in peers)
            except ValueError as exc:
                raise PluginError(f"plugin {name!r}, {path}: {exc}") from None
    if declared:
        raise PluginError(f"plugin {name!r} declares roles for methods it does not serve: "
                          + ", ".join(sorted(declared)))
    unknown_peers = peers - set(rules)
    if unknown_peers:
        raise PluginError(f"plugin {name!r} lists peer methods it does not serve: "
                          + ", ".join(sorted(unknown_peers)))
    return rules
