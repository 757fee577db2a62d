-- `lane.resumed` (a scheduler's pause ended) is recorded by an activity like `lane.paused`: once
-- per activity execution, so a retry after its commit does not notify subscribers twice.
drop index events_lane_once;
create unique index events_lane_once on events (kind, subject)
    where kind in ('lane.paused', 'lane.resumed', 'credits.exhausted') and subject <> '';
