"""``claudemesh install`` / ``uninstall`` and the hooks, in a temporary HOME only."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from claudemesh.clients.mcp import install as inst
from claudemesh.clients.mcp import paths

USER_CONFIG = {
    "numStartups": 12,
    "projects": {"/somewhere": {"allowedTools": []}},
    "mcpServers": {"other": {"type": "stdio", "command": "/bin/other", "args": []}},
}
USER_SETTINGS = {
    "model": "opus",
    "hooks": {
        "SessionStart": [{"hooks": [{"type": "command", "command": "echo mine"}]}],
        "PreToolUse": [{"matcher": "Bash", "hooks": [{"type": "command", "command": "x"}]}],
    },
}


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    h = tmp_path / "home"
    h.mkdir()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("HOME", str(h))
    monkeypatch.setenv("PATH", str(bin_dir))  # no `claude` here unless a test puts one
    monkeypatch.chdir(h)
    assert Path.home() == h
    return h


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=4))


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def snapshot(home: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(home)): p.read_bytes()
        for p in sorted(home.rglob("*"))
        if p.is_file() and not p.name.endswith(".claudemesh.bak")
    }


def test_install_twice_then_uninstall_restores_the_user_files(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_json(home / ".claude.json", USER_CONFIG)
    write_json(home / ".claude" / "settings.json", USER_SETTINGS)
    os.chmod(home / ".claude.json", 0o600)
    original_config = (home / ".claude.json").read_bytes()

    inst.install()
    out = capsys.readouterr().out
    assert inst.START_HINT in out

    config = read_json(home / ".claude.json")
    entry = config["mcpServers"]["claudemesh"]
    assert entry["args"] == ["mcp"]
    assert Path(entry["command"]).is_absolute()
    assert Path(entry["command"]).name == "claudemesh"
    assert config["mcpServers"]["other"] == USER_CONFIG["mcpServers"]["other"]
    assert config["numStartups"] == 12
    assert config["projects"] == USER_CONFIG["projects"]
    assert (home / ".claude.json").stat().st_mode & 0o777 == 0o600
    assert (home / ".claude.json.claudemesh.bak").read_bytes() == original_config

    settings = read_json(home / ".claude" / "settings.json")
    assert settings["model"] == "opus"
    assert settings["hooks"]["PreToolUse"] == USER_SETTINGS["hooks"]["PreToolUse"]
    session_start = settings["hooks"]["SessionStart"]
    assert session_start[0] == USER_SETTINGS["hooks"]["SessionStart"][0]
    for event, arg in inst.HOOK_EVENTS.items():
        commands = [h["command"] for g in settings["hooks"][event] for h in g["hooks"]]
        assert commands[-1] == inst.hook_command(arg)
    skill = home / ".claude" / "skills" / "claudemesh" / "SKILL.md"
    assert skill.read_text().startswith("---\nname: claudemesh\n")
    assert "claudemesh message send" in skill.read_text()

    after_first = snapshot(home)
    inst.install()
    assert "nothing changed" in capsys.readouterr().out
    assert snapshot(home) == after_first

    inst.uninstall()
    assert read_json(home / ".claude.json") == USER_CONFIG
    assert read_json(home / ".claude" / "settings.json") == USER_SETTINGS
    assert not skill.exists()
    assert not skill.parent.exists()
    assert inst.check()["installed"] is False

    inst.uninstall()
    assert "nothing changed" in capsys.readouterr().out.splitlines()[-1]


def test_install_into_an_empty_home_and_back(home: Path) -> None:
    inst.install()
    assert set(read_json(home / ".claude.json")) == {"mcpServers"}
    assert (home / ".claude" / "settings.json").stat().st_mode & 0o777 == 0o600
    inst.uninstall()
    assert not (home / ".claude.json").exists()
    assert not (home / ".claude" / "settings.json").exists()
    assert not (home / ".claude" / "skills" / "claudemesh").exists()


def test_a_changed_skill_is_kept(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    inst.install()
    skill = home / ".claude" / "skills" / "claudemesh" / "SKILL.md"
    skill.write_text("my own notes")
    inst.uninstall(json=True)
    result = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert result["kept_modified"] == [str(skill)]
    assert skill.read_text() == "my own notes"


def test_bad_json_is_refused_and_left_alone(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (home / ".claude.json").write_text("{not json")
    with pytest.raises(SystemExit) as exc:
        inst.install()
    assert exc.value.code == 1
    assert "not valid JSON" in capsys.readouterr().err
    assert (home / ".claude.json").read_text() == "{not json"


def test_json_output(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    inst.install(json=True)
    result = json.loads(capsys.readouterr().out)
    assert result["installed"] is True
    assert str(home / ".claude.json") in result["changed"]


def test_project_scope(home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    project = tmp_path / "proj"
    project.mkdir()
    monkeypatch.chdir(project)
    inst.install(scope="project")
    assert read_json(project / ".mcp.json")["mcpServers"]["claudemesh"]["args"] == ["mcp"]
    assert (project / ".claude" / "settings.json").exists()
    assert not (home / ".claude.json").exists()
    inst.uninstall(scope="project")
    assert not (project / ".mcp.json").exists()


def test_check_reports_problems_for_doctor(home: Path) -> None:
    assert inst.check() == {
        "installed": False,
        "problems": [],
        "path": str(home / ".claude.json"),
    }
    inst.install()
    assert inst.check()["problems"] == []
    config = read_json(home / ".claude.json")
    config["mcpServers"]["claudemesh"]["command"] = "/gone/claudemesh"
    write_json(home / ".claude.json", config)
    (home / ".claude" / "skills" / "claudemesh" / "SKILL.md").unlink()
    problems = inst.check()["problems"]
    assert any("/gone/claudemesh" in p for p in problems)
    assert any("skill" in p for p in problems)


def test_the_claude_cli_is_used_when_present(home: Path, tmp_path: Path) -> None:
    log = tmp_path / "claude.log"
    fake = tmp_path / "bin" / "claude"
    fake.write_text(
        textwrap.dedent(
            f"""\
            #!{sys.executable}
            import json, os, sys
            args = sys.argv[1:]
            open({str(log)!r}, "a").write(json.dumps(args) + "\\n")
            path = os.path.join(os.environ["HOME"], ".claude.json")
            cfg = json.load(open(path)) if os.path.exists(path) else {{}}
            servers = cfg.setdefault("mcpServers", {{}})
            if args[1] == "add-json":
                servers[args[-2]] = json.loads(args[-1])
            elif args[1] == "remove":
                if args[-1] not in servers:
                    sys.exit(1)
                del servers[args[-1]]
            json.dump(cfg, open(path, "w"))
            """
        )
    )
    fake.chmod(0o755)
    inst.install()
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert calls[0][:2] == ["mcp", "remove"]
    assert calls[1][:4] == ["mcp", "add-json", "--scope", "user"]
    assert calls[1][4] == "claudemesh"
    assert json.loads(calls[1][5]) == inst.server_entry()
    inst.install()
    assert len(log.read_text().splitlines()) == 2  # already registered: no call
    inst.uninstall()
    assert json.loads(log.read_text().splitlines()[-1])[:2] == ["mcp", "remove"]
    assert "claudemesh" not in read_json(home / ".claude.json")["mcpServers"]


# ---- the hook commands ---------------------------------------------------------------


def run_hook(
    home: Path, event: str, stdin: bytes, *, shell: bool = False
) -> subprocess.CompletedProcess[bytes]:
    env = {**os.environ, "CLAUDEMESH_HOME": str(home)}
    argv = [sys.executable, "-m", inst.HOOK_MARK, event]
    if shell:  # as Claude Code runs it; `; exit` keeps sh from exec-ing python
        argv = ["sh", "-c", " ".join(argv) + '; exit "$?"']
    return subprocess.run(
        argv,
        input=stdin,
        env=env,
        capture_output=True,
        timeout=30,
        check=False,
    )


@pytest.mark.parametrize("shell", [False, True])
def test_session_start_hook_binds_the_claude_session(tmp_path: Path, shell: bool) -> None:
    cm_home = tmp_path / "cm"
    data = {"session_id": "4f1c-uuid", "cwd": "/work/x", "source": "resume"}
    done = run_hook(cm_home, "session-start", json.dumps(data).encode(), shell=shell)
    assert done.returncode == 0
    assert done.stdout == b""
    bind = paths.session_bind_file(cm_home, os.getpid())
    assert read_json(bind) == {"session_id": "4f1c-uuid", "cwd": "/work/x", "source": "resume"}
    assert bind.stat().st_mode & 0o777 == 0o600
    assert bind.parent.stat().st_mode & 0o777 == 0o700


@pytest.mark.parametrize(
    ("event", "stdin"),
    [
        ("session-start", b"\xff garbage"),
        ("session-start", b"[1]"),
        ("prompt-submit", b'{"session_id": "s"}'),  # no daemon: nothing to tell
        ("stop", b""),
        ("no-such-event", b"{}"),
    ],
)
def test_hooks_always_exit_0_and_stay_quiet(tmp_path: Path, event: str, stdin: bytes) -> None:
    done = run_hook(tmp_path / "cm", event, stdin)
    assert done.returncode == 0
    assert done.stdout == b""


def test_process_info_from_proc_and_from_ps_agree() -> None:
    from claudemesh.clients.mcp.paths import _proc_info, _ps_info

    me = _proc_info(os.getpid())
    assert me is not None
    assert me[1] == os.getppid()
    if shutil.which("ps", path=os.defpath + ":/usr/bin:/bin"):
        assert _ps_info(os.getpid()) == me  # the macOS path, checked here too


def test_a_hook_event_that_is_not_a_list_is_refused_and_left_alone(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = home / ".claude" / "settings.json"
    write_json(settings, {"hooks": {"SessionStart": "not a list"}})
    write_json(home / ".claude.json", {"theme": "dark"})
    before = snapshot(home)
    with pytest.raises(SystemExit) as exc:
        inst.install()
    assert exc.value.code == 1
    assert "SessionStart" in capsys.readouterr().err
    assert snapshot(home) == before  # not split into characters, nothing half-installed
