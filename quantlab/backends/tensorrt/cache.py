"""The engine cache: ``<folder>/<key digest>.engine`` + a JSON sidecar, never used across GPUs or versions.

    EngineCacheKey (model, plan, library, version, compute capability, settings) --digest--> file name
    lookup: same key, sidecar agrees, bytes match their hash --> cached engine
            same build but other version / GPU, or damaged    --> None + why (the caller rebuilds)
    store:  engine first, then its sidecar (a reader never sees a sidecar without its engine)
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from ...atomic import json_dumps, write_bytes, write_text
from ...fingerprint import sha256_bytes, tool_versions
from .flavors import NOT_PORTABLE


class EngineCacheWarning(UserWarning):
    """A cached engine was unusable (other TensorRT version, other GPU, corrupt) and is rebuilt."""


@dataclass(frozen=True)
class EngineCacheKey:
    """Everything that makes an engine valid: model, plan, library, GPU and build settings.

    ``compute_capability`` is ``"8.6"``-style or :data:`CPU_BUILD`; ``settings_sha256``
    hashes the exposed outputs, optimisation profiles and workspace limit.
    """

    model_sha256: str
    plan_sha256: str | None
    library: str
    version: str
    compute_capability: str
    settings_sha256: str

    @property
    def digest(self) -> str:
        return sha256_bytes(json.dumps(asdict(self), sort_keys=True).encode())

    def same_build(self, other: EngineCacheKey) -> bool:
        """Same model, plan, library and settings (version / GPU may differ)."""
        return (self.model_sha256, self.plan_sha256, self.library, self.settings_sha256) == (
            other.model_sha256, other.plan_sha256, other.library, other.settings_sha256)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class EngineBuild:
    """An engine and where it came from: ``status`` is built, cached, rebuilt or uncached."""

    engine: bytes = field(repr=False)
    key: EngineCacheKey
    status: Literal["built", "cached", "rebuilt", "uncached"]
    message: str
    path: Path | None
    build_seconds: float


class EngineCache:
    """``<folder>/<key digest>.engine`` plus a JSON sidecar recording what built it.

    A cached engine is used only when its sidecar matches the current library
    version and GPU compute capability and the engine bytes match their hash;
    otherwise :meth:`lookup` explains why (engines are not portable across GPUs
    or TensorRT versions) and the caller rebuilds.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def engine_path(self, key: EngineCacheKey) -> Path:
        return self.folder / f"{key.digest}.engine"

    def sidecar_path(self, key: EngineCacheKey) -> Path:
        return self.folder / f"{key.digest}.json"

    def _sidecars(self) -> list[tuple[Path, dict[str, Any]]]:
        out = []
        if not self.folder.is_dir():
            return out
        for path in sorted(self.folder.glob("*.json")):
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
                EngineCacheKey(**data["key"])
            except Exception:
                continue
            out.append((path, data))
        return out

    def lookup(self, key: EngineCacheKey) -> tuple[bytes | None, bool, str]:
        """(cached engine or None, whether an unusable entry was found, a sentence saying what)."""
        engine_path, sidecar = self.engine_path(key), self.sidecar_path(key)
        if engine_path.is_file() and sidecar.is_file():
            try:
                meta = json.loads(sidecar.read_text(encoding="utf-8"))
                recorded = EngineCacheKey(**meta["key"])
            except Exception as exc:
                return None, True, f"the sidecar {sidecar} is unreadable ({exc}); rebuilding the engine"
            if (recorded.version, recorded.compute_capability) != (key.version, key.compute_capability):
                return None, True, self._mismatch_text(engine_path, recorded, key)
            data = engine_path.read_bytes()
            if sha256_bytes(data) != meta.get("engine_sha256"):
                return None, True, (f"the cached engine {engine_path} does not match its recorded hash "
                                    "(truncated or edited); rebuilding it")
            return data, False, f"using the cached engine {engine_path}"
        for path, meta in self._sidecars():
            other = EngineCacheKey(**meta["key"])
            if other.same_build(key) and other != key:
                return None, True, self._mismatch_text(path.with_suffix(".engine"), other, key)
        return None, False, "no cached engine for this model, plan, library version and GPU; building one"

    @staticmethod
    def _mismatch_text(path: Path, recorded: EngineCacheKey, current: EngineCacheKey) -> str:
        return (
            f"the cached engine {path} was built by {recorded.library} {recorded.version} for "
            f"compute capability {recorded.compute_capability}, but this is {current.library} "
            f"{current.version} on {current.compute_capability}. {NOT_PORTABLE}: rebuilding "
            "(the old engine is left in place for the machine it was built for)."
        )

    def store(self, key: EngineCacheKey, engine: bytes, settings: Mapping[str, Any]) -> Path:
        """Write the engine, then its sidecar (a reader never sees a sidecar without its engine)."""
        path = write_bytes(self.engine_path(key), engine)
        meta = {
            "key": key.as_dict(),
            "engine_sha256": sha256_bytes(engine),
            "engine_bytes": len(engine),
            "settings": dict(settings),
            "tool_versions": tool_versions(),
            "note": f"{NOT_PORTABLE}; quantlab rebuilds when either differs.",
        }
        write_text(self.sidecar_path(key), json_dumps(meta))
        return path
