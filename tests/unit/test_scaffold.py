"""`aube new`: the template's aube.toml against the real manifest parser, the folders against the real checks."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import msgspec
import pytest

from aube.cli import scaffold
from aube.cli.main import main
from aube.controlplane.manifest import check_function, load_manifest, parse_manifest
from aube.instance.handlers import load_function
from aube.shared.schemas import AccessSection, FunctionSection, LimitsSection, Manifest, ScalingSection

SECTIONS: dict[str, type[msgspec.Struct]] = {
    "function": FunctionSection,
    "scaling": ScalingSection,
    "limits": LimitsSection,
    "access": AccessSection,
}
# A commented-out default: "# key = value", then its explanation after two spaces and "#".
COMMENTED_KEY = re.compile(r"# (?P<key>[a-z0-9_]+) = (?P<value>.+?)\s+# (?P<help>\S.*)")


def commented_defaults(text: str) -> dict[str, dict[str, object]]:
    """Each section's commented-out keys, their values read as TOML (what uncommenting them would set)."""
    found: dict[str, dict[str, object]] = {}
    section = ""
    for line in text.splitlines():
        if header := re.fullmatch(r"\[(\w+)\]", line):
            section = header.group(1)
            found[section] = {}
        elif (match := COMMENTED_KEY.fullmatch(line)) and section:
            assert match["key"] not in found[section], f"{section}.{match['key']} listed twice"
            found[section][match["key"]] = tomllib.loads(f"v = {match['value']}")["v"]
    return found


@pytest.mark.parametrize("style", scaffold.STYLES)
def test_the_template_lists_every_manifest_key_with_its_default(style: scaffold.Style) -> None:
    text = scaffold.manifest_template(style)
    listed = commented_defaults(text)
    assert set(listed) == {*SECTIONS, "env"}
    assert listed["env"] == {}
    for section, struct in SECTIONS.items():
        fields = msgspec.structs.fields(struct)
        assert set(listed[section]) == {f.name for f in fields}, section
        for f in fields:
            default = f.default_factory() if f.default is msgspec.NODEFAULT else f.default
            assert listed[section][f.name] == default, f"{section}.{f.name}"
    # Uncommented, the listed defaults are accepted by the real parser and are exactly the defaults.
    uncommented = "\n".join(
        f"[{section}]\n" + "".join(f"{key} = {scaffold.toml_value(value)}\n" for key, value in keys.items())
        for section, keys in listed.items()
    )
    assert parse_manifest(uncommented) == Manifest()


@pytest.mark.parametrize("style", scaffold.STYLES)
def test_the_template_parses_as_it_is_written(style: scaffold.Style) -> None:
    manifest = parse_manifest(scaffold.manifest_template(style))
    if style == "command":
        command = FunctionSection(runtime="command", command=["python3", "-u", "main.py"])
        assert manifest == Manifest(function=command)
    else:
        assert manifest == Manifest()


def test_key_help_describes_exactly_the_schema() -> None:
    for section, struct in SECTIONS.items():
        assert set(scaffold.KEY_HELP[section]) == set(struct.__struct_fields__), section
    assert set(scaffold.SECTION_HELP) == set(Manifest.__struct_fields__)


@pytest.mark.parametrize("style", scaffold.STYLES)
def test_a_new_folder_passes_the_upload_checks_and_has_its_style(style: scaffold.Style, tmp_path: Path) -> None:
    folder = tmp_path / "deep" / "hello"
    written = scaffold.create_function_folder(folder, style)
    assert sorted(p.name for p in folder.iterdir()) == written
    manifest = load_manifest(folder)
    check_function(folder, manifest)  # what the control plane checks at upload
    if style == "command":
        assert manifest.function.runtime == "command" and (folder / manifest.function.command[2]).is_file()
    else:
        assert load_function(folder, module_name=f"aube_template_{style}").style == style


def test_aube_new_refuses_a_folder_that_is_not_empty(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    assert main(["new", str(taken)]) == 1
    assert "exists and is not empty" in capsys.readouterr().err
    assert [p.name for p in taken.iterdir()] == ["notes.txt"]
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert main(["new", str(a_file)]) == 1
    assert "is not a folder" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["new", str(empty), "--style", "generator"]) == 0
    out = capsys.readouterr().out
    assert "aube deploy" in out and "aube connect empty" in out
    assert sorted(p.name for p in empty.iterdir()) == ["aube.toml", "fn.py"]


def test_toml_values() -> None:
    assert [scaffold.toml_value(v) for v in (True, 900.0, 0.5, 10, "1m", [], ["a", "b"])] == [
        "true", "900", "0.5", "10", '"1m"', "[]", '["a", "b"]',
    ]  # fmt: skip
