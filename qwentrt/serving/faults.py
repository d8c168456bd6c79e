"""Fault injection, for tests only: make engine steps fail on purpose to check that a fault fails only
the requests it touches, is counted, and that an engine that cannot recover says so.

Set QWENTRT_FAULT_INJECT in tritonserver's environment (or the `qwen3` model's `fault_inject` parameter)
to rules separated by ";":

    step:every=N    every Nth model run inside an engine step raises (the step's requests fail, INTERNAL)
    step:after=N    every model run after the first N raises (an engine that cannot recover)
    loop:after=N    after N steps, the scheduler raises outside the step's fault handling (a broken loop)

Never set it in production: nothing else reads it, and the server logs a warning when it is set."""

from __future__ import annotations

import itertools
import re
from typing import Any

ENV = "QWENTRT_FAULT_INJECT"
_RULE = re.compile(r"^(step|loop):(every|after)=(\d+)$")


class InjectedFault(RuntimeError):
    """Raised by an injected fault."""


def parse(spec: str) -> list[tuple[str, str, int]]:
    rules = []
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        m = _RULE.match(part)
        if m is None or (m.group(2) == "every" and int(m.group(3)) < 1):
            raise ValueError(f"{ENV}: bad rule {part!r} (use step:every=N, step:after=N or loop:after=N)")
        rules.append((m.group(1), m.group(2), int(m.group(3))))
    return rules


def install(engine: Any, spec: str) -> list[tuple[str, str, int]]:
    """Wrap the engine's model runner (`step`) or scheduler (`loop`) so that they fail as `spec` says."""
    rules = parse(spec)
    for kind, mode, n in rules:
        owner, name = (engine.runner, "run") if kind == "step" else (engine.scheduler, "schedule")
        original = getattr(owner, name)
        calls = itertools.count(1)

        def wrapped(*args, _original=original, _calls=calls, _kind=kind, _mode=mode, _n=n, **kwargs):
            i = next(_calls)
            if (_mode == "every" and i % _n == 0) or (_mode == "after" and i > _n):
                raise InjectedFault(f"injected fault ({_kind}:{_mode}={_n}, call {i})")
            return _original(*args, **kwargs)

        setattr(owner, name, wrapped)
    return rules
