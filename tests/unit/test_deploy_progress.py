"""`aube deploy`'s output decisions (cli/progress.py): which events are this upload's, what each says, which mode."""

from __future__ import annotations

import json

from aube.cli.progress import DeployEvents, describe, error_json, output_mode
from aube.shared.schemas import FunctionEvent


def ev(event: str, version: int | None = None, **fields: object) -> FunctionEvent:
    return FunctionEvent(name=str(fields.pop("name", "greet")), event=event, at=1.0, version=version, **fields)  # type: ignore[arg-type]


def test_only_this_uploads_events_are_taken_once_accepted_names_its_version() -> None:
    events = DeployEvents("greet")
    assert events.status() == "uploading greet"
    assert not events.take(ev("build", 6, message="another upload's build"))  # before our accepted: not ours
    assert not events.take(ev("scaled", instances=2))  # another operation's
    assert not events.take(ev("accepted", 1, name="other"))
    assert events.take(ev("accepted", 7))
    assert "version 7" in events.status()
    assert events.take(ev("build", 7, message="installing requirements"))
    assert not events.take(ev("build", 8, message="a concurrent upload of the same name"))
    assert not events.finished
    assert events.take(ev("ready", 7, instances=1))
    assert events.finished and "done" in events.status()
    assert not events.take(ev("ready", 7, instances=1))  # nothing after the end


def test_a_failure_before_any_version_is_this_uploads() -> None:
    events = DeployEvents("greet")
    assert events.take(ev("failed", message="no fn.py", code="bundle_missing_fn"))
    assert events.finished


def test_each_step_reads_as_a_line() -> None:
    assert describe(ev("accepted", 3)) == ("accepted", "version 3")
    assert describe(ev("build", 3, message="[pip] Collecting x")) == ("build", "[pip] Collecting x")
    assert describe(ev("ready", 3, instances=1)) == ("ready", "version 3, 1 warm instance")
    assert describe(ev("ready", 3, instances=0)) == ("ready", "version 3, 0 warm instances")
    assert describe(ev("failed", 3, message="boom", code="build_failed")) == ("failed", "build_failed: boom")


def test_the_output_mode_follows_the_terminal_and_the_flags() -> None:
    assert output_mode(json_flag=False, quiet=False, stdout_is_terminal=True) == "terminal"
    assert output_mode(json_flag=False, quiet=False, stdout_is_terminal=False) == "json"
    assert output_mode(json_flag=True, quiet=False, stdout_is_terminal=True) == "json"
    assert output_mode(json_flag=True, quiet=True, stdout_is_terminal=False) == "url"


def test_an_error_prints_as_an_error_reply() -> None:
    assert json.loads(error_json("name_taken", "taken")) == {
        "ok": False,
        "error": {"code": "name_taken", "message": "taken"},
    }
