"""`sitefit deliveries list|resend` against a delivery store in a temporary home."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sitefit.cli import main
from sitefit.deliveries import DeliveryStore
from sitefit.jobs import new_job_id
from sitefit.settings import Settings


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


@pytest.fixture
def store(home: Path) -> DeliveryStore:
    return DeliveryStore.from_settings(Settings(home=home))


def failed(store: DeliveryStore, destination: str = "pacs") -> str:
    delivery = store.add(new_job_id(), destination)
    claim = store.claim(delivery.id)
    assert claim is not None
    store.fail(claim, "association rejected by PACS")
    return delivery.id


def test_list(store: DeliveryStore, home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "deliveries", "list", "--home", str(home))
    assert code == 0 and out.strip() == "no deliveries"
    bad = failed(store)
    waiting = store.add(new_job_id(), "web")
    code, out, _ = run(capsys, "deliveries", "list", "--home", str(home))
    header, *rows = out.strip().splitlines()
    assert header.split()[:5] == ["ID", "JOB", "DESTINATION", "STATUS", "TRIES"]
    assert rows[0].startswith(waiting.id) and f"{waiting.job_id}  web" in rows[0]
    assert rows[1].startswith(bad) and rows[1].endswith("association rejected by PACS")
    code, out, _ = run(capsys, "deliveries", "list", "--status", "failed", "--home", str(home))
    assert [line.split()[0] for line in out.strip().splitlines()[1:]] == [bad]
    code, out, _ = run(capsys, "deliveries", "list", "--status", "dropped", "--home", str(home))
    assert out.strip() == "no dropped deliveries"
    code, out, _ = run(capsys, "deliveries", "list", "--json", "--home", str(home))
    assert [item["status"] for item in json.loads(out)] == ["pending", "failed"]
    with pytest.raises(SystemExit):
        main(["deliveries", "list", "--status", "lost", "--home", str(home)])


def test_resend_ids(store: DeliveryStore, home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    first, second = failed(store), failed(store, "web")
    code, out, err = run(capsys, "deliveries", "resend", first, "--home", str(home))
    assert code == 0 and out.startswith(f"resent {first}") and err == ""
    assert store.get(first).status == "pending" and store.get(second).status == "failed"
    # one already pending, one unknown, one failed: the failed one is resent, exit status 1
    code, out, err = run(
        capsys, "deliveries", "resend", first, "0" * 24, second, "--home", str(home)
    )
    assert code == 1
    assert out.strip() == f"resent {second} (job {store.get(second).job_id} to web)"
    assert "is pending: only a failed delivery can be resent" in err
    assert f"unknown delivery '{'0' * 24}'" in err
    assert store.get(second).status == "pending"


def test_resend_all_failed(
    store: DeliveryStore, home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, "deliveries", "resend", "--all-failed", "--home", str(home))
    assert code == 0 and out.strip() == "no failed deliveries"
    ids = {failed(store), failed(store)}
    waiting = store.add(new_job_id(), "pacs")
    code, out, _ = run(
        capsys, "deliveries", "resend", "--all-failed", "--json", "--home", str(home)
    )
    assert code == 0 and {item["id"] for item in json.loads(out)} == ids
    assert {d.status for d in store.records()} == {"pending"}
    assert store.get(waiting.id).attempts == 0


def test_resend_needs_ids_or_all_failed(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "deliveries", "resend", "--home", str(home))
    assert code == 1 and "give delivery ids or --all-failed" in err
    code, _, err = run(
        capsys, "deliveries", "resend", "a" * 24, "--all-failed", "--home", str(home)
    )
    assert code == 1 and "not both" in err


def test_home_comes_from_the_environment(
    store: DeliveryStore,
    home: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bad = failed(store)
    monkeypatch.setenv("SITEFIT_HOME", str(home))
    code, out, _ = run(capsys, "deliveries", "list", "--status", "failed")
    assert code == 0 and bad in out
