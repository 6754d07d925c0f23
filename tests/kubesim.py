"""KubeSim: kmock's KubernetesEmulator with the API-server behaviour lg-rotate relies on.

kmock's emulator stores objects and serves create/get/list/watch/patch/delete, but it is
lenient where a real kube-apiserver is strict (see TESTING.md). This subclass adds, in one
place (:meth:`KubeSim._prepare_write`), what our code and tests depend on:

* ``metadata.resourceVersion``: one cluster-wide counter, bumped on every write (create,
  patch, update, delete) and returned in the answer, as etcd's revision is;
* ``metadata.uid``, ``metadata.creationTimestamp``, ``metadata.namespace``, ``apiVersion``
  and ``kind`` on create; ``generateName`` gets a random suffix; ``metadata.generation``
  starts at 1 for objects with a ``spec`` and grows when the ``spec`` changes;
* optimistic concurrency: a PATCH (merge, strategic-as-merge or JSON patch) or a PUT whose
  result carries another ``metadata.resourceVersion`` than the stored one gets
  ``409 Conflict``, exactly the rule the real API server applies;
* a create in a namespace that does not exist gets ``404 namespaces "x" not found``;
  ``default``, ``kube-system`` and ``kube-public`` exist from the start;
* Namespace objects themselves (``/api/v1/namespaces[/name]``, which kmock misparses);
* PUT (``replace_*``), which kmock answers with an error;
* ``labelSelector`` (equality and set based) and ``fieldSelector`` (``metadata.name``,
  ``metadata.namespace``) on list and watch; ``timeoutSeconds`` on watch;
* ``stringData`` of Secrets folded into base64 ``data``.

Deliberately not emulated: status-subresource isolation (a main-resource patch may change
``status``, a create may carry one: convenient for tests that fake controllers), RBAC,
admission, cascading deletion, watch bookmarks and ``resourceVersion`` on watch.

Tests may also register *write hooks* (:meth:`KubeSim.before_write`) that run just before a
write is applied, e.g. to simulate another writer changing an object between a client's
read and its patch (:meth:`KubeSim.modify`).
"""

from __future__ import annotations

import asyncio
import base64
import collections
import copy
import inspect
import re
import secrets
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Any

import aiohttp.web
import attrs
import kmock

NAMESPACES = kmock.resource("", "v1", "namespaces")
SECRETS = kmock.resource("", "v1", "secrets")
INITIAL_NAMESPACES = ("default", "kube-system", "kube-public")
_NAMESPACE_PATH = re.compile(r"^/api/v1/namespaces(?:/([^/]+)(?:/(status|finalize))?)?/?$")
_NAMESPACE_ALIAS = "lgsim-namespaces"  # kmock parses it as a cluster-scoped plural
_HISTORY_HIGH, _HISTORY_LOW = 48, 16
_JOURNAL_SIZE = 20_000
_WRITE_ACTIONS = (kmock.action.CREATE, kmock.action.UPDATE, kmock.action.DELETE)

WriteHook = Callable[[kmock.Request], Awaitable[None] | None]


def _status_error(status: int, reason: str, message: str, **details: Any) -> kmock.KubernetesError:
    return kmock.KubernetesError(status=status, reason=reason, message=message, details=details)


def _now() -> str:
    return datetime.now(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def merge_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON merge patch (RFC 7386) that turns ``old`` into ``new``."""
    diff: dict[str, Any] = {}
    for key in old:
        if key not in new:
            diff[key] = None
    for key, value in new.items():
        before = old.get(key)
        if key in old and before == value:
            continue
        if isinstance(before, Mapping) and isinstance(value, Mapping):
            diff[key] = merge_diff(before, value)
        else:
            diff[key] = copy.deepcopy(value)
    return diff


# --- selectors -----------------------------------------------------------------------

_SET_REQUIREMENT = re.compile(r"^\s*([^\s!=()]+)\s+(in|notin)\s+\(([^)]*)\)\s*$")


def _split_selector(text: str) -> list[str]:
    """Split on commas that are not inside parentheses."""
    parts, depth, current = [], 0, ""
    for char in text:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    return [part.strip() for part in parts if part.strip()]


_LABEL_KEY = re.compile(
    r"([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?"
)
_LABEL_VALUE = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?")


def _label_key(text: str) -> str:
    key = text.strip()
    if not _LABEL_KEY.fullmatch(key):
        raise ValueError(f"invalid label key: {key!r}")
    return key


def _label_value(text: str) -> str:
    value = text.strip()
    if not _LABEL_VALUE.fullmatch(value):
        raise ValueError(f"invalid label value: {value!r}")
    return value


def _requirement_matches(requirement: str, labels: Mapping[str, str]) -> bool:
    if match := _SET_REQUIREMENT.match(requirement):
        key_text, operator, values_text = match.groups()
        key = _label_key(key_text)
        values = {_label_value(value) for value in values_text.split(",") if value.strip()}
        if operator == "in":
            return labels.get(key) in values
        return key not in labels or labels[key] not in values
    if "!=" in requirement:
        key, value = requirement.split("!=", 1)
        return labels.get(_label_key(key)) != _label_value(value)
    if "=" in requirement:
        key, value = re.split(r"==?", requirement, maxsplit=1)
        return labels.get(_label_key(key)) == _label_value(value)
    if requirement.startswith("!"):
        return _label_key(requirement[1:]) not in labels
    return _label_key(requirement) in labels


def label_selector_matches(selector: str, labels: Mapping[str, str]) -> bool:
    """Kubernetes label selector semantics: ``a=b``, ``a==b``, ``a!=b``, ``a``, ``!a``,
    ``a in (x,y)``, ``a notin (x)``; requirements are ANDed. Raises ValueError if bad."""
    return all(_requirement_matches(part, labels) for part in _split_selector(selector))


def field_selector_matches(selector: str, obj: Mapping[str, Any]) -> bool:
    """Only ``metadata.name`` and ``metadata.namespace`` (``=``, ``==``, ``!=``)."""
    metadata = obj.get("metadata") or {}
    for requirement in _split_selector(selector):
        negate = "!=" in requirement
        field, value = (part.strip() for part in re.split(r"!=|==?", requirement, maxsplit=1))
        if field not in ("metadata.name", "metadata.namespace"):
            raise ValueError(f"field label not supported: {field}")
        actual = metadata.get(field.split(".", 1)[1])
        if (actual == value) == negate:
            return False
    return True


def _selected(request: kmock.Request, obj: Mapping[str, Any]) -> bool:
    labels = (obj.get("metadata") or {}).get("labels") or {}
    label_selector = request.params.get("labelSelector")
    field_selector = request.params.get("fieldSelector")
    if label_selector and not label_selector_matches(label_selector, labels):
        return False
    return not (field_selector and not field_selector_matches(field_selector, obj))


# --- the emulator --------------------------------------------------------------------


@attrs.define(kw_only=True)
class KubeSim(kmock.KubernetesEmulator):
    """The emulator used by the ``k8s`` fixture (see the module docstring)."""

    strict_namespaces: bool = True
    _revision: int = attrs.field(default=0, init=False)
    _write_lock: asyncio.Lock = attrs.field(factory=asyncio.Lock, init=False)
    _write_hooks: list[WriteHook] = attrs.field(factory=list, init=False)
    _hook_task: asyncio.Task[Any] | None = attrs.field(default=None, init=False)
    journal: collections.deque[kmock.Request] = attrs.field(
        factory=lambda: collections.deque(maxlen=_JOURNAL_SIZE), init=False
    )

    @property
    def revision(self) -> int:
        """The last resourceVersion handed out."""
        return self._revision

    def next_revision(self) -> str:
        self._revision += 1
        return str(self._revision)

    def seed_namespaces(self) -> None:
        """Create the namespaces every cluster has (call inside the emulator's loop)."""
        for name in INITIAL_NAMESPACES:
            self.objects[NAMESPACES, None, name] = self._new_object(
                NAMESPACES, None, {"metadata": {"name": name}, "status": {"phase": "Active"}}
            )

    # --- hooks for tests ---

    def before_write(self, hook: WriteHook) -> Callable[[], None]:
        """Run ``hook(request)`` before each write is applied; returns a remover."""
        self._write_hooks.append(hook)

        def remove() -> None:
            if hook in self._write_hooks:
                self._write_hooks.remove(hook)

        return remove

    def clear_write_hooks(self) -> None:
        self._write_hooks.clear()

    async def modify(
        self, resource: kmock.resource, namespace: str | None, name: str, patch: Mapping[str, Any]
    ) -> dict[str, Any]:
        """Merge-patch a stored object as another client would (new resourceVersion,
        a MODIFIED watch event). Safe to call from a write hook."""
        if asyncio.current_task() is self._hook_task:  # the hook's write holds the write lock
            return await self._modify(resource, namespace, name, patch)
        async with self._write_lock:
            return await self._modify(resource, namespace, name, patch)

    async def _modify(
        self, resource: kmock.resource, namespace: str | None, name: str, patch: Mapping[str, Any]
    ) -> dict[str, Any]:
        async with self._lock:
            stored = self.objects[resource, namespace, name]
            obj = kmock.Object(copy.deepcopy(stored.raw))
            obj.patch(dict(patch))
            new = dict(obj.raw)
            new.setdefault("metadata", {})["resourceVersion"] = self.next_revision()
            stored.patch(merge_diff(stored.raw, new))
            raw = stored.raw
            await self._buses[resource].put({"type": "MODIFIED", "object": raw})
            return raw

    # --- request plumbing ---

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        # kmock cannot parse /api/v1/namespaces (the word is its namespace marker): alias it.
        if match := _NAMESPACE_PATH.match(raw_request.path):
            name, sub = match.groups()
            path = "/api/v1/" + "/".join(p for p in (_NAMESPACE_ALIAS, name, sub) if p)
            url = raw_request.rel_url.with_path(path).with_query(raw_request.rel_url.query)
            raw_request = raw_request.clone(rel_url=url)
        return await super().__call__(raw_request)

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        # kmock matches reactions by scanning its whole request history (quadratic over a
        # test session): keep a short tail there and the full story in our journal.
        if len(self._requests) > _HISTORY_HIGH:
            del self._requests[:-_HISTORY_LOW]
        request = self._replace(request, self._fix_request(request))
        self.journal.append(request)
        if request.resource is None or request.action not in _WRITE_ACTIONS:
            return await super()._handle(request)
        async with self._write_lock:
            self._hook_task = asyncio.current_task()
            try:
                for hook in list(self._write_hooks):
                    result = hook(request)
                    if inspect.isawaitable(result):
                        await result
            finally:
                self._hook_task = None
            request = self._replace(request, self._prepare_write(request))
            return await super()._handle(request)

    def _replace(self, old: kmock.Request, new: kmock.Request) -> kmock.Request:
        """Put an amended request where kmock looks for it (it matches by identity)."""
        if new is not old:
            for index in range(len(self._requests) - 1, -1, -1):
                if self._requests[index] is old:
                    self._requests[index] = new
                    break
        return new

    def writes(
        self,
        *,
        resource: str | kmock.resource | None = None,
        namespace: str | None = None,
        name: str | None = None,
        method: str | None = None,
    ) -> list[kmock.Request]:
        """Journalled write requests (as the clients sent them), optionally filtered."""
        wanted = kmock.resource(resource) if isinstance(resource, str) else resource
        return [
            request
            for request in list(self.journal)
            if request.action in _WRITE_ACTIONS
            and (wanted is None or request.resource == wanted)
            and (namespace is None or request.namespace == namespace)
            and (name is None or request.name == name)
            and (method is None or request.method == kmock.method(method))
        ]

    def _fix_request(self, request: kmock.Request) -> kmock.Request:
        resource = request.resource
        if resource is not None and resource.plural == _NAMESPACE_ALIAS:
            request = attrs.evolve(request, resource=NAMESPACES, namespace=None)
        if request.method == kmock.method.PUT and request.name and request.action is None:
            request = attrs.evolve(request, action=kmock.action.UPDATE)
        return request

    def _is_namespaced(self, resource: kmock.resource) -> bool:
        return resource in self.resources and bool(self.resources[resource].namespaced)

    def _kind(self, resource: kmock.resource) -> str | None:
        return self.resources[resource].kind if resource in self.resources else None

    def _stored(
        self, resource: kmock.resource, namespace: str | None, name: str
    ) -> kmock.Object | None:
        key = (resource, namespace, name)
        if key not in self.objects:
            return None
        stored = self.objects[key]
        return None if stored.deleted else stored

    def _new_object(
        self, resource: kmock.resource, namespace: str | None, data: Mapping[str, Any]
    ) -> dict[str, Any]:
        obj = copy.deepcopy(dict(data))
        metadata = obj.setdefault("metadata", {})
        if namespace is not None:
            metadata["namespace"] = namespace
        if not metadata.get("name") and metadata.get("generateName"):
            metadata["name"] = metadata["generateName"] + secrets.token_hex(3)[:5]
        kind = self._kind(resource)
        if kind and "kind" not in obj:
            obj["kind"] = kind
        if "apiVersion" not in obj and resource.version:
            group = resource.group
            obj["apiVersion"] = f"{group}/{resource.version}" if group else resource.version
        metadata["uid"] = str(uuid.uuid4())
        metadata["creationTimestamp"] = _now()
        metadata["resourceVersion"] = self.next_revision()
        if "spec" in obj:
            metadata["generation"] = 1
        self._fold_string_data(resource, obj)
        return obj

    @staticmethod
    def _fold_string_data(resource: kmock.resource, obj: dict[str, Any]) -> None:
        if resource == SECRETS and obj.get("stringData"):
            data = obj.setdefault("data", {}) or {}
            for key, value in obj.pop("stringData").items():
                data[key] = base64.b64encode(str(value).encode()).decode()
            obj["data"] = data
        elif resource == SECRETS:
            obj.pop("stringData", None)

    def _prepare_write(self, request: kmock.Request) -> kmock.Request:
        """Validate a write and rewrite its body so kmock stores what a real server would."""
        resource = request.resource
        assert resource is not None
        if request.action == kmock.action.CREATE:
            return self._prepare_create(request, resource)
        if request.action == kmock.action.UPDATE and request.name is not None:
            return self._prepare_update(request, resource, request.name)
        deleting = request.action == kmock.action.DELETE and request.name is not None
        if deleting and self._stored(resource, request.namespace, request.name) is not None:
            self.next_revision()
        return request

    def _prepare_create(self, request: kmock.Request, resource: kmock.resource) -> kmock.Request:
        data = request.data if isinstance(request.data, Mapping) else {}
        metadata = data.get("metadata") or {}
        namespace = request.namespace or metadata.get("namespace")
        if self._is_namespaced(resource):
            if not namespace:
                raise _status_error(400, "BadRequest", "the namespace of the object is missing")
            if self.strict_namespaces and self._stored(NAMESPACES, None, namespace) is None:
                raise _status_error(
                    404,
                    "NotFound",
                    f'namespaces "{namespace}" not found',
                    name=namespace,
                    kind="namespaces",
                )
        else:
            namespace = None
        if not metadata.get("name") and not metadata.get("generateName"):
            raise _status_error(400, "BadRequest", "name or generateName is required")
        obj = self._new_object(resource, namespace, data)
        name = obj["metadata"]["name"]
        if self._stored(resource, namespace, name) is not None:
            raise _status_error(
                409,
                "AlreadyExists",
                f'{resource.plural} "{name}" already exists',
                name=name,
                kind=resource.plural,
            )
        return attrs.evolve(request, data=obj, namespace=namespace)

    def _prepare_update(
        self, request: kmock.Request, resource: kmock.resource, name: str
    ) -> kmock.Request:
        stored = self._stored(resource, request.namespace, name)
        if stored is None:
            return request  # kmock answers 404
        old = copy.deepcopy(stored.raw)
        old_meta = old.get("metadata") or {}
        if request.method == kmock.method.PUT:
            if not isinstance(request.data, Mapping):
                raise _status_error(400, "BadRequest", "the body of a PUT must be an object")
            new = copy.deepcopy(dict(request.data))
            new_meta = new.setdefault("metadata", {})
            if not new_meta.get("resourceVersion"):  # unconditional update
                new_meta["resourceVersion"] = old_meta.get("resourceVersion")
            for key in ("uid", "creationTimestamp", "generation", "namespace"):
                if key in old_meta:
                    new_meta.setdefault(key, old_meta[key])
            for key in ("apiVersion", "kind"):
                if key in old:
                    new.setdefault(key, old[key])
        else:
            patched = kmock.Object(copy.deepcopy(old))
            try:
                patched.patch(request.data if request.data is not None else {})
            except Exception as exc:
                raise _status_error(422, "Invalid", f"the patch cannot be applied: {exc}") from exc
            new = copy.deepcopy(patched.raw)
            new_meta = new.setdefault("metadata", {})
        sent_version = new_meta.get("resourceVersion")
        if sent_version is not None and sent_version != old_meta.get("resourceVersion"):
            plural = (
                resource.plural if resource.group == "" else f"{resource.plural}.{resource.group}"
            )
            raise _status_error(
                409,
                "Conflict",
                f'Operation cannot be fulfilled on {plural} "{name}": the object has been '
                "modified; please apply your changes to the latest version and try again",
                name=name,
                kind=resource.plural,
            )
        if "spec" in new and request.subresource is None and new.get("spec") != old.get("spec"):
            new_meta["generation"] = int(old_meta.get("generation") or 0) + 1
        self._fold_string_data(resource, new)
        new_meta["resourceVersion"] = self.next_revision()
        return attrs.evolve(request, data=merge_diff(old, new))

    # --- reads ---

    async def _serve_list(self, request: kmock.Request) -> Any:
        answer = await super()._serve_list(request)
        try:
            items = [item for item in answer["items"] if _selected(request, item)]
        except ValueError as exc:
            raise _status_error(400, "BadRequest", str(exc)) from exc
        return {"metadata": {"resourceVersion": str(self._revision)}, "items": items}

    async def _serve_watch(self, request: kmock.Request) -> AsyncIterator[Any]:
        loop = asyncio.get_running_loop()
        timeout = request.params.get("timeoutSeconds")
        deadline = loop.time() + float(timeout) if timeout else None
        events = super()._serve_watch(request)
        try:
            while True:
                remaining = None if deadline is None else deadline - loop.time()
                if remaining is not None and remaining <= 0:
                    break
                try:
                    event = await asyncio.wait_for(anext(events), remaining)
                except (TimeoutError, StopAsyncIteration):
                    break
                obj = event.get("object") if isinstance(event, Mapping) else None
                if isinstance(obj, Mapping) and not _selected(request, obj):
                    continue
                yield event
        finally:
            await events.aclose()
