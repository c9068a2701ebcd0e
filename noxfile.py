"""Developer sessions: ``nox -s lint tests``; ``nox -s gpu`` on a CUDA machine; ``nox -s docs``."""

from __future__ import annotations

import nox

nox.options.sessions = ["lint", "tests"]
TORCH = "torch==2.13.0"


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", "src", "tests", "benchmarks", "examples")


@nox.session
def tests(session: nox.Session) -> None:
    session.install(TORCH)
    session.install("-e", ".[test]")
    session.run("python", "-m", "pytest", "-q", *session.posargs, env={"HF_HUB_OFFLINE": "1"})


@nox.session
def gpu(session: nox.Session) -> None:
    """Tests and checks that need a CUDA device (not run by default)."""
    session.install("-e", ".[test,quant]")
    session.run("python", "-m", "pytest", "-q", "-m", "gpu", *session.posargs)


@nox.session
def docs(session: nox.Session) -> None:
    session.install(TORCH)
    session.install("-e", ".[docs]")
    session.run("mkdocs", "build", "--strict")
