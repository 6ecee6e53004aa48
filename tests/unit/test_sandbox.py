"""The process runtime's pure parts: memory sizes, rlimits, the bubblewrap argv, /proc parsing, leader finding."""

from __future__ import annotations

import pytest

from aube.controlplane.runtimes import sandbox
from aube.controlplane.runtimes.sandbox import ProcInfo, ProcStat


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("256m", 256 * 1024**2),
        ("1g", 1024**3),
        ("1G", 1024**3),
        ("512Mi", 512 * 1024**2),
        ("64MB", 64 * 1024**2),
        ("100k", 100 * 1024),
        ("1048576", 1048576),
        (" 2g ", 2 * 1024**3),
    ],
)
def test_parse_memory(text: str, expected: int) -> None:
    assert sandbox.parse_memory(text) == expected


# "1.5g" too: the upload's parser (the one both runtimes use) takes whole numbers only.
@pytest.mark.parametrize("text", ["", "m", "-1g", "1x", "0", "lots", "1 g b", "1.5g"])
def test_parse_memory_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="memory"):
        sandbox.parse_memory(text)


def test_rlimits_from_memory() -> None:
    assert sandbox.rlimits("256m", 8 << 20) == {"RLIMIT_AS": 256 * 1024**2, "RLIMIT_CORE": 0, "RLIMIT_FSIZE": 8 << 20}


def test_minimal_roots_drops_nested_and_duplicates() -> None:
    roots = sandbox.minimal_roots(["/opt/py/lib", "/opt/py", "/opt/py/", "/opt/python", "/work/src/shared"])
    assert roots == ["/opt/py", "/opt/python", "/work/src/shared"]


def _argv() -> list[str]:
    return sandbox.bwrap_argv(
        "/usr/bin/bwrap",
        ro_binds=[
            ("/venv", "/venv"),
            ("/src/instance", "/src/instance"),
            ("/data/functions/o/echo/v1/fn", sandbox.SANDBOX_FN_DIR),
            ("/data/functions/o/echo/v1/deps", sandbox.SANDBOX_DEPS_DIR),
        ],
        run_dir="/run/aube/o/i1",
        env={"AUBE_INSTANCE_PORT": "1234", "A": "b c"},
        command=["/venv/bin/python", "-m", "aube.instance"],
        seccomp_fd=7,
    )


def _pairs(argv: list[str], option: str) -> list[tuple[str, str]]:
    return [(argv[i + 1], argv[i + 2]) for i, a in enumerate(argv) if a == option]


def test_bwrap_argv_isolation_flags() -> None:
    argv = _argv()
    assert argv[0] == "/usr/bin/bwrap"
    for flag in ("--unshare-all", "--unshare-user", "--unshare-net", "--disable-userns", "--new-session"):
        assert flag in argv
    assert "--as-pid-1" in argv and "--clearenv" in argv
    assert "--share-net" not in argv  # a network of its own: nothing of the host's loopback
    assert argv[argv.index("--seccomp") + 1] == "7"
    assert "--die-with-parent" not in argv  # instances outlive a crash of the control plane
    assert argv[argv.index("--cap-drop") + 1] == "ALL"
    assert argv[argv.index("--tmpfs") + 1] == "/tmp"
    assert argv[argv.index("--proc") + 1] == "/proc"
    assert argv[argv.index("--dev") + 1] == "/dev"
    assert argv[argv.index("--chdir") + 1] == sandbox.SANDBOX_FN_DIR
    # The command comes last, unchanged.
    assert argv[-3:] == ["/venv/bin/python", "-m", "aube.instance"]


def test_bwrap_argv_binds_read_only() -> None:
    argv = _argv()
    binds = _pairs(argv, "--ro-bind")
    assert ("/venv", "/venv") in binds
    assert ("/src/instance", "/src/instance") in binds
    assert ("/data/functions/o/echo/v1/fn", sandbox.SANDBOX_FN_DIR) in binds
    assert ("/data/functions/o/echo/v1/deps", sandbox.SANDBOX_DEPS_DIR) in binds
    assert ("/usr", "/usr") in _pairs(argv, "--ro-bind-try")
    # Nothing of the host is writable but the instance's own socket folder.
    assert _pairs(argv, "--bind") == [("/run/aube/o/i1", sandbox.SANDBOX_RUN_DIR)]
    assert "--dev-bind" not in argv


def test_bwrap_argv_environment_only_via_setenv() -> None:
    argv = _argv()
    triples = [(argv[i + 1], argv[i + 2]) for i, a in enumerate(argv) if a == "--setenv"]
    assert sorted(triples) == [("A", "b c"), ("AUBE_INSTANCE_PORT", "1234")]
    # --clearenv comes before the variables it must not wipe.
    assert argv.index("--clearenv") < argv.index("--setenv")


def test_probe_uses_the_same_namespaces() -> None:
    probe = sandbox.probe_argv("bwrap", 5)
    assert probe[-1] == "true"
    for flag in ("--unshare-all", "--unshare-user", "--unshare-net", "--disable-userns", "--new-session", "--as-pid-1"):
        assert flag in probe
    assert probe[probe.index("--seccomp") + 1] == "5"


def test_stage_plan_gives_each_folder_its_own_place() -> None:
    plan = sandbox.stage_plan(["/root/py", "/data/fn", "/data/deps"])
    assert plan == [("/root/py", "/tmp/0"), ("/data/fn", "/tmp/1"), ("/data/deps", "/tmp/2")]


def test_parse_stat_with_awkward_command_name() -> None:
    # Field 2 may hold spaces and parentheses; everything after the last ')' is positional.
    rest = " ".join(["S", "1", "42", "42"] + ["0"] * 15 + ["987654"] + ["0"] * 30)
    stat = sandbox.parse_stat(f"42 (we ird) (name) {rest}")
    assert stat == ProcStat(pid=42, state="S", ppid=1, pgrp=42, session=42, starttime=987654)


def test_parse_stat_of_real_proc_format() -> None:
    text = (
        "18152 (python) S 18100 18152 18152 0 -1 4194560 2936 0 0 0 9 2 0 0 20 0 2 0 53232 "
        "37797888 5353 18446744073709551615 1 1 0 0 0 0 0 16781312 16386 0 0 0 17 1 0 0 0 0 0 0 0 0 0 0 0 0 0"
    )
    stat = sandbox.parse_stat(text)
    assert (stat.pid, stat.ppid, stat.session, stat.starttime) == (18152, 18100, 18152, 53232)


def test_parse_environ() -> None:
    data = b"A=1\0B=x=y\0EMPTY=\0junk\0\0"
    assert sandbox.parse_environ(data) == {"A": "1", "B": "x=y", "EMPTY": ""}


def test_handle_round_trip() -> None:
    assert sandbox.parse_handle(sandbox.format_handle(123, 456)) == (123, 456)
    for bad in ("abc", "1:2:3", "container-id", ""):
        with pytest.raises(ValueError):  # noqa: PT011 - int() and unpacking both raise ValueError
            sandbox.parse_handle(bad)


def _stat(pid: int, ppid: int, *, session: int | None = None, pgrp: int | None = None, state: str = "S") -> ProcStat:
    return ProcStat(
        pid=pid,
        state=state,
        ppid=ppid,
        pgrp=pgrp if pgrp is not None else pid,
        session=session if session is not None else pid,
        starttime=pid * 10,
    )


def test_is_gone() -> None:
    assert sandbox.is_gone(None, 10)
    assert sandbox.is_gone(_stat(1, 0), 999)  # recycled pid
    assert sandbox.is_gone(_stat(1, 0, state="Z"), 10)  # zombie
    assert not sandbox.is_gone(_stat(1, 0), 10)


def _marked(owner: str, **extra: str) -> dict[str, str]:
    return {sandbox.ENV_MANAGED_OWNER: owner, **extra}


def test_find_leaders_plain_and_bwrap() -> None:
    procs = [
        # plain instance: python as session leader, a child of the function (same session, marked env).
        ProcInfo(stat=_stat(100, 1), environ=_marked("me", AUBE_INSTANCE_ID="a")),
        ProcInfo(stat=_stat(101, 100, session=100, pgrp=100), environ=_marked("me")),
        # bwrap instance without --as-pid-1: outer bwrap leader, inner bwrap (own session, same env), python.
        ProcInfo(stat=_stat(200, 1), environ=_marked("me", AUBE_INSTANCE_ID="b")),
        ProcInfo(stat=_stat(201, 200), environ=_marked("me", AUBE_INSTANCE_ID="b")),
        ProcInfo(stat=_stat(202, 201, session=201, pgrp=201), environ={"AUBE_INSTANCE_ID": "b"}),
        # bwrap instance with --as-pid-1: outer bwrap leader, python in its own session without the marker.
        ProcInfo(stat=_stat(250, 1), environ=_marked("me", AUBE_INSTANCE_ID="d")),
        ProcInfo(stat=_stat(251, 250), environ={"AUBE_INSTANCE_ID": "d"}),
        # someone else's instance and an unmarked process.
        ProcInfo(stat=_stat(300, 1), environ=_marked("other", AUBE_INSTANCE_ID="c")),
        ProcInfo(stat=_stat(400, 1), environ={}),
    ]
    leaders = sandbox.find_leaders(procs, "me")
    assert [leader.handle for leader in leaders] == ["100:1000", "200:2000", "250:2500"]
    assert [leader.environ["AUBE_INSTANCE_ID"] for leader in leaders] == ["a", "b", "d"]
    assert all(leader.alive for leader in leaders)


def test_find_leaders_reports_zombies_as_dead() -> None:
    procs = [ProcInfo(stat=_stat(100, 1, state="Z"), environ=_marked("me"))]
    (leader,) = sandbox.find_leaders(procs, "me")
    assert not leader.alive


def test_descendants_breadth_first() -> None:
    stats = [_stat(1, 0), _stat(10, 1), _stat(11, 10), _stat(12, 10), _stat(13, 12), _stat(99, 1)]
    assert [s.pid for s in sandbox.descendants(stats, 10)] == [11, 12, 13]
    assert sandbox.descendants(stats, 13) == []


def test_signal_targets_plain_includes_leader() -> None:
    stats = [_stat(100, 1), _stat(101, 100, pgrp=100, session=100)]
    assert sandbox.signal_targets(stats, 100, sandboxed=False) == [100, 101]


def test_signal_targets_sandbox_spares_outer_bwrap() -> None:
    # Killing the outer bwrap first would orphan the sandbox; the workload is signalled instead.
    stats = [_stat(200, 1), _stat(201, 200), _stat(202, 201, pgrp=201, session=201)]
    assert sandbox.signal_targets(stats, 200, sandboxed=True) == [201, 202]


def test_listening_ports() -> None:
    text = (
        "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
        "   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1\n"
        "   1: 0100007F:D2A4 0100007F:1F90 01 00000000:00000000 00:00000000 00000000     0        0 2 1\n"
    )
    assert sandbox.listening_ports(text) == {8080}


def test_paths_under_tmp_are_bound_after_the_private_tmp() -> None:
    # A checkout or virtualenv under /tmp (a CI clone) must stay visible: bwrap applies mounts in order, so the
    # private /tmp has to come before the read-only binds, or it hides them.
    argv = sandbox.bwrap_argv(
        "/usr/bin/bwrap",
        ro_binds=[("/tmp/clone/.venv", "/tmp/clone/.venv"), ("/tmp/data/fn", sandbox.SANDBOX_FN_DIR)],
        run_dir="/tmp/run",
        env={},
        command=["/tmp/clone/.venv/bin/python", "-m", "aube.instance"],
        seccomp_fd=None,
    )
    tmpfs = argv.index("--tmpfs")
    binds = [i for i, a in enumerate(argv) if a in ("--ro-bind", "--ro-bind-try")]
    assert all(tmpfs < i for i in binds)


def test_cgroup_settings_follow_the_manifest() -> None:
    from aube.controlplane.runtimes import cgroups
    from aube.shared.schemas import LimitsSection

    values = cgroups.settings_for(LimitsSection(cpus=1.5, pids=64), 256 * 1024**2)
    assert values == {
        "cpu": {"cpu.cfs_period_us": "100000", "cpu.cfs_quota_us": "150000"},
        "pids": {"pids.max": "64"},
        "memory": {"memory.limit_in_bytes": str(256 * 1024**2)},
    }
    # The kernel refuses a quota under 1 ms: a tiny share is clamped to it rather than failing every start.
    assert cgroups.settings_for(LimitsSection(cpus=0.001), 1)["cpu"]["cpu.cfs_quota_us"] == "1000"


def test_own_cgroups_are_read_per_controller() -> None:
    from aube.controlplane.runtimes import cgroups

    text = "12:pids:/svc\n4:cpu,cpuacct:/svc/cpu\n1:name=systemd:/init.scope\n0::/unified\n"
    assert cgroups.own_groups(text) == {
        "pids": "/svc",
        "cpu": "/svc/cpu",
        "cpuacct": "/svc/cpu",
        "name=systemd": "/init.scope",
    }


def test_namespace_members_are_the_sandboxes_others_not_the_hosts() -> None:
    namespaces = {1: "pid:[host]", 50: "pid:[host]", 51: "pid:[a]", 52: "pid:[a]", 60: "pid:[a]", 70: "pid:[b]"}
    # 50 is bubblewrap (host), 51 its sandbox's pid 1; 60 an instance forked into that sandbox from elsewhere.
    assert sandbox.namespace_members(namespaces, [51], "pid:[host]") == [52, 60]
    assert sandbox.namespace_members(namespaces, [50], "pid:[host]") == []  # never the host's own processes
    assert sandbox.namespace_members(namespaces, [], "pid:[host]") == []
    assert sandbox.namespace_members(namespaces, [51, 52], "pid:[host]") == [60]
