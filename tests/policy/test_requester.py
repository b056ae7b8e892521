"""The requester matcher (`match: requester:`); its journal fields: tests/contract/."""

from __future__ import annotations

import pytest

from kmodd.policy.requester import RequesterFacts, RequesterMatcher

ROOT = RequesterFacts(uid=0, euid=0, gid=0, unit="cron.service")
NOBODY = RequesterFacts(uid=65534, euid=65534, gid=65534, groups=(100,), unit="session-3.scope")
SETUID = RequesterFacts(uid=1000, euid=0, gid=1000)  # mount(8) run by a user
CONTAINED = RequesterFacts(uid=100000, euid=100000, gid=100000, container=True)


@pytest.mark.parametrize(
    ("matcher", "yes", "no"),
    [
        (RequesterMatcher.compile(unprivileged=True), [NOBODY, SETUID, CONTAINED], [ROOT]),
        (RequesterMatcher.compile(unprivileged=False), [ROOT], [NOBODY, SETUID]),
        (RequesterMatcher.compile(uid=[0, 1000]), [ROOT, SETUID], [NOBODY]),
        (RequesterMatcher.compile(gid=[100]), [NOBODY], [ROOT, SETUID]),
        (RequesterMatcher.compile(unit=["cron.*", "session-*"]), [ROOT, NOBODY], [SETUID]),
        (RequesterMatcher.compile(container=True), [CONTAINED], [ROOT, NOBODY]),
        (
            RequesterMatcher.compile(unprivileged=True, container=False),
            [NOBODY, SETUID],
            [ROOT, CONTAINED],
        ),
    ],
)
def test_matches(
    matcher: RequesterMatcher, yes: list[RequesterFacts], no: list[RequesterFacts]
) -> None:
    assert [matcher.matches(f) for f in yes] == [True] * len(yes)
    assert [matcher.matches(f) for f in no] == [False] * len(no)
    assert not matcher.matches(None)  # unknown requester: a requester rule never applies
