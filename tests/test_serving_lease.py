"""A replica's serving lease without Ray: renewals and exclusions ordered by (epoch, generation),
one reconfirmation for many concurrent requests, and no weights loaded on the serving path."""

from __future__ import annotations

import threading
from typing import Any

from actors.serving_lease import LeaseVerdict, ServingLease


def member(epoch: int = 1, generation: int = 1, active: int = 0) -> dict[str, Any]:
    return {"member": True, "epoch": epoch, "generation": generation, "active_version": active}


def test_a_renewal_older_than_the_exclusion_cannot_undo_it() -> None:
    """Loose end 1: ``renew_lease`` cleared the exclusion unconditionally, so a renewal sent before
    ``exclude`` and landing after it re-admitted an excluded replica."""
    lease = ServingLease(10.0, confirm=lambda: {"member": None})  # coordinator unreachable
    assert lease.renew(epoch=1, lease_s=10.0, generation=1)
    assert lease.exclude(epoch=1, generation=2)
    assert not lease.renew(epoch=1, lease_s=10.0, generation=1)  # the late renewal
    assert lease.check(version=3) == (LeaseVerdict.EXCLUDED, 3)
    assert lease.renew(epoch=1, lease_s=10.0, generation=3)  # a real re-admission
    assert lease.check(version=3) == (LeaseVerdict.SERVE, 3)


def test_an_exclusion_older_than_a_readmission_is_ignored() -> None:
    lease = ServingLease(10.0, confirm=lambda: member())
    lease.renew(epoch=1, lease_s=10.0, generation=3)
    assert not lease.exclude(epoch=1, generation=2)
    assert lease.check(version=0)[0] is LeaseVerdict.SERVE


def test_a_new_coordinator_epoch_outranks_any_generation_of_the_old_one() -> None:
    lease = ServingLease(10.0, confirm=lambda: member())
    lease.exclude(epoch=1, generation=40)
    assert lease.renew(epoch=2, lease_s=10.0, generation=1)
    assert lease.check(version=0)[0] is LeaseVerdict.SERVE


def test_an_expired_lease_is_reconfirmed_once_for_many_concurrent_requests() -> None:
    """Loose end 7: every serving thread called ``confirm`` at once when a lease expired."""
    calls: list[int] = []
    release = threading.Event()
    asked = threading.Event()

    def confirm() -> dict[str, Any]:
        calls.append(1)
        asked.set()
        release.wait(10)
        return member()

    lease = ServingLease(10.0, confirm)
    verdicts: list[tuple[LeaseVerdict, int]] = []
    threads = [threading.Thread(target=lambda: verdicts.append(lease.check(version=0))) for _ in range(8)]
    threads[0].start()
    assert asked.wait(10)
    for t in threads[1:]:
        t.start()
    release.set()
    for t in threads:
        t.join(10)
    assert len(calls) == 1
    assert verdicts == [(LeaseVerdict.SERVE, 0)] * 8
    assert lease.check(version=0) == (LeaseVerdict.SERVE, 0)  # from memory: no second call
    assert len(calls) == 1


def test_a_member_found_behind_is_told_to_catch_up_instead_of_serving() -> None:
    """Loose end 7: the reconfirming request ran ``sync_to`` itself, loading from the store inside
    the request. Now the lease only says BEHIND; the replica catches up off the serving path."""
    lease = ServingLease(10.0, confirm=lambda: member(active=7))
    assert lease.check(version=5) == (LeaseVerdict.BEHIND, 7)


def test_a_member_ahead_of_a_lagging_log_serves_its_own_version() -> None:
    lease = ServingLease(10.0, confirm=lambda: member(active=4))
    assert lease.check(version=5) == (LeaseVerdict.SERVE, 5)


def test_a_non_member_is_excluded_and_asks_again_later() -> None:
    answers = iter([{"member": False, "epoch": 1, "generation": 2, "active_version": 0},
                    member(generation=3)])
    lease = ServingLease(10.0, confirm=lambda: next(answers))
    assert lease.check(version=0)[0] is LeaseVerdict.EXCLUDED
    assert lease.check(version=0)[0] is LeaseVerdict.EXCLUDED  # within the recheck interval: from memory
    assert lease.left_s() > 0


def test_an_unreachable_coordinator_lets_a_member_serve_on_but_not_an_excluded_one() -> None:
    def down() -> dict[str, Any]:
        raise ConnectionError("coordinator restarting")

    lease = ServingLease(10.0, down)
    assert lease.check(version=0)[0] is LeaseVerdict.SERVE
    excluded = ServingLease(10.0, down)
    excluded.exclude(epoch=1, generation=1)
    assert excluded.check(version=0)[0] is LeaseVerdict.EXCLUDED


def test_an_answer_overtaken_by_a_newer_exclusion_does_not_readmit() -> None:
    lease = ServingLease(10.0, confirm=lambda: {"member": True, "epoch": 1, "generation": 1,
                                                 "active_version": 0})
    lease.exclude(epoch=1, generation=2)
    assert lease.check(version=0)[0] is LeaseVerdict.EXCLUDED
