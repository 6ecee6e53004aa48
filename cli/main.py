"""`aube`: deploy, delete and list functions over NATS, as the nats CLI or scripts/upload.sh would.

    aube deploy <folder> <name>    upload a function folder; its build steps on a terminal, else the reply as JSON
                                   (--json, --events, --quiet: cli/progress.py)
    aube delete <name>             delete a function
    aube ls                        list functions and their instances
    aube events <name>             follow a function's events
    aube new <folder> [--style S]  write a new function folder (S: sync, async, generator or command)
    aube connect <name>            open a function's stream: stdin lines out, messages in (cli/connect.py)
    aube login [FILE]              keep a tenant's credentials file where aube finds it from any folder
    aube logs [-f] [--since D] <name>  what a function's instances write on stdout and stderr (cli/logs.py)
    aube start [--proxies N]       run the whole platform in the foreground (what `make start` does)
    aube tenant add <tenant>       operator: create a tenant (a deployer identity) and its credentials file
    aube tenant rotate <tenant>    operator: give a tenant a new password (the old one stops working)
    aube host add <host id>        operator: create a host agent's own NATS login (.data/hosts/<id>.env)
    aube host rotate <host id>     operator: give a host's agent a new password

Every command that talks to NATS finds the tenant's credentials as cli/credsearch.py says (--credentials FILE,
$AUBE_CREDENTIALS, ~/.config/aube/credentials.env, the platform folder's .data/credentials.env).
Exit status 0 on success; on failure a one-line `error: <code>: <message>` on stderr and status 1 (2 for usage).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import sys
import tarfile
import uuid
from pathlib import Path

import anyio
import msgspec
import nats
from nats.aio.client import Client as NATS
from nats.js.object_store import ObjectStore

from aube.cli import connect, logs, progress, scaffold, session
from aube.shared import buckets, names
from aube.shared.bus import request
from aube.shared.errors import AubeError, InvalidRequest
from aube.shared.schemas import (
    DeleteReply,
    DeleteRequest,
    ListReply,
    ListRequest,
    UploadReply,
    UploadRequest,
)
from aube.shared.settings import DEFAULT_NATS_URL

# Folders that are never part of a function.
SKIPPED = {"__pycache__", ".git", ".venv", ".mypy_cache", ".pytest_cache"}


def pack_folder(folder: Path) -> bytes:
    """A reproducible tar.gz of the folder's files (paths relative to it, no owners, no skipped folders)."""
    if not folder.is_dir():
        raise InvalidRequest(f"{folder} is not a folder")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for path in sorted(folder.rglob("*")):
            rel = path.relative_to(folder)
            if SKIPPED & set(rel.parts) or path.is_dir():
                continue
            info = tar.gettarinfo(str(path), arcname=str(rel))
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mtime = 0
            if info.isreg():
                with path.open("rb") as f:
                    tar.addfile(info, f)
            else:
                tar.addfile(info)
    return buf.getvalue()


async def deploy(nc: NATS, folder: Path, name: str, timeout: float, *, kv_replicas: int = 1) -> UploadReply:
    names.validate_name(name)
    bundle = pack_folder(folder)
    body = UploadRequest(name=name, tar=base64.b64encode(bundle).decode())
    if len(msgspec.json.encode(body)) > nc.max_payload:
        # Too big for one message: hand the bundle over through the JetStream object store of the deployer's own
        # account (the control plane reads it from there and deletes it).
        store = await bundle_store(nc, kv_replicas)
        key = f"{name}-{uuid.uuid4().hex}"
        await store.put(key, bundle)
        body = UploadRequest(name=name, object=key)
    return await request(nc, names.SUBJECT_UPLOAD, body, UploadReply, timeout)


async def bundle_store(nc: NATS, replicas: int) -> ObjectStore:
    """The deployer's account's bundle store, created with `replicas` copies when missing; an existing one with fewer
    is raised to `replicas`, never lowered (buckets.Resize.RAISE: another deployer may have asked for more)."""
    return await buckets.open_object_store(
        nc.jetstream(), names.BUCKET_BUNDLES, replicas=replicas, resize=buckets.Resize.RAISE
    )


async def follow_events(nc: NATS, name: str) -> None:
    sub = await nc.subscribe(names.events_subject(names.validate_name(name)))
    async for msg in sub.messages:
        print(msg.data.decode(), flush=True)


async def run(args: argparse.Namespace) -> int:
    nc = await session.connect(args.nats, args.credentials, os.environ, Path.cwd())
    try:
        if args.command == "deploy":
            view = progress.make_view(_deploy_output(args), args.name, events=args.events)
            await progress.deploy_following(
                nc,
                args.name,
                lambda: deploy(nc, Path(args.folder), args.name, args.timeout, kv_replicas=args.kv_replicas),
                view,
            )
        elif args.command == "delete":
            names.validate_name(args.name)
            await request(nc, names.SUBJECT_DELETE, DeleteRequest(name=args.name), DeleteReply, args.timeout)
            print(f"deleted {args.name}")
        elif args.command == "ls":
            listed = await request(nc, names.SUBJECT_LIST, ListRequest(), ListReply, args.timeout)
            if args.json:
                print(json.dumps(msgspec.to_builtins(listed.functions), indent=2))
            else:
                print(f"{'NAME':<24} {'VERSION':>7} {'INSTANCES':>9} {'FREE':>5} {'BUSY':>5}  URL")
                for f in listed.functions:
                    print(f"{f.name:<24} {f.version:>7} {f.instances:>9} {f.free:>5} {f.busy:>5}  {f.url}")
        elif args.command == "events":
            await follow_events(nc, args.name)
        elif args.command == "logs":
            await logs.run(nc, args)
    finally:
        await nc.close()
    return 0


def _deploy_output(args: argparse.Namespace) -> progress.OutputMode:
    return progress.output_mode(json_flag=args.json, quiet=args.quiet, stdout_is_terminal=sys.stdout.isatty())


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="aube", description="Aube: functions for streams")
    p.add_argument(
        "--nats",
        help="NATS server URL, or several separated by commas (a cluster's members); default: $AUBE_NATS_URL, "
        "else the credentials file's AUBE_NATS_URL (the rig's names its three nodes), else " + DEFAULT_NATS_URL,
    )
    p.add_argument(
        "--credentials",
        metavar="FILE",
        help="the tenant's credentials file; default: $AUBE_CREDENTIALS, else ~/.config/aube/credentials.env "
        "(aube login), else .data/credentials.env of the platform folder you are in",
    )
    p.add_argument(
        "--kv-replicas",
        type=int,
        choices=range(1, 6),
        default=int(os.environ.get("AUBE_KV_REPLICAS", "1")),
        help="replicas of your bundle store (large uploads) when it is created or has fewer; 3 in a cluster",
    )
    p.add_argument("--timeout", type=float, default=float(os.environ.get("AUBE_CLI_TIMEOUT", "600")))
    # Also after the command (`aube deploy --credentials FILE ...`); SUPPRESS keeps the one given before it.
    login_option = argparse.ArgumentParser(add_help=False)
    login_option.add_argument(
        "--credentials", metavar="FILE", default=argparse.SUPPRESS, help="the tenant's credentials file (aube --help)"
    )
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser(
        "deploy", parents=[login_option], help="upload a function folder (fn.py, requirements.txt, aube.toml)"
    )
    d.add_argument("folder")
    d.add_argument("name")
    d.add_argument("--json", action="store_true", help="print the reply as one JSON object (also when piped)")
    d.add_argument("--events", action="store_true", help="with JSON output: a JSON line per event before the reply")
    d.add_argument("-q", "--quiet", action="store_true", help="print only the stream URL")
    lg = sub.add_parser("login", help="keep a tenant's credentials file where aube finds it from any folder")
    lg.add_argument("file", nargs="?", help="a credentials file (- for stdin); default: .data/credentials.env here")
    sub.add_parser("delete", parents=[login_option], help="delete a function").add_argument("name")
    ls = sub.add_parser("ls", parents=[login_option], help="list functions")
    ls.add_argument("--json", action="store_true")
    sub.add_parser("events", parents=[login_option], help="follow a function's events").add_argument("name")
    scaffold.add_parser(sub)
    connect.add_parser(sub)
    logs.add_parser(sub)
    st = sub.add_parser("start", help="run NATS, control plane, reaper and proxies in the foreground")
    st.add_argument("--proxies", type=int, default=int(os.environ.get("AUBE_PROXIES", "1")), help="proxy replicas")
    st.add_argument("--nats-conf", default="deploy/nats.conf")
    tn = sub.add_parser("tenant", help="operator: manage tenants (deployer identities) of the platform run from here")
    tn_sub = tn.add_subparsers(dest="tenant_command", required=True)
    add = tn_sub.add_parser("add", help="create a tenant; writes its credentials to .data/tenants/NAME.env")
    add.add_argument("name")
    add.add_argument("--nats-conf", default="deploy/nats.conf")
    rotate = tn_sub.add_parser("rotate", help="give a tenant a new password; its credentials file is rewritten")
    rotate.add_argument("name")
    rotate.add_argument("--nats-conf", default="deploy/nats.conf")
    hs = sub.add_parser("host", help="operator: manage the NATS logins of host agents (a cluster's hosts)")
    hs_sub = hs.add_subparsers(dest="host_command", required=True)
    for action, about in (
        ("add", "create a host agent's login; writes it to .data/hosts/ID.env for that host"),
        ("rotate", "give a host agent a new password; its file is rewritten"),
    ):
        one = hs_sub.add_parser(action, help=about)
        one.add_argument("name", metavar="host_id")
        one.add_argument("--nats-conf", default="deploy/nats.conf")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "new":
        return scaffold.new_main(args)
    if args.command == "connect":
        return connect.connect_main(args)
    if args.command == "start":
        from aube.cli.platform import start_platform

        if args.proxies < 1:
            print("error: invalid_request: --proxies must be at least 1", file=sys.stderr)
            return 2
        return start_platform(
            proxies=args.proxies, nats_conf=Path(args.nats_conf).resolve(), workdir=Path.cwd(), env=dict(os.environ)
        )
    if args.command == "login":
        from aube.cli import login

        try:
            return login.run(args.file)
        except AubeError as e:
            print(f"error: {e.code}: {e.message}", file=sys.stderr)
            return 1
    if args.command in ("tenant", "host"):
        from aube.cli import platform

        action = args.tenant_command if args.command == "tenant" else args.host_command
        change = getattr(platform, f"{action}_{args.command}")
        try:
            path, reloaded = change(args.name, nats_conf=Path(args.nats_conf).resolve(), workdir=Path.cwd())
        except AubeError as e:
            print(f"error: {e.code}: {e.message}", file=sys.stderr)
            return 1
        done = "created" if action == "add" else "has a new password"
        print(f"{args.command} {args.name} {done}; its credentials: {path}")
        print("nats-server reloaded" if reloaded else "takes effect when the platform (re)starts")
        return 0
    try:
        return anyio.run(run, args)
    except AubeError as e:
        _fail(args, e.code, e.message)
    except (OSError, nats.errors.Error) as e:
        _fail(args, "unavailable", f"the connection to NATS failed: {e}")
    except KeyboardInterrupt:
        return 130
    return 1


def _fail(args: argparse.Namespace, code: str, message: str) -> None:
    """A failure on stderr; a deploy's with JSON output also as an error reply on stdout."""
    if args.command == "deploy" and _deploy_output(args) == "json":
        print(progress.error_json(code, message), flush=True)
    print(f"error: {code}: {message}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
