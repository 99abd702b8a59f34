"""Developer sessions. They run in the environment nox is started from (install once:
`bash .ci/install`, then `.venv/bin/nox -s <session>`), so no session reinstalls torch."""

from __future__ import annotations

import nox

nox.options.default_venv_backend = "none"
nox.options.sessions = ["lint", "tests"]


@nox.session
def tests(session: nox.Session) -> None:
    """The test suite (CPU, tiny models, ../shared/dreambooth images)."""
    session.run("python", "-m", "pytest", "-n", "2", "-q", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    session.run("python", "-m", "ruff", "check", "benchmark", "methods", "tests", "noxfile.py")
    session.run(
        "python", "-m", "ruff", "format", "--check", "--diff", "benchmark", "methods", "tests", "noxfile.py"
    )
