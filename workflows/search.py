"""Custom search attributes: what the Web UI and `temporal workflow list --query` filter on.

Registered on the dev server by `starter.py dev up`; in production create them once per
namespace (README, "Operations"). Values are ids, lanes and states, never an address.
"""

from __future__ import annotations

from temporalio import workflow
from temporalio.common import SearchAttributeKey, SearchAttributePair, TypedSearchAttributes

USER_ID = SearchAttributeKey.for_keyword("UserId")
LANE = SearchAttributeKey.for_keyword("Lane")
BATCH_STATE = SearchAttributeKey.for_keyword("BatchState")
PRIORITY = SearchAttributeKey.for_keyword("Priority")
KEYS = (USER_ID, LANE, BATCH_STATE, PRIORITY)

# Workflows begun before these attributes existed replay without the upserts.
PATCH = "search-attributes-v1"

# The database's user batch states as BatchState shows them.
USER_BATCH_STATES = {"receiving": "ingesting", "preparing": "preparing", "queued": "processing"}


def user_batch_state(db_state: str) -> str:
    return USER_BATCH_STATES.get(db_state, db_state)


def at_start(user_id: str, priority: str, lane: str, state: str) -> TypedSearchAttributes:
    """For `start_workflow(search_attributes=...)`: the batch is findable before its first task."""
    return TypedSearchAttributes(
        [
            SearchAttributePair(USER_ID, user_id),
            SearchAttributePair(PRIORITY, priority),
            SearchAttributePair(LANE, lane),
            SearchAttributePair(BATCH_STATE, state),
        ]
    )


def show(values: dict[SearchAttributeKey[str], str]) -> None:
    """Upsert the attributes whose value changed (each upsert is one history event)."""
    current = workflow.info().typed_search_attributes
    changed = [key.value_set(value) for key, value in values.items() if value and current.get(key) != value]
    if changed and workflow.patched(PATCH):
        workflow.upsert_search_attributes(changed)
