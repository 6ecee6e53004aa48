"""`aube deploy`'s output: the function's events followed while its upload runs, shown one of three ways.

    terminal   stdout is a terminal (and no --json): a spinner with what is happening now, and a line per step as
               it happens (accepted, each build output line, ready), then the stream URL (rich)
    json       --json, or stdout is not a terminal: one JSON object, the upload's reply (`{"ok": true, "name",
               "version", "url", "instances"}` or `{"ok": false, "error": {"code", "message"}}`); with --events,
               first one JSON line per event (`{"name", "event", "at", ...}`), the reply always last
    url        --quiet: only the stream URL (scripts/upload.sh, AubeFaaS's output)

Events come on aube.events.fn.<name>; the subscription is live at the server before the upload request is sent, so
none of this upload's is missed. Which events are this upload's, and what each says, is decided by `DeployEvents`
(no I/O); a failure is told on stderr as `error: <code>: <message>` in every mode (main.py).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Literal, Protocol

import anyio
import msgspec
from nats.aio.client import Client as NATS
from rich.console import Console
from rich.text import Text

from aube.shared import names
from aube.shared.errors import ServiceUnavailable
from aube.shared.schemas import ErrorBody, ErrorReply, FunctionEvent, UploadReply

OutputMode = Literal["terminal", "json", "url"]
DEPLOY_EVENTS = ("accepted", "build", "ready", "failed")  # scaled, stopped, deleted: other operations'
# After the reply, how long the last event (ready/failed, published just before the reply) may take to arrive.
LAST_EVENT_GRACE = 1.0


def output_mode(*, json_flag: bool, quiet: bool, stdout_is_terminal: bool) -> OutputMode:
    if quiet:
        return "url"
    return "terminal" if stdout_is_terminal and not json_flag else "json"


class DeployEvents:
    """Which events on the function's subject are this upload's: once `accepted` names the version, only that
    version's (another upload of the same name may run at the same moment); before it, only a failure (a bundle
    refused before it got a version)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.version: int | None = None
        self.finished = False  # ready or failed seen

    def take(self, event: FunctionEvent) -> bool:
        if event.name != self.name or event.event not in DEPLOY_EVENTS or self.finished:
            return False
        if self.version is None:
            if event.event == "accepted":
                self.version = event.version
            elif event.event != "failed":
                return False
        elif event.version is not None and event.version != self.version:
            return False
        self.finished = event.event in ("ready", "failed")
        return True

    def status(self) -> str:
        """What the upload is doing now, for the spinner."""
        if self.version is None:
            return f"uploading {self.name}"
        if self.finished:
            return f"version {self.version} of {self.name} is done"
        return f"building version {self.version} of {self.name} and starting its instances"


def describe(event: FunctionEvent) -> tuple[str, str]:
    """A step's label and text for the terminal."""
    if event.event == "accepted":
        return "accepted", f"version {event.version}"
    if event.event == "ready":
        count = event.instances or 0
        return "ready", f"version {event.version}, {count} warm instance{'' if count == 1 else 's'}"
    if event.event == "failed":
        return "failed", f"{event.code}: {event.message}" if event.code else event.message
    return event.event, event.message


class View(Protocol):
    def __enter__(self) -> View: ...
    def __exit__(self, *exc: object) -> None: ...
    def event(self, event: FunctionEvent, status: str) -> None: ...
    def done(self, reply: UploadReply) -> None: ...


class TerminalView:
    STYLES = {"accepted": "cyan", "build": "dim", "ready": "green", "failed": "red"}

    def __init__(self, name: str, console: Console | None = None) -> None:
        self.console = console or Console(highlight=False)
        self._status = self.console.status(f"uploading {name}", spinner="dots")

    def __enter__(self) -> TerminalView:
        self._status.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._status.stop()

    def event(self, event: FunctionEvent, status: str) -> None:
        if event.event == "failed":
            return  # the error line that ends the deploy says the same (main.py, on stderr)
        label, text = describe(event)
        # Text, not markup: a build line's "[...]" is pip's, not a style.
        line = Text.assemble((f"{label:>9}  ", self.STYLES.get(event.event, "")), text)
        self.console.print(line, soft_wrap=True)
        self._status.update(status)

    def done(self, reply: UploadReply) -> None:
        self._status.stop()
        deployed = Text.assemble((f"deployed {reply.name} version {reply.version}: ", "bold green"), reply.url)
        self.console.print(deployed, soft_wrap=True)


class JsonView:
    def __init__(self, *, events: bool) -> None:
        self.events = events

    def __enter__(self) -> JsonView:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def event(self, event: FunctionEvent, status: str) -> None:
        if self.events:
            print(msgspec.json.encode(event).decode(), flush=True)

    def done(self, reply: UploadReply) -> None:
        print(msgspec.json.encode(reply).decode(), flush=True)


class UrlView(JsonView):
    def __init__(self) -> None:
        super().__init__(events=False)

    def done(self, reply: UploadReply) -> None:
        print(reply.url, flush=True)


def make_view(mode: OutputMode, name: str, *, events: bool) -> View:
    if mode == "terminal":
        return TerminalView(name)
    return UrlView() if mode == "url" else JsonView(events=events)


def error_json(code: str, message: str) -> str:
    """An error as the JSON an error reply is (what --json prints for any failure of the deploy)."""
    return msgspec.json.encode(ErrorReply(error=ErrorBody(code=code, message=message))).decode()


async def deploy_following(
    nc: NATS, name: str, upload: Callable[[], Awaitable[UploadReply]], view: View
) -> UploadReply:
    """Run `upload` while showing this upload's events in `view`; its reply, or its error raised."""
    names.validate_name(name)
    events = DeployEvents(name)
    sub = await nc.subscribe(names.events_subject(name))
    await nc.flush()  # the server has the subscription before the upload request: no event of it is missed
    finished = anyio.Event()
    outcome: UploadReply | Exception | None = None

    async def follow() -> None:
        async for msg in sub.messages:
            try:
                event = msgspec.json.decode(msg.data, type=FunctionEvent)
            except msgspec.DecodeError:
                continue  # an event of a later version of the platform, say: not ours to show
            if events.take(event):
                view.event(event, events.status())
                if events.finished:
                    finished.set()

    try:
        with view:
            async with anyio.create_task_group() as tg:
                tg.start_soon(follow)
                # Caught here, raised after the group: raised inside, it would leave it wrapped in an ExceptionGroup.
                try:
                    outcome = await upload()
                except Exception as e:
                    outcome = e
                if not isinstance(outcome, ServiceUnavailable):  # else nobody answered: no event is coming
                    with anyio.move_on_after(LAST_EVENT_GRACE):
                        await finished.wait()
                tg.cancel_scope.cancel()
            if isinstance(outcome, UploadReply):
                view.done(outcome)
    finally:
        with anyio.move_on_after(2, shield=True):
            await sub.unsubscribe()
    if isinstance(outcome, Exception):
        raise outcome
    assert isinstance(outcome, UploadReply)
    return outcome
