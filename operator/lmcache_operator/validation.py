"""Human messages for pydantic validation errors: each names the field as the user wrote it."""

from __future__ import annotations

from pydantic import ValidationError


def describe_validation_error(exc: ValidationError, *, prefix: str = "") -> list[str]:
    problems = []
    for error in exc.errors():
        path = ".".join(str(part) for part in error["loc"])
        where = ".".join(p for p in (prefix, path) if p)
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "unknown field; check the spelling (kubectl explain lmcc.spec)"
        elif "input" in error and error["type"] != "missing":
            message = f"{message} (got {error['input']!r})"
        problems.append(f"{where or '(spec)'}: {message}")
    return problems
