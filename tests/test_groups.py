"""Group names and the queues they route to, in process."""

from __future__ import annotations

import pytest

from download_client.arguments import parse
from download_client.errors import PermanentError
from download_client.groups import DEFAULT_GROUP, check_group, group_queue, split_group
from download_client.lanes import home_queue, urgent_lane, woken_lane


def test_a_download_without_a_group_is_the_default_groups_and_stays_in_its_queue():
    assert parse((), {"url": "https://example.com/a"}).group == DEFAULT_GROUP
    assert group_queue("celery", DEFAULT_GROUP) == "celery"
    assert group_queue("celery", "thumbs") == "celery.group-thumbs"


@pytest.mark.parametrize(
    ("value", "says"),
    [
        (3, "group: expected a string, got int"),
        ("", "group: '' is not a group name"),
        ("Thumbs", "group: 'Thumbs' is not a group name"),
        ("a.b", "group: 'a.b' is not a group name"),
        ("-x", "group: '-x' is not a group name"),
        ("x" * 41, "is not a group name"),
    ],
)
def test_a_bad_group_is_refused_with_its_reason(value, says):
    with pytest.raises(PermanentError, match=says.replace("(", r"\(").replace(".", r"\.")):
        parse((), {"url": "https://example.com/a", "group": value})
    with pytest.raises(PermanentError):
        check_group(value)


def test_a_group_queue_names_its_queue_and_shares_its_lanes():
    name = group_queue("downloads.eu", "crawl_2")
    assert split_group(name) == ("downloads.eu", "crawl_2")
    assert split_group("downloads.eu") == ("downloads.eu", DEFAULT_GROUP)
    assert woken_lane(name) == "downloads.eu.woken" and urgent_lane(name) == "downloads.eu.urgent"
    # Named like a lane, a group is still a group: its queue is not a lane.
    urgent = group_queue("q", "urgent")
    assert home_queue(urgent) == urgent and woken_lane(urgent) == "q.woken"
