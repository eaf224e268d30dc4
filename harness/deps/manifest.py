"""Manifest: write CACHE/env.json (the contract in docs/DESIGN.md) atomically and read it back."""

from __future__ import annotations

import json
from pathlib import Path

from harness.deps.common import Context, DepsError, StepResult
from harness.paths import ENV_FILE, Env


def render(env: Env) -> str:
    return json.dumps(env.to_json(), indent=2) + "\n"


def parse(text: str) -> Env:
    return Env.from_json(json.loads(text))


def write(ctx: Context, env: Env) -> StepResult:
    path = ctx.cache / ENV_FILE
    text = render(env)
    if path.exists() and path.read_text() == text:
        return StepResult("env.json", str(path), "cached")
    if ctx.check:
        raise DepsError(f"{path} is missing or out of date")
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return StepResult("env.json", str(path), "installed")


def env_path(cache: Path) -> Path:
    return cache / ENV_FILE
