"""`sidecar iptables`: the rules (pure), the dry run, and how a run fails.

These never touch the real nat table: runs go through a stand-in `iptables` script that records its
argv. The real network-namespace test is separate.
"""
from __future__ import annotations

import shlex
import subprocess

import pytest

from sidecar.cli import main
from sidecar.iptables import CHAIN, clean_rules, rules

NAT = ["iptables", "-t", "nat"]


def test_rules_build_the_chain_then_hook_it():
    assert rules(15006, 1337, [5432, 6379]) == [
        [*NAT, "-N", "SIDECAR_OUTPUT"],
        [*NAT, "-A", "SIDECAR_OUTPUT", "-m", "owner", "--uid-owner", "1337", "-j", "RETURN"],
        [*NAT, "-A", "SIDECAR_OUTPUT", "-o", "lo", "-j", "RETURN"],
        [*NAT, "-A", "SIDECAR_OUTPUT", "-d", "127.0.0.1/32", "-j", "RETURN"],
        [*NAT, "-A", "SIDECAR_OUTPUT", "-p", "tcp", "--dport", "5432", "-j", "RETURN"],
        [*NAT, "-A", "SIDECAR_OUTPUT", "-p", "tcp", "--dport", "6379", "-j", "RETURN"],
        [*NAT, "-A", "SIDECAR_OUTPUT", "-p", "tcp", "-j", "REDIRECT", "--to-ports", "15006"],
        [*NAT, "-A", "OUTPUT", "-p", "tcp", "-j", "SIDECAR_OUTPUT"],
    ]


def test_clean_rules_undo_the_hook_and_the_chain():
    assert clean_rules() == [
        [*NAT, "-D", "OUTPUT", "-p", "tcp", "-j", CHAIN],
        [*NAT, "-F", CHAIN],
        [*NAT, "-X", CHAIN],
    ]


@pytest.mark.parametrize("bad", [dict(proxy_port=0), dict(proxy_port=70000), dict(proxy_uid=-1),
                                 dict(exclude_ports=[0])])
def test_rules_reject_nonsense(bad):
    with pytest.raises(ValueError):
        rules(**({"proxy_port": 15006, "proxy_uid": 1337, "exclude_ports": []} | bad))


def test_dry_run_prints_a_runnable_idempotent_script(capsys):
    assert main(["iptables", "--dry-run", "--proxy-port", "15006", "--proxy-uid", "1337",
                 "--exclude-port", "5432"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    # First remove what a previous run left (failures ignored), then rebuild.
    assert lines[:3] == [f"{shlex.join(argv)} 2>/dev/null || true" for argv in clean_rules()]
    assert lines[3:] == [shlex.join(argv) for argv in rules(15006, 1337, [5432])]
    assert "iptables -t nat -A SIDECAR_OUTPUT -m owner --uid-owner 1337 -j RETURN" in lines
    assert lines.index("iptables -t nat -A SIDECAR_OUTPUT -p tcp -j REDIRECT --to-ports 15006") \
        > lines.index("iptables -t nat -A SIDECAR_OUTPUT -m owner --uid-owner 1337 -j RETURN")
    assert lines[-1] == "iptables -t nat -A OUTPUT -p tcp -j SIDECAR_OUTPUT"
    assert subprocess.run(["sh", "-n"], input=out, text=True).returncode == 0


def test_dry_run_clean(capsys):
    assert main(["iptables", "--dry-run", "--clean"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 3


def test_missing_iptables_is_a_clear_error(tmp_path, capsys):
    assert main(["iptables", "--iptables", str(tmp_path / "iptables")]) == 1
    err = capsys.readouterr().err
    assert "not found" in err and "Traceback" not in err


def _fake_iptables(tmp_path, body: str):
    log = tmp_path / "calls"
    script = tmp_path / "iptables"
    script.write_text(f'#!/bin/sh\necho "$@" >> {log}\n{body}\n')
    script.chmod(0o755)
    return script, log


def test_not_permitted_is_a_clear_error(tmp_path, capsys):
    script, log = _fake_iptables(
        tmp_path, 'echo "iptables v1.8.9 (nf_tables): Could not fetch rule set generation id: '
                  'Permission denied (you must be root)" >&2; exit 4')
    assert main(["iptables", "--iptables", str(script)]) == 1
    err = capsys.readouterr().err
    assert "Permission denied" in err and "NET_ADMIN" in err
    assert log.read_text().splitlines() == ["-t nat -S OUTPUT"]       # stopped at the read-only check


def test_a_run_cleans_up_then_builds(tmp_path, capsys):
    # Cleanup commands fail on a fresh pod (nothing to delete): ignored. Everything else must succeed.
    script, log = _fake_iptables(tmp_path, 'case "$3" in -D|-F|-X) exit 1;; esac; exit 0')
    assert main(["iptables", "--iptables", str(script), "--proxy-port", "15006"]) == 0
    calls = log.read_text().splitlines()
    expected = [["-t", "nat", "-S", "OUTPUT"]] + [a[1:] for a in clean_rules()] + [a[1:] for a in rules(15006, 1337)]
    assert calls == [" ".join(a) for a in expected]
    assert "installed" in capsys.readouterr().err


def test_a_failing_rule_fails_the_run(tmp_path, capsys):
    script, _ = _fake_iptables(tmp_path, 'case "$*" in *REDIRECT*) echo "No chain/target/match" >&2; exit 1;; esac')
    assert main(["iptables", "--iptables", str(script)]) == 1
    assert "REDIRECT" in capsys.readouterr().err
