"""Workflow templates: data files (*.toml) of steps, each with a `type` and a `domain`.

Built-in templates live beside this module; users add their own in the folder named by
`paths.workflows`. Templates are validated when loaded. A session records the resolved steps
when it is created, so later edits to a template never change a session already submitted.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from pydantic import ValidationError as PydanticValidationError

from engine.errors import UnknownWorkflow, ValidationError

BUILTIN_DIR = Path(__file__).parent


class StepTemplate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: str = Field(min_length=1)
    domain: str = Field(min_length=1)
    when: str | None = Field(None, description="include the step only when this param is non-empty")
    config: dict[str, Any] = Field(default_factory=dict)


class Workflow(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str = Field(min_length=1)
    description: str = ""
    requires: list[str] = Field(default_factory=list, description="params that must be given")
    generates: bool = Field(True, description="whether the workflow runs a diffusion model")
    steps: list[StepTemplate] = Field(min_length=1)

    def resolve(self, params: dict[str, Any]) -> list[dict[str, Any]]:
        """The steps a session of these params runs, as plain data recorded in session.created."""
        return [
            {"type": s.type, "domain": s.domain, "config": s.config}
            for s in self.steps
            if s.when is None or params.get(s.when)
        ]


def load_file(path: Path) -> Workflow:
    try:
        data = tomllib.loads(path.read_text())
        data.setdefault("id", path.stem)
        return Workflow.model_validate(data)
    except (tomllib.TOMLDecodeError, PydanticValidationError) as exc:
        raise ValidationError(f"workflow template {path}: {exc}") from exc


def load_workflows(extra_dir: Path | None = None) -> dict[str, Workflow]:
    found: dict[str, Workflow] = {}
    folders = [BUILTIN_DIR] + ([extra_dir] if extra_dir and extra_dir.is_dir() else [])
    for folder in folders:
        for path in sorted(folder.glob("*.toml")):
            workflow = load_file(path)
            found[workflow.id] = workflow
    return found


def get_workflow(workflows: dict[str, Workflow], workflow_id: str) -> Workflow:
    try:
        return workflows[workflow_id]
    except KeyError:
        raise UnknownWorkflow(
            f"unknown workflow {workflow_id!r}; known: {', '.join(sorted(workflows))}", [{"loc": "workflow"}]
        ) from None
