"""aube.toml parsing and the fn.py / command checks, on folders in tmp_path."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from aube.controlplane.manifest import (
    MAX_FN_BYTES,
    ManifestBounds,
    check_function,
    check_manifest,
    load_manifest,
    memory_bytes,
    parse_manifest,
)
from aube.shared.errors import InvalidBundle
from aube.shared.schemas import FunctionSection, LimitsSection, Manifest
from aube.shared.settings import ControlPlaneSettings

CONTRACT_EXAMPLE = """
[function]
runtime = "command"
command = ["./prog", "arg"]
[scaling]
min_free = 1
max_instances = 10
idle_timeout = 900
fresh_per_stream = false
[limits]
memory = "256m"
cpus = 0.5
pids = 128
stream_idle_timeout = 0
stream_max_duration = 0
[env]
GREETING = "hello"
"""


def _code(action: object) -> InvalidBundle:
    assert callable(action)
    with pytest.raises(InvalidBundle) as caught:
        action()
    return caught.value


# --------------------------------------------------------------------------------------------------------
# aube.toml


def test_no_manifest_gives_defaults(tmp_path: Path) -> None:
    assert load_manifest(tmp_path) == Manifest()


def test_contract_example(tmp_path: Path) -> None:
    (tmp_path / "aube.toml").write_text(CONTRACT_EXAMPLE)
    manifest = load_manifest(tmp_path)
    assert manifest.function.runtime == "command"
    assert manifest.function.command == ["./prog", "arg"]
    assert manifest.scaling.idle_timeout == 900.0
    assert manifest.limits.memory == "256m"
    assert manifest.env == {"GREETING": "hello"}


def test_partial_manifest_keeps_defaults() -> None:
    manifest = parse_manifest(b"[scaling]\nfresh_per_stream = true\n")
    assert manifest.scaling.fresh_per_stream is True
    assert manifest.scaling.max_instances == Manifest().scaling.max_instances
    assert manifest.limits == Manifest().limits


def test_memory_as_plain_bytes() -> None:
    assert parse_manifest("[limits]\nmemory = 268435456\n").limits.memory == "268435456"
    assert parse_manifest('[limits]\nmemory = "1g"\n').limits.memory == "1g"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("256m", 256 * 1024**2),
        ("256M", 256 * 1024**2),
        ("256mb", 256 * 1024**2),
        ("1g", 1024**3),
        ("512k", 512 * 1024),
        ("1048576", 1048576),
        ("100b", 100),
    ],
)
def test_memory_bytes(text: str, expected: int) -> None:
    assert memory_bytes(text) == expected


@pytest.mark.parametrize("text", ["", "lots", "1.5g", "-1m", "12q", "m"])
def test_memory_bytes_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="memory"):
        memory_bytes(text)


@pytest.mark.parametrize(
    ("toml", "needle"),
    [
        ("[scaling\n", "not valid TOML"),
        ("surprise = 1\n", "surprise"),
        ("[scaling]\nmax_instancez = 3\n", "max_instancez"),
        ("[scaling]\nmax_instances = 'ten'\n", "max_instances"),
        ("[scaling]\nfresh_per_stream = 1\n", "fresh_per_stream"),
        ("[function]\nruntime = 'java'\n", "runtime"),
        ("[scaling]\nmax_instances = 0\n", "max_instances"),
        ("[scaling]\nmin_free = -1\n", "min_free"),
        ("[scaling]\nmin_free = 4\nmax_instances = 3\n", "min_free"),
        ("[scaling]\nidle_timeout = 0\n", "idle_timeout"),
        ("[scaling]\nidle_timeout = nan\n", "idle_timeout"),
        ("[limits]\ncpus = 0\n", "cpus"),
        ("[limits]\ncpus = -0.5\n", "cpus"),
        ("[limits]\npids = 0\n", "pids"),
        ("[limits]\nmemory = 'lots'\n", "memory"),
        ("[limits]\nmemory = '1k'\n", "memory"),
        ("[limits]\nstream_idle_timeout = -1\n", "stream_idle_timeout"),
        ("[limits]\nstream_max_duration = -5\n", "stream_max_duration"),
        ("[function]\nruntime = 'command'\n", "command"),
        ("[function]\nruntime = 'command'\ncommand = []\n", "command"),
        ("[function]\nruntime = 'command'\ncommand = ['']\n", "command"),
        ("[function]\ncommand = ['./prog']\n", "command"),
        ("[env]\n'1BAD' = 'x'\n", "1BAD"),
        ("[env]\n'A-B' = 'x'\n", "A-B"),
        ("[env]\nPORT = 8080\n", "PORT"),
        ("[env]\nFLAG = true\n", "FLAG"),
    ],
)
def test_invalid_manifest(toml: str, needle: str) -> None:
    err = _code(lambda: parse_manifest(toml))
    assert err.code == "bundle_invalid_manifest"
    assert needle in err.message
    assert err.message.startswith("aube.toml")


def test_manifest_not_utf8(tmp_path: Path) -> None:
    (tmp_path / "aube.toml").write_bytes(b"[env]\nA = '\xff'\n")
    assert _code(lambda: load_manifest(tmp_path)).code == "bundle_invalid_manifest"


def test_manifest_that_is_a_folder(tmp_path: Path) -> None:
    (tmp_path / "aube.toml").mkdir()
    assert _code(lambda: load_manifest(tmp_path)).code == "bundle_invalid_manifest"


def test_check_manifest_on_constructed_values() -> None:
    check_manifest(Manifest())
    bad = Manifest(function=FunctionSection(runtime="command"))
    assert _code(lambda: check_manifest(bad)).code == "bundle_invalid_manifest"


# --------------------------------------------------------------------------------------------------------
# fn.py


def _fn(tmp_path: Path, source: str) -> Path:
    (tmp_path / "fn.py").write_text(source)
    return tmp_path


@pytest.mark.parametrize(
    "source",
    [
        "def fn(websocket):\n    for m in websocket:\n        websocket.send(m)\n",
        "async def fn(websocket):\n    async for m in websocket:\n        await websocket.send(m)\n",
        "async def fn(messages):\n    async for m in messages:\n        yield m.upper()\n",
        "def _impl(ws):\n    pass\n\nfn = _impl\n",
        "from os import getcwd as fn\n",
        "import functools as fn\n",
        "from mylib import fn\n",
        "try:\n    from fast import fn\nexcept ImportError:\n    def fn(ws):\n        pass\n",
        "import sys\nif sys.version_info >= (3, 11):\n    def fn(ws):\n        pass\n",
        "fn: object = print\n",
    ],
    ids=["sync", "async", "async-generator", "assign", "import-as", "module-as", "from-import", "try", "if", "ann"],
)
def test_fn_styles_accepted(tmp_path: Path, source: str) -> None:
    check_function(_fn(tmp_path, source), Manifest())


@pytest.mark.parametrize(
    "source",
    [
        "",
        "def handler(ws):\n    pass\n",
        "def outer():\n    def fn(ws):\n        pass\n",
        "class Fn:\n    def fn(self, ws):\n        pass\n",
        "fn: object\n",
        "from fn import handler\n",
        "FN = 1\n",
    ],
    ids=["empty", "other-name", "nested", "method", "annotation-only", "import-from-fn", "case"],
)
def test_fn_undefined(tmp_path: Path, source: str) -> None:
    err = _code(lambda: check_function(_fn(tmp_path, source), Manifest()))
    assert err.code == "bundle_fn_undefined"
    assert "fn.py" in err.message


@pytest.mark.parametrize(
    ("source", "line"),
    [
        ("import os\n\ndef fn(ws)\n    pass\n", 3),
        ("def fn(ws):\n    pass\n\n\nreturn 1\n", 5),  # passes the parser, fails compile
        ("def fn(ws):\n\tif ws:\n        pass\n  pass\n", 3),
    ],
)
def test_fn_syntax(tmp_path: Path, source: str, line: int) -> None:
    err = _code(lambda: check_function(_fn(tmp_path, source), Manifest()))
    assert err.code == "bundle_fn_syntax"
    assert f"line {line}" in err.message


def test_fn_with_nul_byte(tmp_path: Path) -> None:
    (tmp_path / "fn.py").write_bytes(b"def fn(ws):\n    pass\x00\n")
    assert _code(lambda: check_function(tmp_path, Manifest())).code == "bundle_fn_syntax"


def test_fn_missing(tmp_path: Path) -> None:
    (tmp_path / "main.py").write_text("def fn(ws): pass\n")
    err = _code(lambda: check_function(tmp_path, Manifest()))
    assert err.code == "bundle_missing_fn"
    assert "main.py" in err.message  # says what the folder holds instead


def test_fn_folder_is_not_fn(tmp_path: Path) -> None:
    (tmp_path / "fn.py").mkdir()
    assert _code(lambda: check_function(tmp_path, Manifest())).code == "bundle_missing_fn"


# --------------------------------------------------------------------------------------------------------
# runtime "command"


def _command(*argv: str) -> Manifest:
    return Manifest(function=FunctionSection(runtime="command", command=list(argv)))


def test_command_in_folder(tmp_path: Path) -> None:
    prog = tmp_path / "prog"
    prog.write_text("#!/bin/sh\ncat\n")
    prog.chmod(0o755)
    check_function(tmp_path, _command("./prog", "--flag"))  # no fn.py needed
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "run.sh").write_text("#!/bin/sh\n")
    check_function(tmp_path, _command("bin/run.sh"))
    (tmp_path / "prog.sh").write_text("#!/bin/sh\n")
    check_function(tmp_path, _command("prog.sh"))


def test_command_on_path_or_absolute(tmp_path: Path) -> None:
    check_function(tmp_path, _command("python3", "-u", "main.py"))
    check_function(tmp_path, _command("/usr/bin/env", "cat"))


def test_command_missing_in_folder(tmp_path: Path) -> None:
    err = _code(lambda: check_function(tmp_path, _command("./prog")))
    assert err.code == "bundle_invalid_manifest"
    assert "./prog" in err.message


def test_command_leaving_folder(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (tmp_path / "outside").write_text("#!/bin/sh\n")
    err = _code(lambda: check_function(root, _command("../outside")))
    assert err.code == "bundle_unsafe_path"
    os.symlink("../outside", root / "prog")
    err = _code(lambda: check_function(root, _command("./prog")))
    assert err.code == "bundle_unsafe_path"
    assert "./prog" in err.message


def test_command_empty(tmp_path: Path) -> None:
    assert _code(lambda: check_function(tmp_path, _command())).code == "bundle_invalid_manifest"


def test_access_tokens_are_sha256_hex_digests() -> None:
    digest = "ab" * 32
    assert parse_manifest(f'[access]\ntokens_sha256 = ["{digest}"]\n').access.tokens_sha256 == [digest]
    assert parse_manifest("").access.tokens_sha256 == []  # public by default
    for bad in ('"s3cret"', '"' + "AB" * 32 + '"', '"' + "ab" * 31 + '"'):
        with pytest.raises(InvalidBundle) as e:
            parse_manifest(f"[access]\ntokens_sha256 = [{bad}]\n")
        assert e.value.code == "bundle_invalid_manifest"


# --------------------------------------------------------------------------------------------------------
# The operator's ranges (finding 8) and reserved environment names.

# (toml, key, allowed range as the message shows it) for each limit and scaling value, both ends, under the
# default ranges (cpus_max pinned to 2 so the case does not depend on the host).
BOUNDS = ManifestBounds(cpus_max=2.0)
# With maxima for the stream timeouts (by default they have none): their 0 ("never") is then out of range too.
STREAM_BOUNDS = ManifestBounds(cpus_max=2.0, stream_idle_timeout_max=3600.0, stream_max_duration_max=86400.0)
OUT_OF_RANGE = [
    ("[limits]\nmemory = '5m'\n", "limits.memory", "6m..4g"),
    ("[limits]\nmemory = '100000g'\n", "limits.memory", "6m..4g"),
    ("[limits]\nmemory = 4294967297\n", "limits.memory", "6m..4g"),
    ("[limits]\ncpus = 1e-12\n", "limits.cpus", "0.01..2"),
    ("[limits]\ncpus = 0.009\n", "limits.cpus", "0.01..2"),
    ("[limits]\ncpus = 2.5\n", "limits.cpus", "0.01..2"),
    ("[limits]\npids = 7\n", "limits.pids", "8..4096"),
    ("[limits]\npids = 4000000\n", "limits.pids", "8..4096"),
    ("[scaling]\nmax_instances = 0\n", "scaling.max_instances", "1..100"),
    ("[scaling]\nmax_instances = 100000\n", "scaling.max_instances", "1..100"),
    ("[scaling]\nmin_free = -1\n", "scaling.min_free", "0..10"),
    ("[scaling]\nmin_free = 11\nmax_instances = 20\n", "scaling.min_free", "0..10"),
    ("[scaling]\nidle_timeout = 0.5\n", "scaling.idle_timeout", "1..86400"),
    ("[scaling]\nidle_timeout = 86401\n", "scaling.idle_timeout", "1..86400"),
    ("[limits]\nstream_idle_timeout = -1\nstream_max_duration = 1\n", "limits.stream_idle_timeout", "0..3600"),
    ("[limits]\nstream_idle_timeout = 3601\nstream_max_duration = 1\n", "limits.stream_idle_timeout", "0..3600"),
    ("[limits]\nstream_max_duration = -5\nstream_idle_timeout = 1\n", "limits.stream_max_duration", "0..86400"),
    ("[limits]\nstream_max_duration = 86401\nstream_idle_timeout = 1\n", "limits.stream_max_duration", "0..86400"),
]


@pytest.mark.parametrize(("toml", "key", "allowed"), OUT_OF_RANGE)
def test_values_outside_the_operator_range_are_refused_naming_key_and_range(toml: str, key: str, allowed: str) -> None:
    err = _code(lambda: parse_manifest(toml, STREAM_BOUNDS if "stream" in key else BOUNDS))
    assert err.code == "bundle_invalid_manifest"
    assert key in err.message and allowed in err.message, err.message


@pytest.mark.parametrize(
    "toml",
    [
        "[limits]\nmemory = '6m'\ncpus = 0.01\npids = 8\n",
        "[limits]\nmemory = '4g'\ncpus = 2\npids = 4096\n",
        "[limits]\nmemory = '4096Mi'\n",
        "[scaling]\nmax_instances = 100\nmin_free = 10\nidle_timeout = 86400\n",
        "[scaling]\nmax_instances = 1\nmin_free = 0\nidle_timeout = 1\n",
    ],
)
def test_values_at_the_ends_of_the_range_are_accepted(toml: str) -> None:
    parse_manifest(toml, BOUNDS)
    parse_manifest("[limits]\nstream_idle_timeout = 3600\nstream_max_duration = 86400\n", STREAM_BOUNDS)


def test_zero_means_never_and_is_refused_once_the_operator_sets_a_maximum() -> None:
    unbounded = ManifestBounds()  # the defaults: no maximum for the stream timeouts, so 0 (never) is fine
    assert parse_manifest("[limits]\nstream_max_duration = 0\n", unbounded).limits.stream_max_duration == 0
    err = _code(lambda: parse_manifest("[limits]\nstream_max_duration = 0\nstream_idle_timeout = 1\n", STREAM_BOUNDS))
    assert "limits.stream_max_duration 0 (never)" in err.message and "0..86400" in err.message


def test_default_manifest_fits_the_default_ranges() -> None:
    check_manifest(Manifest(), ManifestBounds())


def test_cpus_below_a_hundredth_can_never_be_allowed() -> None:
    """Docker gets int(cpus * 1e9) nano-CPUs: 1e-12 became 0, which Docker reads as no limit at all."""
    assert ManifestBounds(cpus_min=0.001).problem() is not None
    assert "AUBE_CPUS_MIN" in (ManifestBounds(cpus_min=0.0).problem() or "")
    assert "AUBE_MEMORY_MIN" in (ManifestBounds(memory_min=1024).problem() or "")
    assert "AUBE_PIDS_MAX" in (ManifestBounds(pids_min=10, pids_max=9).problem() or "")
    assert ManifestBounds().problem() is None


def test_bounds_from_settings() -> None:
    settings = ControlPlaneSettings(memory_max="1g", max_instances_max=3, stream_max_duration_max=60.0, cpus_max=1.5)
    bounds = ManifestBounds.from_settings(settings)
    assert (bounds.memory_max, bounds.max_instances_max, bounds.cpus_max) == (1024**3, 3, 1.5)
    err = _code(lambda: parse_manifest("[scaling]\nmax_instances = 4\n", bounds))
    assert "scaling.max_instances 4" in err.message and "1..3" in err.message
    assert ManifestBounds.from_settings(ControlPlaneSettings()).cpus_max == float(os.cpu_count() or 1)
    with pytest.raises(ValueError, match="AUBE_MEMORY"):
        ManifestBounds.from_settings(ControlPlaneSettings(memory_max="lots"))
    with pytest.raises(ValueError, match="AUBE_CPUS_MIN"):
        ManifestBounds.from_settings(ControlPlaneSettings(cpus_min=0.0))


@pytest.mark.parametrize(
    "name",
    [
        "AUBE_FN_DIR",
        "AUBE_INSTANCE_PORT",
        "LD_PRELOAD",
        "LD_LIBRARY_PATH",
        "LD_AUDIT",
        "PYTHONPATH",
        "PYTHONHOME",
        "PYTHONSTARTUP",
        "PYTHONINSPECT",
        "PYTHONWARNINGS",
        "PATH",
        "HOME",
        "MALLOC_ARENA_MAX",
        "GLIBC_TUNABLES",
        "GCONV_PATH",
        "LOCPATH",
        "RES_OPTIONS",
        "HOSTALIASES",
        "TMPDIR",
    ],
)
def test_reserved_env_names_are_refused(name: str) -> None:
    err = _code(lambda: parse_manifest(f'[env]\n{name} = "x"\n'))
    assert err.code == "bundle_invalid_manifest"
    assert f"env key {name} is reserved" in err.message


@pytest.mark.parametrize("name", ["GREETING", "path", "MY_PATH", "PYTHON_", "LD", "DATABASE_URL", "TZ", "LANG"])
def test_ordinary_env_names_pass(name: str) -> None:
    if name == "PYTHON_":
        assert _code(lambda: parse_manifest(f'[env]\n{name} = "x"\n')).code == "bundle_invalid_manifest"
        return
    assert parse_manifest(f'[env]\n{name} = "x"\n').env == {name: "x"}


@pytest.mark.parametrize(("toml", "needle"), [('[env]\n"A=B" = "x"\n', "A=B"), ('[env]\nA = "x\\u0000y"\n', "NUL")])
def test_env_names_that_are_not_names_and_values_with_nul(toml: str, needle: str) -> None:
    assert needle in _code(lambda: parse_manifest(toml)).message


def test_manifest_size_and_nesting_are_bounded(tmp_path: Path) -> None:
    (tmp_path / "aube.toml").write_text("# padding\n" * 10_000)
    assert "more than the limit" in _code(lambda: load_manifest(tmp_path)).message
    nested = "a = " + "[" * 5000 + "]" * 5000 + "\n"
    err = _code(lambda: parse_manifest(nested))
    assert err.code == "bundle_invalid_manifest" and "nest too deeply" in err.message


@pytest.mark.parametrize(
    "source",
    ["x = " + "+".join(["1"] * 60_000) + "\n", "x = " + "-" * 100_000 + "1\n", "x = " + "(" * 300 + ")" * 300],
)
def test_fn_nesting_too_deep_to_compile_is_a_syntax_error_not_a_crash(tmp_path: Path, source: str) -> None:
    err = _code(lambda: check_function(_fn(tmp_path, source), Manifest()))
    assert err.code == "bundle_fn_syntax"


def test_big_fn_py_is_not_compiled(tmp_path: Path) -> None:
    source = "def fn(ws):\n    pass\n" + "x = 1\n" * (MAX_FN_BYTES // 6 + 1)
    err = _code(lambda: check_function(_fn(tmp_path, source), Manifest()))
    assert err.code == "bundle_too_large" and "fn.py" in err.message


def test_keys_left_out_take_the_nearest_allowed_value() -> None:
    """An operator range that excludes a default must not refuse every AubeFaaS folder (they have no manifest)."""
    tight = ManifestBounds(
        memory_max=128 * 1024**2,
        cpus_max=0.25,
        pids_max=64,
        max_instances_max=3,
        idle_timeout_max=60.0,
        stream_idle_timeout_max=300.0,
        stream_max_duration_max=3600.0,
        min_free_min=2,
    )
    manifest = parse_manifest(b"", tight)
    assert manifest.limits == LimitsSection(
        memory=str(128 * 1024**2), cpus=0.25, pids=64, stream_idle_timeout=300.0, stream_max_duration=3600.0
    )
    assert (manifest.scaling.max_instances, manifest.scaling.min_free, manifest.scaling.idle_timeout) == (3, 2, 60.0)
    # A key the manifest sets is checked, never moved.
    assert "limits.pids 128" in _code(lambda: parse_manifest(b"[limits]\npids = 128\n", tight)).message
    assert parse_manifest(b"", ManifestBounds()) == Manifest()


def test_docker_never_gets_zero_nano_cpus() -> None:
    from aube.controlplane.bounds import nano_cpus

    assert nano_cpus(1e-12) == 10_000_000  # a record from before the floor: still limited, to 0.01 of a core
    assert nano_cpus(0.25) == 250_000_000
    assert nano_cpus(2) == 2_000_000_000
