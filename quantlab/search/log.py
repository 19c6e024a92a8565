"""The resumable search log: ``workdir/search_log.jsonl`` (settings, evaluations, trajectory).

One JSON object a line, rewritten atomically after every step::

    {"type": "header", "format": LOG_FORMAT, "settings": {...}}
    {"type": "evaluation", "plan_hash": ..., "samples": ..., "rows": [...], "comparison": "evaluations/..."}
    ...
    {"type": "step", ...one trajectory row...}
    ...
    {"type": "sensitivity", "records": [...]}      (extra records: after the ranking, at the end)
    {"type": "end", "met": ..., "message": ...}
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..atomic import json_default, write_text
from ..errors import SearchError
from .evaluation import Evaluation

LOG_FORMAT = "quantlab.search-log/1"
LOG_FILE = "search_log.jsonl"


def log_line(record: Mapping[str, Any]) -> str:
    """One log line: sorted keys, no spaces, NaN kept, numpy values as plain JSON."""
    return json.dumps(record, sort_keys=True, separators=(",", ":"), allow_nan=True, default=json_default)


def normalise(obj: Any) -> Any:
    """What ``obj`` becomes after a JSON round trip (tuples -> lists...), for comparing settings."""
    return json.loads(log_line({"v": obj}))["v"]


class SearchLog:
    """``workdir/search_log.jsonl``: settings, evaluations and trajectory, rewritten after every step.

    Opening an existing log checks that it was written with the same ``settings``
    (SearchError naming the differences otherwise) and loads its evaluations, which the
    search then reuses instead of measuring again. Full validations' comparator results
    are saved beside it (``evaluations/<plan>-<samples>/``) so a resumed search can still
    return the final candidate's comparison.
    """

    def __init__(self, workdir: str | Path, settings: Mapping[str, Any]) -> None:
        self.workdir = Path(workdir)
        self.path = self.workdir / LOG_FILE
        self.settings = normalise(dict(settings))
        self.evaluations: dict[str, Evaluation] = {}
        self.comparison_dirs: dict[str, str] = {}
        self._order: list[str] = []
        self._resumed = 0
        if self.path.is_file():
            self._load()

    @property
    def resumed(self) -> int:
        """How many evaluations were read from an earlier run's log."""
        return self._resumed

    def _load(self) -> None:
        header: dict[str, Any] | None = None
        lines = self.path.read_text(encoding="utf-8").splitlines()
        for number, text in enumerate(lines, 1):
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except ValueError:
                raise SearchError(f"{self.path}:{number}: not a JSON line; the search log is damaged. Delete "
                                  f"{self.path} (or use another workdir) to start the search over.") from None
            kind = record.get("type")
            if header is None:
                if kind != "header" or record.get("format") != LOG_FORMAT:
                    raise SearchError(f"{self.path}: not a quantlab search log (first line is not a "
                                      f"{LOG_FORMAT!r} header); use another workdir")
                header = record
                self._check_settings(record.get("settings", {}))
            elif kind == "evaluation":
                ev = Evaluation.from_record(record)
                self.evaluations[ev.key] = ev
                self._order.append(ev.key)
                if record.get("comparison"):
                    self.comparison_dirs[ev.key] = str(record["comparison"])
        self._resumed = len(self.evaluations)

    def _check_settings(self, old: Mapping[str, Any]) -> None:
        was, now = _flatten(old), _flatten(self.settings)
        differ = [k for k in sorted(set(was) | set(now)) if was.get(k) != now.get(k)]
        if differ:
            shown = "; ".join(f"{k}: logged {_short(was.get(k))}, now {_short(now.get(k))}" for k in differ[:6])
            raise SearchError(
                f"{self.path} was written by a search with other settings ({shown}). Its evaluations "
                f"do not apply: use another workdir, or delete {self.path} to start over."
            )

    def add(self, ev: Evaluation, comparison_dir: str | None = None) -> None:
        if ev.key not in self.evaluations:
            self._order.append(ev.key)
        self.evaluations[ev.key] = ev
        if comparison_dir:
            self.comparison_dirs[ev.key] = comparison_dir

    def comparison_dir(self, ev: Evaluation) -> Path:
        return self.workdir / "evaluations" / f"{ev.plan_hash[:16]}-{ev.samples}"

    def write(self, rows: Sequence[Mapping[str, Any]], extra: Sequence[Mapping[str, Any]] = ()) -> Path:
        """Rewrite the whole log atomically: header, evaluations, then trajectory rows and ``extra``."""
        lines = [log_line({"type": "header", "format": LOG_FORMAT, "settings": self.settings})]
        for key in self._order:
            rec = {"type": "evaluation", **self.evaluations[key].to_record(),
                   "comparison": self.comparison_dirs.get(key)}
            lines.append(log_line(rec))
        lines += [log_line({"type": "step", **dict(r)}) for r in rows]
        lines += [log_line(dict(r)) for r in extra]
        return write_text(self.path, "\n".join(lines) + "\n")


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested settings as dotted keys, so a refusal names the exact setting that differs."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."

